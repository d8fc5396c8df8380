"""The prediction job's files: Id lists in; the submission, the probabilities and rejected.csv out.

Pure Python/numpy (no TensorFlow), shared by `model.predict` and any other job that writes a submission.
"""

from __future__ import annotations

import csv
import io
from typing import Sequence

import numpy as np

import schemas
from model import fileio
from model.config import VAL_IDS, VAL_SCORES

__all__ = [
    "PROB_CLASS_NAMES",
    "PROB_IDS",
    "PROB_SCORES",
    "PredictError",
    "format_submission",
    "order_by_ids",
    "probabilities_bytes",
    "read_id_list",
    "rejected_csv",
    "rejected_path",
    "submission_rows",
]

# Arrays of the --probabilities .npz: Ids and scores named as in the training job's val_predictions.npz.
PROB_IDS, PROB_SCORES, PROB_CLASS_NAMES = VAL_IDS, VAL_SCORES, "class_names"


class PredictError(ValueError):
    """Bad flags or inputs; the message says what is wrong and what to do."""


def order_by_ids(ids: Sequence[str], scores: np.ndarray, wanted: Sequence[str]) -> np.ndarray:
    """Rows of `scores` (one per Id of `ids`) in the order of `wanted`.

    Args:
      ids: Ids of the scored records.
      scores: [len(ids), C] scores.
      wanted: the Ids to return, in order.

    Raises:
      PredictError: repeated Ids in either list, or Ids of `wanted` without a record.
    """
    ids = [str(i) for i in ids]
    if len(ids) != len(scores):
        raise PredictError(f"{len(ids)} Ids but {len(scores)} rows of scores")
    _check_unique(ids, "the records")
    _check_unique(wanted, "the Id list")
    index = {sid: row for row, sid in enumerate(ids)}
    missing = [sid for sid in wanted if sid not in index]
    if missing:
        raise PredictError(f"{len(missing)} of {len(wanted)} Ids have no scores, e.g. {missing[:5]}")
    return scores[[index[sid] for sid in wanted]]


def _check_unique(ids: Sequence[str], what: str) -> None:
    seen: set[str] = set()
    dup = [i for i in ids if i in seen or seen.add(i)]
    if dup:
        raise PredictError(f"{what} repeat{'s' if len(dup) == 1 else ''} Ids, e.g. {sorted(set(dup))[:5]}")


def submission_rows(ids: Sequence[str], predictions: np.ndarray) -> list[tuple[str, str]]:
    """(Id, Predicted) rows: Predicted is the space-separated class indices of each 0/1 prediction row."""
    predictions = np.asarray(predictions)
    if predictions.shape != (len(ids), schemas.NUM_CLASSES):
        raise PredictError(f"predictions of shape {predictions.shape} do not fit {len(ids)} Ids")
    return [(str(sid), schemas.format_target(row)) for sid, row in zip(ids, predictions, strict=True)]


def format_submission(ids: Sequence[str], predictions: np.ndarray) -> str:
    """The submission file's text: header `Id,Predicted`, one row per Id in the given order."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([schemas.CSV_ID, schemas.CSV_PREDICTED])
    w.writerows(submission_rows(ids, predictions))
    return buf.getvalue()


def read_id_list(path: str) -> list[str]:
    """The Ids of a CSV with an `Id` column (sample_submission.csv, a label file), in file order.

    Raises:
      PredictError: no such file, no `Id` column, no rows, empty or repeated Ids.
    """
    if not fileio.exists(path):
        raise PredictError(f"--ids_csv {path}: no such file")
    reader = csv.DictReader(io.StringIO(fileio.read_text(path)))
    if schemas.CSV_ID not in (reader.fieldnames or []):
        raise PredictError(f"{path}: no `{schemas.CSV_ID}` column (header: {reader.fieldnames})")
    ids = [(row[schemas.CSV_ID] or "").strip() for row in reader]
    if not ids:
        raise PredictError(f"{path} lists no Ids")
    if any(not i for i in ids):
        raise PredictError(f"{path}: row {ids.index('') + 2} has an empty Id")
    try:
        _check_unique(ids, path)
    except PredictError as e:
        raise PredictError(f"{e}: an Id list must name each sample once") from None
    return ids


def probabilities_bytes(path: str, ids: np.ndarray, scores: np.ndarray) -> bytes:
    """The --probabilities file's bytes: an .npz of Ids, scores and class names, or a CSV (Id, classes)."""
    if path.endswith(".npz"):
        buf = io.BytesIO()
        np.savez(
            buf,
            **{
                PROB_IDS: np.asarray(ids, dtype=str),
                PROB_SCORES: scores.astype(np.float32),
                PROB_CLASS_NAMES: np.asarray(schemas.CLASS_NAMES, dtype=str),
            },
        )
        return buf.getvalue()
    text = io.StringIO()
    w = csv.writer(text, lineterminator="\n")
    w.writerow([schemas.CSV_ID, *schemas.CLASS_NAMES])
    for sid, row in zip(ids, scores, strict=True):
        w.writerow([sid, *(f"{v:.6f}" for v in row)])
    return text.getvalue().encode("utf-8")


REJECTED_SUFFIX = ".rejected.csv"


def rejected_path(out: str) -> str:
    """The rejected Ids' file of the submission `out`: `submission.csv` -> `submission.rejected.csv`.

    One per submission, so two submissions written into one folder keep their own.
    """
    stem = out[: -len(".csv")] if out.endswith(".csv") else out
    return stem + REJECTED_SUFFIX


def rejected_csv(rejected: Sequence[tuple[str, str, str]], source: str) -> bytes:
    """rejected.csv's bytes (schemas.REJECTED_COLUMNS) for (Id, reason, detail) rows, in the given order."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(schemas.REJECTED_COLUMNS)
    w.writerows((sid, reason, detail, source) for sid, reason, detail in rejected)
    return buf.getvalue().encode("utf-8")


def preprocessing_reasons(data_dir: str) -> dict[str, tuple[str, str]]:
    """Id -> (reason, detail) of the preprocessing job's rejected.csv in data_dir (empty when absent)."""
    path = fileio.join(data_dir, schemas.REJECTED_FILE)
    if not fileio.exists(path):
        return {}
    out = {}
    for row in csv.DictReader(io.StringIO(fileio.read_text(path))):
        sid = row.get(schemas.CSV_ID)
        if sid:
            detail = row.get(schemas.REJECTED_DETAIL) or ""
            out[sid] = (row.get(schemas.REJECTED_REASON) or "?", f"rejected by preprocessing: {detail}")
    return out
