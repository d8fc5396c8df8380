"""The prediction-output rules, once, for `hpa-predict` (model/predict.py) and `hpa-batch-predict`
(pipelines/batch_predict.py): which listed Ids are predicted, rejected, missing a record or extra, and what
the submission and the probabilities hold.

    account(listed, scored Ids, rejected)   -> Accounting: every listed Id predicted or in rejected.csv
    label(accounting, Ids, scores, ...)     -> Labelled: the submission's rows and the probabilities' rows

Pure numpy (no TensorFlow, no Beam). The rules:
- the listed Ids are the Id list (--ids_csv) in its order, else every Id scored or rejected, sorted;
- a listed Id is rejected when the job rejected it (its images) or, where the caller names a reason for it,
  when no record holds it (NO_RECORD, or the preprocessing job's own reason from its rejected.csv);
- rejected.csv follows the listed order; the submission holds every other listed Id, in order;
- a scored Id that is not listed is extra: left out of the submission, kept (after the listed ones) in the
  probabilities;
- labels: the per-class thresholds, a row where no class passes gets its top class with `top1`.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Sequence

import numpy as np

from model import submission

# Reason code in rejected.csv of a listed Id that no record holds (and preprocessing did not reject).
NO_RECORD = "no_record"
EMPTY_RULES = ("top1", "none")

Rejection = tuple[str, str, str]  # (Id, reason, detail)


def listed_ids(wanted: Sequence[str] | None, ids: Sequence[str], rejected: Sequence[Rejection]) -> list[str]:
    """The Ids the outputs account for: the Id list in its order, else every scored or rejected Id, sorted."""
    if wanted is not None:
        return list(wanted)
    return sorted({str(i) for i in ids} | {r[0] for r in rejected})


@dataclasses.dataclass(frozen=True)
class Accounting:
    """Where each listed Id ends.

    Attributes:
      listed: the Ids accounted for, in the submission's order.
      rejected: (Id, reason, detail) rows of rejected.csv, in the listed order.
      predicted: the listed Ids not rejected (the submission's rows), in order.
      extra: scored Ids that are not listed, sorted.
    """

    listed: list[str]
    rejected: list[Rejection]
    predicted: list[str]
    extra: list[str]

    def reasons(self) -> dict[str, int]:
        """{reason: rejected Ids}, sorted by reason."""
        return dict(sorted(collections.Counter(r[1] for r in self.rejected).items()))


def account(
    listed: Sequence[str],
    ids: Sequence[str],
    rejected: Sequence[Rejection] = (),
    absent_detail: str | None = None,
    absent_reasons: dict[str, tuple[str, str]] | None = None,
) -> Accounting:
    """Sorts the listed Ids into predicted and rejected, and the scored ones not listed into extra.

    Args:
      listed: the Ids to account for (`listed_ids`).
      ids: the scored Ids.
      rejected: (Id, reason, detail) of samples the job rejected.
      absent_detail: with a value, a listed Id neither scored nor rejected is rejected as NO_RECORD with this
        detail (or with its reason in `absent_reasons`); None: the caller accounts for every such Id itself.
      absent_reasons: Id -> (reason, detail), the preprocessing job's reasons for Ids it did not write.
    """
    have = {str(i) for i in ids}
    rows = list(rejected)
    if absent_detail is not None:
        gone = {r[0] for r in rows}
        absent, reasons = (NO_RECORD, absent_detail), absent_reasons or {}
        rows += [(sid, *reasons.get(sid, absent)) for sid in listed if sid not in have and sid not in gone]
    position = {sid: k for k, sid in enumerate(listed)}
    rows.sort(key=lambda r: (position.get(r[0], len(position)), r[0]))
    gone = {r[0] for r in rows}
    return Accounting(
        listed=list(listed),
        rejected=rows,
        predicted=[sid for sid in listed if sid not in gone],
        extra=sorted(have - set(listed)),
    )


@dataclasses.dataclass(frozen=True)
class Labelled:
    """The predicted Ids with their scores and labels, and the probabilities' rows.

    Attributes:
      ids: the submission's Ids (Accounting.predicted).
      scores: [len(ids), C] their scores.
      labels: [len(ids), C] 0/1 labels.
      prob_ids, prob_scores: the probabilities' rows: the predicted Ids, then the extra ones.
      filled_rows: rows without a passing class that got their top class (`top1`; 0 with `none`).
    """

    ids: list[str]
    scores: np.ndarray
    labels: np.ndarray
    prob_ids: np.ndarray
    prob_scores: np.ndarray
    filled_rows: int

    @property
    def empty_rows(self) -> int:
        return int((self.labels.sum(axis=1) == 0).sum())

    @property
    def labels_per_row(self) -> float:
        return float(self.labels.sum(axis=1).mean())

    def submission_bytes(self) -> bytes:
        """The submission file (Id,Predicted)."""
        return submission.format_submission(self.ids, self.labels).encode("utf-8")

    def probabilities_bytes(self, path: str) -> bytes:
        """The probabilities file, in the format of `path`'s extension (.npz or .csv)."""
        return submission.probabilities_bytes(path, self.prob_ids, self.prob_scores)


def label(
    accounting: Accounting, ids: np.ndarray, scores: np.ndarray, thresholds: np.ndarray, empty: str
) -> Labelled:
    """The predicted Ids' scores, their labels at `thresholds` (rule `empty`), and the probabilities' rows.

    Raises:
      PredictError: repeated Ids, or predicted Ids without scores.
    """
    from model import thresholds as thr

    ids = np.asarray(ids)
    out_scores = submission.order_by_ids(ids, scores, accounting.predicted)
    labels = thr.apply_thresholds(out_scores, thresholds, at_least_one=empty == "top1")
    prob_ids, prob_scores = np.asarray(accounting.predicted + accounting.extra, dtype=str), out_scores
    if accounting.extra:
        index = {sid: i for i, sid in enumerate(ids.tolist())}
        prob_scores = np.concatenate([out_scores, scores[[index[s] for s in accounting.extra]]])
    filled = int(((out_scores >= thresholds).sum(axis=1) == 0).sum()) if empty == "top1" else 0
    return Labelled(
        ids=list(accounting.predicted),
        scores=out_scores,
        labels=labels,
        prob_ids=prob_ids,
        prob_scores=prob_scores,
        filled_rows=filled,
    )
