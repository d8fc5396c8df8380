"""How random is the training order a cache serves? The new per-epoch permutation beside the old cache's.

    .venv/bin/python -m bench.cache_order [--samples 24858] [--shards 83] [--batch_size 32] [--seeds 3]

Default size: the training folds of one 5-fold split of the competition's 31,072 samples (24,858), in
Id-sorted shards of about 150 MB (83 at 512 px), batch 32. Works on record positions only (no images), so
it runs at full size in seconds.

For two consecutive epochs of each order it prints:
  - once per epoch: every record exactly once in each epoch (the new order; the old one is a stream, so
    its "epoch" is the next N records, in which records may repeat or be missing);
  - the Spearman rank correlation of a record's positions in the two epochs (0 for independent orders; the
    standard error of independent draws is 1/sqrt(N - 1));
  - the share of same-batch pairs of epoch 1 that meet in one batch again in epoch 2, beside (B - 1)/(N - 1),
    its expectation for independent uniform permutations;
  - the mean distance, in Id-order positions, between records of one batch (N/3 for uniform draws): how far
    from the Id-sorted neighbourhood a batch reaches.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script too

from model import epoch_order  # noqa: E402


def _positions(order: np.ndarray, n: int) -> np.ndarray:
    pos = np.full(n, np.nan)
    pos[order] = np.arange(len(order))
    return pos


def spearman(a: np.ndarray, b: np.ndarray, n: int) -> float:
    """Rank correlation of the records' positions in two epochs (records present in both)."""
    pa, pb = _positions(a, n), _positions(b, n)
    both = ~(np.isnan(pa) | np.isnan(pb))
    ra = np.argsort(np.argsort(pa[both]))
    rb = np.argsort(np.argsort(pb[both]))
    return float(np.corrcoef(ra, rb)[0, 1])


def batch_pairs_met_again(a: np.ndarray, b: np.ndarray, batch: int, n: int) -> float:
    """Share of pairs of records batched together in epoch a that are batched together again in b."""
    batch_b = np.full(n, -1)
    batch_b[b[: len(b) // batch * batch]] = np.arange(len(b) // batch * batch) // batch
    met = pairs = 0
    for start in range(0, len(a) // batch * batch, batch):
        members = batch_b[a[start : start + batch]]
        members = members[members >= 0]
        _, counts = np.unique(members, return_counts=True)
        met += int((counts * (counts - 1) // 2).sum())
        pairs += batch * (batch - 1) // 2
    return met / pairs


def batch_spread(a: np.ndarray, batch: int) -> float:
    """Mean |i - j| over pairs of Id-order positions within a batch."""
    spreads = []
    for start in range(0, len(a) // batch * batch, batch):
        x = np.sort(a[start : start + batch]).astype(np.float64)
        k = np.arange(len(x))
        spreads.append(float(((2 * k - len(x) + 1) * x).sum() / (len(x) * (len(x) - 1) / 2)))
    return float(np.mean(spreads))


def once_per_epoch(a: np.ndarray, n: int) -> str:
    counts = np.bincount(a, minlength=n)
    once, missing, repeated = int((counts == 1).sum()), int((counts == 0).sum()), int((counts > 1).sum())
    return f"{once}/{n} once, {missing} missing, {repeated} repeated"


def main(argv: list[str] | None = None) -> int:
    """Entry point: prints the order statistics of both orders."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=24858)
    p.add_argument("--shards", type=int, default=83)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seeds", type=int, default=3, help="seeds (each gives one pair of epochs)")
    args = p.parse_args(argv)
    n, b = args.samples, args.batch_size

    from bench._old_cache import old_order

    rows: dict[str, dict[str, list]] = {"new: per-epoch permutation": {}, "old: 16 files + shuffle 1024": {}}
    work = tempfile.mkdtemp(prefix="bench-order-")
    for seed in range(args.seeds):
        e1 = epoch_order.epoch_order(np.arange(n), seed, 0)
        e2 = epoch_order.epoch_order(np.arange(n), seed, 1)
        stream = np.fromiter(
            old_order(args.shards, n, work, seed=seed).take(2 * n).as_numpy_iterator(), np.int64
        )
        o1, o2 = stream[:n], stream[n:]
        for name, (x, y) in zip(rows, ((e1, e2), (o1, o2))):
            r = rows[name]
            r.setdefault("spearman", []).append(spearman(x, y, n))
            r.setdefault("met", []).append(batch_pairs_met_again(x, y, b, n))
            r.setdefault("spread", []).append(batch_spread(x, b))
            r.setdefault("once", []).append(once_per_epoch(x, n) + " / " + once_per_epoch(y, n))
    expected = (b - 1) / (n - 1)
    print(f"{n} records in {args.shards} Id-sorted shards, batch {b}, {args.seeds} seeds (medians)")
    print(f"standard error of the rank correlation of independent orders: {1 / np.sqrt(n - 1):.4f}")
    print()
    print(
        "| order | rank correlation epoch 1 vs 2 | batch pairs met again | vs independent "
        f"| batch spread (N/3 = {n / 3:.0f}) | records per epoch (1 / 2), seed 0 |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        met = statistics.median(r["met"])
        print(
            f"| {name} | {statistics.median(r['spearman']):+.4f} | {met:.5f} | {met / expected:.2f}x "
            f"({expected:.5f}) | {statistics.median(r['spread']):.0f} | {r['once'][0]} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
