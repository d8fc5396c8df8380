"""Iterative stratification of multi-label samples into cross-validation folds (pure numpy).

`assign_folds` implements iterative stratification (Sechidis, Tsoumakas and Vlahavas, "On the stratification
of multi-label data", ECML PKDD 2011), generalised to label pairs as in Szymański and Kajdanowicz ("A network
perspective on stratification of multi-label data", LIDTA 2017), with whole groups of samples as the units
that are placed. `fold_quality` computes the paper's measures of a fold assignment.

Algorithm. The "items" to balance are the labels (order 1), or the labels and the label pairs that occur
(order 2; scikit-multilearn's combinations with replacement). Each fold f wants `desire[item, f]` = the item's
positives / n_folds, and `desire_size[f]` = n / n_folds samples; both are decremented as units are placed.
Repeatedly the item with the fewest not-yet-placed positives is taken (ties: a pair before a label, then
random), and every unplaced unit carrying it is placed in the fold that, lexicographically,
  1. most desires that item (the paper's rule),
  2. most desires the unit's positives overall: sum over the unit's items of count * desire (a deviation:
     the paper goes straight to rule 3; this is how the unit's other labels and pairs take part),
  3. most desires samples (the paper's second rule),
  4. wins a seeded random draw (the paper's last rule).
Units carrying no label are placed last, largest first, by rules 3 and 4 alone.

Speed. Units with identical contents (the same label set, or for groups the same multiset of member label
sets) form a bucket. Placing one unit lowers every key of the fold it lands in by a fixed amount, so placing
the m units of a bucket one after the other is the same as taking the m largest keys from k decreasing
sequences: one `lexsort` per bucket instead of a Python step per sample. Which units of the bucket land in
which fold is a seeded permutation. Within an item's round, buckets go smallest first (random among equal
sizes) where the paper goes in input order; the cost grows with the number of distinct buckets (577 label
sets on the competition's 31,072 rows), not with the number of rows.

Sizes. The label-driven placement can leave fold sizes a few samples apart; a final pass moves units from the
largest fold to the smallest (a unit smaller than their gap, choosing the one whose move least increases the
squared error of the item counts) until no such move exists. Without groups this makes sizes differ by at
most one; with groups, as equal as the group sizes allow.

Groups. Members of a group always share a fold: a group is one unit, whose positives for an item are the sum
over its members, and whose size is its member count. The result depends on the seed and on the input row
order only (the caller sorts rows by Id); the same inputs give the same folds.
"""

from __future__ import annotations

import numpy as np

__all__ = ["assign_folds", "fold_quality", "label_pairs"]


def _check_labels(labels: np.ndarray) -> np.ndarray:
    """Returns labels as a bool (n, q) array, or raises ValueError with the reason."""
    arr = np.asarray(labels)
    if arr.ndim != 2:
        raise ValueError(f"labels must be a 2-D (n_samples, n_labels) 0/1 array; got shape {arr.shape}")
    if arr.dtype == bool:
        return arr
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"labels must be numeric 0/1 values; got dtype {arr.dtype}")
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        rows = np.unique(np.nonzero(np.isnan(arr))[0])
        raise ValueError(f"labels contain NaN (first rows: {rows[:5].tolist()}); expected only 0 and 1")
    bad = (arr != 0) & (arr != 1)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise ValueError(f"labels must contain only 0 and 1; got {arr[r, c]!r} at row {r}, column {c}")
    return arr.astype(bool)


def _check_groups(groups: np.ndarray | None, n: int) -> np.ndarray:
    """Returns a unit index per sample (0..n_units-1) from optional group ids."""
    if groups is None:
        return np.arange(n)
    g = np.asarray(groups)
    if g.shape != (n,):
        raise ValueError(f"groups must be a 1-D array with one id per sample ({n}); got shape {g.shape}")
    if g.dtype.kind == "f" and np.isnan(g).any():
        raise ValueError("groups contain NaN; give every sample a group id (its own Id if it has no group)")
    if g.dtype.kind == "O" and any(v is None for v in g):
        raise ValueError("groups contain None; give every sample a group id (its own Id if it has no group)")
    _, unit_of = np.unique(g, return_inverse=True)
    return unit_of.ravel()


