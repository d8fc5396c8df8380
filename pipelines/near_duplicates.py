"""Perceptual hashes of samples and near-duplicate groups (pure numpy + Pillow, no Beam or TF).

Hash. `hash_stains` turns one sample's decoded stains into HASH_BITS = 140 bits (HASH_WORDS uint64 words):
for each of the four stains, the signs of the 35 lowest-frequency coefficients (6 x 6 without the constant
term) of the 2-D DCT of a 32 x 32 area-averaged thumbnail. Area averaging makes the hash independent of the
image size; signs of the low frequencies do not change with brightness or contrast and move little under
re-encoding, pixel noise, rescaling and small crops, while different fields differ in about half of them.
The choice (against dHash, aHash and 64-bit pHash, over several stain sets) and DEFAULT_MAX_DISTANCE come
from `bench/duplicates.py`: see docs/benchmarks.md.

Search. `near_pairs` finds every pair within a Hamming distance without comparing all pairs (multi-index
hashing): the bits that vary are cut into m bands; if two hashes differ in at most d bits, one of the bands
differs in at most r = ceil((d + 1) / m) - 1 bits (pigeonhole). So each band is a table of keys, each hash
looks up its band's key and the keys r bits away, and only the candidates found get the exact Hamming check.
m and r are chosen for the least expected work on uniform hashes; the result is exact for any data.

Groups. `group_labels` turns pairs (and other groupings: `--groups_csv`, `ids_pattern_groups`) into
connected components, labelled by their smallest member index (numpy union-find by pointer jumping).
`duplicate_groups` does the whole step and scales with the number of distinct hashes, not with the number of
pairs (many samples with the same hash give one distinct hash, not a quadratic number of pairs).
"""

from __future__ import annotations

import itertools
import math
import re
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

import schemas

__all__ = [
    "DEFAULT_MAX_DISTANCE",
    "HASHED_STAINS",
    "BITS_PER_STAIN",
    "HASH_BITS",
    "HASH_WORDS",
    "HPAV18_WELL_PATTERN",
    "duplicate_groups",
    "group_labels",
    "hamming",
    "hash_stains",
    "ids_pattern_groups",
    "near_pairs",
    "split_wide_groups",
]

