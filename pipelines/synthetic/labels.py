"""Label sets of the synthetic dataset: class frequencies like the competition's, drawn or read from a file.

Pure numpy; `draw_label_sets(n, balance, rng)` draws multi-hot rows whose class frequencies follow
`class_frequencies(balance)`, `read_label_sets(path)` takes whole label sets from a real `Id,Target` file.
"""

from __future__ import annotations

import csv
import os

import numpy as np

import schemas

# Per-class positives and labels-per-sample counts of the competition's train.csv (31,072 samples).
HPA_CLASS_COUNTS: tuple[int, ...] = (
    12885, 1254, 3621, 1561, 1858, 2513, 1008, 2822, 53, 45, 28, 1093, 688, 537,
    1066, 21, 530, 210, 902, 1482, 172, 3777, 802, 2965, 322, 8228, 328, 11,
)  # fmt: skip
HPA_LABELS_PER_SAMPLE: dict[int, int] = {1: 15126, 2: 12485, 3: 3160, 4: 299, 5: 2}
HPA_NUM_SAMPLES = 31072
assert len(HPA_CLASS_COUNTS) == schemas.NUM_CLASSES

BALANCES = ("hpa", "tempered", "uniform")
TEMPERED_POWER = 0.2  # tempered class frequencies follow count ** TEMPERED_POWER
MIN_IMAGE_SIZE = 32
MAX_LABELS = 5


def class_frequencies(balance: str) -> np.ndarray:
    """Target fraction of samples that carry each class under a balance (sums to the mean labels per sample).

    Raises:
      ValueError: unknown balance.
    """
    if balance not in BALANCES:
        raise ValueError(f"unknown class_balance {balance!r}; choose one of {', '.join(BALANCES)}")
    counts = np.asarray(HPA_CLASS_COUNTS, dtype=np.float64)
    mean_k = _labels_per_sample_probs() @ np.arange(1, MAX_LABELS + 1)
    if balance == "hpa":
        shares = counts
    elif balance == "tempered":
        shares = counts**TEMPERED_POWER
    else:
        shares = np.ones_like(counts)
    return shares / shares.sum() * mean_k


def _labels_per_sample_probs() -> np.ndarray:
    k = np.array([HPA_LABELS_PER_SAMPLE.get(i, 0) for i in range(1, MAX_LABELS + 1)], dtype=np.float64)
    return k / k.sum()


def _inclusion_probabilities(freq: np.ndarray, k: int) -> np.ndarray:
    """Per-class inclusion probabilities of a k-label sample: proportional to freq, sum k, each at most 1."""
    p = freq * (k / freq.sum())
    for _ in range(len(freq)):
        over = p > 1.0
        if not over.any():
            break
        p[over] = 1.0
        rest = ~over & (p < 1.0)
        p[rest] *= (k - (p >= 1.0).sum()) / p[rest].sum()
    return np.minimum(p, 1.0)


def draw_label_sets(num_samples: int, balance: str, rng: np.random.Generator) -> np.ndarray:
    """Draws multi-hot label sets [num_samples, NUM_CLASSES] with 1-5 labels per sample.

    The number of labels k follows the competition's distribution; given k, the classes are drawn by
    randomised systematic sampling (classes in random order, k equally spaced points on the cumulated
    inclusion probabilities), which hits `class_frequencies(balance)` exactly in expectation (up to capping
    a class at probability 1 in 4- and 5-label samples).
    """
    freq = class_frequencies(balance)
    ks = rng.choice(np.arange(1, MAX_LABELS + 1), size=num_samples, p=_labels_per_sample_probs())
    table = np.stack([_inclusion_probabilities(freq, k) for k in range(1, MAX_LABELS + 1)])
    probs = table[ks - 1]
    order = np.argsort(rng.random(probs.shape), axis=1)
    cum = np.cumsum(np.take_along_axis(probs, order, axis=1), axis=1)
    u = rng.random((num_samples, 1))
    hits = np.floor(cum - u + 1.0) - np.floor(
        np.concatenate([np.zeros((num_samples, 1)), cum[:, :-1]], axis=1) - u + 1.0
    )
    out = np.zeros(probs.shape, dtype=np.int64)
    np.put_along_axis(out, order, (hits > 0.5).astype(np.int64), axis=1)
    return out


def read_label_sets(path: str) -> np.ndarray:
    """Reads a label file (`Id,Target`) into multi-hot rows.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: unreadable content, missing columns, bad class indices or no rows.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"labels file {path!r} not found")
    rows = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or schemas.CSV_TARGET not in reader.fieldnames:
                raise ValueError(
                    f"labels file {path!r} needs a header with a {schemas.CSV_TARGET!r} column, "
                    f"found {reader.fieldnames}"
                )
            for line, row in enumerate(reader, start=2):
                try:
                    idx = [int(t) for t in (row[schemas.CSV_TARGET] or "").split()]
                    if not idx:
                        raise ValueError("empty Target")
                    rows.append(schemas.labels_to_multi_hot(idx))
                except ValueError as e:
                    raise ValueError(
                        f"labels file {path!r}, line {line}: bad {schemas.CSV_TARGET}: {e}"
                    ) from None
    except UnicodeDecodeError as e:
        raise ValueError(f"labels file {path!r} is not a text CSV file: {e}") from None
    if not rows:
        raise ValueError(f"labels file {path!r} has no rows")
    return np.stack(rows)
