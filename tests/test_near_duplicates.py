"""Tests of pipelines.near_duplicates: hashes, exact near-pair search, groups, Id patterns, bad input."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

import schemas
from pipelines import near_duplicates as nd

# ---------------------------------------------------------------------------------------------- fixtures


def _field(seed: int, size: int = 128) -> dict[str, np.ndarray]:
    """A made-up four-stain field: smooth random texture plus bright blobs, different per seed."""
    rng = np.random.default_rng(seed)
    out = {}
    yy, xx = np.mgrid[0:size, 0:size]
    for stain in schemas.STAINS:
        coarse = rng.random((6, 6)) * 120
        img = np.asarray(
            Image.fromarray(coarse.astype(np.float32)).resize((size, size), Image.Resampling.BICUBIC)
        )
        for _ in range(12):
            cy, cx = rng.random(2) * size
            r = size * (0.03 + 0.05 * rng.random())
            img = img + 120 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        out[stain] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())))


def _noise(img: np.ndarray, seed: int) -> np.ndarray:
    step = np.random.default_rng(seed).integers(-1, 2, img.shape)
    return np.clip(img.astype(np.int16) + step, 0, 255).astype(np.uint8)


def _rescale(img: np.ndarray, factor: int) -> np.ndarray:
    h, w = img.shape
    big = Image.fromarray(img).resize((w * factor, h * factor), Image.Resampling.BICUBIC)
    return np.asarray(big.resize((w, h), Image.Resampling.BOX))


def _crop(img: np.ndarray, fraction: float, resize_back: bool) -> np.ndarray:
    h, w = img.shape
    dy, dx = max(1, round(h * fraction)), max(1, round(w * fraction))
    out = img[dy:, :-dx]
    if resize_back:
        out = np.asarray(Image.fromarray(out).resize((w, h), Image.Resampling.BILINEAR))
    return out


_TRANSFORMS = {
    "jpeg75": lambda img, s: _jpeg(img, 75),
    "jpeg95": lambda img, s: _jpeg(img, 95),
    "noise1": _noise,
    "rescale4": lambda img, s: _rescale(img, 4),
    "upscaled4_kept": lambda img, s: np.asarray(
        Image.fromarray(img).resize((img.shape[1] * 4, img.shape[0] * 4), Image.Resampling.BICUBIC)
    ),
    "crop2_kept": lambda img, s: _crop(img, 0.02, False),
    "crop2_back": lambda img, s: _crop(img, 0.02, True),
}


def _hash(field: dict[str, np.ndarray]) -> np.ndarray:
    return nd.hash_stains(field)


# ---------------------------------------------------------------------------------------------- hashes


def test_hash_shape_dtype_and_determinism():
    field = _field(0)
    h = nd.hash_stains(field)
    assert h.shape == (nd.HASH_WORDS,) and h.dtype == np.uint64
    assert np.array_equal(h, nd.hash_stains(field))
    assert nd.HASH_BITS == nd.BITS_PER_STAIN * len(nd.HASHED_STAINS) <= 64 * nd.HASH_WORDS
    bits = np.unpackbits(h.astype(">u8").view(np.uint8))
    assert not bits[nd.HASH_BITS :].any()  # padding up to whole words stays zero


def test_hash_uses_only_the_hashed_stains():
    field = _field(1)
    only = {s: field[s] for s in nd.HASHED_STAINS}
    extra = {**only, "extra": np.zeros((5, 5), np.uint8)}
    assert np.array_equal(nd.hash_stains(only), nd.hash_stains(extra))
    # Every hashed stain counts: changing one of them changes the hash.
    for stain in nd.HASHED_STAINS:
        other = {**only, stain: np.ascontiguousarray(field[stain][::-1])}
        assert nd.hamming(nd.hash_stains(only), nd.hash_stains(other)) > 0


@pytest.mark.parametrize("shape", [(512, 512), (64, 96), (544, 96), (502, 507), (3, 5)])
def test_thumbnail_is_pillow_box_resize(shape):
    """The reference: Pillow's BOX resize (the fast path may round differently by at most one count)."""
    img = np.random.default_rng(9).integers(0, 256, shape, dtype=np.uint8)
    ref = np.asarray(Image.fromarray(img).resize((32, 32), Image.Resampling.BOX), dtype=np.float32)
    assert np.abs(nd._shrink(img) - ref).max() <= 1


