"""Per-class decision thresholds for multi-label scores, tuned for F1 (numpy only).

One global threshold fails on this task: classes range from 41% of the samples to 0.04%, and a network's
scores for a rare class rarely reach the same level as for a common one. So each class gets its own
threshold, chosen on validation predictions (pooled out-of-fold predictions when several folds were
trained):

* Exact search: for each class the scores are sorted once and every distinct cut is scored with cumulative
  true/false-positive counts, O(n log n), so the F1-optimal threshold is found without a grid. The
  threshold is placed halfway between the lowest score kept and the highest score left out.
* Rare classes: a class with fewer than `min_positives` positives in the tuning data would get a
  threshold fitted to noise (the rarest real class has 11 positives of 31,072, about 2 per fold). Below
  that minimum a rule the top competition teams used takes over:
    - `rate`: match the predicted-positive rate to the class's share (1st place set its thresholds from
      label ratios): the threshold keeps the top `round(share * n)` scores;
    - `shrink`: shrink the fitted threshold toward one global threshold, weight `positives / min_positives`
      on the fitted value (so a class with no positives gets the global threshold);
    - `fit`: no fallback (the exact fit is used whatever the count).
  `rate` with `min_positives=10` is the default. On simulated scores with the real class frequencies
  (bench/thresholds.py) it is the robust choice: where rare classes get low probabilities, as a network
  trained with BCE on imbalanced data gives them, it raises the rare classes' cross-fitted F1 well above
  the plain fit and `shrink` collapses; where all classes share one probability scale, it costs a little
  against `shrink`. A test checks the default beats the plain fit on such low-scored rare classes.

A sample is predicted positive for a class when its score is `>=` the class's threshold. F1 of a class with
no positives and no positive predictions is 0 (scikit-learn's `zero_division=0`), so macro F1 here matches
`sklearn.metrics.f1_score(average="macro")`.

Thresholds are saved as JSON (`save_thresholds`/`load_thresholds`) with the class names, the rule, its
options and the per-class values, so the prediction job can check they belong to the same class list.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Callable, Sequence

import numpy as np

import schemas
from model import fileio

__all__ = [
    "RARE_RULES",
    "CrossFit",
    "Scores",
    "ThresholdConfig",
    "ThresholdFit",
    "apply_thresholds",
    "best_f1_thresholds",
    "cross_fit",
    "ensemble_thresholds",
    "fit_thresholds",
    "load_thresholds",
    "save_thresholds",
    "score_predictions",
    "stratified_splits",
    "thresholds_from_dict",
    "thresholds_to_dict",
    "tune_thresholds",
]

RARE_RULES = ("rate", "shrink", "fit")
THRESHOLDS_FORMAT = "hpa-thresholds/1"


@dataclasses.dataclass(frozen=True)
class ThresholdConfig:
    """How thresholds are tuned.

    Attributes:
      min_positives: classes with fewer positives than this in the tuning data use `rare_rule`.
      rare_rule: `rate` (match the class's share), `shrink` (toward the global threshold) or `fit` (none).
      global_threshold: the global threshold of `shrink`; None fits it exactly on all classes pooled
        (the micro-F1-optimal single threshold).
    """

    min_positives: int = 10
    rare_rule: str = "rate"
    global_threshold: float | None = None

    def __post_init__(self):
        if self.rare_rule not in RARE_RULES:
            raise ValueError(f"rare_rule must be one of {RARE_RULES}, got {self.rare_rule!r}")
        if int(self.min_positives) != self.min_positives or self.min_positives < 0:
            raise ValueError(f"min_positives must be a non-negative integer, got {self.min_positives!r}")
        if self.global_threshold is not None and not math.isfinite(self.global_threshold):
            raise ValueError(f"global_threshold must be finite, got {self.global_threshold!r}")


@dataclasses.dataclass(frozen=True)
class ThresholdFit:
    """Tuned thresholds and how each one was obtained.

    Attributes:
      values: float64 [num_classes] thresholds (predict positive when score >= value).
      rules: per class, the rule that set the value: `fit`, `rate`, `shrink` (or `none` when loaded
        from a file that does not say).
      positives: per class, positives in the tuning data.
      num_samples: samples in the tuning data.
      global_threshold: the global threshold in use (fitted or given).
      config: the options used.
    """

    values: np.ndarray
    rules: tuple[str, ...]
    positives: tuple[int, ...]
    num_samples: int
    global_threshold: float
    config: ThresholdConfig


@dataclasses.dataclass(frozen=True)
class Scores:
    """Per-class and averaged scores of binary predictions.

    Attributes:
      precision, recall, f1: float64 [num_classes].
      support: int64 [num_classes], positives per class.
      predicted: int64 [num_classes], positive predictions per class.
      macro_f1: mean of the per-class F1.
      micro_f1: F1 of all (sample, class) decisions pooled.
    """

    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray
    predicted: np.ndarray
    macro_f1: float
    micro_f1: float


@dataclasses.dataclass(frozen=True)
class CrossFit:
    """Out-of-split predictions: each split's samples thresholded with values tuned on the other splits.

    Attributes:
      splits: int [n] split index of each sample.
      thresholds: float64 [n_splits, num_classes], the values applied to each split.
      predictions: int8 [n, num_classes] binary predictions.
      scores: the Scores of those predictions against the labels.
    """

    splits: np.ndarray
    thresholds: np.ndarray
    predictions: np.ndarray
    scores: Scores


def _check(y_true, y_score) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_true.ndim != 2 or y_score.ndim != 2:
        raise ValueError(
            f"y_true and y_score must be 2-D [samples, classes], "
            f"got shapes {y_true.shape} and {y_score.shape}"
        )
    if y_true.shape != y_score.shape:
        raise ValueError(f"y_true has shape {y_true.shape} but y_score has shape {y_score.shape}")
    if y_true.shape[0] == 0:
        raise ValueError("no samples to tune or score on")
    if not np.isin(y_true, (0, 1)).all():
        raise ValueError("y_true must hold only 0 and 1")
    if not np.isfinite(y_score).all():
        raise ValueError("y_score holds NaN or infinite values")
    return y_true.astype(np.int8), y_score


def _cut_between(hi: float, lo: float) -> float:
    """A threshold that keeps `hi` and drops `lo` (hi > lo): their midpoint when representable."""
    mid = 0.5 * (hi + lo)
    return mid if lo < mid <= hi else hi


def _above(value: float) -> float:
    """The smallest threshold that drops a score of `value`."""
    return float(np.nextafter(value, np.inf))


def _exact_column(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    """F1-optimal threshold of one class and its F1, by one sort and a sweep over distinct scores."""
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    tp = np.cumsum(y[order], dtype=np.int64)
    positives = int(tp[-1])
    if positives == 0:
        # Every cut has F1 = 0; predicting nothing is the only choice that is not wrong.
        return _above(float(s_sorted[0])), 0.0
    # A cut can only fall between distinct scores: keep the last index of each run of ties.
    last = np.flatnonzero(np.r_[s_sorted[:-1] != s_sorted[1:], True])
    tp_c = tp[last]
    kept = last + 1  # samples predicted positive at each cut
    f1 = 2.0 * tp_c / (kept + positives)  # 2TP / (2TP + FP + FN) with TP + FP = kept, TP + FN = positives
    j = int(np.argmax(f1))  # first maximum: the highest threshold reaching the best F1
    hi = float(s_sorted[last[j]])
    if j + 1 < len(last):
        return _cut_between(hi, float(s_sorted[last[j + 1]])), float(f1[j])
    return hi, float(f1[j])


def best_f1_thresholds(y_true, y_score) -> tuple[np.ndarray, np.ndarray]:
    """Exact F1-optimal threshold of every class (no rare-class rule).

    Args:
      y_true: [n, C] 0/1 labels.
      y_score: [n, C] scores (any real values; usually probabilities).

    Returns:
      (thresholds [C], in-sample F1 at those thresholds [C]). A class without positives gets a threshold
      just above its highest score (it predicts nothing) and F1 0.
    """
    y_true, y_score = _check(y_true, y_score)
    out = [_exact_column(y_true[:, c], y_score[:, c]) for c in range(y_true.shape[1])]
    return np.array([t for t, _ in out]), np.array([f for _, f in out])


def _rate_threshold(s: np.ndarray, share: float) -> float:
    """The threshold that keeps the top `round(share * n)` scores of one class."""
    k = int(round(share * len(s)))
    if k <= 0:
        return _above(float(s.max()))
    if k >= len(s):
        return float(s.min())
    s_sorted = np.sort(s)[::-1]
    hi, lo = float(s_sorted[k - 1]), float(s_sorted[k])
    return _cut_between(hi, lo) if hi > lo else hi


def fit_thresholds(
    y_true, y_score, config: ThresholdConfig | None = None, prior: Sequence[float] | None = None
) -> ThresholdFit:
    """Tunes one threshold per class: exact F1 search, with the rare-class rule below the minimum.

    Args:
      y_true: [n, C] 0/1 labels of the tuning data (pooled out-of-fold predictions when available).
      y_score: [n, C] predicted probabilities.
      config: tuning options (defaults: ThresholdConfig()).
      prior: optional [C] class shares for the `rate` rule (e.g. from the whole training label file);
        by default each class's share in the tuning data.

    Returns:
      A ThresholdFit whose `values` are the thresholds.
    """
    config = config or ThresholdConfig()
    y_true, y_score = _check(y_true, y_score)
    n, num_classes = y_true.shape
    positives = y_true.sum(axis=0).astype(np.int64)
    if prior is None:
        share = positives / n
    else:
        share = np.asarray(prior, dtype=np.float64)
        if share.shape != (num_classes,) or not ((share >= 0) & (share <= 1)).all():
            raise ValueError(f"prior must hold {num_classes} class shares in [0, 1], got {share!r}")
    fitted, _ = best_f1_thresholds(y_true, y_score)
    if config.global_threshold is not None:
        global_t = float(config.global_threshold)
    else:
        global_t, _ = _exact_column(y_true.ravel(), y_score.ravel())
    values = fitted.copy()
    rules = ["fit"] * num_classes
    for c in range(num_classes):
        if config.rare_rule == "fit" or positives[c] >= config.min_positives:
            continue
        if config.rare_rule == "rate":
            values[c] = _rate_threshold(y_score[:, c], float(share[c]))
        else:
            w = positives[c] / config.min_positives
            values[c] = w * fitted[c] + (1.0 - w) * global_t if positives[c] else global_t
        rules[c] = config.rare_rule
    return ThresholdFit(
        values=values,
        rules=tuple(rules),
        positives=tuple(int(p) for p in positives),
        num_samples=int(n),
        global_threshold=float(global_t),
        config=config,
    )


def tune_thresholds(
    y_true, y_score, config: ThresholdConfig | None = None, prior: Sequence[float] | None = None
) -> np.ndarray:
    """Per-class thresholds [C] for the scores (see `fit_thresholds` for the arguments)."""
    return fit_thresholds(y_true, y_score, config, prior).values


def ensemble_thresholds(thresholds, member_scores) -> np.ndarray:
    """Thresholds for the average of K models' scores, from thresholds tuned on single models' scores.

    Out-of-fold thresholds are tuned on one model's scores per sample; the fold ensemble averages K models,
    whose mean is less spread out (the models' errors partly cancel), so a threshold fitted to one model's
    scores cuts the average at another place: for a class whose tuned threshold lies in the upper tail, fewer
    samples reach it, for one in the lower tail more. This keeps each class's decision rate instead: the
    share q of (model, sample) pairs whose single-model score passes the class's threshold is measured on
    these very samples (no labels needed), and the ensemble's threshold keeps the top round(q * n) averaged
    scores (`_rate_threshold`). With K = 1 it predicts exactly what the tuned thresholds predict.

    Args:
      thresholds: [C] thresholds tuned on single models' (pooled out-of-fold) scores.
      member_scores: [K, n, C] each model's scores of the same n samples (K >= 1, n >= 1).

    Returns:
      float64 [C] thresholds for `member_scores.mean(axis=0)`.
    """
    members = np.asarray(member_scores, dtype=np.float64)
    values = np.asarray(thresholds, dtype=np.float64)
    if members.ndim != 3 or members.shape[0] < 1 or members.shape[1] < 1:
        raise ValueError(f"member_scores must be [models, samples, classes], got shape {members.shape}")
    if values.shape != members.shape[2:]:
        raise ValueError(f"{values.shape} thresholds do not fit member scores of shape {members.shape}")
    if not np.isfinite(members).all():
        raise ValueError("member_scores holds NaN or infinite values")
    share = (members >= values).mean(axis=(0, 1))
    average = members.mean(axis=0)
    return np.array([_rate_threshold(average[:, c], float(share[c])) for c in range(values.shape[0])])


def apply_thresholds(y_score, thresholds, at_least_one: bool = False) -> np.ndarray:
    """Binary predictions: score >= threshold, per class.

    Args:
      y_score: [n, C] scores.
      thresholds: [C] thresholds, or [n, C] per sample.
      at_least_one: when no class passes its threshold, predict the class with the largest
        score - threshold margin instead of none.

    Returns:
      int8 [n, C] 0/1 predictions.
    """
    y_score = np.asarray(y_score, dtype=np.float64)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if y_score.ndim != 2 or thresholds.shape not in (y_score.shape[1:], y_score.shape):
        raise ValueError(f"thresholds of shape {thresholds.shape} do not fit scores of shape {y_score.shape}")
    pred = (y_score >= thresholds).astype(np.int8)
    if at_least_one:
        empty = np.flatnonzero(pred.sum(axis=1) == 0)
        margin = y_score[empty] - (thresholds[empty] if thresholds.ndim == 2 else thresholds)
        pred[empty, np.argmax(margin, axis=1)] = 1
    return pred


def score_predictions(y_true, y_pred) -> Scores:
    """Precision, recall and F1 per class, macro and micro F1 (0 where undefined, as scikit-learn).

    Args:
      y_true: [n, C] 0/1 labels.
      y_pred: [n, C] 0/1 predictions.
    """
    y_true, y_pred_f = _check(y_true, y_pred)
    y_pred = y_pred_f.astype(np.int8)
    if not np.isin(y_pred, (0, 1)).all() or not np.array_equal(y_pred, y_pred_f):
        raise ValueError("y_pred must hold only 0 and 1")
    tp = (y_true & y_pred).sum(axis=0).astype(np.int64)
    support = y_true.sum(axis=0).astype(np.int64)
    predicted = y_pred.sum(axis=0).astype(np.int64)

    def ratio(a, b):
        return np.divide(a, b, out=np.zeros(a.shape, dtype=np.float64), where=b > 0)

    f1 = ratio(2.0 * tp, (support + predicted).astype(np.float64))
    denom = support.sum() + predicted.sum()
    return Scores(
        precision=ratio(tp.astype(np.float64), predicted),
        recall=ratio(tp.astype(np.float64), support),
        f1=f1,
        support=support,
        predicted=predicted,
        macro_f1=float(f1.mean()),
        micro_f1=float(2.0 * tp.sum() / denom) if denom else 0.0,
    )


def stratified_splits(y_true, n_splits: int, seed: int = 0) -> np.ndarray:
    """Assigns samples to `n_splits` splits so that each class's positives spread evenly.

    Samples are grouped by their rarest class (all-negative samples form their own group), groups ordered
    rarest first, shuffled within a group, and dealt round-robin, continuing the deal across groups. So the
    samples whose rarest class is c differ by at most one between splits (the rarest class's positives in
    particular), and every class spreads close to evenly. A numpy-only stand-in for iterative
    stratification, good enough for cross-fitting thresholds.

    Returns:
      int64 [n] split index in 0..n_splits-1.
    """
    y_true = np.asarray(y_true)
    n = y_true.shape[0]
    if n_splits < 2 or n_splits > n:
        raise ValueError(f"n_splits must be in 2..{n} (the number of samples), got {n_splits}")
    rng = np.random.default_rng(seed)
    counts = y_true.sum(axis=0)
    # Rarest class of each sample (num_classes for samples without a label).
    rarity = np.where(y_true > 0, counts[None, :], np.inf)
    group = np.where(np.isfinite(rarity.min(axis=1)), np.argmin(rarity, axis=1), y_true.shape[1])
    group_rank = np.argsort(np.argsort(np.r_[counts, np.inf], kind="stable"), kind="stable")
    order = np.lexsort((rng.random(n), group_rank[group]))
    splits = np.empty(n, dtype=np.int64)
    splits[order] = (np.arange(n) + rng.integers(n_splits)) % n_splits
    return splits


def cross_fit(
    y_true,
    y_score,
    config: ThresholdConfig | None = None,
    n_splits: int = 5,
    seed: int = 0,
    splits: np.ndarray | None = None,
    tuner: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> CrossFit:
    """Honest F1 of tuned thresholds: each split is scored with thresholds tuned on the other splits.

    Args:
      y_true: [n, C] 0/1 labels.
      y_score: [n, C] scores.
      config: tuning options for `tune_thresholds`.
      n_splits: number of splits when `splits` is not given (`stratified_splits`).
      seed: seed of the splits.
      splits: optional [n] split index per sample (e.g. the training folds).
      tuner: optional `tuner(y_true, y_score) -> thresholds` replacing `tune_thresholds(..., config)`.

    Returns:
      A CrossFit with the out-of-split predictions and their scores.
    """
    y_true, y_score = _check(y_true, y_score)
    if splits is None:
        splits = stratified_splits(y_true, n_splits, seed)
    splits = np.asarray(splits)
    if splits.shape != (y_true.shape[0],):
        raise ValueError(f"splits must have shape ({y_true.shape[0]},), got {splits.shape}")
    ids = np.unique(splits)
    if len(ids) < 2:
        raise ValueError("cross-fitting needs at least two splits")
    if tuner is None:

        def tuner(yt, ys):
            return tune_thresholds(yt, ys, config)

    thresholds = np.empty((len(ids), y_true.shape[1]))
    predictions = np.empty(y_true.shape, dtype=np.int8)
    for k, split in enumerate(ids):
        held = splits == split
        thresholds[k] = tuner(y_true[~held], y_score[~held])
        predictions[held] = apply_thresholds(y_score[held], thresholds[k])
    return CrossFit(
        splits=np.searchsorted(ids, splits),
        thresholds=thresholds,
        predictions=predictions,
        scores=score_predictions(y_true, predictions),
    )


def thresholds_to_dict(fit: ThresholdFit, **extra) -> dict:
    """The JSON-ready form of a ThresholdFit for the project's 28 classes (`extra` keys are added)."""
    if len(fit.values) != schemas.NUM_CLASSES:
        raise ValueError(f"expected {schemas.NUM_CLASSES} thresholds, got {len(fit.values)}")
    return {
        "format": THRESHOLDS_FORMAT,
        "class_names": list(schemas.CLASS_NAMES),
        "thresholds": [float(v) for v in fit.values],
        "rules": list(fit.rules),
        "positives": list(fit.positives),
        "num_samples": fit.num_samples,
        "global_threshold": fit.global_threshold,
        "method": "exact-f1",
        "options": dataclasses.asdict(fit.config),
        **extra,
    }


def thresholds_from_dict(data: dict, source: str = "thresholds") -> ThresholdFit:
    """Reads the form written by `thresholds_to_dict`, checking the class list against `schemas`.

    Raises:
      ValueError: another format, another class list, or malformed values.
    """
    if not isinstance(data, dict) or data.get("format") != THRESHOLDS_FORMAT:
        raise ValueError(f"{source}: not a thresholds file of format {THRESHOLDS_FORMAT!r}")
    names = data.get("class_names")
    if names != list(schemas.CLASS_NAMES):
        raise ValueError(f"{source}: its class names differ from schemas.CLASS_NAMES ({names!r})")
    values = np.asarray(data.get("thresholds"), dtype=np.float64)
    if values.shape != (schemas.NUM_CLASSES,) or not np.isfinite(values).all():
        raise ValueError(f"{source}: needs {schemas.NUM_CLASSES} finite thresholds")
    n = schemas.NUM_CLASSES
    options = data.get("options") or {}
    return ThresholdFit(
        values=values,
        rules=tuple(data.get("rules") or ["none"] * n),
        positives=tuple(int(p) for p in (data.get("positives") or [0] * n)),
        num_samples=int(data.get("num_samples", 0)),
        global_threshold=float(data.get("global_threshold", float("nan"))),
        config=ThresholdConfig(
            **{k: v for k, v in options.items() if k in ThresholdConfig.__dataclass_fields__}
        ),
    )


def save_thresholds(path: str, fit: ThresholdFit, **extra) -> None:
    """Writes thresholds as JSON (local path, or gs:// through tf.io.gfile); `extra` keys are added."""
    text = json.dumps(thresholds_to_dict(fit, **extra), indent=2) + "\n"
    fileio.write_bytes(path, text.encode("utf-8"))


def load_thresholds(path: str) -> ThresholdFit:
    """Reads a thresholds JSON written by `save_thresholds` (local or gs://).

    Raises:
      FileNotFoundError: no file at `path`.
      ValueError: not a thresholds file, or one for another class list.
    """
    try:
        text = fileio.read_bytes(path).decode("utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: tune thresholds first (hpa-evaluate)") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return thresholds_from_dict(data, source=path)
