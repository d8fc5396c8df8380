"""Label files and Ids: reading `Id,Target` (or `Id,Predicted`) tables and checking each row.

Table-level problems (empty file, missing columns, unreadable file) raise `LabelFileError` before any work
starts. Row-level problems (hostile Id, malformed Target, label out of range, duplicate Id) become rejected
rows with a reason, so every input row is accounted for.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import re
from typing import Iterator

import schemas

# Reason codes of rejected rows.
BAD_ID = "bad_id"
MALFORMED_TARGET = "malformed_target"
LABEL_OUT_OF_RANGE = "label_out_of_range"
DUPLICATE_ID = "duplicate_id"

# Ids are file-name stems: letters, digits, '-', '_', '.', not starting with '.', so `{Id}_{stain}.png`
# can never name a file outside the input folder (`../x`, `/etc/x`, `a/b` are all refused).
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")


class LabelFileError(ValueError):
    """A label file that cannot be used at all (the job stops before doing any work)."""


@dataclasses.dataclass(frozen=True)
class LabelRow:
    """One row of a label file, as read (not yet checked).

    Attributes:
      source: name of the input set.
      input_dir: folder holding this set's stain images.
      line: 1-based line number in the file (header is line 1), for error messages.
      id: the Id column as written.
      target: the Target column as written, or None for an unlabeled set.
    """

    source: str
    input_dir: str
    line: int
    id: str
    target: str | None


@dataclasses.dataclass(frozen=True)
class CheckedRow:
    """A row that passed the row-level checks: a sample to read."""

    source: str
    input_dir: str
    id: str
    labels: tuple[int, ...]  # sorted class indices; empty when unlabeled
    labeled: bool


class RowRejected(Exception):
    """A row that cannot become a sample; `reason` is a short code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def parse_label_table(text: str, source: str, input_dir: str, path: str = "<labels>") -> list[LabelRow]:
    """Parses the text of a label file into its rows (see `iter_label_rows`).

    Raises:
      LabelFileError: as `iter_label_rows`, or a header without rows.
    """
    rows = list(iter_label_rows(text, source, input_dir, path))
    if not rows:
        raise LabelFileError(f"{path} has a header but no rows")
    return rows


def count_label_rows(text: str, path: str = "<labels>") -> int:
    """Checks a whole label file as `parse_label_table` does, keeping no rows. Returns the number of rows.

    The launchers call it before a job starts (a malformed file stops the job before any work); the rows
    themselves are read again by the workers (`pipelines.transforms.rows.ReadLabelRows`), so the job's graph
    does not grow with the file.
    """
    n = sum(1 for _ in iter_label_rows(text, "", "", path))
    if not n:
        raise LabelFileError(f"{path} has a header but no rows")
    return n


def iter_label_rows(text: str, source: str, input_dir: str, path: str = "<labels>") -> Iterator[LabelRow]:
    """The rows of a label file's text, in file order, each with its line number; blank lines are skipped.

    Accepts the competition's `Id,Target` (labeled) and `Id,Predicted` (sample_submission, unlabeled) forms;
    extra columns are ignored.

    Raises:
      LabelFileError: empty file, no header, no `Id` column / neither `Target` nor `Predicted`, or a line
        that is not CSV (unbalanced quotes, a stray carriage return) or has another number of columns than
        the header; the message names the file and the line.
    """
    if not text.strip():
        raise LabelFileError(f"{path} is empty: expected a header `Id,Target` and one row per sample")
    reader = csv.reader(io.StringIO(text), strict=True)  # lines end at \n only: a lone CR is an error
    try:
        header = [h.strip().lstrip("\ufeff") for h in next(reader)]
    except csv.Error as e:
        raise LabelFileError(f"{path} line {reader.line_num}: {_csv_problem(e)}") from None
    if schemas.CSV_ID not in header:
        raise LabelFileError(f"{path} has no `{schemas.CSV_ID}` column (header: {header})")
    if schemas.CSV_TARGET in header:
        target_col = header.index(schemas.CSV_TARGET)
    elif schemas.CSV_PREDICTED in header:
        target_col = None  # an unlabeled set, like sample_submission.csv
    else:
        raise LabelFileError(
            f"{path} has neither a `{schemas.CSV_TARGET}` column (labeled set) nor a "
            f"`{schemas.CSV_PREDICTED}` column (unlabeled set); header: {header}"
        )
    id_col = header.index(schemas.CSV_ID)
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise LabelFileError(f"{path} line {reader.line_num}: {_csv_problem(e)}") from None
        line = reader.line_num
        if not fields or all(not f.strip() for f in fields):
            continue  # blank line
        if len(fields) != len(header):
            raise LabelFileError(
                f"{path} line {line}: {len(fields)} column(s) where the header has {len(header)} "
                f"({', '.join(header)}); quote fields that hold commas"
            )
        target = None if target_col is None else fields[target_col]
        yield LabelRow(source, input_dir, line, fields[id_col].strip(), target)


