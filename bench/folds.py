"""Benchmark of fold assignment: pipelines.folds vs iterative-stratification, scikit-multilearn and KFold.

One run, one table: for the given label file(s) (concatenated into one label matrix) and the same matrix
tiled --tile times, every method's median time over --repeats runs, Sechidis et al.'s LD, LPD, ED, FZ and FLZ
(`pipelines.folds.fold_quality`, for every method alike) and the fold sizes. Then the time growth from 1x to
--tile x rows, and the issue's targets checked on figures measured in this run.

The "with groups" rows use synthetic groups, since the real duplicate clusters are not in the label file: the
rows are shuffled (seeded) and cut into consecutive groups of 1 to --max_group samples (sizes uniform). Random
groups mix unrelated label sets, which is harder to stratify than clusters of near-duplicates. The tiled
matrix repeats the rows and the groups (a copy's groups get new ids), so it has 4x the groups, while its
distinct label sets stay the same.

Timing: --repeats runs per method (median shown), except scikit-multilearn on the tiled matrix
(--tile_repeats, default 1: one run takes about a minute).

Usage:
  python bench/folds.py --labels ../shared/data/hpa-labels/train.csv [--labels more.csv ...]
  python -m bench.folds --labels ...
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import read_label_matrix  # noqa: E402
from pipelines.folds import assign_folds, fold_quality  # noqa: E402

Method = Callable[[np.ndarray, np.ndarray, int, int], np.ndarray]


def random_groups(n: int, max_group: int, seed: int) -> np.ndarray:
    """Group id per row: rows shuffled, then cut into consecutive groups of 1..max_group rows."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, max_group + 1, size=n)
    ids = np.repeat(np.arange(n), sizes)[:n]
    out = np.empty(n, dtype=np.int64)
    out[rng.permutation(n)] = ids
    return out


def _folds_from_splits(splits, n: int) -> np.ndarray:
    folds = np.full(n, -1, dtype=np.int64)
    for j, (_, test) in enumerate(splits):
        folds[test] = j
    return folds


def _random_kfold(y, groups, k, seed):
    from sklearn.model_selection import KFold

    return _folds_from_splits(KFold(k, shuffle=True, random_state=seed).split(y), len(y))


def _iterstrat(y, groups, k, seed):
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

    splitter = MultilabelStratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return _folds_from_splits(splitter.split(np.zeros(len(y)), y), len(y))


def _skmultilearn(order):
    def run(y, groups, k, seed):
        from skmultilearn.model_selection import IterativeStratification

        np.random.seed(seed)  # it draws its ties from the global generator; random_state is ignored
        splitter = IterativeStratification(n_splits=k, order=order)
        return _folds_from_splits(splitter.split(np.zeros(len(y)), y), len(y))

    return run


def _ours(order, with_groups=False):
    def run(y, groups, k, seed):
        return assign_folds(y, k, seed, order=order, groups=groups if with_groups else None)

    return run


METHODS: list[tuple[str, Method, bool]] = [
    ("random KFold", _random_kfold, False),
    ("iterative-stratification (MultilabelStratifiedKFold)", _iterstrat, False),
    ("scikit-multilearn, order 1", _skmultilearn(1), True),
    ("scikit-multilearn, order 2", _skmultilearn(2), True),
    ("pipelines.folds, order 1", _ours(1), False),
    ("pipelines.folds, order 2", _ours(2), False),
    ("pipelines.folds, order 2, with groups", _ours(2, True), False),
]
ITERSTRAT, SKML2, OURS1, OURS2, OURS2G = (
    METHODS[1][0],
    METHODS[3][0],
    METHODS[4][0],
    METHODS[5][0],
    METHODS[6][0],
)


