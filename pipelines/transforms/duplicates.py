"""Near-duplicate groups: a global step over every sample's perceptual hash (FindDuplicates).

The hashes are computed where the stains are decoded anyway (transforms.images.InspectSamples); here they
are collected once, matched without all-pairs comparison (pipelines.near_duplicates), merged with the
--group_id_pattern and --groups_csv groupings, and turned into
  - the {Id: group} side input of the fold assignment (`--duplicates group`; with `report` or `off` only the
    Id pattern and the groups file shape the folds),
  - duplicates.csv (`group,Id,source` for every group of two or more, groups numbered by smallest Id),
  - counts for the manifest.
"""

from __future__ import annotations

import collections
import csv
import io

import apache_beam as beam
import numpy as np

import schemas
from pipelines import storage

GROUP, REPORT, OFF = "group", "report", "off"
MODES = (GROUP, REPORT, OFF)
_EXAMPLES = 20


def _labels_from_names(ids: list[str], names: dict[str, str]) -> np.ndarray:
    """(n,) labels from an {Id: group name} map; Ids without a name are each their own group."""
    keys = [f"g{names[i]}" if i in names else f"\0{i}" for i in ids]
    return np.unique(np.asarray(keys, dtype=object).astype(str), return_inverse=True)[1].ravel()


def group_size_error(
    for_folds: np.ndarray, ids: list[str], labeled: np.ndarray, num_folds: int, max_group_size: int | None
) -> str | None:
    """One line naming the largest fold group when it is larger than allowed, else None.

    A group lands in one fold, so a group over 1 / (2 x folds) of the labeled samples leaves its fold more
    than half again as large as the others (the issue's 10,000 of 31,072 samples: folds [5278 ... 10000]).
    The bound is `max_group_size` when given, else labeled samples // (2 x num_folds). Only labeled members
    count (unlabeled samples get no fold).
    """
    if not labeled.any():
        return None
    sizes = np.bincount(for_folds[labeled], minlength=len(ids))
    largest = int(sizes.argmax())
    size = int(sizes[largest])
    n_labeled = int(labeled.sum())
    bound = max_group_size if max_group_size is not None else n_labeled // (2 * num_folds)
    if size <= max(bound, 1):
        return None
    members = [ids[i] for i in np.flatnonzero((for_folds == largest) & labeled)]
    shown = ", ".join(members[:10]) + (f" and {len(members) - 10} more" if len(members) > 10 else "")
    why = (
        f"--max_group_size {max_group_size}"
        if max_group_size is not None
        else f"{n_labeled} labeled samples / (2 x {num_folds} folds)"
    )
    return (
        f"a group of {size} labeled samples is larger than {bound} ({why}), so its fold could not be "
        f"balanced: {shown}; check --groups_csv, --group_id_pattern and --max_hash_distance, or pass "
        f"--max_group_size {size} to keep it"
    )


def _largest_groups(labels: np.ndarray, ids: list[str], count: int = 5) -> list[dict]:
    """The `count` largest groups (size, first Ids), largest first."""
    sizes = np.bincount(labels, minlength=len(ids)) if len(ids) else np.zeros(0, np.int64)
    top = [int(g) for g in np.argsort(-sizes, kind="stable")[:count] if sizes[g] > 1]
    return [{"size": int(sizes[g]), "ids": [ids[i] for i in np.flatnonzero(labels == g)[:5]]} for g in top]


