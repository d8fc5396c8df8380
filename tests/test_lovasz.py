"""The Lovasz hinge per class (model/losses.py) against brute-force references on small batches.

The Lovasz extension of a submodular set function is (a) the Choquet integral over thresholds of the error
vector, and (b) the largest of the sums over all orderings of the samples (the greedy order, sorted by error,
attains it). Both are computed here from the Jaccard loss of mispredicted sets alone, without sorting tricks.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from keras import ops

from model import losses


def jaccard_loss(gt: np.ndarray, mispredicted: set[int]) -> float:
    """1 - |gt and correct| / |gt or predicted| when the samples in `mispredicted` are predicted wrong."""
    positives = {i for i in range(len(gt)) if gt[i]}
    predicted = (positives - mispredicted) | (mispredicted - positives)
    union = positives | predicted
    return 0.0 if not union else 1.0 - len(positives & predicted) / len(union)


def choquet(gt: np.ndarray, errors: np.ndarray) -> float:
    """The Lovasz extension at errors >= 0: integral over t of J({i: errors_i >= t})."""
    total, below = 0.0, 0.0
    for t in sorted(set(errors.tolist())):
        if t <= 0:
            continue
        total += (t - below) * jaccard_loss(gt, {i for i in range(len(gt)) if errors[i] >= t})
        below = t
    return total


def best_ordering(gt: np.ndarray, errors: np.ndarray) -> float:
    """max over every ordering of sum_k errors[pi_k] (J(first k) - J(first k - 1))."""
    best = -np.inf
    for order in itertools.permutations(range(len(gt))):
        value, prev, chosen = 0.0, 0.0, set()
        for i in order:
            chosen.add(i)
            j = jaccard_loss(gt, chosen)
            value += errors[i] * (j - prev)
            prev = j
        best = max(best, value)
    return best


def _hinge_errors(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    logits = np.log(p) - np.log1p(-p)
    return np.maximum(0.0, 1.0 - logits * (2 * y - 1))


@pytest.mark.parametrize("seed", range(6))
def test_lovasz_hinge_matches_the_lovasz_extension_by_brute_force(seed):
    rng = np.random.default_rng(seed)
    batch, classes = int(rng.integers(2, 6)), 3
    y = (rng.random((batch, classes)) < 0.4).astype(np.float32)
    y[:, 2] = 0  # a class without positives in the batch
    p = rng.random((batch, classes)).astype(np.float32)
    terms = ops.convert_to_numpy(losses.lovasz_hinge_per_sample(y, p))
    assert terms.shape == (batch,)
    errors = _hinge_errors(y.astype(np.float64), p.astype(np.float64))
    per_class = [choquet(y[:, c], errors[:, c]) for c in range(classes)]
    assert terms.mean() == pytest.approx(np.mean(per_class), rel=1e-4, abs=1e-5)
    orderings = [best_ordering(y[:, c], errors[:, c]) for c in range(classes)]
    np.testing.assert_allclose(per_class, orderings, rtol=1e-9, atol=1e-9)


def test_focal_lovasz_is_the_sum_and_perfect_margins_cost_nothing():
    rng = np.random.default_rng(0)
    y = (rng.random((4, 28)) < 0.3).astype(np.float32)
    p = rng.random((4, 28)).astype(np.float32)
    focal = ops.convert_to_numpy(losses.make_loss("focal")(y, p))
    lovasz = ops.convert_to_numpy(losses.make_loss("lovasz")(y, p))
    both = ops.convert_to_numpy(losses.make_loss("focal_lovasz")(y, p))
    assert both == pytest.approx(focal + lovasz, rel=1e-5)
    sure = np.where(y > 0, 0.99, 0.01).astype(np.float32)  # logits of +-4.6: every margin beyond 1
    assert float(ops.convert_to_numpy(losses.make_loss("lovasz")(y, sure))) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kind", ["lovasz", "focal_lovasz"])
@pytest.mark.parametrize("seed", range(3))
def test_pads_of_weight_zero_do_not_change_the_lovasz_loss_of_the_records(kind, seed):
    """A padded last validation batch (pads: blank rows of weight 0, data.pad_for_replicas) against the
    batch without its pads, and the unmasked call to show that the pads did enter the ranking before."""
    rng = np.random.default_rng(10 + seed)
    records, pads, classes = int(rng.integers(2, 5)), int(rng.integers(1, 4)), 3
    y = (rng.random((records, classes)) < 0.4).astype(np.float32)
    p = rng.random((records, classes)).astype(np.float32)
    pad_p = rng.uniform(0.6, 0.99, (pads, classes)).astype(np.float32)  # confident, wrong on blank pads
    y_pad = np.concatenate([y, np.zeros((pads, classes), np.float32)])
    p_pad = np.concatenate([p, pad_p])
    weight = (records + pads) / records  # the constant pad_for_replicas gives every record
    w_pad = np.array([weight] * records + [0.0] * pads, np.float32)
    rows = w_pad > 0

    terms = ops.convert_to_numpy(losses.lovasz_hinge_per_sample(y_pad, p_pad, rows))
    alone = ops.convert_to_numpy(losses.lovasz_hinge_per_sample(y, p))
    np.testing.assert_allclose(terms[:records], alone, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(terms[records:], 0.0)
    # The records' Lovasz term is still the brute-force Lovasz extension of the batch without the pads.
    errors = _hinge_errors(y.astype(np.float64), p.astype(np.float64))
    per_class = [choquet(y[:, c], errors[:, c]) for c in range(classes)]
    assert terms[:records].mean() == pytest.approx(np.mean(per_class), rel=1e-4, abs=1e-5)

    # Through the Keras loss, with the sample weights: the weighted sum over the padded batch is the
    # unpadded batch's (Keras divides by the rows, pads included, which the weight constant undoes).
    loss = losses.make_loss(kind)
    padded = float(ops.convert_to_numpy(loss(y_pad, p_pad, sample_weight=w_pad))) * (records + pads)
    unpadded = float(ops.convert_to_numpy(loss(y, p, sample_weight=w_pad[:records]))) * records
    assert padded == pytest.approx(unpadded, rel=1e-5, abs=1e-6)
    # Before the fix the pads took part in the ranking: the loss of the same weights differs.
    unmasked = ops.convert_to_numpy(losses.lovasz_hinge_per_sample(y_pad, p_pad))
    assert float((unmasked * w_pad).sum()) != pytest.approx(float((alone * weight).sum()), rel=1e-3)
