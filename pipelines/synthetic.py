"""Synthetic HPA-like dataset in the competition's own file format.

    python -m pipelines.synthetic --output_dir DIR [--num_samples 2000] [--image_size 512] [--seed 0] \
        [--class_balance hpa|tempered|uniform] [--labels_csv real_train.csv] [--test_samples N] [--workers N]

writes `DIR/train/{Id}_{red,green,blue,yellow}.png` (8-bit grayscale) and `DIR/train.csv` (`Id,Target`),
and with `--test_samples` also `DIR/test/`, `DIR/sample_submission.csv` (`Id,Predicted`) and the hidden
answers in `DIR/test_labels.csv`. Each image is a field of cells with landmark stains (nuclei blue,
microtubules red, ER yellow) and a green protein stain that sums one spatial pattern per label
(`pipelines.synthetic_patterns`). Small images show a magnified part of a field (fewer, larger cells; see
`RenderConfig.min_cell_radius`) so that dots, rims and filaments stay several pixels wide; at 512 px a field
holds 4-10 whole or cut cells.

The pure core is `render_sample(seed, labels, image_size)`; `draw_label_sets` draws label sets for a balance;
`generate(cfg)` renders and writes a whole dataset across processes. Output bytes depend only on the
configuration, never on the number of worker processes.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import json
import multiprocessing
import os
import struct
import sys
import time
import uuid
import zlib
from typing import Sequence

import numpy as np

import schemas
from pipelines import cli
from pipelines import synthetic_cells as sc
from pipelines import synthetic_patterns as sp

PROG = "hpa-synthetic"

# Per-class positives and labels-per-sample counts of the competition's train.csv (31,072 samples).
HPA_CLASS_COUNTS: tuple[int, ...] = (
    12885, 1254, 3621, 1561, 1858, 2513, 1008, 2822, 53, 45, 28, 1093, 688, 537,
    1066, 21, 530, 210, 902, 1482, 172, 3777, 802, 2965, 322, 8228, 328, 11,
)  # fmt: skip
HPA_LABELS_PER_SAMPLE: dict[int, int] = {1: 15126, 2: 12485, 3: 3160, 4: 299, 5: 2}
HPA_NUM_SAMPLES = 31072
assert len(HPA_CLASS_COUNTS) == schemas.NUM_CLASSES

BALANCES = ("hpa", "tempered", "uniform")
TEMPERED_POWER = 0.2  # tempered class frequencies follow count ** TEMPERED_POWER
MIN_IMAGE_SIZE = 32
MAX_LABELS = 5
TRAIN_DIR = "train"
TEST_DIR = "test"
TRAIN_CSV = "train.csv"
TEST_LABELS_CSV = "test_labels.csv"
SUBMISSION_CSV = "sample_submission.csv"
CONFIG_JSON = "synthetic_config.json"

# Child streams of a sample's SeedSequence: the layout, landmarks and noise never depend on the labels' own
# streams, so a sample rendered with and without a label differs only by that label's pattern.
_STREAM_LAYOUT, _STREAM_LANDMARKS, _STREAM_INTENSITY, _STREAM_NOISE, _STREAM_PATTERNS = range(5)
_SPLIT_TRAIN, _SPLIT_TEST = 0, 1
_NORMAL_TABLE = np.random.default_rng(20180101).standard_normal(65536).astype(np.float32)
_CLASSES_NEEDING_LAYOUT = {"force_daughters": 16, "force_mitotic": 17, "force_contact": 22}


@dataclasses.dataclass(frozen=True)
class RenderConfig:
    """Difficulty and realism knobs of one rendered sample.

    Attributes:
      green_peak_range: range (log-uniform) of the green stain's peak in 8-bit counts, per image: dim to
        saturated, as in the atlas.
      landmark_peak_range: range (uniform) of each landmark stain's peak in counts, per image.
      label_amplitude_range: relative amplitude of each label's pattern within a sample.
      cell_expression_range: per-cell expression multiplier (single-cell variability).
      green_haze: faint unspecific green in every cell (relative to the green peak).
      background_range: camera offset in counts (uniform per image and stain).
      read_noise: additive Gaussian noise in counts.
      shot_gain: variance of shot noise per count of signal.
      division_rate: probability that a field shows a mitotic cell, and (independently) a pair of daughters.
      min_cell_radius: typical cell radius in pixels that small images keep by showing a magnified part of
        the field (fewer, larger cells; see `synthetic_cells.make_layout`). A 512 px field has cells of
        ~70 px radius and is not magnified; at 128 px or less the default keeps dots, rims and filaments
        several pixels wide instead of shrinking them below one pixel.
    """

    green_peak_range: tuple[float, float] = (90.0, 360.0)
    landmark_peak_range: tuple[float, float] = (110.0, 240.0)
    label_amplitude_range: tuple[float, float] = (0.6, 1.0)
    cell_expression_range: tuple[float, float] = (0.55, 1.25)
    green_haze: float = 0.04
    background_range: tuple[float, float] = (0.0, 3.0)
    read_noise: float = 1.2
    shot_gain: float = 0.8
    division_rate: float = 0.25
    min_cell_radius: float = 32.0


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    """What `generate` writes.

    Attributes:
      output_dir: dataset root (gets train/, train.csv and, with test samples, test/, sample_submission.csv,
        test_labels.csv).
      num_samples: labeled (train) samples.
      image_size: side of the square images in pixels.
      seed: master seed; every output byte follows from it and the other fields.
      class_balance: `hpa` (competition frequencies), `tempered` (flattened, default) or `uniform`.
      labels_csv: optional real label file (`Id,Target`) to draw whole label sets from.
      test_samples: unlabeled samples written to test/ (answers in test_labels.csv).
      workers: processes (does not change the output).
      overwrite: replace an existing dataset in output_dir.
      render: difficulty knobs.
    """

    output_dir: str
    num_samples: int = 2000
    image_size: int = 512
    seed: int = 0
    class_balance: str = "tempered"
    labels_csv: str | None = None
    test_samples: int = 0
    workers: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)
    overwrite: bool = False
    render: RenderConfig = RenderConfig()

    def validate(self) -> None:
        """Raises ValueError with a clear message on a bad setting."""
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {self.num_samples}")
        if self.test_samples < 0:
            raise ValueError(f"test_samples must be 0 or more, got {self.test_samples}")
        if self.image_size < MIN_IMAGE_SIZE:
            raise ValueError(
                f"image_size must be at least {MIN_IMAGE_SIZE} px to hold cells with visible patterns, "
                f"got {self.image_size}"
            )
        if self.class_balance not in BALANCES:
            raise ValueError(
                f"unknown class_balance {self.class_balance!r}; choose one of {', '.join(BALANCES)}"
            )
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        if not self.output_dir:
            raise ValueError("output_dir must be given")


@dataclasses.dataclass
class RenderedSample:
    """One rendered sample.

    Attributes:
      stains: uint8 [S, S] image per stain name (schemas.STAINS).
      masks: boolean [S, S] region masks of the field (see `synthetic_cells.Layout.masks`).
      green_signal: the noise-free green signal in counts before quantisation.
      layout: the cell field.
    """

    stains: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]
    green_signal: np.ndarray
    layout: sc.Layout


# ----------------------------------------------------------------------------------------------------
# Labels


def class_frequencies(balance: str) -> np.ndarray:
    """Target fraction of samples that carry each class under a balance (sums to the mean labels per sample).

    Raises:
      ValueError: unknown balance.
    """
    if balance not in BALANCES:
        raise ValueError(f"unknown class_balance {balance!r}; choose one of {', '.join(BALANCES)}")
    counts = np.asarray(HPA_CLASS_COUNTS, dtype=np.float64)
    mean_k = _labels_per_sample_probs() @ np.arange(1, MAX_LABELS + 1)
    if balance == "hpa":
        shares = counts
    elif balance == "tempered":
        shares = counts**TEMPERED_POWER
    else:
        shares = np.ones_like(counts)
    return shares / shares.sum() * mean_k


def _labels_per_sample_probs() -> np.ndarray:
    k = np.array([HPA_LABELS_PER_SAMPLE.get(i, 0) for i in range(1, MAX_LABELS + 1)], dtype=np.float64)
    return k / k.sum()


def _inclusion_probabilities(freq: np.ndarray, k: int) -> np.ndarray:
    """Per-class inclusion probabilities of a k-label sample: proportional to freq, sum k, each at most 1."""
    p = freq * (k / freq.sum())
    for _ in range(len(freq)):
        over = p > 1.0
        if not over.any():
            break
        p[over] = 1.0
        rest = ~over & (p < 1.0)
        p[rest] *= (k - (p >= 1.0).sum()) / p[rest].sum()
    return np.minimum(p, 1.0)


def draw_label_sets(num_samples: int, balance: str, rng: np.random.Generator) -> np.ndarray:
    """Draws multi-hot label sets [num_samples, NUM_CLASSES] with 1-5 labels per sample.

    The number of labels k follows the competition's distribution; given k, the classes are drawn by
    randomised systematic sampling (classes in random order, k equally spaced points on the cumulated
    inclusion probabilities), which hits `class_frequencies(balance)` exactly in expectation (up to capping
    a class at probability 1 in 4- and 5-label samples).
    """
    freq = class_frequencies(balance)
    ks = rng.choice(np.arange(1, MAX_LABELS + 1), size=num_samples, p=_labels_per_sample_probs())
    table = np.stack([_inclusion_probabilities(freq, k) for k in range(1, MAX_LABELS + 1)])
    probs = table[ks - 1]
    order = np.argsort(rng.random(probs.shape), axis=1)
    cum = np.cumsum(np.take_along_axis(probs, order, axis=1), axis=1)
    u = rng.random((num_samples, 1))
    hits = np.floor(cum - u + 1.0) - np.floor(
        np.concatenate([np.zeros((num_samples, 1)), cum[:, :-1]], axis=1) - u + 1.0
    )
    out = np.zeros(probs.shape, dtype=np.int64)
    np.put_along_axis(out, order, (hits > 0.5).astype(np.int64), axis=1)
    return out


def read_label_sets(path: str) -> np.ndarray:
    """Reads a label file (`Id,Target`) into multi-hot rows.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: unreadable content, missing columns, bad class indices or no rows.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"labels file {path!r} not found")
    rows = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or schemas.CSV_TARGET not in reader.fieldnames:
                raise ValueError(
                    f"labels file {path!r} needs a header with a {schemas.CSV_TARGET!r} column, "
                    f"found {reader.fieldnames}"
                )
            for line, row in enumerate(reader, start=2):
                try:
                    idx = [int(t) for t in (row[schemas.CSV_TARGET] or "").split()]
                    if not idx:
                        raise ValueError("empty Target")
                    rows.append(schemas.labels_to_multi_hot(idx))
                except ValueError as e:
                    raise ValueError(
                        f"labels file {path!r}, line {line}: bad {schemas.CSV_TARGET}: {e}"
                    ) from None
    except UnicodeDecodeError as e:
        raise ValueError(f"labels file {path!r} is not a text CSV file: {e}") from None
    if not rows:
        raise ValueError(f"labels file {path!r} has no rows")
    return np.stack(rows)


