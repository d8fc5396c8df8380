"""Per-class thresholds: exact search against brute force, rare-class rules, cross-fitting, metrics, JSON."""

import json

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_score, recall_score

import schemas
from model import thresholds as thr


def _brute_best_f1(y: np.ndarray, s: np.ndarray) -> float:
    """Best F1 over every threshold that can change the prediction (each distinct score, and above all)."""
    best = 0.0
    for t in [*np.unique(s), np.inf]:
        best = max(best, f1_score(y, s >= t, zero_division=0))
    return best


@pytest.mark.parametrize("seed", range(40))
def test_exact_search_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(1, 25)), 3
    y = (rng.random((n, c)) < rng.uniform(0.05, 0.7, c)).astype(int)
    s = rng.random((n, c))
    if seed % 2:
        s = np.round(s, 1)  # many ties
    t, f = thr.best_f1_thresholds(y, s)
    for k in range(c):
        brute = _brute_best_f1(y[:, k], s[:, k])
        achieved = f1_score(y[:, k], s[:, k] >= t[k], zero_division=0)
        assert achieved == pytest.approx(brute)
        assert f[k] == pytest.approx(brute)


def test_threshold_lies_between_kept_and_dropped_scores():
    y = np.array([[1], [1], [0], [1], [0], [0]])
    s = np.array([[0.9], [0.8], [0.7], [0.6], [0.2], [0.1]])
    t, f = thr.best_f1_thresholds(y, s)
    # Keeping the top 4 (3 TP, 1 FP) gives F1 6/7, the best; the cut falls between 0.6 and 0.2.
    assert f[0] == pytest.approx(6 / 7)
    assert t[0] == pytest.approx(0.4)


def test_ties_cannot_be_split():
    y = np.array([[1], [0], [0], [0]])
    s = np.array([[0.5], [0.5], [0.5], [0.1]])
    t, f = thr.best_f1_thresholds(y, s)
    assert f[0] == pytest.approx(0.5)  # the three tied samples go together: 1 TP, 2 FP
    assert (s[:, 0] >= t[0]).sum() == 3


def test_class_without_positives_predicts_nothing():
    y = np.zeros((5, 1), dtype=int)
    s = np.linspace(0.1, 0.9, 5)[:, None]
    t, f = thr.best_f1_thresholds(y, s)
    assert (s >= t).sum() == 0 and f[0] == 0


def _rare_case(rng, n=400, rare_pos=4, common_share=0.3):
    y = np.zeros((n, 2), dtype=int)
    y[rng.choice(n, int(common_share * n), replace=False), 0] = 1
    y[rng.choice(n, rare_pos, replace=False), 1] = 1
    s = np.clip(0.35 * y + rng.random((n, 2)) * 0.7, 0, 1)
    return y, s


@pytest.mark.parametrize("rule", ["rate", "shrink"])
def test_rare_rule_engages_below_minimum_only(rule):
    y, s = _rare_case(np.random.default_rng(0), rare_pos=4)
    exact, _ = thr.best_f1_thresholds(y, s)
    fit = thr.fit_thresholds(y, s, thr.ThresholdConfig(min_positives=5, rare_rule=rule))
    assert fit.rules == ("fit", rule)
    assert fit.positives == (120, 4)
    assert fit.values[0] == exact[0]
    assert fit.values[1] != exact[1]
    at_minimum = thr.fit_thresholds(y, s, thr.ThresholdConfig(min_positives=4, rare_rule=rule))
    assert at_minimum.rules == ("fit", "fit")
    np.testing.assert_array_equal(at_minimum.values, exact)


def test_rate_rule_matches_class_share():
    y, s = _rare_case(np.random.default_rng(1), rare_pos=6)
    fit = thr.fit_thresholds(y, s, thr.ThresholdConfig(min_positives=10, rare_rule="rate"))
    assert (s[:, 1] >= fit.values[1]).sum() == 6
    prior = [0.3, 0.02]  # a share given from elsewhere (e.g. the whole label file): 8 of 400
    fit = thr.fit_thresholds(y, s, thr.ThresholdConfig(min_positives=10, rare_rule="rate"), prior=prior)
    assert (s[:, 1] >= fit.values[1]).sum() == 8
    assert fit.values[0] == thr.best_f1_thresholds(y, s)[0][0]


