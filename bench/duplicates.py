"""Benchmark of near-duplicate detection: recall on planted duplicates, false matches, margins and cost.

What is measured (one run, one report):
1. Cost per sample on one core: decoding the four real PNG stains of a sample (PIL, bytes already in memory)
   next to `hash_stains` on the decoded stains, medians over --repeats passes over the 12 real samples; the
   same at 2048 px (the stains upsampled, stored as JPEG q90 like the atlas' HPAv18 files).
2. Planted near-duplicates. Originals: the 12 real samples (../shared/data/hpa-real-smoke) and the first
   --synthetic_planted synthetic fields. Each original gets copies: JPEG q75/q85/q95, +-1 intensity noise,
   512 -> 2048 -> 512, 512 -> 2048 kept at 2048, a crop of 1 % and 2 % of each side (split at random between
   the two edges; kept smaller or resized back), and two combinations (crop + JPEG, noise + JPEG). A pair is
   (original, copy); recall = pairs within the bound / pairs.
3. Distinct images. --synthetic fields rendered by pipelines.synthetic at 512 px, their labels cycling through
   --label_sets label sets so that many distinct fields share their labels; plus the 12 real samples under
   the 8 rotations/flips (a field seen in another orientation: a different image to the hash) and their four
   quadrants zoomed 2x (different parts of a field). The real set composes each sample from one real green
   image and landmark images shared between some samples, so pairs that share an identical source stain
   file are left out of the distinct pairs (their count is printed). A false match = a distinct pair within
   the bound.
4. Several hashes (dHash, aHash, pHash: 64 bits per stain; the signs of the 6 x 6 lowest DCT frequencies:
   35 bits per stain, the one pipelines.near_duplicates uses) over several stain sets, so the choice is backed
   by the same run: max planted distance vs min distinct distance, and the closest distinct pairs.
5. The bound, chosen on one set and checked on another: the originals (real samples, synthetic fields) are
   split at random into two halves, each original with its copies and its rotations/quadrants. On the
   tuning half the bound is the smallest one (smaller bounds search faster) whose recall reaches
   --target_recall with no false match (failing that, the one with most planted pairs found minus false
   matches); recall and false matches are then reported on the held-out half at that bound and at the
   shipped DEFAULT_MAX_DISTANCE. Distinct pairs are those within one half.
6. near_pairs, group_labels and duplicate_groups at --scale_n hashes (105,678 = train + HPAv18): uniform
   random, and clustered (a third of the rows are copies of other rows with 0..bound bits flipped).
6. Chains (--chain_n; `--chain_only` runs just this): random walks of hashes in 8-bit steps (each hash near
   the one before, the ends far apart), alone and next to stars (an original with 12 copies, each `bound`
   bits from it in bits of its own, so copies are up to 2 x bound apart). Grouped two ways in one run:
   connected components of the near pairs (the grouping before chains were split) and duplicate_groups
   (components wider than 2 x bound split around centres). Link recall = near pairs (<= bound) left in one
   group; far pairs = pairs further apart than 2 x bound put in one group (false matches); star recall =
   copy pairs of one original in one group. The planted set of 2. is grouped both ways too.

The defaults are the settings of the README's figures (800 synthetic fields, 7 timing passes).

Usage:
  python bench/duplicates.py [--smoke_dir ../shared/data/hpa-real-smoke] [--synthetic 800] [--repeats 7]
      [--target_recall 0.999]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import subprocess
import sys
import time
from typing import Callable

import numpy as np
from PIL import Image

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import schemas  # noqa: E402
from bench._common import REAL_SMOKE, median, print_table  # noqa: E402
from pipelines import near_duplicates as nd  # noqa: E402
from pipelines import synthetic  # noqa: E402

Stains = dict[str, np.ndarray]

# ------------------------------------------------------------------------------------------- hash variants


def _shrink(img: np.ndarray, w: int, h: int) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BOX), dtype=np.float32)


def _dhash(img: np.ndarray) -> np.ndarray:
    s = _shrink(img, 9, 8)
    return (s[:, 1:] > s[:, :-1]).ravel()


def _ahash(img: np.ndarray) -> np.ndarray:
    s = _shrink(img, 8, 8)
    return (s > s.mean()).ravel()


_N = 32
_DCT = np.cos(np.pi * (2 * np.arange(_N)[None, :] + 1) * np.arange(8)[:, None] / (2 * _N)).astype(np.float32)


def _phash(img: np.ndarray) -> np.ndarray:
    """Classic pHash: 8 x 8 lowest DCT frequencies of a 32 x 32 thumbnail above their median (DC left out)."""
    low = (_DCT @ _shrink(img, _N, _N) @ _DCT.T).ravel()
    return low > np.median(low[1:])


# Bits per stain of each hash; "dct6_sign" is the one pipelines.near_duplicates uses.
HASHES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "dhash64": _dhash,
    "ahash64": _ahash,
    "phash64": _phash,
    "dct6_sign35": nd._stain_bits,
}
STAIN_SETS: dict[str, tuple[str, ...]] = {
    "green": ("green",),
    "blue": ("blue",),
    "green+blue": ("green", "blue"),
    "all4": tuple(schemas.STAINS),
}


def variant_bits(stains: Stains, hash_name: str, stain_set: str) -> np.ndarray:
    fn = HASHES[hash_name]
    return np.concatenate([fn(stains[s]) for s in STAIN_SETS[stain_set]])


# ------------------------------------------------------------------------------------------- transforms


def _jpeg(img: np.ndarray, q: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=q)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())))


def _noise(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(img.astype(np.int16) + rng.integers(-1, 2, img.shape), 0, 255).astype(np.uint8)


def _up(img: np.ndarray, side: int = 2048) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((side, side), Image.Resampling.BICUBIC))


def _down(img: np.ndarray, side: int) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((side, side), Image.Resampling.BOX))


def _crop(stains: Stains, frac: float, back: bool, rng: np.random.Generator) -> Stains:
    h, w = next(iter(stains.values())).shape
    cy, cx = max(1, round(h * frac)), max(1, round(w * frac))
    top, left = int(rng.integers(0, cy + 1)), int(rng.integers(0, cx + 1))
    out = {}
    for s, img in stains.items():
        c = img[top : h - (cy - top), left : w - (cx - left)]
        out[s] = np.asarray(Image.fromarray(c).resize((w, h), Image.Resampling.BILINEAR)) if back else c
    return out


def _per_stain(fn) -> Callable[[Stains, np.random.Generator], Stains]:
    return lambda st, rng: {s: fn(img, rng) for s, img in st.items()}


TRANSFORMS: dict[str, Callable[[Stains, np.random.Generator], Stains]] = {
    "jpeg_q75": _per_stain(lambda i, r: _jpeg(i, 75)),
    "jpeg_q85": _per_stain(lambda i, r: _jpeg(i, 85)),
    "jpeg_q95": _per_stain(lambda i, r: _jpeg(i, 95)),
    "noise_pm1": _per_stain(_noise),
    "resize_2048_back": _per_stain(lambda i, r: _down(_up(i), i.shape[0])),
    "resize_2048_kept": _per_stain(lambda i, r: _up(i)),
    "crop1_kept": lambda st, r: _crop(st, 0.01, False, r),
    "crop2_kept": lambda st, r: _crop(st, 0.02, False, r),
    "crop1_back": lambda st, r: _crop(st, 0.01, True, r),
    "crop2_back": lambda st, r: _crop(st, 0.02, True, r),
    "crop2_back+jpeg_q75": lambda st, r: {s: _jpeg(i, 75) for s, i in _crop(st, 0.02, True, r).items()},
    "noise_pm1+jpeg_q85": _per_stain(lambda i, r: _jpeg(_noise(i, r), 85)),
}

D4 = {
    "rot90": lambda i: np.rot90(i, 1),
    "rot180": lambda i: np.rot90(i, 2),
    "rot270": lambda i: np.rot90(i, 3),
    "flip_lr": lambda i: i[:, ::-1],
    "flip_ud": lambda i: i[::-1, :],
    "transpose": lambda i: i.T,
    "anti_transpose": lambda i: np.rot90(i, 2).T,
}


def _quadrant(img: np.ndarray, q: int) -> np.ndarray:
    h, w = img.shape
    y, x = (q // 2) * (h // 2), (q % 2) * (w // 2)
    part = img[y : y + h // 2, x : x + w // 2]
    return np.asarray(Image.fromarray(part).resize((w, h), Image.Resampling.BILINEAR))


# ------------------------------------------------------------------------------------------- data


def load_real(smoke_dir: str) -> tuple[list[str], list[dict[str, bytes]]]:
    folder = os.path.join(smoke_dir, "train")
    if not os.path.isdir(folder):
        sys.exit(f"{folder} not found: this benchmark needs the real sample images (--smoke_dir)")
    ids = sorted({n.rsplit("_", 1)[0] for n in os.listdir(folder) if n.endswith(".png")})
    files = []
    for sid in ids:
        raw = {}
        for s in schemas.STAINS:
            with open(os.path.join(folder, f"{sid}_{s}.png"), "rb") as f:
                raw[s] = f.read()
        files.append(raw)
    return ids, files


def decode(raw: dict[str, bytes]) -> Stains:
    out = {}
    for s, data in raw.items():
        img = Image.open(io.BytesIO(data))
        img.load()
        out[s] = np.asarray(img.convert("L") if img.mode != "L" else img)
    return out


def synthetic_fields(n: int, label_sets: int, seed: int, log) -> list[Stains]:
    rng = np.random.default_rng(seed)
    pool = synthetic.draw_label_sets(label_sets, "tempered", rng)
    out = []
    t0 = time.perf_counter()
    for i in range(n):
        labels = np.flatnonzero(pool[i % label_sets])
        out.append(synthetic.render_stains(synthetic.sample_seed(seed, i), labels.tolist(), 512))
        if (i + 1) % 100 == 0:
            log(f"  synthetic fields: {i + 1}/{n} ({time.perf_counter() - t0:.0f} s)")
    return out


# ------------------------------------------------------------------------------------------- report


def _all_variants(stains: Stains) -> dict[tuple[str, str], np.ndarray]:
    out = {(h, s): variant_bits(stains, h, s) for h in HASHES for s in STAIN_SETS}
    out[CHOSEN] = nd.hash_stains(stains)
    return out


CHOSEN = ("chosen", "hash_stains")


def _cost(real_raw: list[dict[str, bytes]], repeats: int) -> list[list]:
    """Per-sample decode and hash times (ms), medians over passes."""
    rows = []
    big_raw = []
    for raw in real_raw:
        big = {}
        for s, img in decode(raw).items():
            buf = io.BytesIO()
            Image.fromarray(_up(img)).save(buf, format="JPEG", quality=90)
            big[s] = buf.getvalue()
        big_raw.append(big)
    clock = time.process_time  # CPU time of this (single-threaded) process: less hit by other load
    for label, raws in (("512 px, 4 PNG", real_raw), ("2048 px, 4 JPEG q90", big_raw)):
        decoded = [decode(r) for r in raws]
        t_dec, t_hash, t_var = [], [], {}
        for _ in range(repeats):
            dec = hsh = 0.0
            for r in raws:  # interleaved per sample, so both see the same machine state
                t0 = clock()
                st = decode(r)
                t1 = clock()
                nd.hash_stains(st)
                t2 = clock()
                dec, hsh = dec + t1 - t0, hsh + t2 - t1
            t_dec.append(dec / len(raws))
            t_hash.append(hsh / len(raws))
            for h in HASHES:
                t0 = clock()
                for st in decoded:
                    variant_bits(st, h, "all4")
                t_var.setdefault(h, []).append((clock() - t0) / len(raws))
        dec, hsh = median(t_dec) * 1e3, median(t_hash) * 1e3
        rows.append(
            [
                label,
                f"{dec:.2f}",
                f"{hsh:.3f}",
                f"{hsh / dec:.3f}",
                " / ".join(f"{h} {median(v) * 1e3:.3f}" for h, v in t_var.items()),
            ]
        )
    return rows


def _pack(bits: np.ndarray) -> np.ndarray:
    """(n, HASH_BITS) bools -> (n, HASH_WORDS) uint64 laid out like hash_stains (zero padding)."""
    pad = np.zeros((len(bits), 64 * nd.HASH_WORDS - bits.shape[1]), dtype=bool)
    return np.packbits(np.concatenate([bits, pad], axis=1), axis=1).view(">u8").astype(np.uint64)


def _scale(n: int, max_distance: int, seed: int) -> list[list]:
    """near_pairs, group_labels and duplicate_groups on n uniform random hashes and on clustered ones."""
    rng = np.random.default_rng(seed)
    bits = rng.random((n, nd.HASH_BITS)) < 0.5
    # Clustered: a third of the rows are copies of random other rows, each with 0..max_distance bits flipped
    # (so many pairs sit at the bound, and copies of one row chain into groups).
    clustered = bits.copy()
    n_copies = n // 3
    src = rng.integers(0, n - n_copies, n_copies)
    copies = clustered[src].copy()
    flips = rng.integers(0, max_distance + 1, n_copies)
    for k, f in enumerate(flips):
        copies[k, rng.choice(nd.HASH_BITS, f, replace=False)] ^= True
    clustered[n - n_copies :] = copies
    rows = []
    for label, b in (("uniform random", bits), ("clustered", clustered)):
        hashes = _pack(b)
        t0 = time.perf_counter()
        pairs = nd.near_pairs(hashes, max_distance)
        t1 = time.perf_counter()
        labels = nd.group_labels(n, pairs)
        t2 = time.perf_counter()
        groups = nd.duplicate_groups(hashes, max_distance)
        t3 = time.perf_counter()
        assert np.array_equal(groups, labels)
        sizes = np.bincount(labels)
        rows.append(
            [
                label,
                n,
                len(pairs),
                int((sizes > 1).sum()),
                f"{t1 - t0:.2f}",
                f"{t2 - t1:.2f}",
                f"{t3 - t2:.2f}",
            ]
        )
    for d in (max_distance - 2, max_distance + 2):
        t0 = time.perf_counter()
        nd.near_pairs(_pack(bits), d)
        rows.append([f"uniform random, bound {d}", n, "", "", f"{time.perf_counter() - t0:.2f}", "", ""])
    return rows


def _grouping_figures(hashes: np.ndarray, labels: np.ndarray, bound: int, same: np.ndarray | None) -> list:
    """groups, largest, widest pair in a group, link recall, far pairs in one group, star recall."""
    n = len(hashes)
    iu = np.triu_indices(n, 1)
    dist = np.concatenate(
        [nd.hamming(hashes[i : i + 256, None, :], hashes[None, :, :])[:, :].ravel() for i in range(0, n, 256)]
    ).reshape(n, n)[iu]
    together = labels[iu[0]] == labels[iu[1]]
    near = dist <= bound
    widest = max(int(dist[together].max()) if together.any() else 0, 0)
    star = f"{together[same].mean():.4f}" if same is not None and same.any() else "-"
    return [
        len(np.unique(labels)),
        int(np.bincount(labels).max()),
        widest,
        f"{together[near].mean():.4f}",
        int((together & (dist > 2 * bound)).sum()),
        star,
    ]


def chain_case(chain_n: int, bound: int, seed: int) -> list[list]:
    """Section 6: chains and stars grouped by connected components (before) and duplicate_groups (now)."""
    from tests.fixtures import random_walk_hashes

    rows = []
    rng = np.random.default_rng(seed)
    chain = random_walk_hashes(chain_n, step=8, seed=seed)
    stars, star_of = [], []
    for k in range(20):
        original = rng.integers(0, 2**64, size=nd.HASH_WORDS, dtype=np.uint64)
        original[-1] &= np.uint64((1 << (nd.HASH_BITS - 64 * (nd.HASH_WORDS - 1))) - 1)
        stars.append(original)
        star_of.append(k)
        for _ in range(12):
            copy = original.copy()
            for bit in rng.choice(nd.HASH_BITS, size=bound, replace=False):
                copy[bit // 64] ^= np.uint64(1) << np.uint64(bit % 64)
            stars.append(copy)
            star_of.append(k)
    cases = {
        f"chain of {chain_n}, 8-bit steps": (chain, None),
        "the chain + 20 stars of 13": (
            np.concatenate([chain, np.stack(stars)]),
            np.array([-1] * chain_n + star_of),
        ),
    }
    for name, (hashes, origin) in cases.items():
        same = None
        if origin is not None:
            iu = np.triu_indices(len(hashes), 1)
            same = (origin[iu[0]] == origin[iu[1]]) & (origin[iu[0]] >= 0)
        components = nd.group_labels(len(hashes), nd.near_pairs(hashes, bound))
        t0 = time.perf_counter()
        split = nd.duplicate_groups(hashes, bound)
        secs = time.perf_counter() - t0
        rows.append([name, "components (before)", *_grouping_figures(hashes, components, bound, same), "-"])
        rows.append(
            [name, "duplicate_groups (now)", *_grouping_figures(hashes, split, bound, same), f"{secs:.2f}"]
        )
    return rows


def _print_chain_case(args) -> None:
    if not args.chain_n:
        return
    bound = nd.DEFAULT_MAX_DISTANCE
    load = open("/proc/loadavg").read().split()[:3]
    print_table(
        CHAIN_HEADER,
        chain_case(args.chain_n, bound, args.seed),
        title=f"6. Chains, bound {bound} of {nd.HASH_BITS} bits, before and now (load {' '.join(load)})",
    )


CHAIN_HEADER = [
    "case",
    "grouping",
    "groups",
    "largest",
    "widest pair",
    "link recall",
    "far pairs",
    "star recall",
    "s",
]


def choose_bound(planted: np.ndarray, distinct: np.ndarray, target_recall: float) -> int:
    """The smallest bound whose recall on `planted` distances reaches `target_recall` with no `distinct`
    distance within it; failing that, the bound with the most planted pairs found minus false matches."""
    top = int(max(planted.max(), 1)) + 1
    for b in range(top):
        if np.mean(planted <= b) >= target_recall and not (distinct <= b).any():
            return b
    scores = [int((planted <= b).sum()) - int((distinct <= b).sum()) for b in range(top)]
    return int(np.argmax(scores))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke_dir", default=REAL_SMOKE, help="folder with train/ of real four-stain PNGs")
    p.add_argument("--synthetic", type=int, default=800, help="distinct synthetic 512 px fields")
    p.add_argument("--synthetic_planted", type=int, default=100, help="synthetic fields that get copies")
    p.add_argument("--label_sets", type=int, default=8, help="label sets the synthetic fields cycle through")
    p.add_argument("--crop_draws", type=int, default=3, help="random crop placements per crop transform")
    p.add_argument("--repeats", type=int, default=7, help="timing passes (median shown)")
    p.add_argument(
        "--target_recall", type=float, default=0.999, help="recall the bound must reach on the tuning half"
    )
    p.add_argument("--scale_n", type=int, default=105_678, help="hashes for the near_pairs timing (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chain_n", type=int, default=3000, help="hashes in the chain case (0: skip)")
    p.add_argument("--chain_only", action="store_true", help="run only the chain case (section 6)")
    args = p.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.chain_only:
        _print_chain_case(args)
        return 0

    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"# bench/duplicates.py  load: {uptime}")
    print(
        f"hash: {nd.BITS_PER_STAIN} DCT sign bits per stain of {', '.join(nd.HASHED_STAINS)} "
        f"({nd.HASH_BITS} bits in {nd.HASH_WORDS} words); "
        f"bound DEFAULT_MAX_DISTANCE = {nd.DEFAULT_MAX_DISTANCE} of {nd.HASH_BITS} bits"
    )

    ids, real_raw = load_real(args.smoke_dir)
    print(f"real samples: {len(ids)} (files read into memory before timing: decode from bytes)")
    log("timing decode and hash ...")
    print_table(
        ["stains", "decode 4 stains ms", "hash_stains ms", "hash / decode", "all-4-stain variants ms"],
        _cost(real_raw, args.repeats),
        title=f"Cost per sample: CPU ms of one core, medians of {args.repeats} passes over the real samples",
    )

    rng = np.random.default_rng(args.seed)
    real = [decode(r) for r in real_raw]
    md5 = [{s: hashlib.md5(r[s]).hexdigest() for s in schemas.STAINS} for r in real_raw]

    log(f"rendering {args.synthetic} synthetic fields ...")
    syn = synthetic_fields(args.synthetic, args.label_sets, args.seed, log)

    # Distinct pool: items with (origin, per-stain source keys).
    distinct: list[tuple[Stains, set]] = []
    names: list[str] = []
    for i, st in enumerate(syn):
        distinct.append((st, {("syn", i, s) for s in schemas.STAINS}))
        names.append(f"synthetic {i} (label set {i % args.label_sets})")
    for i, st in enumerate(real):
        distinct.append((st, {(md5[i][s], "id") for s in schemas.STAINS}))
        names += [f"real {i}"] + [f"real {i} {t}" for t in D4] + [f"real {i} quadrant {q}" for q in range(4)]
        for name, fn in D4.items():
            distinct.append(
                (
                    {s: np.ascontiguousarray(fn(img)) for s, img in st.items()},
                    {(md5[i][s], name) for s in schemas.STAINS},
                )
            )
        for q in range(4):
            distinct.append(
                (
                    {s: _quadrant(img, q) for s, img in st.items()},
                    {(md5[i][s], f"q{q}") for s in schemas.STAINS},
                )
            )
    log(f"hashing {len(distinct)} distinct images ...")
    dv = [_all_variants(st) for st, _ in distinct]
    n_d = len(distinct)
    share = np.zeros((n_d, n_d), dtype=bool)
    for a in range(n_d):
        for b in range(a + 1, n_d):
            if distinct[a][1] & distinct[b][1]:
                share[a, b] = True
    iu = np.triu_indices(n_d, 1)
    keep = ~share[iu]
    print(
        f"\ndistinct images: {n_d} ({len(syn)} synthetic, {len(real) * 12} real-derived: 12 real x "
        f"(original + 7 rotations/flips + 4 zoomed quadrants)); distinct pairs: {int(keep.sum())} "
        f"(left out: {int((~keep).sum())} pairs sharing an identical source stain file)"
    )

    log("planting near-duplicates ...")
    originals = real + syn[: args.synthetic_planted]
    kinds = ["real"] * len(real) + ["synthetic"] * min(args.synthetic_planted, len(syn))
    planted: list[tuple[int, str, dict]] = []
    ov = [_all_variants(st) for st in originals]
    for o, st in enumerate(originals):
        for name, fn in TRANSFORMS.items():
            draws = args.crop_draws if name.startswith("crop") else 1
            for _ in range(draws):
                planted.append((o, name, _all_variants(fn(st, rng))))
    print(
        f"planted pairs: {len(planted)} ({len(real)} real + {len(originals) - len(real)} synthetic originals "
        f"x {len(TRANSFORMS)} transforms, {args.crop_draws} placements per crop)"
    )

    rows = []
    dd_by, pd_by = {}, {}
    for key in dv[0]:
        if key == CHOSEN:
            hashes = np.stack([v[key] for v in dv])
            dd = nd.hamming(hashes[iu[0]], hashes[iu[1]])[keep]
            pd = np.array([int(nd.hamming(ov[o][key], v[key])) for o, _, v in planted])
            bits = nd.HASH_BITS
        else:
            b = np.stack([v[key] for v in dv])
            bits = b.shape[1]
            dd = np.concatenate(
                [
                    (b[iu[0][k : k + 50_000]] != b[iu[1][k : k + 50_000]]).sum(1)
                    for k in range(0, len(iu[0]), 50_000)
                ]
            )[keep]
            pd = np.array([int((ov[o][key] != v[key]).sum()) for o, _, v in planted])
        dd_by[key], pd_by[key] = dd, pd
        rows.append(
            [
                f"{key[0]} {key[1]}",
                bits,
                int(pd.max()),
                f"{np.percentile(pd, 99):.0f}",
                int(dd.min()),
                f"{np.percentile(dd, 0.1):.0f}",
                int(dd.min()) - int(pd.max()),
                f"{pd.max() / bits:.3f}",
                f"{dd.min() / bits:.3f}",
            ]
        )
    print_table(
        [
            "hash",
            "bits",
            "planted max",
            "planted p99",
            "distinct min",
            "distinct p0.1",
            "margin",
            "planted max/bits",
            "distinct min/bits",
        ],
        rows,
        title="Distances: planted pairs vs distinct pairs, every hash variant (same images)",
    )

    # The chosen hash at the default bound: per transform and overall.
    dd, all_pd = dd_by[CHOSEN], pd_by[CHOSEN]
    bound = nd.DEFAULT_MAX_DISTANCE
    by_name: dict[tuple[str, str], list[int]] = {}
    for (o, name, _), d in zip(planted, all_pd):
        by_name.setdefault((kinds[o], name), []).append(int(d))
    pd_rows = []
    for (kind, name), ds in sorted(by_name.items()):
        ds_a = np.array(ds)
        pd_rows.append(
            [kind, name, len(ds), f"{np.median(ds_a):.0f}", int(ds_a.max()), f"{(ds_a <= bound).mean():.3f}"]
        )
    print_table(
        ["originals", "transform", "pairs", "median d", "max d", "recall"],
        pd_rows,
        title=f"hash_stains ({nd.HASH_BITS} bits), bound {bound}: planted pairs by transform",
    )
    found = int((all_pd <= bound).sum())
    print(
        f"\nrecall {found / len(all_pd):.4f} ({found}/{len(all_pd)}); false matches "
        f"{int((dd <= bound).sum())} of {len(dd)} distinct pairs; planted max {all_pd.max()}, distinct min "
        f"{dd.min()}, margin {dd.min() - all_pd.max()} bits"
    )
    sweep = []
    for b in range(bound - 6, bound + 8, 2):
        sweep.append([b, f"{np.mean(all_pd <= b):.4f}", int((all_pd > b).sum()), int((dd <= b).sum())])
    print_table(
        ["bound", "recall", "planted missed", "false matches"], sweep, title="Other bounds, same pairs"
    )
    pair_a, pair_b = iu[0][keep], iu[1][keep]
    closest = np.argsort(dd, kind="stable")[:8]
    print(
        "closest distinct pairs:",
        "; ".join(f"{dd[k]}: {names[pair_a[k]]} / {names[pair_b[k]]}" for k in closest),
    )
    hist_p = np.bincount(all_pd)
    hist_d = np.bincount(dd)
    print("planted distance histogram (d: count):", {d: int(c) for d, c in enumerate(hist_p) if c})
    low = {d: int(c) for d, c in enumerate(hist_d) if c and d < 3 * bound}
    print(f"distinct distance histogram below {3 * bound}:", low, f"median {np.median(dd):.0f}")

    # The bound chosen on one half of the originals, its recall and false matches checked on the other.
    half_of_distinct = np.empty(n_d, dtype=np.int64)
    syn_half = rng.permutation(np.arange(len(syn)) % 2)
    real_half = rng.permutation(np.arange(len(real)) % 2)
    half_of_distinct[: len(syn)] = syn_half
    half_of_distinct[len(syn) :] = np.repeat(real_half, 12)  # each real sample: itself, 7 D4, 4 quadrants
    half_of_planted = np.array(
        [real_half[o] if o < len(real) else syn_half[o - len(real)] for o, _, _ in planted]
    )
    pair_half = np.where(half_of_distinct[iu[0]] == half_of_distinct[iu[1]], half_of_distinct[iu[0]], -1)[
        keep
    ]
    halves = {h: (all_pd[half_of_planted == h], dd[pair_half == h]) for h in (0, 1)}
    chosen = choose_bound(*halves[0], args.target_recall)
    split_rows = []
    for name, h in (("tuning", 0), ("held-out", 1)):
        pd_h, dd_h = halves[h]
        for b in dict.fromkeys((chosen, bound)):
            which = " = ".join(w for w, v in (("chosen", chosen), ("shipped default", bound)) if v == b)
            recall, false = f"{np.mean(pd_h <= b):.4f}", int((dd_h <= b).sum())
            split_rows.append([name, len(pd_h), len(dd_h), f"{b} ({which})", recall, false])
    print_table(
        ["half", "planted pairs", "distinct pairs", "bound", "recall", "false matches"],
        split_rows,
        title=f"The bound chosen on the tuning half (smallest with recall >= {args.target_recall} and no "
        "false match), checked on the held-out half",
    )

    # End to end on the chosen hash: the distinct pool (which holds every original once) plus all copies,
    # grouped by duplicate_groups; each group should be one pool image with its copies.
    pool_index = [len(syn) + 12 * k for k in range(len(real))] + list(range(len(originals) - len(real)))
    hashes = np.stack([v[CHOSEN] for v in dv] + [v[CHOSEN] for _, _, v in planted])
    origin = np.array(list(range(n_d)) + [pool_index[o] for o, _, _ in planted])
    groups = nd.duplicate_groups(hashes, bound)
    mixed = sum(len(np.unique(origin[groups == g])) > 1 for g in np.unique(groups))
    split = sum(len(np.unique(groups[origin == o])) > 1 for o in np.unique(origin))
    print(
        f"duplicate_groups on {len(hashes)} images (distinct pool + copies): groups mixing two pool images "
        f"{mixed}, pool images whose copies are split over groups {split}"
    )
    components = nd.group_labels(len(hashes), nd.near_pairs(hashes, bound))
    mixed_c = sum(len(np.unique(origin[components == g])) > 1 for g in np.unique(components))
    split_c = sum(len(np.unique(components[origin == o])) > 1 for o in np.unique(origin))
    print(f"the same as connected components (before chains were split): mixing {mixed_c}, split {split_c}")

    _print_chain_case(args)
    if args.scale_n:
        log(f"near_pairs at {args.scale_n} hashes ...")
        print_table(
            ["hashes", "n", "pairs", "groups >1", "near_pairs s", "group_labels s", "duplicate_groups s"],
            _scale(args.scale_n, nd.DEFAULT_MAX_DISTANCE, args.seed),
            title=f"Search and grouping at scale, bound {nd.DEFAULT_MAX_DISTANCE} of {nd.HASH_BITS} bits",
        )
    print(f"load at end: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