# ----------------------------------------------------------------------------------------------------
# Rendering


def _seed_sequence(seed) -> np.random.SeedSequence:
    if isinstance(seed, np.random.SeedSequence):
        return seed
    return np.random.SeedSequence(int(seed))


def _child(ss: np.random.SeedSequence, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(ss.entropy, spawn_key=tuple(ss.spawn_key) + key))


def sample_seed(seed: int, index: int, test: bool = False) -> np.random.SeedSequence:
    """The SeedSequence of one sample of a dataset (train or test split), independent of process count."""
    return np.random.SeedSequence(seed, spawn_key=(_SPLIT_TEST if test else _SPLIT_TRAIN, index))


def render_sample(
    seed: int | np.random.SeedSequence,
    labels: Sequence[int],
    image_size: int,
    config: RenderConfig = RenderConfig(),
    draw_patterns: bool = True,
    with_masks: bool = True,
) -> RenderedSample:
    """Renders one sample: four 8-bit stains of a field of cells whose green stain shows the labels' patterns.

    Args:
      seed: integer seed or SeedSequence of the sample.
      labels: class indices (0..NUM_CLASSES-1) whose patterns the green stain sums.
      image_size: side in pixels.
      config: difficulty knobs.
      draw_patterns: False renders the same field, landmarks, intensities and noise without the labels'
        green patterns (for checking where a pattern puts its signal).
      with_masks: False leaves `masks` empty (saves time when only the images are needed).

    Returns:
      The stains, region masks, noise-free green signal and layout.

    Raises:
      ValueError: a class index out of range or an image size below MIN_IMAGE_SIZE.
    """
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}")
    labels = sorted({int(c) for c in labels})
    if any(c < 0 or c >= schemas.NUM_CLASSES for c in labels):
        raise ValueError(f"class index out of range 0..{schemas.NUM_CLASSES - 1}: {labels}")
    ss = _seed_sequence(seed)
    force = {k: c in labels for k, c in _CLASSES_NEEDING_LAYOUT.items()}
    layout = sc.make_layout(
        _child(ss, _STREAM_LAYOUT),
        image_size,
        division_rate=config.division_rate,
        min_cell_radius=config.min_cell_radius,
        **force,
    )
    scene = sp.Scene(layout, _child(ss, _STREAM_LANDMARKS))
    irng = _child(ss, _STREAM_INTENSITY)

    peaks = {stain: irng.uniform(*config.landmark_peak_range) for stain in sp.LANDMARKS}
    lo, hi = np.log(config.green_peak_range)
    green_peak = float(np.exp(irng.uniform(lo, hi)))
    expression = irng.uniform(*config.cell_expression_range, max(len(layout.cells), 1))
    amplitudes = irng.uniform(*config.label_amplitude_range, schemas.NUM_CLASSES)
    background = irng.uniform(*config.background_range, schemas.NUM_STAINS)

    signals = {
        stain: fn(scene, _child(ss, _STREAM_LANDMARKS, k)) * peaks[stain]
        for k, (stain, fn) in enumerate(sp.LANDMARKS.items())
    }
    green = np.float32(config.green_haze) * (scene.soft_cytoplasm + 0.5 * scene.soft_nucleus)
    if draw_patterns:
        for c in labels:
            green = green + amplitudes[c] * sp.GREEN_PATTERNS[c](scene, _child(ss, _STREAM_PATTERNS, c))
    green = green * layout.per_cell(expression[: len(layout.cells)]) * np.float32(green_peak)
    signals["green"] = green.astype(np.float32)

    # One standard-normal field (by table lookup: cheaper than drawing normals), seen flipped differently by
    # each stain, so the four noise fields are pixel-wise independent.
    draws = _child(ss, _STREAM_NOISE).integers(
        0, _NORMAL_TABLE.size, (image_size, image_size), dtype=np.uint16
    )
    normal = _NORMAL_TABLE[draws]
    views = (normal, normal[::-1], normal[:, ::-1], normal[::-1, ::-1])
    stains = {}
    for k, stain in enumerate(schemas.STAINS):
        sig = np.maximum(signals[stain], 0.0) + np.float32(background[k])
        std = np.sqrt(sig * np.float32(config.shot_gain) + np.float32(config.read_noise**2))
        noisy = sig + std * views[k]
        stains[stain] = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    return RenderedSample(
        stains=stains,
        masks=layout.masks() if with_masks else {},
        green_signal=signals["green"],
        layout=layout,
    )


