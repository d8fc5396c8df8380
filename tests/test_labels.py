"""Label files and row checks (schemas.labels)."""

import pytest

from schemas import labels


def test_parse_labeled_and_unlabeled_tables():
    rows = labels.parse_label_table("Id,Target\na,0 25\nb,3\n\n", "train", "/in")
    assert [(r.id, r.target, r.line) for r in rows] == [("a", "0 25", 2), ("b", "3", 3)]
    rows = labels.parse_label_table("\ufeffId,Predicted\nx,\ny,0\n", "test", "/in")
    assert [(r.id, r.target) for r in rows] == [("x", None), ("y", None)]


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "empty"),
        ("   \n", "empty"),
        ("Name,Target\na,1\n", "no `Id`"),
        ("Id,Label\na,1\n", "neither"),
        ("Id,Target\n", "no rows"),
    ],
)
def test_bad_tables_raise_before_work(text, match):
    with pytest.raises(labels.LabelFileError, match=match):
        labels.parse_label_table(text, "s", "/in")


@pytest.mark.parametrize("bad", ["../x", "/etc/x", "a/b", "a\\b", "..", ".hidden", "", "a b", "x\0y", "a..b"])
def test_hostile_ids_rejected(bad):
    with pytest.raises(labels.RowRejected) as e:
        labels.check_id(bad)
    assert e.value.reason == labels.BAD_ID


@pytest.mark.parametrize("good", ["00070df0-bbc3-11e8-b2bc-ac1f6b6435d0", "10580_1610_C1_1", "s0001", "a.b"])
def test_plain_ids_accepted(good):
    labels.check_id(good)


@pytest.mark.parametrize(
    "target, reason",
    [
        ("", labels.MALFORMED_TARGET),
        ("a b", labels.MALFORMED_TARGET),
        ("1,2", labels.MALFORMED_TARGET),
        ("28", labels.LABEL_OUT_OF_RANGE),
        ("-1", labels.LABEL_OUT_OF_RANGE),
        ("0 99", labels.LABEL_OUT_OF_RANGE),
    ],
)
def test_bad_targets(target, reason):
    with pytest.raises(labels.RowRejected) as e:
        labels.parse_target(target)
    assert e.value.reason == reason


def test_parse_target_sorts_and_dedupes():
    assert labels.parse_target(" 25  0 25 ") == (0, 25)


def test_duplicates_resolved_independently_of_order():
    a = labels.CheckedRow("train", "/in", "x", (1,), True)
    b = labels.CheckedRow("train", "/in", "x", (2,), True)
    kept, rejected = labels.resolve_duplicates([a, a, a])
    assert kept == a and len(rejected) == 2
    for order in ([a, b], [b, a]):
        kept, rejected = labels.resolve_duplicates(order)
        assert kept is None and len(rejected) == 2


def test_count_label_rows_checks_like_parse_and_keeps_nothing():
    text = "Id,Target\na,0 25\n\nb,3\n"
    assert labels.count_label_rows(text) == len(labels.parse_label_table(text, "s", "/in")) == 2
    with pytest.raises(labels.LabelFileError, match="line 3"):
        labels.count_label_rows("Id,Target\na,1\nb,1,extra\n")
    assert [r.line for r in labels.iter_label_rows(text, "s", "/in")] == [2, 4]


def test_groups_table_refuses_empty_or_missing_groups_naming_their_lines():
    assert labels.parse_groups_table("Id,Group\na,g\nb,g\n\nc,h\n") == {"a": "g", "b": "g", "c": "h"}
    with pytest.raises(labels.LabelFileError, match=r"line\(s\) 3, 5$"):
        labels.parse_groups_table("Id,Group\na,g\nb,\nc,h\nd, \n")
    with pytest.raises(labels.LabelFileError, match="line 3: 1 column"):
        labels.parse_groups_table("Id,Group\na,g\nb\n")
    with pytest.raises(labels.LabelFileError, match="needs a header"):
        labels.parse_groups_table("Id,Cluster\na,g\n")