def _csv_problem(e: csv.Error) -> str:
    """A plain-words description of a CSV parsing error."""
    msg = str(e)
    if "new-line character" in msg:
        return "a line break (CR) inside a field; save the file with plain line ends"
    if "unexpected end of data" in msg or "expected" in msg and "after" in msg:
        return f"unbalanced quotes ({msg})"
    return msg


def check_id(sample_id: str) -> None:
    """Raises RowRejected unless the Id is a safe file-name stem."""
    if not _SAFE_ID.match(sample_id) or ".." in sample_id:
        raise RowRejected(
            BAD_ID, f"Id {sample_id!r} is not a plain file-name stem (letters, digits, '-', '_', '.')"
        )


def parse_target(target: str) -> tuple[int, ...]:
    """Parses a Target string (`"0 25"`) into sorted unique class indices.

    Raises:
      RowRejected: empty or non-integer Target, or an index outside 0..NUM_CLASSES-1.
    """
    tokens = target.split()
    if not tokens:
        raise RowRejected(MALFORMED_TARGET, "empty Target")
    try:
        values = [int(t) for t in tokens]
    except ValueError:
        raise RowRejected(MALFORMED_TARGET, f"Target {target!r} is not space-separated integers") from None
    bad = [v for v in values if not 0 <= v < schemas.NUM_CLASSES]
    if bad:
        raise RowRejected(
            LABEL_OUT_OF_RANGE, f"Target {target!r} has labels outside 0..{schemas.NUM_CLASSES - 1}"
        )
    return tuple(sorted(set(values)))


def check_row(row: LabelRow) -> CheckedRow:
    """Row-level checks of one label row. Raises RowRejected."""
    check_id(row.id)
    if row.target is None:
        return CheckedRow(row.source, row.input_dir, row.id, (), labeled=False)
    return CheckedRow(row.source, row.input_dir, row.id, parse_target(row.target), labeled=True)


def resolve_duplicates(rows: list[CheckedRow]) -> tuple[CheckedRow | None, list[tuple[CheckedRow, str]]]:
    """Decides what to keep of several rows sharing one Id, independently of their order.

    Identical rows (same source and labels) keep one copy; the others are rejected as repeats. Rows that
    disagree are all rejected: which one is right cannot be known.

    Returns:
      (kept row or None, [(rejected row, detail), ...]).
    """
    if len(rows) == 1:
        return rows[0], []
    distinct = {(r.source, r.labels, r.labeled) for r in rows}
    if len(distinct) == 1:
        return rows[0], [(r, f"repeated row of Id {r.id!r} ({len(rows)} copies, one kept)") for r in rows[1:]]
    desc = "; ".join(f"{s}: {' '.join(map(str, lab)) or '-'}" for s, lab, _ in sorted(distinct))
    return None, [
        (r, f"Id {r.id!r} appears {len(rows)} times with different sources or labels ({desc})") for r in rows
    ]


GROUP_COLUMN = "Group"


def parse_groups_table(text: str, path: str = "<groups>") -> dict[str, str]:
    """Id -> group name from the text of an `Id,Group` file (`--groups_csv`), checked like a label file.

    Raises:
      LabelFileError: no `Id` or `Group` column, a line that is not CSV or has another number of columns
        than the header, or rows whose Id or Group is empty or missing (the message names their lines: an
        empty group name would otherwise put every such row in one group).
    """
    reader = csv.reader(io.StringIO(text), strict=True)
    try:
        header = [h.strip().lstrip("\ufeff") for h in next(reader, [])]
        if schemas.CSV_ID not in header or GROUP_COLUMN not in header:
            raise LabelFileError(f"groups file {path} needs a header `{schemas.CSV_ID},{GROUP_COLUMN}`")
        i, g = header.index(schemas.CSV_ID), header.index(GROUP_COLUMN)
        groups, empty = {}, []
        for fields in reader:
            if not fields or all(not f.strip() for f in fields):
                continue
            if len(fields) != len(header):
                raise LabelFileError(
                    f"groups file {path} line {reader.line_num}: {len(fields)} column(s) where the header "
                    f"has {len(header)}"
                )
            sid, group = fields[i].strip(), fields[g].strip()
            if not sid or not group:
                empty.append(reader.line_num)
            groups[sid] = group
    except csv.Error as e:
        raise LabelFileError(f"groups file {path} line {reader.line_num}: {_csv_problem(e)}") from None
    if empty:
        shown = ", ".join(map(str, empty[:10])) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
        raise LabelFileError(
            f"groups file {path}: empty or missing {schemas.CSV_ID} or {GROUP_COLUMN} on line(s) {shown}"
        )
    return groups