@pytest.mark.parametrize("size", [3, 9, 37, 200])
def test_hash_any_size(size):
    field = {s: img[:size, :size] for s, img in _field(2, 200).items()}
    assert nd.hash_stains(field).shape == (nd.HASH_WORDS,)


@pytest.mark.parametrize("name", sorted(_TRANSFORMS))
def test_planted_duplicates_are_near_and_distinct_fields_are_not(name):
    transform = _TRANSFORMS[name]
    fields = [_field(seed) for seed in range(8)]
    originals = np.stack([_hash(f) for f in fields])
    copies = np.stack([_hash({s: transform(img, i) for s, img in f.items()}) for i, f in enumerate(fields)])
    planted = nd.hamming(originals, copies)
    assert planted.max() <= nd.DEFAULT_MAX_DISTANCE, planted
    hashes = np.concatenate([originals, copies])
    pairs = {tuple(p) for p in nd.near_pairs(hashes).tolist()}
    n = len(fields)
    assert pairs == {(i, i + n) for i in range(n)}


def test_distinct_fields_are_far_apart():
    hashes = np.stack([_hash(_field(seed)) for seed in range(40)])
    d = nd.hamming(hashes[:, None, :], hashes[None, :, :])
    off = d[~np.eye(len(hashes), dtype=bool)]
    assert off.min() > nd.DEFAULT_MAX_DISTANCE
    assert len(nd.near_pairs(hashes)) == 0


