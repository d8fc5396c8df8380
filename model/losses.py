"""Losses of the training job (binary cross-entropy, focal, the Lovasz hinge per class) and the rare-class
factors they and the input pipeline share.

`class_factors` and `sample_repeats` are plain numpy: a class's factor grows with its rarity,
`(max count / count) ** power`, clipped to `[1, max_factor]`. The input pipeline repeats a sample by the
largest factor among its labels (oversampling); the loss can instead weight each class's positive term by it.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

import schemas


def class_factors(counts: np.ndarray, power: float = 0.5, max_factor: float = 4.0) -> np.ndarray:
    """Per-class rarity factors from positive counts.

    Args:
      counts: positives per class, shape [NUM_CLASSES].
      power: 0 gives all ones, 1 fully inverse to frequency.
      max_factor: upper clip of a factor.

    Returns:
      float32 array [NUM_CLASSES] in [1, max_factor]; classes without positives get 1 (nothing to repeat).
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.shape != (schemas.NUM_CLASSES,):
        raise ValueError(f"counts must have shape ({schemas.NUM_CLASSES},), got {counts.shape}")
    if (counts < 0).any():
        raise ValueError("counts must be >= 0")
    if max_factor < 1.0:
        raise ValueError(f"max_factor must be >= 1, got {max_factor}")
    top = counts.max()
    factors = np.ones_like(counts)
    present = counts > 0
    factors[present] = (top / counts[present]) ** power
    return np.clip(factors, 1.0, max_factor).astype(np.float32)


