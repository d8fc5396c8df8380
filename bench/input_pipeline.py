"""Benchmark of the training input pipeline on shards the preprocessing job made from real PNG bytes.

    .venv/bin/python -m bench.input_pipeline [--source ../shared/data/hpa-real-smoke] [--samples 1008]
        [--data_dir OUT_OF_A_PREVIOUS_RUN] [--repeats 3]

Replicates the real samples under new Ids (bench._common.build_real_dataset) to >= 1,000 samples, runs the
real preprocessing job (`pipelines.preprocess.run`) unless --data_dir names its output already, then
measures in one run, on all cores, samples/s of:
  (a) the decode ceiling: read, parse and decode the four stains in parallel, nothing else;
  (b) the training pipeline as shipped (`model.data.make_dataset(training=True)`, augmentation included);
  (c) the original project's pipeline shape: sequential map, float32 cast, shuffle 1000, batch, prefetch 1.
Each repeat runs (a), (b), (c) in turn over the same number of samples, timed after a warm-up that fills
buffers and starts threads (steady state, as over a long epoch); the table shows
medians over repeats, the ratios b/a and b/c, per-core rates and the cores an H200 would need (its
consumption rate from ../shared/FACTS.md, passed as --gpu_rate).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script too

import tensorflow as tf  # noqa: E402

import schemas  # noqa: E402
from bench._common import REAL_SMOKE, build_real_shards  # noqa: E402
from model import data as data_lib  # noqa: E402
from model.config import DataConfig  # noqa: E402

# ../shared/FACTS.md: ResNet50 on an H200, mixed_bfloat16, 512x512x4, uint8 input rescaled inside the model.
FACTS_GPU_RATE = 944.0


def decode_ceiling(files: list[str], image_size: int) -> tf.data.Dataset:
    """(a) Read, parse and decode the four stains in parallel, nothing else."""
    ds = tf.data.Dataset.from_tensor_slices(files).interleave(
        tf.data.TFRecordDataset,
        cycle_length=len(files),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=False,
    )
    return ds.map(
        lambda s: schemas.decode_stains(schemas.parse_example(s), image_size),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=False,
    )


def original_shape(files: list[str], image_size: int, batch_size: int) -> tf.data.Dataset:
    """(c) The original shape: sequential read/map, float32 cast, shuffle 1000, batch, prefetch 1."""

    def parse(serialized):
        features = schemas.parse_example(serialized)
        image = tf.cast(schemas.decode_stains(features, image_size), tf.float32) / 255.0
        return image, tf.cast(features[schemas.LABELS_KEY], tf.float32)

    ds = tf.data.TFRecordDataset(files).map(parse).shuffle(1000).repeat()
    ds = ds.batch(batch_size).prefetch(1)
    # Current tf.data silently parallelises a plain map and injects prefetches; the original ran on a
    # tf.data without those rewrites, so switch them off to measure its shape as it was.
    options = tf.data.Options()
    options.experimental_optimization.map_parallelization = False
    options.experimental_optimization.inject_prefetch = False
    return ds.with_options(options)


def samples_per_second(ds: tf.data.Dataset, samples: int, batched: bool, warmup: int) -> float:
    """Steady-state samples/s: `warmup` samples first (buffers filled, threads started), then `samples` timed.

    Startup is excluded on purpose: a shuffle buffer of 1,000 decoded images costs 1,000 decodes before the
    first batch, which would count against the original shape on a short run but not over a whole epoch.
    """
    it = iter(ds.repeat())
    seen = 0
    while seen < warmup:
        element = next(it)
        seen += int(element[0].shape[0]) if batched else 1
    start = time.perf_counter()
    seen = 0
    while seen < samples:
        element = next(it)
        seen += int(element[0].shape[0]) if batched else 1
    return seen / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    """Entry point: build (or reuse) the shards, measure, print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=REAL_SMOKE, help="folder of real samples (train/, train.csv)")
    p.add_argument("--samples", type=int, default=1008, help="replicated samples (>= 1,000)")
    p.add_argument("--data_dir", default=None, help="reuse an existing preprocessing output")
    p.add_argument("--work_dir", default=None, help="where to build the dataset (default: a temp dir)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--measure_samples", type=int, default=None, help="samples per measurement (default: all)")
    p.add_argument("--warmup", type=int, default=1100, help="samples read before timing (fills buffers)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--gpu_rate", type=float, default=FACTS_GPU_RATE, help="GPU samples/s from FACTS.md")
    args = p.parse_args(argv)

    data_dir = args.data_dir
    if data_dir is None:
        if not os.path.isdir(os.path.join(args.source, "train")):
            print(f"error: {args.source}/train not found (pass --source or --data_dir)", file=sys.stderr)
            return 2
        work = args.work_dir or tempfile.mkdtemp(prefix="bench-input-")
        data_dir = build_real_shards(work, args.samples, smoke_dir=args.source)

    manifest = schemas.read_manifest(data_dir)
    image_size = data_lib.image_size_of(data_dir, manifest)
    folds = list(range(int(manifest[schemas.MANIFEST_NUM_FOLDS])))
    files = data_lib.list_shards(data_dir, folds)
    total = sum(int(manifest[schemas.MANIFEST_WRITTEN].get(schemas.written_key(f), 0)) for f in folds)
    n = args.measure_samples or total
    cores = os.cpu_count() or 1
    print(
        f"{total} samples of {image_size}px in {len(files)} shards; {n} samples per measurement; "
        f"{cores} cores"
    )

    shipped_cfg = DataConfig(batch_size=args.batch_size)
    pipelines = {
        "(a) decode ceiling": (lambda: decode_ceiling(files, image_size), False),
        "(b) training pipeline as shipped": (
            lambda: data_lib.make_dataset(data_dir, folds, shipped_cfg, training=True),
            True,
        ),
        "(c) original project's shape": (lambda: original_shape(files, image_size, args.batch_size), True),
    }
    rates: dict[str, list[float]] = {name: [] for name in pipelines}
    for r in range(args.repeats):
        for name, (make, batched) in pipelines.items():
            rate = samples_per_second(make(), n, batched, args.warmup)
            rates[name].append(rate)
            print(f"  repeat {r + 1}/{args.repeats} {name}: {rate:.1f} samples/s", flush=True)

    med = {name: statistics.median(v) for name, v in rates.items()}
    a, b, c = (
        med["(a) decode ceiling"],
        med["(b) training pipeline as shipped"],
        med["(c) original project's shape"],
    )
    print()
    print(f"| pipeline | samples/s (median of {args.repeats}) | per core ({cores}) | runs |")
    print("| --- | --- | --- | --- |")
    for name, v in med.items():
        runs = ", ".join(f"{x:.0f}" for x in rates[name])
        print(f"| {name} | {v:.1f} | {v / cores:.1f} | {runs} |")
    print()
    print(f"(b)/(a) = {b / a:.2f}  (target >= 0.90)")
    print(f"(b)/(c) = {b / c:.2f}  (target >= 3)")
    print(
        f"GPU consumption (FACTS.md, ResNet50 H200 uint8): {args.gpu_rate:.0f} samples/s = "
        f"{args.gpu_rate / (b / cores):.1f} cores at (b)'s per-core rate of {b / cores:.1f} samples/s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