def test_shrink_rule_weights_fit_and_global():
    y, s = _rare_case(np.random.default_rng(2), rare_pos=3)
    exact, _ = thr.best_f1_thresholds(y, s)
    fit = thr.fit_thresholds(
        y, s, thr.ThresholdConfig(min_positives=12, rare_rule="shrink", global_threshold=0.4)
    )
    assert fit.values[1] == pytest.approx(0.25 * exact[1] + 0.75 * 0.4)
    assert fit.global_threshold == 0.4
    y[:, 1] = 0
    fit = thr.fit_thresholds(
        y, s, thr.ThresholdConfig(min_positives=12, rare_rule="shrink", global_threshold=0.4)
    )
    assert fit.values[1] == 0.4


def test_fitted_global_threshold_is_micro_f1_optimal():
    rng = np.random.default_rng(3)
    y, s = _rare_case(rng, n=60)
    fit = thr.fit_thresholds(y, s, thr.ThresholdConfig(rare_rule="shrink"))
    micro = f1_score(y.ravel(), s.ravel() >= fit.global_threshold)
    assert micro == pytest.approx(_brute_best_f1(y.ravel(), s.ravel()))


def _low_scored_rare_classes(seed, n=2000):
    """Two common and four rare classes (4-10 positives); rare classes get low probabilities, as from a
    network trained with BCE on imbalanced data (bench/thresholds.py's `logit` model)."""
    rng = np.random.default_rng(seed)
    share = np.array([0.3, 0.2, 0.002, 0.003, 0.004, 0.005])
    y = (rng.random((n, len(share))) < share).astype(int)
    for c in range(len(share)):  # at least 2 positives
        if y[:, c].sum() < 2:
            y[rng.choice(n, 2, replace=False), c] = 1
    z = rng.normal(np.log(share / (1 - share)) - 1.0, 1.0, y.shape) + 3.0 * y
    return y, 1 / (1 + np.exp(-z))


def test_default_rule_beats_plain_fit_on_low_scored_rare_classes():
    # Paired over 30 simulations: mean gain of the rare classes' cross-fitted F1. Measured: +0.026 with a
    # standard error of 0.008, so the bound leaves about two standard errors of room.
    gains = []
    for seed in range(30):
        y, s = _low_scored_rare_classes(seed)
        default = thr.cross_fit(y, s, thr.ThresholdConfig(), seed=seed).scores.f1[2:].mean()
        plain = thr.cross_fit(y, s, thr.ThresholdConfig(rare_rule="fit"), seed=seed).scores.f1[2:].mean()
        gains.append(default - plain)
    assert thr.ThresholdConfig().rare_rule == "rate"
    assert np.mean(gains) > 0.01


def test_cross_fit_never_tunes_on_the_scored_split():
    rng = np.random.default_rng(4)
    n = 200
    y = (rng.random((n, 3)) < 0.3).astype(int)
    s = rng.random((n, 3))
    s[:, 0] = np.arange(n) / n  # column 0 identifies each row
    seen = []

    def spy(yt, ys):
        seen.append(set(np.round(ys[:, 0] * n).astype(int).tolist()))
        return thr.tune_thresholds(yt, ys)

    cf = thr.cross_fit(y, s, n_splits=4, seed=1, tuner=spy)
    assert len(seen) == 4
    for k, rows in enumerate(seen):
        held = set(np.flatnonzero(cf.splits == k).tolist())
        assert rows.isdisjoint(held)
        assert rows | held == set(range(n))


