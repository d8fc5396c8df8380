"""The order in which a random-access cache serves its records: a fresh uniform permutation every epoch.

Pure numpy, no TensorFlow. Every draw comes from `np.random.default_rng([seed, epoch, ...])`, so the order
of an epoch is a function of (seed, epoch) alone: a run resumed at epoch e reads epoch e's order, the same
one an uninterrupted run reads, and any two epochs' orders are independent draws.

With rare-class oversampling every record is repeated by its factor (rounded up or down at random, drawn
per epoch) before the permutation, so its copies land anywhere in the epoch.

Several workers (tf.distribute, one input pipeline each) split one epoch's order into contiguous disjoint
parts of equal length: each record of the epoch is read by exactly one worker.
"""

from __future__ import annotations

import numpy as np


def repeats(factors: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """Copies of each record in one epoch: floor(f) or ceil(f), ceil with probability f - floor(f).

    Args:
      factors: [N] float >= 1, each record's oversampling factor (1 everywhere: no oversampling).
      seed, epoch: the draw's key.
    """
    factors = np.asarray(factors, np.float64)
    whole = np.floor(factors)
    draw = np.random.default_rng([seed, epoch, 1]).random(len(factors))
    return (whole + (draw < factors - whole)).astype(np.int64)


def epoch_order(
    pool: np.ndarray, seed: int, epoch: int, length: int | None = None, factors: np.ndarray | None = None
) -> np.ndarray:
    """The records of one epoch in a uniformly random order.

    Args:
      pool: [N] record indices (the training folds' records in the cache).
      seed, epoch: the order is a function of these (and of pool, length and factors) only.
      length: records the epoch consumes (steps x global batch); None: one pass over the (oversampled)
        pool. A longer epoch continues with further independent permutations of the pool, a shorter one
        takes the first `length`, so every record appears at most once per pass.
      factors: [N] oversampling factors of the pool's records (None: each record once per pass).

    Returns:
      [length] int64 record indices.
    """
    pool = np.asarray(pool, np.int64)
    if len(pool) == 0:
        raise ValueError("an empty pool has no order")
    passes = []
    total = 0
    k = 0
    want = None if length is None else int(length)
    while True:
        items = pool if factors is None else np.repeat(pool, repeats(factors, seed, epoch * 1_000_003 + k))
        passes.append(np.random.default_rng([seed, epoch, 0, k]).permutation(items))
        total += len(items)
        k += 1
        if want is None or total >= want:
            break
    order = np.concatenate(passes)
    return order if want is None else order[:want]


def worker_part(order: np.ndarray, worker: int, workers: int) -> np.ndarray:
    """Worker `worker`'s contiguous part of an epoch's order (the parts are disjoint and cover it).

    Raises:
      ValueError: the order does not split into `workers` equal parts.
    """
    if len(order) % workers:
        raise ValueError(f"{len(order)} records do not split evenly between {workers} workers")
    size = len(order) // workers
    return order[worker * size : (worker + 1) * size]
