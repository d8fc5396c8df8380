"""Benchmark of per-class threshold tuning: exact search against grid search, and the rare-class rules.

Part 1 (--labels, the real label matrix, 31,072 x 28): scores are simulated, since no real predictions
exist yet, in two models, each with a per-class separability q_c ~ U(0, 1) (seeded):
  * beta:  positives ~ Beta(2 + 4 q_c, 2), skewed high; 20% of positives are hard and scored like
           negatives; negatives ~ Beta(1, 6 + 24 q_c), skewed low. All classes share one probability scale.
  * logit: binormal on the logit scale, negatives ~ N(logit(share_c) - 1, 1), positives shifted by
           1.5 + 2.5 q_c: rare classes get low probabilities, as from a network trained with BCE on
           imbalanced data (a single 0.5 threshold fails on them).
For each model: the time of model.thresholds' exact search (all 28 classes) next to a 100-point grid search
(thresholds 0.00, 0.01, ..., 0.99; predict score >= t) scored with scikit-learn's f1_score, and the same grid
scored with vectorised numpy counts (a faster baseline than the issue asks for), medians over --repeats runs
in this run; and the in-sample F1 each finds (the exact search must never be lower on any class). Then
macro F1 of the rare-class rules, cross-fitted (5 stratified splits, each scored with thresholds tuned on
the others), medians over --seeds simulations, tuned on all rows (pooled out-of-fold predictions) and on a
random fifth (one fold's validation predictions); "rare 6" is the mean F1 of the six rarest classes.

Part 2 (--val_predictions, the demo's or a training run's val_predictions.npz files or model dirs, pooled):
macro F1 of one 0.5 threshold, of tuned thresholds in-sample (optimistic), and cross-fitted for the plain
fit and each rare-class rule; medians (min-max) over --seeds split seeds.

Usage:
  python bench/thresholds.py --labels ../shared/data/hpa-labels/train.csv
  python bench/thresholds.py --val_predictions runs/fold0 runs/fold1 ...
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Sequence

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import read_label_matrix  # noqa: E402
from model import thresholds as thr  # noqa: E402

GRID = np.round(np.arange(100) * 0.01, 2)
RARE_COUNT = 6


def simulate_scores(labels: np.ndarray, model: str, seed: int, class_seed: int = 7) -> np.ndarray:
    """Simulated probabilities for a label matrix (see the module docstring for the two models).

    The per-class separability depends on `class_seed` only, the noise on `seed`.
    """
    q = np.random.default_rng(class_seed).uniform(0.0, 1.0, labels.shape[1])
    rng = np.random.default_rng(seed)
    if model == "beta":
        pos = rng.beta(2 + 4 * q, 2, size=labels.shape)
        neg = rng.beta(1, 6 + 24 * q, size=labels.shape)
        hard = rng.random(labels.shape) < 0.2
        return np.where((labels == 1) & ~hard, pos, neg)
    if model == "logit":
        share = np.clip(labels.mean(axis=0), 1e-6, 1 - 1e-6)
        z = rng.normal(np.log(share / (1 - share)) - 1.0, 1.0, size=labels.shape) + (1.5 + 2.5 * q) * labels
        return 1.0 / (1.0 + np.exp(-z))
    raise ValueError(f"unknown score model {model!r}")


def grid_sklearn(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best of the 100 grid thresholds per class, each scored with sklearn.metrics.f1_score."""
    from sklearn.metrics import f1_score

    best_t = np.zeros(y_true.shape[1])
    best_f = np.full(y_true.shape[1], -1.0)
    for c in range(y_true.shape[1]):
        for t in GRID:
            f = f1_score(y_true[:, c], y_score[:, c] >= t, zero_division=0)
            if f > best_f[c]:
                best_t[c], best_f[c] = t, f
    return best_t, best_f