def measure(fn: Method, y: np.ndarray, groups: np.ndarray, k: int, seed: int, repeats: int) -> dict:
    """Median time over repeats (same seed) and the quality of the folds."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        folds = fn(y, groups, k, seed)
        times.append(time.perf_counter() - t0)
    if folds.min() < 0:
        raise RuntimeError("a method left samples without a fold")
    sizes = np.bincount(folds, minlength=k)
    return {"time": statistics.median(times), "sizes": sizes, "folds": folds, **fold_quality(y, folds, k)}


def groups_kept(groups: np.ndarray, folds: np.ndarray) -> bool:
    """True when every group's members share one fold."""
    order = np.argsort(groups, kind="stable")
    g, f = groups[order], folds[order]
    same_group = g[1:] == g[:-1]
    return bool(np.all(f[1:][same_group] == f[:-1][same_group]))


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark and prints the table."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--labels", action="append", required=True, help="Id,Target label CSV (repeat to concatenate)"
    )
    p.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of every method and of the synthetic groups")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per method at 1x; the median is shown")
    p.add_argument("--tile", type=int, default=4, help="tiling factor of the scaling rows (default 4)")
    p.add_argument(
        "--tile_repeats",
        type=int,
        default=1,
        help="timed runs of scikit-multilearn (slow) on the tiled matrix",
    )
    p.add_argument("--max_group", type=int, default=4, help="largest synthetic group (default 4)")
    p.add_argument(
        "--skip_skmultilearn_tiled", action="store_true", help="skip the slow skmultilearn tiled runs"
    )
    args = p.parse_args(argv)
    if args.folds < 2 or args.repeats < 1 or args.tile < 1 or args.tile_repeats < 1 or args.max_group < 1:
        p.error("--folds must be >= 2; --repeats, --tile, --tile_repeats and --max_group >= 1")

    y = read_label_matrix(args.labels)
    groups = random_groups(len(y), args.max_group, args.seed)
    name = " + ".join(os.path.basename(x) for x in args.labels)
    datasets = [(f"{name}, {y.shape[0]:,} x {y.shape[1]}", y, groups, args.repeats)]
    if args.tile > 1:
        yt = np.tile(y, (args.tile, 1))
        gt = np.concatenate([groups + i * (groups.max() + 1) for i in range(args.tile)])
        datasets.append((f"{name} tiled {args.tile}x, {yt.shape[0]:,} x {yt.shape[1]}", yt, gt, args.repeats))

    results: dict[tuple[int, str], dict] = {}
    for d, (label, yy, gg, reps) in enumerate(datasets):
        for method, fn, slow in METHODS:
            if d > 0 and slow and args.skip_skmultilearn_tiled:
                continue
            print(f"[{label}] {method} ...", file=sys.stderr, flush=True)
            runs = reps if d == 0 or not slow else args.tile_repeats
            results[d, method] = r = measure(fn, yy, gg, args.folds, args.seed, runs)
            if method == OURS2G and not groups_kept(gg, r["folds"]):
                raise SystemExit(f"group constraint violated on {label}")

    print(
        f"\nFold assignment, {args.folds} folds, seed {args.seed}; time = median of the runs; "
        "LD/LPD/ED lower is better"
    )
    print("| data | method | time | x iterstrat | LD | LPD | ED | FZ | FLZ | fold sizes |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for d, (label, *_rest) in enumerate(datasets):
        base = results[d, ITERSTRAT]["time"]
        for j, (method, _, _) in enumerate(METHODS):
            r = results.get((d, method))
            if r is None:
                continue
            sizes = f"{r['sizes'].min()}-{r['sizes'].max()}"
            print(
                f"| {label if j == 0 else ''} | {method} | {r['time']:.3f} s | {r['time'] / base:.2f} "
                f"| {r['LD']:.5f} | {r['LPD']:.5f} | {r['ED']:.2f} | {r['FZ']} | {r['FLZ']} | {sizes} |"
            )
    print(
        f"\nWith groups: {len(np.unique(groups)):,} groups of 1-{args.max_group} rows at 1x; "
        "every group kept in one fold."
    )

    if len(datasets) > 1:
        print(f"\nTime growth from 1x to {args.tile}x rows")
        print(f"| method | time 1x | time {args.tile}x | ratio |")
        print("| --- | --- | --- | --- |")
        for method, _, _ in METHODS:
            if (1, method) in results:
                t1, t4 = results[0, method]["time"], results[1, method]["time"]
                print(f"| {method} | {t1:.3f} s | {t4:.3f} s | {t4 / max(t1, 1e-9):.2f} |")

    r2, sk2, it = results[0, OURS2], results[0, SKML2], results[0, ITERSTRAT]
    checks = [
        (
            f"order-2 LD <= scikit-multilearn order 2 ({r2['LD']:.5f} vs {sk2['LD']:.5f})",
            r2["LD"] <= sk2["LD"],
        ),
        (
            f"order-2 LPD <= scikit-multilearn order 2 ({r2['LPD']:.5f} vs {sk2['LPD']:.5f})",
            r2["LPD"] <= sk2["LPD"],
        ),
    ]
    for method in (OURS1, OURS2, OURS2G):
        ratio = results[0, method]["time"] / it["time"]
        checks.append((f"{method}: time <= 1.5x iterative-stratification ({ratio:.2f}x)", ratio <= 1.5))
    if len(datasets) > 1:
        for method in (OURS1, OURS2, OURS2G):
            ratio = results[1, method]["time"] / results[0, method]["time"]
            text = f"{method}: {args.tile}x rows cost <= {args.tile + 1}x time ({ratio:.2f}x)"
            checks.append((text, ratio <= args.tile + 1))
    print("\nTargets (figures from this run)")
    for text, ok in checks:
        print(f"- [{'met' if ok else 'MISSED'}] {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
