"""Perceptual hashes of samples and near-duplicate groups (pure numpy + Pillow, no Beam or TF).

Hash. `hash_stains` turns one sample's decoded stains into `HASH_WORDS` uint64 words: for each stain of
`HASHED_STAINS`, a 64-bit difference hash (dHash) of the stain shrunk to 9x8 pixels by area averaging
(each bit: is a pixel brighter than its right neighbour). Area averaging makes the hash independent of the
image size, and comparing neighbours makes it independent of brightness and contrast; re-encoding, pixel
noise, rescaling and small crops flip few bits, different fields flip about half of them.

Search. `near_pairs` finds every pair within a Hamming distance without comparing all pairs (multi-index
hashing): the bits are cut into m bands; if two hashes differ in at most d bits, one of the bands differs in
at most r = ceil((d + 1) / m) - 1 bits (pigeonhole). So each band is a sorted table, each hash looks up its
band's key and the keys r bits away, and only the candidates found get the exact Hamming check. m is chosen
for the least expected work on uniform hashes; the result is exact for any data.

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
    "HASH_BITS",
    "HASH_WORDS",
    "HPAV18_WELL_PATTERN",
    "duplicate_groups",
    "group_labels",
    "hamming",
    "hash_stains",
    "ids_pattern_groups",
    "near_pairs",
]

# Stains whose hashes make up a sample's hash, in this order (names as in schemas.STAINS).
HASHED_STAINS: tuple[str, ...] = ("green", "blue")
_HASH_SIDE = 8  # an 8x8 grid of comparisons = 64 bits per stain
HASH_WORDS: int = len(HASHED_STAINS)
HASH_BITS: int = 64 * HASH_WORDS
# Hamming bound (over HASH_BITS bits) under which two samples are near-duplicates.
DEFAULT_MAX_DISTANCE: int = 24

# Ids of the HPAv18 external set are `{a}_{plate}_{well}_{field}[_suffix]`; fields of one well are
# near-identical, so they share a group: the key is `{a}_{plate}_{well}`. Competition Ids are UUIDs (no
# underscore), so they do not match and each stays in its own group.
HPAV18_WELL_PATTERN = r"^(\d+_\d+_[A-H]\d{1,2})_\d+"

assert set(HASHED_STAINS) <= set(schemas.STAINS), "HASHED_STAINS must be names of schemas.STAINS"

_BYTE_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _shrink(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """The image area-averaged (box filter) to height x width, as float32."""
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BOX), dtype=np.float32)


def _dhash(image: np.ndarray) -> np.uint64:
    """64-bit difference hash of a 2-D uint8 image: bit = pixel > right neighbour on a 9x8 thumbnail."""
    small = _shrink(image, _HASH_SIDE + 1, _HASH_SIDE)
    bits = (small[:, 1:] > small[:, :-1]).ravel()
    return np.packbits(bits).view(">u8")[0].astype(np.uint64)


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
      A (HASH_WORDS,) uint64 array: one 64-bit dHash per stain of HASHED_STAINS, in that order.

    Raises:
      ValueError: a hashed stain is missing, not 2-D, not uint8 or empty.
    """
    missing = [s for s in HASHED_STAINS if s not in stains]
    if missing:
        raise ValueError(f"hash_stains needs the stains {list(HASHED_STAINS)}; missing {missing}")
    return np.array([_dhash(_check_stain(s, stains[s])) for s in HASHED_STAINS], dtype=np.uint64)


