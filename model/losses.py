"""Losses of the training job (binary cross-entropy, focal) and the rare-class factors they and the input
pipeline share.

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


def make_loss(kind: str = "bce", gamma: float = 2.0, positive_weights: np.ndarray | None = None):
    """The training loss.

    Args:
      kind: `bce` (binary cross-entropy) or `focal` (binary focal cross-entropy, Lin et al. 2017).
      gamma: focal loss focusing parameter.
      positive_weights: optional [NUM_CLASSES] weights of each class's positive term (rare-class weighting).

    Returns:
      A `keras.losses.Loss` over sigmoid probabilities [B, NUM_CLASSES].
    """
    if kind not in ("bce", "focal"):
        raise ValueError(f"loss must be 'bce' or 'focal', got {kind!r}")
    weights = None if positive_weights is None else [float(w) for w in positive_weights]
    if weights is not None and len(weights) != schemas.NUM_CLASSES:
        raise ValueError(f"positive_weights must have {schemas.NUM_CLASSES} values, got {len(weights)}")
    return MultiLabelLoss(kind=kind, gamma=gamma, positive_weights=weights)


@keras.saving.register_keras_serializable(package="hpa")
class MultiLabelLoss(keras.losses.Loss):
    """Mean over classes of per-class binary (focal) cross-entropy, with optional positive-term weights."""

    def __init__(self, kind="bce", gamma=2.0, positive_weights=None, name="multi_label_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.kind = kind
        self.gamma = float(gamma)
        self.positive_weights = None if positive_weights is None else list(positive_weights)

    def call(self, y_true, y_pred):
        y_pred = ops.cast(y_pred, "float32")
        y_true = ops.cast(y_true, "float32")
        eps = keras.config.epsilon()
        p = ops.clip(y_pred, eps, 1.0 - eps)
        pos = -y_true * ops.log(p)
        neg = -(1.0 - y_true) * ops.log(1.0 - p)
        if self.kind == "focal":
            pos = pos * ops.power(1.0 - p, self.gamma)
            neg = neg * ops.power(p, self.gamma)
        if self.positive_weights is not None:
            pos = pos * ops.convert_to_tensor(self.positive_weights, dtype="float32")
        return ops.mean(pos + neg, axis=-1)

    def get_config(self):
        config = super().get_config()
        config.update(kind=self.kind, gamma=self.gamma, positive_weights=self.positive_weights)
        return config