def grid_numpy(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same grid search with vectorised numpy counts (one class at a time, all thresholds at once)."""
    best_t = np.zeros(y_true.shape[1])
    best_f = np.zeros(y_true.shape[1])
    for c in range(y_true.shape[1]):
        pred = y_score[:, c][None, :] >= GRID[:, None]
        y = y_true[:, c].astype(bool)
        tp = (pred & y).sum(axis=1)
        denom = pred.sum(axis=1) + y.sum()
        f = np.divide(2.0 * tp, denom, out=np.zeros(len(GRID)), where=denom > 0)
        j = int(np.argmax(f))
        best_t[c], best_f[c] = GRID[j], f[j]
    return best_t, best_f


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _in_sample_f1(y_true: np.ndarray, y_score: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    return thr.score_predictions(y_true, thr.apply_thresholds(y_score, thresholds)).f1


def _fmt_range(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.4f} ({min(values):.4f}-{max(values):.4f})"


def speed_table(labels: np.ndarray, repeats: int) -> None:
    """Part 1a: exact search against the two grid searches, time and F1, for both score models."""
    print(
        f"\n## Exact search vs 100-point grid, {labels.shape[0]} x {labels.shape[1]} labels, simulated scores"
    )
    print(f"medians over {repeats} runs (grid with sklearn: over {max(1, repeats // 2)} runs)\n")
    print("| scores | method | time (s) | speed-up of exact | macro F1 in-sample | classes exact < method |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    targets = []
    for model in ("beta", "logit"):
        y_score = simulate_scores(labels, model, seed=0)
        exact_t, _ = thr.best_f1_thresholds(labels, y_score)
        exact_f1 = _in_sample_f1(labels, y_score, exact_t)
        t_exact = _median_time(lambda s=y_score: thr.best_f1_thresholds(labels, s), repeats)
        print(f"| {model} | exact (model.thresholds) | {t_exact:.3f} | 1.0x | {exact_f1.mean():.4f} | - |")
        for name, fn, reps in (
            ("grid, sklearn f1_score", grid_sklearn, max(1, repeats // 2)),
            ("grid, numpy counts", grid_numpy, repeats),
        ):
            sys.stderr.write(f"timing {name} on {model} scores...\n")
            grid_t, _ = fn(labels, y_score)
            grid_f1 = _in_sample_f1(labels, y_score, grid_t)
            t = _median_time(lambda f=fn, s=y_score: f(labels, s), reps)
            worse = int((exact_f1 < grid_f1 - 1e-12).sum())
            print(f"| {model} | {name} | {t:.3f} | {t / t_exact:.1f}x | {grid_f1.mean():.4f} | {worse} |")
            if "sklearn" in name:
                targets.append((model, t / t_exact, worse, exact_f1.mean() - grid_f1.mean()))
    print("\nIssue target (>= 10x faster than the sklearn grid, never a lower F1):")
    for model, ratio, worse, gain in targets:
        ok = ratio >= 10 and worse == 0
        print(
            f"- {model}: {ratio:.0f}x faster, {worse} classes lower, macro F1 +{gain:.4f}: "
            f"{'met' if ok else 'NOT met'}"
        )


def _rule_configs(min_positives: int) -> list[tuple[str, thr.ThresholdConfig]]:
    return [
        ("fit (no rare rule)", thr.ThresholdConfig(rare_rule="fit")),
        (
            f"rate, < {min_positives} positives",
            thr.ThresholdConfig(min_positives=min_positives, rare_rule="rate"),
        ),
        (
            f"shrink, < {min_positives} positives",
            thr.ThresholdConfig(min_positives=min_positives, rare_rule="shrink"),
        ),
    ]


def rules_table(labels: np.ndarray, seeds: int, min_positives: int) -> None:
    """Part 1b: cross-fitted macro F1 of the rare-class rules on simulated scores."""
    rare = np.argsort(labels.sum(axis=0), kind="stable")[:RARE_COUNT]
    print(f"\n## Rare-class rules on simulated scores, cross-fitted in 5 splits, medians over {seeds} seeds")
    print(
        f"rare {RARE_COUNT} = classes {rare.tolist()} with {labels.sum(axis=0)[rare].tolist()} positives "
        "in all rows\n"
    )
    print("| scores | tuned on | thresholds | macro F1 | rare 6 F1 |")
    print("| --- | --- | --- | ---: | ---: |")
    for model in ("beta", "logit"):
        for scope in ("all rows", "one fifth"):
            rows: dict[str, tuple[list[float], list[float]]] = {}
            for seed in range(seeds):
                y_score = simulate_scores(labels, model, seed=100 + seed)
                y_true = labels
                if scope == "one fifth":
                    idx = np.random.default_rng(seed).permutation(len(labels))[: len(labels) // 5]
                    y_true, y_score = labels[idx], y_score[idx]
                base = thr.score_predictions(
                    y_true, thr.apply_thresholds(y_score, np.full(y_true.shape[1], 0.5))
                )
                rows.setdefault("one threshold 0.5", ([], []))
                rows["one threshold 0.5"][0].append(base.macro_f1)
                rows["one threshold 0.5"][1].append(float(base.f1[rare].mean()))
                for name, cfg in _rule_configs(min_positives):
                    s = thr.cross_fit(y_true, y_score, cfg, n_splits=5, seed=seed).scores
                    rows.setdefault(name, ([], []))
                    rows[name][0].append(s.macro_f1)
                    rows[name][1].append(float(s.f1[rare].mean()))
            for name, (macro, rare_f1) in rows.items():
                print(
                    f"| {model} | {scope} | {name} | {statistics.median(macro):.4f} | "
                    f"{statistics.median(rare_f1):.4f} |"
                )
            sys.stderr.write(f"rules on {model} scores, {scope}: done\n")


def val_predictions_table(paths: Sequence[str], seeds: int, min_positives: int) -> list[str]:
    """Part 2: macro F1 of the threshold settings on real validation predictions; returns the table lines."""
    from model import evaluate

    pooled = evaluate.pool_predictions([evaluate.load_val_predictions(p) for p in paths])
    y_true, y_score = pooled.labels, pooled.scores
    support = y_true.sum(axis=0)
    lines = [
        f"\n## Validation predictions: {len(y_true)} samples from {len(paths)} file(s); "
        f"classes with < {min_positives} positives: {int((support < min_positives).sum())}",
        f"cross-fitted in 5 splits, medians (min-max) over {seeds} split seeds\n",
        "| thresholds | macro F1 | micro F1 |",
        "| --- | ---: | ---: |",
    ]
    base = thr.score_predictions(y_true, thr.apply_thresholds(y_score, np.full(y_true.shape[1], 0.5)))
    lines.append(f"| one threshold 0.5 | {base.macro_f1:.4f} | {base.micro_f1:.4f} |")
    insample = thr.score_predictions(
        y_true, thr.apply_thresholds(y_score, thr.tune_thresholds(y_true, y_score, thr.ThresholdConfig()))
    )
    lines.append(
        f"| tuned (default rule), in-sample, optimistic | {insample.macro_f1:.4f} | {insample.micro_f1:.4f} |"
    )
    for name, cfg in _rule_configs(min_positives):
        runs = [thr.cross_fit(y_true, y_score, cfg, n_splits=5, seed=s).scores for s in range(seeds)]
        lines.append(
            f"| tuned, {name}, cross-fitted | {_fmt_range([r.macro_f1 for r in runs])} | "
            f"{_fmt_range([r.micro_f1 for r in runs])} |"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parses flags and prints the tables."""
    p = argparse.ArgumentParser(
        prog="python bench/thresholds.py",
        description="Per-class threshold tuning: exact vs grid search on simulated scores over a real label "
        "matrix (--labels), and the threshold settings on validation predictions (--val_predictions).",
    )
    p.add_argument("--labels", help="an Id,Target label file (e.g. ../shared/data/hpa-labels/train.csv)")
    p.add_argument(
        "--val_predictions", nargs="+", metavar="PATH", help="val_predictions.npz files or model dirs"
    )
    p.add_argument(
        "--repeats", type=int, default=5, help="timing repeats (the sklearn grid runs half as many)"
    )
    p.add_argument("--seeds", type=int, default=5, help="simulations / split seeds per setting")
    p.add_argument(
        "--min_positives", type=int, default=thr.ThresholdConfig().min_positives, help="rare-class minimum"
    )
    p.add_argument("--skip_rules", action="store_true", help="part 1: time and F1 only, no rare-rule table")
    args = p.parse_args(argv)
    if not args.labels and not args.val_predictions:
        p.error("give --labels and/or --val_predictions")
    if args.labels:
        if not os.path.exists(args.labels):
            p.error(f"{args.labels} not found")
        labels = read_label_matrix(args.labels)
        speed_table(labels, args.repeats)
        if not args.skip_rules:
            rules_table(labels, args.seeds, args.min_positives)
    if args.val_predictions:
        try:
            print("\n".join(val_predictions_table(args.val_predictions, args.seeds, args.min_positives)))
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