def render_stains(
    seed, labels: Sequence[int], image_size: int, config: RenderConfig = RenderConfig()
) -> dict:
    """Like `render_sample` but returns only the uint8 stains (skips computing the masks)."""
    return render_sample(seed, labels, image_size, config, with_masks=False).stains


# ----------------------------------------------------------------------------------------------------
# Files


def encode_png(image: np.ndarray) -> bytes:
    """Encodes a uint8 [H, W] array as an 8-bit grayscale PNG.

    A minimal encoder (no row filters, zlib level 1, run-length strategy): about three times faster than
    Pillow's on these images and decoded by every PNG reader.
    """
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D uint8 image, got shape {image.shape}")
    h, w = image.shape
    raw = np.zeros((h, w + 1), dtype=np.uint8)  # filter byte 0 (None) per row
    raw[:, 1:] = image
    comp = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    data = comp.compress(raw.tobytes()) + comp.flush()

    def chunk(tag: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def sample_id(seed: int, index: int, test: bool = False) -> str:
    """A competition-style Id (UUID text) determined by the seed, split and index."""
    rng = np.random.default_rng(sample_seed(seed, index, test).spawn(1)[0])
    return str(uuid.UUID(bytes=rng.bytes(16), version=1))


def _write_one(task) -> int:
    seed, index, test, sid, labels, image_size, image_dir, render = task
    stains = render_stains(sample_seed(seed, index, test), labels, image_size, render)
    for stain in schemas.STAINS:
        with open(os.path.join(image_dir, f"{sid}_{stain}.png"), "wb") as f:
            f.write(encode_png(stains[stain]))
    return index


def _prepare_output(cfg: GeneratorConfig) -> None:
    targets = [TRAIN_DIR, TEST_DIR, TRAIN_CSV, TEST_LABELS_CSV, SUBMISSION_CSV, CONFIG_JSON]
    existing = [t for t in targets if os.path.exists(os.path.join(cfg.output_dir, t))]
    if existing and not cfg.overwrite:
        raise FileExistsError(
            f"{cfg.output_dir!r} already holds a dataset ({', '.join(existing)}); "
            "pick a new directory or pass --overwrite"
        )
    for t in existing:
        path = os.path.join(cfg.output_dir, t)
        if os.path.isdir(path):
            for name in os.listdir(path):
                if name.endswith(".png"):
                    os.remove(os.path.join(path, name))
        else:
            os.remove(path)
    os.makedirs(os.path.join(cfg.output_dir, TRAIN_DIR), exist_ok=True)
    if cfg.test_samples:
        os.makedirs(os.path.join(cfg.output_dir, TEST_DIR), exist_ok=True)


def _write_csv(path: str, header: tuple[str, str], rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def generate(cfg: GeneratorConfig, log=print) -> dict:
    """Renders and writes a whole dataset.

    Args:
      cfg: what to write.
      log: progress printer (None for silence).

    Returns:
      A summary: counts, per-class positives, seconds, samples per second.

    Raises:
      ValueError, FileNotFoundError, FileExistsError: bad configuration or labels file, occupied output.
    """
    cfg.validate()
    log = log or (lambda *a, **k: None)
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(2,)))
    total = cfg.num_samples + cfg.test_samples
    if cfg.labels_csv:
        pool = read_label_sets(cfg.labels_csv)
        labels = pool[rng.integers(0, len(pool), total)]
    else:
        labels = draw_label_sets(total, cfg.class_balance, rng)
    _prepare_output(cfg)

    tasks, train_rows, test_rows = [], [], []
    for i in range(total):
        test = i >= cfg.num_samples
        index = i - cfg.num_samples if test else i
        sid = sample_id(cfg.seed, index, test)
        labs = schemas.multi_hot_to_labels(labels[i])
        (test_rows if test else train_rows).append((sid, " ".join(map(str, labs))))
        image_dir = os.path.join(cfg.output_dir, TEST_DIR if test else TRAIN_DIR)
        tasks.append((cfg.seed, index, test, sid, labs, cfg.image_size, image_dir, cfg.render))

    start = time.perf_counter()
    done = 0
    every = max(total // 20, 1)

    def progress():
        if done % every == 0 or done == total:
            el = time.perf_counter() - start
            log(
                f"rendered {done}/{total} samples ({done / max(el, 1e-9):.1f} samples/s, {el:.0f} s)",
                flush=True,
            )

    workers = min(cfg.workers, total)
    if workers == 1:
        for t in tasks:
            _write_one(t)
            done += 1
            progress()
    else:
        ctx = multiprocessing.get_context("spawn")  # safe even when the caller has threads (TF, Beam)
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as ex:
            for _ in ex.map(_write_one, tasks, chunksize=max(1, min(16, total // (workers * 8)))):
                done += 1
                progress()
    seconds = time.perf_counter() - start

    _write_csv(os.path.join(cfg.output_dir, TRAIN_CSV), (schemas.CSV_ID, schemas.CSV_TARGET), train_rows)
    if cfg.test_samples:
        _write_csv(
            os.path.join(cfg.output_dir, TEST_LABELS_CSV), (schemas.CSV_ID, schemas.CSV_TARGET), test_rows
        )
        _write_csv(
            os.path.join(cfg.output_dir, SUBMISSION_CSV),
            (schemas.CSV_ID, schemas.CSV_PREDICTED),
            [(sid, "0") for sid, _ in test_rows],
        )
    resolved = dataclasses.asdict(cfg)
    for key in ("output_dir", "workers", "overwrite"):  # where and how it ran does not change the bytes
        resolved.pop(key)
    with open(os.path.join(cfg.output_dir, CONFIG_JSON), "w") as f:
        json.dump(resolved, f, indent=2)
    summary = {
        "train_samples": cfg.num_samples,
        "test_samples": cfg.test_samples,
        "positives_per_class": labels[: cfg.num_samples].sum(axis=0).tolist(),
        "seconds": seconds,
        "samples_per_second": total / max(seconds, 1e-9),
        "workers": workers,
    }
    log(
        f"wrote {cfg.num_samples} train + {cfg.test_samples} test samples of {cfg.image_size} px to "
        f"{cfg.output_dir} in {seconds:.1f} s with {workers} process(es)"
    )
    return summary


# ----------------------------------------------------------------------------------------------------
# Entry point


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0].rstrip(".")
        + ": fields of cells whose green protein stain shows one spatial pattern per label, written as "
        "{Id}_{red,green,blue,yellow}.png plus train.csv like the competition's data.",
    )
    d = GeneratorConfig(output_dir="")  # the defaults live in the dataclass
    p.add_argument(
        "--output_dir", required=True, help="dataset root to write (train/, train.csv, ...): a local folder"
    )
    p.add_argument(
        "--num_samples",
        type=int,
        default=d.num_samples,
        help=f"labeled samples in train/ (default {d.num_samples})",
    )
    p.add_argument(
        "--image_size", type=int, default=d.image_size, help=f"image side in pixels (default {d.image_size})"
    )
    p.add_argument(
        "--seed", type=int, default=d.seed, help=f"master seed: same seed, same bytes (default {d.seed})"
    )
    p.add_argument(
        "--class_balance",
        choices=BALANCES,
        default=d.class_balance,
        help="class frequencies: hpa (the competition's), tempered (count**%g, the default) or uniform"
        % TEMPERED_POWER,
    )
    p.add_argument(
        "--labels_csv", default=None, help="draw whole label sets from this local Id,Target file instead"
    )
    p.add_argument(
        "--test_samples",
        type=int,
        default=d.test_samples,
        help="unlabeled samples in test/ (answers in test_labels.csv)",
    )
    p.add_argument("--workers", type=int, default=d.workers, help="processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in output_dir")
    return p


@cli.command(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    for flag, path in (("--output_dir", args.output_dir), ("--labels_csv", args.labels_csv)):
        if path and "://" in path:
            parser.error(f"{flag} {path}: the generator reads and writes local files only (copy with gsutil)")
    cfg = GeneratorConfig(
        output_dir=args.output_dir,
        num_samples=args.num_samples,
        image_size=args.image_size,
        seed=args.seed,
        class_balance=args.class_balance,
        labels_csv=args.labels_csv,
        test_samples=args.test_samples,
        workers=args.workers,
        overwrite=args.overwrite,
    )
    try:
        generate(cfg)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        return cli.bad_input(PROG, e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