def test_cross_fit_thresholds_ignore_the_scored_split_labels():
    rng = np.random.default_rng(5)
    y = (rng.random((300, 4)) < 0.25).astype(int)
    s = np.clip(0.3 * y + rng.random((300, 4)) * 0.7, 0, 1)
    a = thr.cross_fit(y, s, seed=3)
    flipped = y.copy()
    flipped[a.splits == 2] = 1 - flipped[a.splits == 2]
    b = thr.cross_fit(flipped, s, splits=a.splits)
    np.testing.assert_array_equal(a.thresholds[2], b.thresholds[2])
    assert not np.array_equal(a.thresholds[0], b.thresholds[0])
    np.testing.assert_array_equal(a.predictions[a.splits == 2], b.predictions[a.splits == 2])


def test_stratified_splits_spread_rare_positives():
    rng = np.random.default_rng(6)
    y = (rng.random((1000, 6)) < [0.4, 0.2, 0.05, 0.02, 0.011, 0.007]).astype(int)
    splits = thr.stratified_splits(y, 5, seed=0)
    assert set(splits.tolist()) == set(range(5))
    sizes = np.bincount(splits, minlength=5)
    assert sizes.max() - sizes.min() <= 1
    rarest = int(np.argmin(y.sum(axis=0)))
    per_split = np.bincount(splits[y[:, rarest] == 1], minlength=5)
    assert per_split.max() - per_split.min() <= 1
    for c in range(6):
        counts = np.bincount(splits[y[:, c] == 1], minlength=5)
        assert counts.min() > 0 and counts.max() - counts.min() <= max(2, 0.2 * counts.mean())
    np.testing.assert_array_equal(splits, thr.stratified_splits(y, 5, seed=0))


@pytest.mark.parametrize("seed", range(5))
def test_score_predictions_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random((50, 5)) < 0.3).astype(int)
    p = (rng.random((50, 5)) < 0.3).astype(int)
    y[:, 4] = 0  # a class without support
    if seed % 2:
        p[:, 4] = 0  # and without predictions
    got = thr.score_predictions(y, p)
    kw = dict(zero_division=0)
    np.testing.assert_allclose(got.f1, f1_score(y, p, average=None, **kw))
    np.testing.assert_allclose(got.precision, precision_score(y, p, average=None, **kw))
    np.testing.assert_allclose(got.recall, recall_score(y, p, average=None, **kw))
    assert got.macro_f1 == pytest.approx(f1_score(y, p, average="macro", **kw))
    assert got.micro_f1 == pytest.approx(f1_score(y, p, average="micro", **kw))
    np.testing.assert_array_equal(got.support, y.sum(axis=0))


def test_apply_thresholds_at_least_one():
    s = np.array([[0.9, 0.2, 0.1], [0.1, 0.2, 0.3], [0.0, 0.0, 0.0]])
    t = np.array([0.5, 0.25, 0.5])
    np.testing.assert_array_equal(thr.apply_thresholds(s, t), [[1, 0, 0], [0, 0, 0], [0, 0, 0]])
    # Row 1: margins -0.4, -0.05, -0.2 -> class 1.
    np.testing.assert_array_equal(thr.apply_thresholds(s, t, at_least_one=True)[1:], [[0, 1, 0], [0, 1, 0]])
    with pytest.raises(ValueError, match="do not fit"):
        thr.apply_thresholds(s, t[:2])


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="shape"):
        thr.tune_thresholds(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="only 0 and 1"):
        thr.tune_thresholds(np.full((4, 2), 2), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="NaN"):
        thr.tune_thresholds(np.zeros((4, 2)), np.full((4, 2), np.nan))
    with pytest.raises(ValueError, match="rare_rule"):
        thr.ThresholdConfig(rare_rule="median")
    with pytest.raises(ValueError, match="min_positives"):
        thr.ThresholdConfig(min_positives=-1)
    with pytest.raises(ValueError, match="prior"):
        thr.fit_thresholds(np.zeros((4, 2)), np.zeros((4, 2)), prior=[0.5])
    with pytest.raises(ValueError, match="n_splits"):
        thr.stratified_splits(np.zeros((3, 2)), 5)


def _full_fit(seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random((300, schemas.NUM_CLASSES)) < 0.1).astype(int)
    s = np.clip(0.3 * y + rng.random(y.shape) * 0.7, 0, 1)
    return thr.fit_thresholds(y, s)