# Stains whose hashes make up a sample's hash, in this order (names as in schemas.STAINS).
HASHED_STAINS: tuple[str, ...] = tuple(schemas.STAINS)
_THUMB = 32  # side of the area-averaged thumbnail the DCT is taken of
_LOW = 6  # the lowest 6 x 6 frequencies of the DCT, without the constant term: 35 bits per stain
BITS_PER_STAIN: int = _LOW * _LOW - 1
HASH_BITS: int = BITS_PER_STAIN * len(HASHED_STAINS)
HASH_WORDS: int = -(-HASH_BITS // 64)
# Hamming bound (over HASH_BITS bits) under which two samples are near-duplicates.
DEFAULT_MAX_DISTANCE: int = 15

# Ids of the HPAv18 external set are `{a}_{plate}_{well}_{field}[_suffix]` (plates are numbers or `si<n>`,
# e.g. `10580_1610_C1_1`, `63683_si35_H1_11`); fields of one well are near-identical, so they share a group:
# the key is `{a}_{plate}_{well}` (74,606 Ids of HPAv18RBGY_wodpl.csv -> 37,074 wells, every Id matches).
# Competition Ids are UUIDs (no underscore): they do not match and each stays in its own group.
HPAV18_WELL_PATTERN = r"^(\d+_[^_]+_[A-Z]\d+)_\d+"

assert set(HASHED_STAINS) <= set(schemas.STAINS), "HASHED_STAINS must be names of schemas.STAINS"

# Rows of the DCT-II basis for the lowest _LOW frequencies over _THUMB samples.
_DCT = np.cos(np.pi * np.outer(np.arange(_LOW), 2 * np.arange(_THUMB) + 1) / (2 * _THUMB)).astype(np.float32)
_PAD_BITS = 64 * HASH_WORDS - HASH_BITS
_TABLE_BITS = 22  # bands up to this width are looked up in a 2**width table (16 MB at most)
_BYTE_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _reduce_step(factor: int) -> int:
    """The largest divisor of factor up to 16 (Pillow's `reduce` is fastest in such steps), or factor."""
    step = next(d for d in range(min(factor, 16), 0, -1) if factor % d == 0)
    return step if step > 1 else factor


def _shrink(image: np.ndarray) -> np.ndarray:
    """The image area-averaged (box filter) to a _THUMB x _THUMB float32 thumbnail.

    Sides that are multiples of _THUMB (512, 2048) go through Pillow's integer `reduce`, a few times cheaper
    than `resize` and the same averages; any other size (a crop, a few pixels) through a BOX `resize`, whose
    fractional pixel weights keep the thumbnail of a slightly cropped image close to the original's.
    """
    pil = Image.fromarray(image)
    h, w = image.shape
    if h % _THUMB or w % _THUMB:
        return np.asarray(pil.resize((_THUMB, _THUMB), Image.Resampling.BOX), dtype=np.float32)
    fx, fy = w // _THUMB, h // _THUMB
    while fx > 1 or fy > 1:
        sx, sy = _reduce_step(fx), _reduce_step(fy)
        pil = pil.reduce((sx, sy))
        fx, fy = fx // sx, fy // sy
    return np.asarray(pil, dtype=np.float32)


def _stain_bits(image: np.ndarray) -> np.ndarray:
    """BITS_PER_STAIN bools: signs of the lowest 2-D DCT coefficients (without the constant) of the thumbnail.

    Signs of the low frequencies do not change with brightness or contrast, and move little under
    re-encoding, pixel noise, rescaling or a crop of a few percent.
    """
    low = _DCT @ _shrink(image) @ _DCT.T
    return low.ravel()[1:] > 0


def _check_stain(name: str, image: object) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 2:
        raise ValueError(f"stain {name!r} must be a 2-D (height, width) image; got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"stain {name!r} must be uint8; got dtype {arr.dtype}")
    if arr.size == 0:
        raise ValueError(f"stain {name!r} is empty (shape {arr.shape})")
    return np.ascontiguousarray(arr)


def hash_stains(stains: Mapping[str, np.ndarray]) -> np.ndarray:
    """The perceptual hash of one sample.

    Args:
      stains: decoded 2-D uint8 images keyed by stain name (schemas.STAINS); the stains of HASHED_STAINS must
        be there, others are ignored. Any size; the stains need not have the same size.

    Returns:
      A (HASH_WORDS,) uint64 array: the BITS_PER_STAIN bits of each stain of HASHED_STAINS in that order,
        most significant bit of word 0 first, then zero bits up to a whole word.

    Raises:
      ValueError: a hashed stain is missing, not 2-D, not uint8 or empty.
    """
    missing = [s for s in HASHED_STAINS if s not in stains]
    if missing:
        raise ValueError(f"hash_stains needs the stains {list(HASHED_STAINS)}; missing {missing}")
    bits = [_stain_bits(_check_stain(s, stains[s])) for s in HASHED_STAINS]
    packed = np.packbits(np.concatenate([*bits, np.zeros(_PAD_BITS, dtype=bool)]))
    return packed.view(">u8").astype(np.uint64)


def _check_hashes(hashes: np.ndarray) -> np.ndarray:
    arr = np.asarray(hashes)
    if arr.dtype != np.uint64:
        raise ValueError(f"hashes must be uint64; got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"hashes must be a 2-D (n_samples, n_words) array; got shape {arr.shape}")
    return np.ascontiguousarray(arr)


def _popcount_bytes(words: np.ndarray) -> np.ndarray:
    """Set bits per row of a (n, w) uint64 array by a byte table (numpy before 2.0)."""
    as_bytes = np.ascontiguousarray(words).view(np.uint8).reshape(len(words), -1)
    return _BYTE_POPCOUNT[as_bytes].sum(axis=1, dtype=np.int64)


def _popcount(words: np.ndarray) -> np.ndarray:
    """Set bits per row of a (n, w) uint64 array."""
    if not hasattr(np, "bitwise_count"):
        return _popcount_bytes(words)
    return np.bitwise_count(words).sum(axis=1, dtype=np.int64)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances between hashes: a and b of shape (..., n_words) uint64, broadcast together.

    Returns:
      int64 distances of the broadcast shape without the last axis.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != np.uint64 or b.dtype != np.uint64:
        raise ValueError(f"hashes must be uint64; got {a.dtype} and {b.dtype}")
    x = np.bitwise_xor(a, b)
    shape = x.shape[:-1]
    return _popcount(x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)).reshape(shape)


def _bits(hashes: np.ndarray) -> np.ndarray:
    """(n, 64 * n_words) bool matrix of the hash bits, most significant bit of word 0 first."""
    be = hashes.astype(">u8").view(np.uint8).reshape(len(hashes), -1)
    return np.unpackbits(be, axis=1).astype(bool)


def _plan(n: int, n_bits: int, max_distance: int) -> tuple[int, int]:
    """(bands m, radius r) with m * (r + 1) > max_distance and the least expected work on uniform hashes."""
    best = None
    for m in range(1, n_bits + 1):
        r = math.ceil((max_distance + 1) / m) - 1
        width = math.ceil(n_bits / m)
        if width > 62 or r > width:
            continue
        probes = sum(math.comb(width, k) for k in range(r + 1))
        expected_candidates = n * probes * n / 2.0**width
        # Measured: a candidate costs about 3 table probes; a binary search about 4.
        cost = m * (n * probes * (1 if width <= _TABLE_BITS else 4) + 3 * expected_candidates)
        if best is None or cost < best[0]:
            best = (cost, m, r)
    if best is None:
        raise ValueError(f"no band plan for {n_bits} bits and max_distance {max_distance}")
    return best[1], best[2]


def _expand(starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ranges [start, start + count): (range index, position) of every element, vectorised."""
    total = int(counts.sum())
    owner = np.repeat(np.arange(len(counts)), counts)
    offset = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    return owner, np.repeat(starts, counts) + offset


def _band_candidates(keys: np.ndarray, width: int, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i < j) whose `width`-bit band keys are equal or differ by one of the non-zero `masks`."""
    n = len(keys)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    unique_keys = sorted_keys[starts]
    sizes = np.diff(np.r_[starts, n])
    # Equal keys: each element pairs with the ones after it in its run.
    run_end = np.repeat(starts + sizes, sizes)
    owner, pos = _expand(np.arange(1, n + 1), run_end - np.arange(n) - 1)
    a, b = order[owner], order[pos]
    found_a, found_b = [np.minimum(a, b)], [np.maximum(a, b)]
    # Keys one mask away: look each (key ^ mask) up among the distinct keys; keep i < j. Narrow bands use a
    # table indexed by key (a gather per probe), wide ones a binary search.
    table = None
    if width <= _TABLE_BITS:
        table = np.full(1 << width, -1, dtype=np.int32)
        table[unique_keys.astype(np.int64)] = np.arange(len(unique_keys))
    for mask in masks:
        probe = keys ^ mask
        if table is not None:
            at = table[probe.astype(np.int64)]
            hit = np.flatnonzero(at >= 0)
        else:
            at = np.minimum(np.searchsorted(unique_keys, probe), len(unique_keys) - 1)
            hit = np.flatnonzero(unique_keys[at] == probe)
        if hit.size == 0:
            continue
        owner, pos = _expand(starts[at[hit]], sizes[at[hit]])
        a, b = hit[owner], order[pos]
        keep = a < b
        found_a.append(a[keep])
        found_b.append(b[keep])
    return np.concatenate(found_a), np.concatenate(found_b)


def _masks(width: int, radius: int) -> np.ndarray:
    """All non-zero bit masks of popcount <= radius over `width` bits."""
    out = [
        sum(1 << i for i in combo)
        for k in range(1, radius + 1)
        for combo in itertools.combinations(range(width), k)
    ]
    return np.array(out, dtype=np.uint64)


def _all_pairs(n: int) -> np.ndarray:
    a, b = np.triu_indices(n, 1)
    return np.stack([a, b], axis=1).astype(np.int64)


def _search(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """near_pairs without the input checks: exact, via multi-index hashing on the bits that vary."""
    n = len(hashes)
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    bits = _bits(hashes)
    # Bits equal in every hash add nothing to any distance: only the others are cut into bands.
    bits = bits[:, bits.any(axis=0) & ~bits.all(axis=0)]
    n_bits = bits.shape[1]
    if max_distance >= n_bits:
        return _all_pairs(n)
    m, r = _plan(n, n_bits, max_distance)
    edges = np.linspace(0, n_bits, m + 1).round().astype(int)
    found = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        width = hi - lo
        weights = np.uint64(1) << np.arange(width - 1, -1, -1, dtype=np.uint64)
        keys = (bits[:, lo:hi].astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)
        i, j = _band_candidates(keys, width, _masks(width, r))
        keep = hamming(hashes[i], hashes[j]) <= max_distance
        found.append(i[keep] * n + j[keep])
    codes = np.unique(np.concatenate(found))
    return np.stack([codes // n, codes % n], axis=1).astype(np.int64)


def near_pairs(hashes: np.ndarray, max_distance: int = DEFAULT_MAX_DISTANCE) -> np.ndarray:
    """Every pair of hashes within a Hamming distance, without comparing all pairs.

    Args:
      hashes: (n, n_words) uint64, one row per sample (e.g. stacked `hash_stains` results).
      max_distance: largest Hamming distance (over all 64 * n_words bits) that counts as near.

    Returns:
      (m, 2) int64 index pairs (i, j), i < j, sorted, each pair once. k equal hashes give k(k-1)/2 pairs
      (e.g. many blank images): for groups, `duplicate_groups` avoids building them.

    Raises:
      ValueError: hashes not a 2-D uint64 array, or max_distance negative.
    """
    hashes = _check_hashes(hashes)
    if int(max_distance) != max_distance or max_distance < 0:
        raise ValueError(f"max_distance must be a non-negative integer; got {max_distance!r}")
    return _search(hashes, int(max_distance))


def _union(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Component label (smallest member index) per node of the graph with edges (a, b)."""
    parent = np.arange(n, dtype=np.int64)
    if a.size == 0:
        return parent
    while True:
        pa, pb = parent[a], parent[b]
        differ = pa != pb
        if not differ.any():
            return parent
        a, b, pa, pb = a[differ], b[differ], pa[differ], pb[differ]
        # Hook the larger root (or node) below the smaller one, then compress paths fully.
        np.minimum.at(parent, np.maximum(pa, pb), np.minimum(pa, pb))
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand


def _labels_edges(labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Edges tying every sample to the first sample with the same label."""
    arr = np.asarray(labels)
    if arr.shape != (n,):
        raise ValueError(f"a grouping must have one label per sample ({n}); got shape {arr.shape}")
    _, first, inverse = np.unique(arr, return_index=True, return_inverse=True)
    return np.arange(n, dtype=np.int64), first[inverse.ravel()].astype(np.int64)


def group_labels(n: int, pairs: np.ndarray, *more_groupings: np.ndarray) -> np.ndarray:
    """Connected components of samples joined by pairs and by shared labels in other groupings.

    Args:
      n: number of samples.
      pairs: (m, 2) int indices of joined samples (e.g. from `near_pairs`).
      *more_groupings: (n,) label arrays of any dtype (e.g. group ids from --groups_csv, or
        `ids_pattern_groups`); samples with equal labels in any of them end in one component.

    Returns:
      (n,) int64: per sample, the smallest sample index of its component.

    Raises:
      ValueError: pairs not (m, 2) integers in [0, n), or a grouping of the wrong length.
    """
    if int(n) != n or n < 0:
        raise ValueError(f"n must be a non-negative integer; got {n!r}")
    p = np.asarray(pairs)
    if p.size == 0:
        p = p.reshape(0, 2)
    if p.ndim != 2 or p.shape[1] != 2:
        raise ValueError(f"pairs must be an (m, 2) array; got shape {p.shape}")
    if p.size and p.dtype.kind not in "iu":
        raise ValueError(f"pairs must be integer indices; got dtype {p.dtype}")
    p = p.astype(np.int64)
    if p.size and (p.min() < 0 or p.max() >= n):
        raise ValueError(f"pairs hold indices outside [0, {n}): {p.min()}..{p.max()}")
    a, b = [p[:, 0]], [p[:, 1]]
    for grouping in more_groupings:
        ea, eb = _labels_edges(grouping, int(n))
        a.append(ea)
        b.append(eb)
    return _union(int(n), np.concatenate(a), np.concatenate(b))


def duplicate_groups(
    hashes: np.ndarray, max_distance: int = DEFAULT_MAX_DISTANCE, *more_groupings: np.ndarray
) -> np.ndarray:
    """Near-duplicate groups of samples whose hashes are all within 2 x max_distance of each other.

    Pairs within max_distance join samples (`near_pairs`); a connected component whose widest pair is
    further apart than 2 x max_distance (a chain: A~B and B~C with A and C far apart) is split by
    `split_wide_groups`, so no group spans more than copies of one image can (two copies each within
    max_distance of their original are within 2 x max_distance of each other). Equal hashes are merged
    first, so the work grows with the distinct hashes and the near pairs between them, not with the
    (quadratic) number of pairs among equal hashes. `more_groupings` are merged after the split.

    Returns:
      (n,) int64: per sample, the smallest sample index of its group.
    """
    hashes = _check_hashes(hashes)
    n = len(hashes)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    packed = hashes.view(np.dtype((np.void, 8 * hashes.shape[1])))[:, 0]
    _, first, inverse = np.unique(packed, return_index=True, return_inverse=True)
    inverse = inverse.ravel()
    distinct = hashes[first]
    distinct_pairs = near_pairs(distinct, max_distance)
    components = _union(len(distinct), distinct_pairs[:, 0], distinct_pairs[:, 1])
    split = split_wide_groups(distinct, components, distinct_pairs, 2 * int(max_distance))
    return group_labels(n, np.zeros((0, 2), np.int64), split[inverse], *more_groupings)


def _widest_pair(hashes: np.ndarray, chunk: int = 256) -> int:
    """The largest Hamming distance between any two rows (all pairs, in chunks of rows)."""
    widest = 0
    for start in range(0, len(hashes), chunk):
        d = hamming(hashes[start : start + chunk, None, :], hashes[None, :, :])
        widest = max(widest, int(d.max()))
    return widest


def split_wide_groups(
    hashes: np.ndarray, labels: np.ndarray, pairs: np.ndarray, max_spread: int
) -> np.ndarray:
    """Splits every group whose widest pair is further apart than max_spread into star-shaped groups.

    A group that is within bounds is kept whole. A wider one (a chain of near pairs) is cut around centres:
    its members in order of most near pairs within the group first (ties: lowest index), each member not
    yet placed becomes a centre and takes every unplaced member it is paired with. Every member of a new
    group is then within max_spread / 2 (one pair) of its centre, so no new group is wider than max_spread.
    A group that has a member paired with all the others (copies of one image, the image among them) is
    never cut.

    Args:
      hashes: (n, n_words) uint64 hashes.
      labels: (n,) group per row (e.g. connected components of `pairs`).
      pairs: (m, 2) index pairs within max_spread / 2 (the near pairs the groups came from).
      max_spread: the widest pair a group may hold.

    Returns:
      (n,) int64: per row, the smallest row index of its (possibly new) group.
    """
    labels = np.asarray(labels, dtype=np.int64)
    out = labels.copy()
    sizes = np.bincount(labels, minlength=len(labels))
    big = np.flatnonzero(sizes > 2)
    if big.size == 0:
        return out
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    pair_group = labels[pairs[:, 0]]
    order = np.argsort(pair_group, kind="stable")
    pairs, pair_group = pairs[order], pair_group[order]
    for g in big:
        members = np.flatnonzero(labels == g)
        if _widest_pair(hashes[members]) <= max_spread:
            continue
        lo, hi = np.searchsorted(pair_group, [g, g + 1])
        neighbours: dict[int, list[int]] = {int(m): [] for m in members}
        for a, b in pairs[lo:hi].tolist():
            neighbours[a].append(b)
            neighbours[b].append(a)
        placed: set[int] = set()
        for centre in sorted(neighbours, key=lambda m: (-len(neighbours[m]), m)):
            if centre in placed:
                continue
            star = [centre] + [m for m in neighbours[centre] if m not in placed]
            placed.update(star)
            out[star] = min(star)
    return out


def ids_pattern_groups(ids: Sequence[str], pattern: str) -> np.ndarray:
    """Groups of Ids whose regular-expression match is equal.

    The key of an Id is the tuple of the pattern's capture groups if it has any, else the whole match
    (`re.search`, so anchor with `^` as needed). Ids without a match are each their own group.
    HPAv18 wells: `HPAV18_WELL_PATTERN` (`10580_1610_C1_1` and `10580_1610_C1_2` share the key
    `10580_1610_C1`); competition Ids (UUIDs) have no well structure and do not match it.

    Returns:
      (n,) int64: per Id, the smallest index of an Id with the same key (its own index without a match).

    Raises:
      ValueError: the pattern is not a valid regular expression.
    """
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"bad group Id pattern {pattern!r}: {e}") from None
    labels = np.arange(len(ids), dtype=np.int64)
    first: dict[object, int] = {}
    for i, sample_id in enumerate(ids):
        match = regex.search(sample_id)
        if match is None:
            continue
        key = match.groups() if regex.groups else match.group(0)
        labels[i] = first.setdefault(key, i)
    return labels