def sample_repeats(labels: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """Expected repeats of each sample under oversampling: the largest factor among its labels (1 if none).

    Args:
      labels: multi-hot [N, NUM_CLASSES].
      factors: `class_factors` output.

    Returns:
      float32 [N], each >= 1.
    """
    labels = np.asarray(labels) > 0
    per = np.where(labels, np.asarray(factors, dtype=np.float32)[None, :], 1.0)
    return per.max(axis=1).astype(np.float32) if len(labels) else np.zeros(0, np.float32)


KINDS = ("bce", "focal", "lovasz", "focal_lovasz")


def lovasz_hinge_per_sample(y_true, y_pred, rows=None):
    """The Lovasz hinge of each class over the batch, as per-sample terms [B] whose mean is its class mean.

    For class c the samples' hinge errors e_i = max(0, 1 - z_i s_i) (z the logit, s = +1 for a positive and
    -1 for a negative) are sorted in decreasing order and weighted by the increments of the Jaccard loss of
    the growing set of errors (`lovasz_grad`): the Lovasz extension of the Jaccard loss at the errors
    (Berman, Triki, Blaschko 2018, "The Lovasz-Softmax loss"). Summing sample i's weighted error over the
    classes (divided by their number) and multiplying by the batch size gives terms whose batch mean is the
    mean over classes of the per-class loss, so Keras' per-sample reduction and sample weights apply.

    Args:
      y_true: multi-hot [B, C].
      y_pred: sigmoid probabilities [B, C] (the logits are recovered from the clipped probabilities).
      rows: optional bool [B], False for a row that is not a sample (a pad that keeps a replica's last
        validation batch non-empty). Such rows sort after every error > 0 and count as correct (error 0),
        so they change neither the ranking nor the Jaccard increments of the real rows: the real rows' terms
        are those of the batch without the pads (the multiplier is the number of real rows), a pad's is 0.
    """
    y_true = ops.cast(y_true, "float32")
    p = ops.clip(ops.cast(y_pred, "float32"), 1e-6, 1.0 - 1e-6)
    logits = ops.log(p) - ops.log(1.0 - p)
    errors = 1.0 - logits * (2.0 * y_true - 1.0)  # [B, C]
    batch = ops.cast(ops.shape(y_true)[0], "float32")
    if rows is not None:
        real = ops.expand_dims(ops.cast(rows, "bool"), -1)
        y_true = ops.where(real, y_true, 0.0)  # a pad is a negative ...
        errors = ops.where(real, errors, -1.0)  # ... ranked after every positive error, contributing 0
        batch = ops.sum(ops.cast(rows, "float32"))
    order = ops.argsort(-ops.stop_gradient(errors), axis=0)
    errors_sorted = ops.take_along_axis(errors, order, axis=0)
    grad = lovasz_grad(ops.take_along_axis(y_true, order, axis=0))
    terms_sorted = ops.relu(errors_sorted) * grad
    terms = ops.take_along_axis(terms_sorted, ops.argsort(order, axis=0), axis=0)
    return ops.mean(terms, axis=-1) * batch


def lovasz_grad(gt_sorted):
    """Increments of the Jaccard loss along a sorted order: [B, C] multi-hot (sorted by error) -> [B, C].

    Row k holds J(first k+1 errors) - J(first k), where J(M) = 1 - |gt minus M| / |gt union M| is the
    Jaccard loss when the samples in M are mispredicted.
    """
    positives = ops.sum(gt_sorted, axis=0, keepdims=True)
    intersection = positives - ops.cumsum(gt_sorted, axis=0)
    union = positives + ops.cumsum(1.0 - gt_sorted, axis=0)
    jaccard = 1.0 - intersection / union
    return ops.concatenate([jaccard[:1], jaccard[1:] - jaccard[:-1]], axis=0)


def make_loss(kind: str = "bce", gamma: float = 2.0, positive_weights: np.ndarray | None = None):
    """The training loss.

    Args:
      kind: `bce` (binary cross-entropy), `focal` (binary focal cross-entropy, Lin et al. 2017), `lovasz`
        (the Lovasz hinge per class, Berman et al. 2018) or `focal_lovasz` (their sum, the 1st place's
        loss).
      gamma: focal loss focusing parameter.
      positive_weights: optional [NUM_CLASSES] weights of each class's positive term (rare-class weighting).

    Returns:
      A `keras.losses.Loss` over sigmoid probabilities [B, NUM_CLASSES].
    """
    if kind not in KINDS:
        raise ValueError(f"loss must be one of {KINDS}, got {kind!r}")
    weights = None if positive_weights is None else [float(w) for w in positive_weights]
    if weights is not None and len(weights) != schemas.NUM_CLASSES:
        raise ValueError(f"positive_weights must have {schemas.NUM_CLASSES} values, got {len(weights)}")
    return MultiLabelLoss(kind=kind, gamma=gamma, positive_weights=weights)


class _Terms(keras.losses.Loss):
    """Keras' reduction and sample weighting of per-sample terms computed beforehand (passed as y_pred)."""

    def call(self, y_true, y_pred):
        return y_pred


def _weighted_mean(terms, sample_weight, reduction: str, name: str):
    return _Terms(name=name, reduction=reduction)(terms, terms, sample_weight)


@keras.saving.register_keras_serializable(package="hpa")
class MultiLabelLoss(keras.losses.Loss):
    """Mean over classes of per-class binary (focal) cross-entropy, with optional positive-term weights."""

    def __init__(self, kind="bce", gamma=2.0, positive_weights=None, name="multi_label_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.kind = kind
        self.gamma = float(gamma)
        self.positive_weights = None if positive_weights is None else list(positive_weights)

    def __call__(self, y_true, y_pred, sample_weight=None):
        """Keras' Loss call; the rows of weight 0 (pads) are also kept out of the Lovasz ranking."""
        if sample_weight is None or "lovasz" not in self.kind:
            return super().__call__(y_true, y_pred, sample_weight)
        rows = ops.reshape(ops.greater(ops.convert_to_tensor(sample_weight), 0), (-1,))
        terms = self._per_sample(y_true, y_pred, rows)
        return _weighted_mean(terms, sample_weight, self.reduction, self.name)

    def call(self, y_true, y_pred):
        return self._per_sample(y_true, y_pred, None)

    def _per_sample(self, y_true, y_pred, rows):
        lovasz = lovasz_hinge_per_sample(y_true, y_pred, rows) if "lovasz" in self.kind else 0.0
        if self.kind == "lovasz":
            return lovasz
        y_pred = ops.cast(y_pred, "float32")
        y_true = ops.cast(y_true, "float32")
        eps = keras.config.epsilon()
        p = ops.clip(y_pred, eps, 1.0 - eps)
        pos = -y_true * ops.log(p)
        neg = -(1.0 - y_true) * ops.log(1.0 - p)
        if self.kind.startswith("focal"):
            pos = pos * ops.power(1.0 - p, self.gamma)
            neg = neg * ops.power(p, self.gamma)
        if self.positive_weights is not None:
            pos = pos * ops.convert_to_tensor(self.positive_weights, dtype="float32")
        return ops.mean(pos + neg, axis=-1) + lovasz

    def get_config(self):
        config = super().get_config()
        config.update(kind=self.kind, gamma=self.gamma, positive_weights=self.positive_weights)
        return config