def find_groups(
    entries: list[tuple[str, str, bool, bytes]],
    mode: str,
    max_distance: int,
    id_pattern: str | None,
    groups: dict[str, str] | None,
    num_folds: int = 5,
    max_group_size: int | None = None,
) -> tuple[dict[str, int] | None, list[tuple[int, str, str]], dict]:
    """The whole step on collected (Id, source, labeled, hash bytes) entries.

    Returns:
      ({Id: group} for the folds (members of groups of two or more only; None when a group is too large,
      see `group_size_error`), duplicates.csv rows, counts).
    """
    from pipelines import near_duplicates as nd

    entries = sorted(entries)
    ids = [e[0] for e in entries]
    n = len(ids)
    fixed = []
    if id_pattern:
        fixed.append(nd.ids_pattern_groups(ids, id_pattern))
    if groups:
        fixed.append(_labels_from_names(ids, groups))
    empty = np.zeros((0, 2), dtype=np.int64)
    base = nd.group_labels(n, empty, *fixed)
    near_pair_count = 0
    if mode == OFF or n == 0:
        merged = base
    else:
        hashes = np.frombuffer(b"".join(e[3] for e in entries), dtype=np.uint64).reshape(n, -1)
        image_groups = nd.duplicate_groups(hashes, max_distance)
        near_pair_count = int(n - len(np.unique(image_groups)))  # samples joined to a group by their image
        merged = nd.group_labels(n, empty, image_groups, *fixed)
    for_folds = merged if mode == GROUP else base

    def multi(labels):
        counts = np.bincount(labels, minlength=n) if n else np.zeros(0, np.int64)
        return {ids[i]: int(g) for i, g in enumerate(labels) if counts[g] > 1}

    members = collections.defaultdict(list)
    for i, g in enumerate(merged):
        members[int(g)].append(i)
    multi_groups = [m for m in members.values() if len(m) > 1]
    multi_groups.sort(key=lambda m: ids[m[0]])  # members are in Id order: number groups by smallest Id
    rows, cross_source, test_matches = [], 0, []
    for number, m in enumerate(multi_groups):
        rows += [(number, ids[i], entries[i][1]) for i in m]
        if len({entries[i][1] for i in m}) > 1:
            cross_source += 1
        labeled = [ids[i] for i in m if entries[i][2]]
        if labeled:
            test_matches += [[ids[i], labeled] for i in m if not entries[i][2]]
    counts = {
        "mode": mode,
        "max_distance": max_distance,
        "group_id_pattern": id_pattern,
        "groups": len(multi_groups),
        "samples_in_groups": sum(len(m) for m in multi_groups),
        "samples_joined_by_image": near_pair_count,
        "groups_across_sources": cross_source,
        "unlabeled_matching_labeled": len(test_matches),
        "unlabeled_matching_labeled_examples": test_matches[:_EXAMPLES],
    }
    labeled = np.array([e[2] for e in entries], dtype=bool)
    error = group_size_error(for_folds, ids, labeled, num_folds, max_group_size) if n else None
    counts["largest_groups"] = _largest_groups(merged, ids)
    counts["group_error"] = error
    return (None if error else multi(for_folds)), rows, counts


def duplicates_csv(rows: list[tuple[int, str, str]]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(schemas.DUPLICATES_COLUMNS)
    w.writerows(rows)
    return buf.getvalue().encode("utf-8")


class _FindFn(beam.DoFn):
    FOLD_GROUPS = "fold_groups"

    def __init__(self, path, mode, max_distance, id_pattern, groups_csv, num_folds, max_group_size):
        self._path = path
        self._args = (mode, max_distance, id_pattern)
        self._groups_csv = groups_csv
        self._fold_args = (num_folds, max_group_size)

    def process(self, entries):
        from schemas import labels as labels_lib

        groups = None
        if self._groups_csv:  # read here, not in the graph: the file may be as long as the label files
            text = storage.read_text(self._groups_csv, "groups file")
            groups = labels_lib.parse_groups_table(text, self._groups_csv)
        fold_groups, rows, counts = find_groups(list(entries), *self._args, groups, *self._fold_args)
        storage.write_bytes(self._path, duplicates_csv(rows))
        yield beam.pvalue.TaggedOutput(self.FOLD_GROUPS, fold_groups)
        yield counts


@beam.ptransform_fn
def FindDuplicates(  # noqa: N802
    hashes,
    path,
    mode=GROUP,
    max_distance=None,
    id_pattern=None,
    groups_csv=None,
    num_folds=5,
    max_group_size=None,
):
    """(Id, source, labeled, hash bytes) of every sample -> counts (main) and `fold_groups` ({Id: group}).

    Writes duplicates.csv to `path`; `groups_csv`: an `Id,Group` file (--groups_csv), read by the worker.
    `fold_groups` is None when a group is too large for `num_folds` folds (counts["group_error"] says why;
    see `group_size_error`): no fold is assigned and nothing is written.
    """
    if max_distance is None:
        from pipelines import near_duplicates as nd

        max_distance = nd.DEFAULT_MAX_DISTANCE
    return (
        hashes
        | "Collect" >> beam.combiners.ToList()
        | "Group"
        >> beam.ParDo(
            _FindFn(path, mode, max_distance, id_pattern, groups_csv, num_folds, max_group_size)
        ).with_outputs(_FindFn.FOLD_GROUPS, main="counts")
    )