def test_brightness_and_contrast_do_not_change_the_hash_much():
    field = _field(3)
    dimmer = {s: (img // 2 + 10).astype(np.uint8) for s, img in field.items()}
    assert nd.hamming(_hash(field), _hash(dimmer)) <= 4


def test_hash_rejects_bad_stains():
    field = _field(4, 32)
    with pytest.raises(ValueError, match="missing"):
        nd.hash_stains({"red": field["red"]})
    with pytest.raises(ValueError, match="uint8"):
        nd.hash_stains({**field, nd.HASHED_STAINS[0]: field["red"].astype(np.float32)})
    with pytest.raises(ValueError, match="2-D"):
        nd.hash_stains({**field, nd.HASHED_STAINS[0]: np.zeros((4, 4, 3), np.uint8)})
    with pytest.raises(ValueError, match="empty"):
        nd.hash_stains({**field, nd.HASHED_STAINS[0]: np.zeros((0, 4), np.uint8)})


# ---------------------------------------------------------------------------------------------- near_pairs


def _brute_force(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    d = nd.hamming(hashes[:, None, :], hashes[None, :, :])
    i, j = np.nonzero(np.triu(d <= max_distance, 1))
    return np.stack([i, j], axis=1).astype(np.int64)


def _clustered(rng: np.random.Generator, n: int, words: int, centres: int, max_flips: int) -> np.ndarray:
    """Hashes around a few random centres, each with up to max_flips random bits flipped."""
    c = rng.integers(0, 2**64, size=(centres, words), dtype=np.uint64)
    out = c[rng.integers(0, centres, n)].copy()
    for row in out:
        for _ in range(int(rng.integers(0, max_flips + 1))):
            bit = int(rng.integers(0, 64 * words))
            row[bit // 64] ^= np.uint64(1) << np.uint64(bit % 64)
    return out


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(0, 120),
    words=st.integers(1, 3),
    max_distance=st.integers(0, 40),
    clustered=st.booleans(),
)
def test_near_pairs_equals_brute_force(seed, n, words, max_distance, clustered):
    rng = np.random.default_rng(seed)
    if clustered:
        hashes = _clustered(rng, n, words, centres=max(1, n // 10), max_flips=max_distance + 3)
    else:
        hashes = rng.integers(0, 2**64, size=(n, words), dtype=np.uint64)
    got = nd.near_pairs(hashes, max_distance)
    assert got.dtype == np.int64 and got.shape[1:] == (2,)
    np.testing.assert_array_equal(got, _brute_force(hashes, max_distance))


def test_near_pairs_with_repeated_hashes_and_default_bound():
    rng = np.random.default_rng(5)
    hashes = _clustered(rng, 300, nd.HASH_WORDS, centres=20, max_flips=nd.DEFAULT_MAX_DISTANCE // 2)
    hashes[10:20] = hashes[0]
    np.testing.assert_array_equal(nd.near_pairs(hashes), _brute_force(hashes, nd.DEFAULT_MAX_DISTANCE))


def test_near_pairs_bound_beyond_all_bits_gives_all_pairs():
    hashes = np.random.default_rng(6).integers(0, 2**64, size=(5, 1), dtype=np.uint64)
    assert len(nd.near_pairs(hashes, 64)) == 10


def test_near_pairs_rejects_bad_input():
    with pytest.raises(ValueError, match="uint64"):
        nd.near_pairs(np.zeros((3, 2), np.int64))
    with pytest.raises(ValueError, match="2-D"):
        nd.near_pairs(np.zeros(3, np.uint64))
    with pytest.raises(ValueError, match="non-negative"):
        nd.near_pairs(np.zeros((3, 2), np.uint64), -1)


def test_popcount_fallback_equals_numpy():
    words = np.random.default_rng(10).integers(0, 2**64, size=(50, 3), dtype=np.uint64)
    np.testing.assert_array_equal(nd._popcount_bytes(words), np.bitwise_count(words).sum(axis=1))


def test_hamming():
    a = np.array([[0, 0]], dtype=np.uint64)
    b = np.array([[1, 2**64 - 1]], dtype=np.uint64)
    assert nd.hamming(a, b).tolist() == [65]
    assert nd.hamming(a[0], b[0]) == 65
    with pytest.raises(ValueError, match="uint64"):
        nd.hamming(a.astype(np.int64), b)


# ---------------------------------------------------------------------------------------------- groups


def _components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Reference: scipy's connected components, relabelled by smallest member."""
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    smallest = np.full(comp.max() + 1 if n else 0, n, dtype=np.int64)
    np.minimum.at(smallest, comp, np.arange(n))
    return smallest[comp]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 200), m=st.integers(0, 300))
def test_group_labels_equals_scipy(seed, n, m):
    rng = np.random.default_rng(seed)
    pairs = rng.integers(0, n, size=(m, 2))
    np.testing.assert_array_equal(nd.group_labels(n, pairs), _components(n, pairs.reshape(-1, 2)))


def test_group_labels_long_chain():
    n = 5000
    order = np.random.default_rng(7).permutation(n)
    pairs = np.stack([order[:-1], order[1:]], axis=1)
    assert (nd.group_labels(n, pairs) == 0).all()


def test_group_labels_merges_other_groupings():
    pairs = np.array([[0, 1], [4, 5]])
    from_csv = np.array(["a", "b", "c", "c", "d", "e", "f"])
    from_ids = np.array([0, 1, 2, 3, 2, 5, 6])
    labels = nd.group_labels(7, pairs, from_csv, from_ids)
    assert labels.tolist() == [0, 0, 2, 2, 2, 2, 6]
    assert nd.group_labels(3, np.zeros((0, 2), np.int64)).tolist() == [0, 1, 2]


def test_group_labels_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(m, 2\)"):
        nd.group_labels(3, np.array([[0, 1, 2]]))
    with pytest.raises(ValueError, match="outside"):
        nd.group_labels(3, np.array([[0, 3]]))
    with pytest.raises(ValueError, match="integer"):
        nd.group_labels(3, np.array([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="one label per sample"):
        nd.group_labels(3, np.zeros((0, 2), np.int64), np.array([1, 2]))


def test_duplicate_groups_equals_group_labels_of_near_pairs():
    rng = np.random.default_rng(8)
    hashes = _clustered(rng, 400, nd.HASH_WORDS, centres=30, max_flips=nd.DEFAULT_MAX_DISTANCE)
    hashes[50:150] = hashes[49]  # many equal hashes
    extra = np.arange(400) // 3
    expected = nd.group_labels(400, nd.near_pairs(hashes), extra)
    np.testing.assert_array_equal(nd.duplicate_groups(hashes, nd.DEFAULT_MAX_DISTANCE, extra), expected)


# ---------------------------------------------------------------------------------------------- Id patterns


def test_hpav18_well_pattern():
    ids = [
        "10580_1610_C1_1",
        "10580_1610_C1_2",
        "10580_1756_B1_1",
        "11651_1732_F3_13_cr580610dc203b9",
        "11651_1732_F3_2",
        "0fa556f8-bbab-11e8-b2ba-ac1f6b6435d0",
        "2266b284-bbc7-11e8-b2bc-ac1f6b6435d0",
        "10580_1610_C10_1",
        "63683_si35_H1_11",
        "63683_si35_H1_2",
    ]
    assert nd.ids_pattern_groups(ids, nd.HPAV18_WELL_PATTERN).tolist() == [0, 0, 2, 3, 3, 5, 6, 7, 8, 8]


def test_pattern_without_groups_uses_whole_match():
    assert nd.ids_pattern_groups(["ab1", "ab2", "cd1", "x"], r"^[a-z]+").tolist() == [0, 0, 2, 3]


def test_bad_pattern_is_a_clear_error():
    with pytest.raises(ValueError, match="bad group Id pattern"):
        nd.ids_pattern_groups(["a"], "(unclosed")


# ---------------------------------------------------------------------------------------- chains and stars


def _widest(hashes: np.ndarray, labels: np.ndarray) -> int:
    widest = 0
    for g in np.unique(labels):
        members = hashes[labels == g]
        widest = max(widest, int(nd.hamming(members[:, None, :], members[None, :, :]).max()))
    return widest


def test_a_chain_is_not_one_group_and_no_group_is_wider_than_twice_the_bound():
    from tests.fixtures import random_walk_hashes

    d = nd.DEFAULT_MAX_DISTANCE
    hashes = random_walk_hashes(300, step=8, seed=3)
    pairs = nd.near_pairs(hashes, d)
    components = nd.group_labels(len(hashes), pairs)
    assert len(np.unique(components)) == 1  # connected components alone: one group...
    assert nd.hamming(hashes[0], hashes[-1]) > 2 * d  # ...whose ends are far apart
    labels = nd.duplicate_groups(hashes, d)
    assert len(np.unique(labels)) > 1
    assert _widest(hashes, labels) <= 2 * d
    # every group is a union of linked samples: a split never joins what the pairs did not join
    assert all(len(np.unique(components[labels == g])) == 1 for g in np.unique(labels))


def test_copies_of_one_image_stay_one_group_even_when_some_are_far_apart():
    rng = np.random.default_rng(5)
    d = nd.DEFAULT_MAX_DISTANCE
    original = rng.integers(0, 2**64, size=(1, nd.HASH_WORDS), dtype=np.uint64)
    copies = [original[0]]
    for k in range(12):  # each copy d bits from the original, in its own bits: copies are up to 2d apart
        c = original[0].copy()
        for bit in range(k * d % 128, k * d % 128 + d):
            c[bit // 64] ^= np.uint64(1) << np.uint64(bit % 64)
        copies.append(c)
    hashes = np.stack(copies)
    assert (nd.duplicate_groups(hashes, d) == 0).all()


def test_split_wide_groups_keeps_groups_within_bounds():
    hashes = np.array([[0b0], [0b1], [0b11], [0b111]], dtype=np.uint64)
    pairs = nd.near_pairs(hashes, 1)
    labels = nd.group_labels(4, pairs)
    assert nd.split_wide_groups(hashes, labels, pairs, 3).tolist() == [0, 0, 0, 0]  # widest pair 3
    split = nd.split_wide_groups(hashes, labels, pairs, 2)
    assert len(set(split.tolist())) == 2 and _widest(hashes, split) <= 2


def test_group_id_pattern_example_in_help_matches_every_hpav18_id(capsys):
    import os
    import re

    from pipelines import preprocess

    with pytest.raises(SystemExit):
        preprocess.parse_args(["--help"])
    assert f"'{nd.HPAV18_WELL_PATTERN}'" in capsys.readouterr().out  # the example is the tested pattern
    ids = ["63683_si35_H1_11", "10580_1610_C1_1", "11651_1732_F3_13_cr580610dc203b9"]
    shared = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "hpa-labels")
    path = os.path.join(shared, "HPAv18RBGY_wodpl.csv")
    if os.path.exists(path):  # the real label file when it is there: all 74,606 Ids
        with open(path) as f:
            ids += [line.split(",", 1)[0] for line in f.read().splitlines()[1:]]
    unmatched = [i for i in ids if not re.search(nd.HPAV18_WELL_PATTERN, i)]
    assert not unmatched, unmatched[:5]