def _check_hashes(hashes: np.ndarray) -> np.ndarray:
    arr = np.asarray(hashes)
    if arr.dtype != np.uint64:
        raise ValueError(f"hashes must be uint64; got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"hashes must be a 2-D (n_samples, n_words) array; got shape {arr.shape}")
    return np.ascontiguousarray(arr)


def _popcount(words: np.ndarray) -> np.ndarray:
    """Set bits per row of a (n, w) uint64 array."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(words).sum(axis=1, dtype=np.int64)
    as_bytes = np.ascontiguousarray(words).view(np.uint8).reshape(len(words), -1)
    return _BYTE_POPCOUNT[as_bytes].sum(axis=1, dtype=np.int64)


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
        cost = m * (n * probes + expected_candidates)
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


def _band_candidates(keys: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Pairs (i < j) whose band keys are equal or differ by one of the non-zero `masks`, as codes i*n+j."""
    n = len(keys)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    # Equal keys: each element pairs with the ones after it in its run.
    run_end = np.searchsorted(sorted_keys, sorted_keys, side="right")
    counts = run_end - np.arange(n) - 1
    owner, pos = _expand(np.arange(n) + 1, counts)
    a, b = order[owner], order[pos]
    parts = [np.minimum(a, b) * n + np.maximum(a, b)]
    # Keys one mask away: look each (key ^ mask) up; keep i < j so each pair comes once per mask set.
    for mask in masks:
        probe = keys ^ mask
        lo = np.searchsorted(sorted_keys, probe, side="left")
        hi = np.searchsorted(sorted_keys, probe, side="right")
        owner, pos = _expand(lo, hi - lo)
        a, b = owner, order[pos]
        keep = a < b
        parts.append(a[keep] * n + b[keep])
    return np.concatenate(parts)


def _masks(width: int, radius: int) -> np.ndarray:
    """All non-zero bit masks of popcount <= radius over `width` bits."""
    out = [
        sum(1 << i for i in combo)
        for k in range(1, radius + 1)
        for combo in itertools.combinations(range(width), k)
    ]
    return np.array(out, dtype=np.uint64)


def _near_pairs_distinct(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """near_pairs on rows that may repeat; exact, via multi-index hashing."""
    n, words = hashes.shape
    n_bits = 64 * words
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    if max_distance >= n_bits:
        a, b = np.triu_indices(n, 1)
        return np.stack([a, b], axis=1).astype(np.int64)
    m, r = _plan(n, n_bits, max_distance)
    bits = _bits(hashes)
    edges = np.linspace(0, n_bits, m + 1).round().astype(int)
    found = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        width = hi - lo
        weights = (np.uint64(1) << np.arange(width - 1, -1, -1, dtype=np.uint64)).astype(np.uint64)
        keys = (bits[:, lo:hi].astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)
        codes = _band_candidates(keys, _masks(width, r))
        if codes.size:
            codes = np.unique(codes)
            i, j = codes // n, codes % n
            keep = hamming(hashes[i], hashes[j]) <= max_distance
            found.append(codes[keep])
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    codes = np.unique(np.concatenate(found))
    return np.stack([codes // n, codes % n], axis=1).astype(np.int64)


def near_pairs(hashes: np.ndarray, max_distance: int = DEFAULT_MAX_DISTANCE) -> np.ndarray:
    """Every pair of hashes within a Hamming distance, without comparing all pairs.

    Args:
      hashes: (n, n_words) uint64, one row per sample (e.g. stacked `hash_stains` results).
      max_distance: largest Hamming distance (over all 64 * n_words bits) that counts as near.

    Returns:
      (m, 2) int64 index pairs (i, j), i < j, sorted, each pair once.

    Raises:
      ValueError: hashes not a 2-D uint64 array, or max_distance negative.
    """
    hashes = _check_hashes(hashes)
    if int(max_distance) != max_distance or max_distance < 0:
        raise ValueError(f"max_distance must be a non-negative integer; got {max_distance!r}")
    return _near_pairs_distinct(hashes, int(max_distance))


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
    """Near-duplicate groups of samples: `group_labels(n, near_pairs(hashes, max_distance), *more)`.

    Equal hashes are merged first, so the work grows with the distinct hashes and the near pairs between
    them, not with the (quadratic) number of pairs among equal hashes.

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
    distinct_pairs = near_pairs(hashes[first], max_distance)
    pairs = first[distinct_pairs].astype(np.int64)
    return group_labels(n, pairs, inverse, *more_groupings)


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