def label_pairs(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The label pairs that occur together in at least one sample.

    Args:
      labels: (n, q) 0/1 array.

    Returns:
      Two int arrays (a, b), a < b, one entry per occurring pair, in row-major order of (a, b).
    """
    y = _check_labels(labels).astype(np.int64)
    a, b = np.nonzero(np.triu(y.T @ y, 1))
    return a, b


def _unique_rows(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows of a bool matrix and the index of each input row's distinct row."""
    n, q = y.shape
    if q == 0:
        return np.zeros((1, 0), dtype=bool), np.zeros(n, dtype=np.int64)
    packed = np.ascontiguousarray(np.packbits(y, axis=1))
    view = packed.view(np.dtype((np.void, packed.shape[1])))[:, 0]
    _, first, inv = np.unique(view, return_index=True, return_inverse=True)
    return y[first], inv.ravel()


def _row_items(rows: np.ndarray, order: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Items of each distinct label set, as CSR (ptr, item ids), and which item ids are pairs.

    Item ids: label j is j; the occurring pairs follow, numbered q, q+1, ... in (a, b) order.
    """
    n_rows, q = rows.shape
    r, lab = np.nonzero(rows)
    per_row = rows.sum(1)
    is_pair = np.zeros(q, dtype=bool)
    if order == 2 and lab.size:
        pos = np.arange(lab.size) - (np.cumsum(per_row) - per_row)[r]
        partners = per_row[r] - pos - 1
        first = np.repeat(np.arange(lab.size), partners)
        offset = np.arange(partners.sum()) - np.repeat(np.cumsum(partners) - partners, partners) + 1
        codes, pair_id = np.unique(lab[first] * q + lab[first + offset], return_inverse=True)
        r = np.r_[r, r[first]]
        lab = np.r_[lab, q + pair_id.ravel()]
        is_pair = np.r_[is_pair, np.ones(codes.size, dtype=bool)]
        o = np.lexsort((lab, r))
        r, lab = r[o], lab[o]
    ptr = np.r_[0, np.cumsum(np.bincount(r, minlength=n_rows))]
    return ptr, lab, is_pair


class _Buckets:
    """Units with identical contents (a bucket): item counts (CSR), unit size and member units.

    Without groups a bucket is a distinct label set. With groups, a single-sample group shares the bucket of
    its label set and a larger group's bucket is the multiset of its members' label sets.
    """

    def __init__(self, row_ptr: np.ndarray, row_item: np.ndarray, row_of: np.ndarray, unit_of: np.ndarray):
        n_rows = row_ptr.size - 1
        n_units = int(unit_of.max()) + 1
        unit_size = np.bincount(unit_of, minlength=n_units)
        row_bucket = np.repeat(np.arange(n_rows), np.diff(row_ptr))
        ent_bucket, ent_item, ent_val = row_bucket, row_item, np.ones(row_item.size)
        size = np.ones(n_rows, dtype=np.int64)
        bucket_of_unit = np.empty(n_units, dtype=np.int64)
        if n_units == unit_of.size:  # every unit is one sample
            bucket_of_unit[unit_of] = row_of
        else:
            order = np.lexsort((row_of, unit_of))
            member_rows = row_of[order]
            starts = np.r_[0, np.cumsum(unit_size)]
            single = unit_size == 1
            bucket_of_unit[single] = member_rows[starts[:-1][single]]
            signatures: dict[tuple, int] = {}
            reps: list[tuple] = []
            for u in np.flatnonzero(~single):
                key = tuple(member_rows[starts[u] : starts[u + 1]].tolist())
                b = signatures.get(key)
                if b is None:
                    b = signatures[key] = n_rows + len(reps)
                    reps.append(key)
                bucket_of_unit[u] = b
            if reps:
                lengths = np.array([len(key) for key in reps])
                rep_rows = np.fromiter((r for key in reps for r in key), dtype=np.int64, count=lengths.sum())
                rep_bucket = np.repeat(n_rows + np.arange(len(reps)), lengths)
                n_ent = np.diff(row_ptr)[rep_rows]
                lo = np.repeat(row_ptr[rep_rows] - (np.cumsum(n_ent) - n_ent), n_ent)
                items = row_item[lo + np.arange(n_ent.sum())]
                n_items = int(row_item.max()) + 1 if row_item.size else 1
                codes, val = np.unique(np.repeat(rep_bucket, n_ent) * n_items + items, return_counts=True)
                ent_bucket = np.r_[ent_bucket, codes // n_items]
                ent_item = np.r_[ent_item, codes % n_items]
                ent_val = np.r_[ent_val, val.astype(np.float64)]
                size = np.r_[size, lengths]
        n_buckets = size.size
        self.size = size
        self.count = np.bincount(bucket_of_unit, minlength=n_buckets)
        self.ptr = np.r_[0, np.cumsum(np.bincount(ent_bucket, minlength=n_buckets))]
        self.ent_bucket, self.item, self.val = ent_bucket, ent_item, ent_val
        self.sq = np.bincount(ent_bucket, weights=ent_val * ent_val, minlength=n_buckets)
        self.units_sorted = np.argsort(bucket_of_unit, kind="stable")
        self.start = np.r_[0, np.cumsum(self.count)]
        self.bucket_of_unit = bucket_of_unit
        self.unit_size = unit_size

    def carrying(self, n_items: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Inverted index: CSR (ptr, bucket, count) of the buckets carrying each item."""
        o = np.argsort(self.item, kind="stable")
        ptr = np.r_[0, np.cumsum(np.bincount(self.item, minlength=n_items))]
        return ptr, self.ent_bucket[o], self.val[o]

    def add_to(self, target: np.ndarray, bucket: int, fold: int, sign: float) -> None:
        """Adds sign x the bucket's item counts to column `fold` of an (items, folds) array."""
        lo, hi = self.ptr[bucket], self.ptr[bucket + 1]
        target[self.item[lo:hi], fold] += sign * self.val[lo:hi]


def assign_folds(
    labels: np.ndarray,
    n_folds: int,
    seed: int,
    order: int = 2,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """Assigns every sample to a fold by iterative stratification (see the module docstring).

    Args:
      labels: (n, q) array of 0/1 values (bool, int or float); rows without labels are spread evenly.
      n_folds: number of folds, 2 <= n_folds <= number of samples (of groups, when groups are given).
      seed: seed of the random tie-breaking; the same inputs and seed give the same folds.
      order: 1 balances each label; 2 balances each label and each label pair that occurs.
      groups: optional (n,) array of group ids (ints or strings); samples sharing an id share a fold.

    Returns:
      (n,) int64 array of fold indices in [0, n_folds).

    Raises:
      ValueError: on a malformed labels array (not 2-D, NaN, values other than 0/1), a bad n_folds or order,
        or malformed groups.
    """
    y = _check_labels(labels)
    n, q = y.shape
    if isinstance(n_folds, bool) or not isinstance(n_folds, (int, np.integer)):
        raise ValueError(f"n_folds must be an integer; got {n_folds!r}")
    if not 2 <= n_folds <= n:
        raise ValueError(f"n_folds must be between 2 and the number of samples ({n}); got {n_folds}")
    if isinstance(order, bool) or order not in (1, 2):
        raise ValueError(f"order must be 1 (labels) or 2 (labels and label pairs); got {order!r}")
    unit_of = _check_groups(groups, n)
    n_units = int(unit_of.max()) + 1
    if n_folds > n_units:
        raise ValueError(
            f"n_folds ({n_folds}) exceeds the number of groups ({n_units}): some folds would be empty"
        )
    k = int(n_folds)
    rng = np.random.default_rng(seed)

    rows, row_of = _unique_rows(y)
    row_ptr, row_item, is_pair = _row_items(rows, order)
    n_items = is_pair.size
    bk = _Buckets(row_ptr, row_item, row_of, unit_of)
    item_ptr, item_bucket, item_val = bk.carrying(n_items)

    remaining = np.bincount(bk.item, weights=bk.val * bk.count[bk.ent_bucket], minlength=n_items).astype(
        float
    )
    desire = remaining[:, None] / k * np.ones((1, k))  # (items, folds): positives each fold still wants
    desire_size = np.full(k, n / k)
    placed = bk.count == 0
    fold_of_unit = np.full(n_units, -1, dtype=np.int64)
    item_tiebreak = rng.permutation(n_items)
    folds = np.arange(k)

    def place(bucket: int, item: int, item_count: float) -> None:
        m = int(bk.count[bucket])
        lo, hi = bk.ptr[bucket], bk.ptr[bucket + 1]
        idx, cnt = bk.item[lo:hi], bk.val[lo:hi]
        s = float(bk.size[bucket])
        keys = [rng.random(k), desire_size]
        if item >= 0:
            keys += [cnt @ desire[idx], desire[item]]
        if m == 1:
            fold = int(np.lexsort(keys)[-1])
            fold_of_unit[bk.units_sorted[bk.start[bucket]]] = fold
            desire[idx, fold] -= cnt
            desire_size[fold] -= s
            remaining[idx] -= cnt
        else:
            steps = np.arange(m, dtype=np.float64)[:, None]
            drops = [0.0, s] + ([float(bk.sq[bucket]), item_count] if item >= 0 else [])
            best = np.lexsort([(key[None, :] - steps * drop).ravel() for key, drop in zip(keys, drops)])[-m:]
            counts = np.bincount(best % k, minlength=k)
            units = bk.units_sorted[bk.start[bucket] : bk.start[bucket + 1]]
            fold_of_unit[units[rng.permutation(m)]] = np.repeat(folds, counts)
            desire[idx] -= cnt[:, None] * counts[None, :]
            desire_size[:] -= s * counts
            remaining[idx] -= cnt * m
        placed[bucket] = True

    while True:
        live = remaining > 0.5
        if not live.any():
            break
        item = int(np.lexsort((item_tiebreak, ~is_pair, np.where(live, remaining, np.inf)))[0])
        lo, hi = item_ptr[item], item_ptr[item + 1]
        todo, todo_val = item_bucket[lo:hi], item_val[lo:hi]
        keep = ~placed[todo]
        todo, todo_val = todo[keep], todo_val[keep]
        for j in np.lexsort((rng.random(todo.size), bk.count[todo])):
            place(int(todo[j]), item, float(todo_val[j]))
    rest = np.flatnonzero(~placed)
    for bucket in rest[np.lexsort((rng.random(rest.size), -bk.size[rest]))]:
        place(int(bucket), -1, 0.0)

    _balance_sizes(bk, fold_of_unit, desire, k, rng)
    return fold_of_unit[unit_of]


def _balance_sizes(
    bk: _Buckets, fold_of_unit: np.ndarray, desire: np.ndarray, k: int, rng: np.random.Generator
) -> None:
    """Moves units from the largest fold to the smallest while that narrows their gap (in place)."""
    sizes = np.bincount(fold_of_unit, weights=bk.unit_size, minlength=k).astype(np.int64)
    n_buckets = bk.size.size
    per_fold = np.zeros((n_buckets, k), dtype=np.int64)
    np.add.at(per_fold, (bk.bucket_of_unit, fold_of_unit), 1)
    while True:
        src, dst = int(np.argmax(sizes)), int(np.argmin(sizes))
        gap = sizes[src] - sizes[dst]
        movable = (per_fold[:, src] > 0) & (bk.size < gap)
        if gap <= 1 or not movable.any():
            return
        # Growth of the squared error of the item desires when one unit of a bucket moves from src to dst.
        diff = desire[:, src] - desire[:, dst]
        cost = 2.0 * (np.bincount(bk.ent_bucket, weights=bk.val * diff[bk.item], minlength=n_buckets) + bk.sq)
        cand = np.flatnonzero(movable)
        bucket = int(cand[np.lexsort((rng.random(cand.size), cost[cand]))[0]])
        units = bk.units_sorted[bk.start[bucket] : bk.start[bucket + 1]]
        in_src = units[fold_of_unit[units] == src]
        fold_of_unit[in_src[rng.integers(in_src.size)]] = dst
        per_fold[bucket, [src, dst]] += [-1, 1]
        sizes[[src, dst]] += [-bk.size[bucket], bk.size[bucket]]
        bk.add_to(desire, bucket, src, 1.0)
        bk.add_to(desire, bucket, dst, -1.0)


def _distribution(positives: np.ndarray, sizes: np.ndarray, total: np.ndarray, n: int) -> float:
    """Mean over columns and folds of |pos/neg in the fold - pos/neg in the data| (see fold_quality)."""
    if positives.shape[1] == 0:
        return 0.0
    fold_ratio = positives / np.maximum(sizes[:, None] - positives, 1)
    data_ratio = total / np.maximum(n - total, 1)
    terms = np.abs(fold_ratio - data_ratio[None, :])
    terms[:, total == n] = 0.0  # positive in every sample: every fold is too, both ratios are infinite
    return float(terms.mean())


def fold_quality(labels: np.ndarray, folds: np.ndarray, n_folds: int | None = None) -> dict:
    """The stratification measures of Sechidis et al. (2011) for a fold assignment (lower is better).

    With k folds S_f, data D of n samples, D_j the positives of label j and d_fj those in fold f:
      LD  = 1/q * sum_j 1/k * sum_f | d_fj / (|S_f| - d_fj) - D_j / (n - D_j) |  (label distribution);
      LPD = the same over the label pairs that occur in D (label-pair distribution);
      ED  = 1/k * sum_f | |S_f| - n/k |  (examples distribution);
      FZ  = the number of folds with zero positives of at least one label;
      FLZ = the number of (fold, label) pairs with zero positives.
    The paper leaves a zero count of negatives undefined: a column positive in every sample contributes 0
    (every fold matches the data), otherwise a fold without negatives counts its negatives as one;
    FZ and FLZ look only at labels with positives in D (a label absent from the data cannot be placed).

    Args:
      labels: (n, q) 0/1 array.
      folds: (n,) integer fold index per sample, in [0, n_folds).
      n_folds: number of folds (default: the largest index + 1); empty folds count in ED, FZ and FLZ.

    Returns:
      Dict with float "LD", "LPD", "ED" and int "FZ", "FLZ".
    """
    y = _check_labels(labels)
    n, _ = y.shape
    f = np.asarray(folds)
    if f.shape != (n,):
        raise ValueError(f"folds must be a 1-D array with one fold per sample ({n}); got shape {f.shape}")
    if n == 0:
        raise ValueError("labels and folds are empty")
    if f.dtype.kind not in "iu" or f.min() < 0:
        raise ValueError("folds must be non-negative integers")
    k = int(f.max()) + 1 if n_folds is None else int(n_folds)
    if f.max() >= k:
        raise ValueError(f"fold index {int(f.max())} is out of range for {k} folds")
    sizes = np.bincount(f, minlength=k)
    onehot = np.zeros((n, k), dtype=np.int64)
    onehot[np.arange(n), f] = 1
    yi = y.astype(np.int64)
    d = onehot.T @ yi
    total = yi.sum(0)
    a, b = np.nonzero(np.triu(yi.T @ yi, 1))
    pairs = yi[:, a] * yi[:, b]
    empty = (d == 0) & (total > 0)[None, :]
    return {
        "LD": _distribution(d, sizes, total, n),
        "LPD": _distribution(onehot.T @ pairs, sizes, pairs.sum(0), n),
        "ED": float(np.abs(sizes - n / k).mean()),
        "FZ": int(empty.any(1).sum()),
        "FLZ": int(empty.sum()),
    }