def test_save_load_round_trip(tmp_path):
    fit = _full_fit()
    path = str(tmp_path / "t.json")
    thr.save_thresholds(path, fit, sources=["a", "b"])
    data = json.loads(open(path).read())
    assert data["class_names"] == list(schemas.CLASS_NAMES)
    assert data["sources"] == ["a", "b"]
    back = thr.load_thresholds(path)
    np.testing.assert_array_equal(back.values, fit.values)
    assert back.rules == fit.rules and back.positives == fit.positives and back.config == fit.config
    assert back.num_samples == 300


def test_load_rejects_other_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="hpa-evaluate"):
        thr.load_thresholds(str(tmp_path / "missing.json"))
    data = thr.thresholds_to_dict(_full_fit())
    bad = tmp_path / "bad.json"
    for change, msg in (
        ({"class_names": list(reversed(schemas.CLASS_NAMES))}, "class names"),
        ({"thresholds": [0.5] * 3}, "finite thresholds"),
        ({"format": "other"}, "format"),
    ):
        bad.write_text(json.dumps({**data, **change}))
        with pytest.raises(ValueError, match=msg):
            thr.load_thresholds(str(bad))
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        thr.load_thresholds(str(bad))


# --- thresholds for an ensemble's average -------------------------------------------------------------------


def test_ensemble_thresholds_with_one_model_predict_what_the_tuned_ones_do():
    rng = np.random.default_rng(3)
    scores = np.round(rng.random((200, 6)), 2)  # ties included
    tuned = rng.uniform(0.2, 0.9, 6)
    matched = thr.ensemble_thresholds(tuned, scores[None])
    np.testing.assert_array_equal(thr.apply_thresholds(scores, matched), thr.apply_thresholds(scores, tuned))


def test_ensemble_thresholds_keep_the_single_models_decision_rate():
    rng = np.random.default_rng(4)
    members = rng.random((5, 400, 4))
    tuned = np.array([0.3, 0.5, 0.8, 0.95])
    matched = thr.ensemble_thresholds(tuned, members)
    share_single = (members >= tuned).mean(axis=(0, 1))
    share_average = (members.mean(axis=0) >= matched).mean(axis=0)
    np.testing.assert_allclose(share_average, share_single, atol=0.5 / 400 + 1e-12)
    # The average of 5 uniform scores is less spread: an upper-tail threshold moves down, a lower one up.
    assert matched[3] < tuned[3] and matched[0] > tuned[0]


def test_ensemble_thresholds_beat_the_tuned_values_on_averaged_scores():
    """Models = signal + independent noise: thresholds tuned on one model's scores, applied to the average of
    five, lose recall on a rare class; matching the decision rate gets it back."""
    rng = np.random.default_rng(5)
    n, k = 4000, 5
    y = (rng.random((n, 1)) < 0.08).astype(np.int8)
    members = 1 / (1 + np.exp(-(2.0 * y - 2.5 + rng.normal(0, 1.3, (k, n, 1)))))
    tuned = thr.tune_thresholds(y, members[0])  # tuned on one model's scores, as out-of-fold thresholds are
    average = members.mean(axis=0)
    matched = thr.ensemble_thresholds(tuned, members)
    f1_tuned = thr.score_predictions(y, thr.apply_thresholds(average, tuned)).macro_f1
    f1_matched = thr.score_predictions(y, thr.apply_thresholds(average, matched)).macro_f1
    assert f1_matched > f1_tuned + 0.02, (f1_matched, f1_tuned)


def test_ensemble_thresholds_bad_input():
    with pytest.raises(ValueError, match="models, samples, classes"):
        thr.ensemble_thresholds([0.5], np.zeros((4, 1)))
    with pytest.raises(ValueError, match="do not fit"):
        thr.ensemble_thresholds([0.5, 0.5], np.zeros((2, 4, 3)))
    with pytest.raises(ValueError, match="NaN"):
        thr.ensemble_thresholds([0.5], np.full((2, 4, 1), np.nan))
