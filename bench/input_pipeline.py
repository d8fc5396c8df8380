"""Benchmark of the training input pipeline on shards the preprocessing job made from real PNG bytes.

    .venv/bin/python -m bench.input_pipeline [--source ../shared/data/hpa-real-smoke] [--samples 1008]
        [--data_dir OUT_OF_A_PREVIOUS_RUN] [--repeats 3]

Replicates the real samples under new Ids (bench._common.build_real_dataset) to >= 1,000 samples, runs the
real preprocessing job (`pipelines.preprocess.run`) unless --data_dir names its output already, then
measures in one run, on all cores, samples/s of:
  (a) the decode ceiling: read, parse and decode the four stains in parallel, nothing else;
  (b) the training pipeline as shipped (`model.data.make_dataset(training=True)`, default flags: no cache);
  (c) the original project's pipeline shape: sequential map, float32 cast, shuffle 1000, batch, prefetch 1,
      with current tf.data's automatic map parallelisation and prefetch injection turned off (as it ran);
  (d) the training pipeline with `--cache memory` and with `--cache DIR` (a directory under --work_dir), in
      steady state, i.e. after the cache is filled; the fill (one decoding pass; for DIR the write before
      training) is timed on its own. The DIR cache is measured twice: warm (its files were just written, so
      they sit in the page cache, as a cache smaller than RAM would) and evicted (after the warm-up, every
      cache file's pages are dropped with posix_fadvise DONTNEED, so the timed samples are read from the
      disk, as a cache larger than RAM would be: the real one is about 30 GiB); the share of the cache
      files in the page cache is printed after the eviction and after the timed pass;
  (e) the original project's shape on current tf.data with its default optimisations on.
Each repeat runs every pipeline in turn over the same number of samples, timed after a warm-up that fills
buffers and starts threads (steady state, as over a long epoch); the table shows medians over repeats,
ratios, per-core rates and the cores an H200 would need (its consumption rate from ../shared/FACTS.md,
passed as --gpu_rate).

Augmentation runs in the model (`model.augment`), not in these pipelines; so the script also times the
model's first layer alone (the random dihedral transform, with and without crop / jitter) on a uint8 batch
on this CPU, to show what it would cost if it ran on the host's cores. On a GPU host it runs on the GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script too

import tensorflow as tf  # noqa: E402

import schemas  # noqa: E402
from bench._common import REAL_SMOKE, build_real_shards, cached_share, evict  # noqa: E402
from model import cache as cache_lib  # noqa: E402
from model import data as data_lib  # noqa: E402
from model.config import DataConfig  # noqa: E402

# ../shared/FACTS.md: ResNet50 on an H200, mixed_bfloat16, 512x512x4, uint8 input rescaled inside the model.
FACTS_GPU_RATE = 944.0
EVICTED = "(d) cached, --cache DIR, pages evicted"


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


def original_shape(
    files: list[str], image_size: int, batch_size: int, optimised: bool = False
) -> tf.data.Dataset:
    """(c) The original shape: sequential read/map, float32 cast, shuffle 1000, batch, prefetch 1.

    `optimised`: keep current tf.data's default rewrites on ((e)); off by default ((c)).
    """

    def parse(serialized):
        features = schemas.parse_example(serialized)
        image = tf.cast(schemas.decode_stains(features, image_size), tf.float32) / 255.0
        return image, tf.cast(features[schemas.LABELS_KEY], tf.float32)

    ds = tf.data.TFRecordDataset(files).map(parse).shuffle(1000).repeat()
    ds = ds.batch(batch_size).prefetch(1)
    if optimised:
        return ds
    # Current tf.data silently parallelises a plain map and injects prefetches; the original ran on a
    # tf.data without those rewrites, so switch them off to measure its shape as it was.
    options = tf.data.Options()
    options.experimental_optimization.map_parallelization = False
    options.experimental_optimization.inject_prefetch = False
    return ds.with_options(options)


def samples_per_second(
    ds: tf.data.Dataset, samples: int, batched: bool, warmup: int, before_timing=None
) -> float:
    """Steady-state samples/s: `warmup` samples first (buffers filled, threads started), then `samples` timed.

    Startup is excluded on purpose: a shuffle buffer of 1,000 decoded images costs 1,000 decodes before the
    first batch, which would count against the original shape on a short run but not over a whole epoch.
    `before_timing`, if given, is called between the warm-up and the timed samples (e.g. to evict files).
    """
    it = iter(ds.repeat())
    seen = 0
    while seen < warmup:
        element = next(it)
        seen += int(element[0].shape[0]) if batched else 1
    if before_timing is not None:
        before_timing()
    start = time.perf_counter()
    seen = 0
    while seen < samples:
        element = next(it)
        seen += int(element[0].shape[0]) if batched else 1
    return seen / (time.perf_counter() - start)


def cached_pipeline(
    data_dir: str, folds: list[int], cfg: DataConfig, fill_samples: int
) -> tuple[tf.data.Dataset, float]:
    """(d) `make_dataset` with a cache; returns the dataset with its cache filled and the fill's seconds.

    A directory cache is written by `make_dataset` itself (before training); a memory cache fills during
    the first pass, which is read here (`fill_samples` records, then the iterator is dropped).
    """
    start = time.perf_counter()
    ds = data_lib.make_dataset(data_dir, folds, cfg, training=True)
    if cfg.cache == "memory":
        # The cache sits before repeat/shuffle: one full pass of the cached stage fills it.
        seen = 0
        for images, _ in ds:
            seen += int(images.shape[0])
            if seen >= fill_samples + cfg.shuffle_buffer:
                break
    return ds, time.perf_counter() - start


def augmentation_cost(image_size: int, batch_size: int, repeats: int) -> dict[str, float]:
    """Samples/s of the augmentation layer alone on a uint8 batch on this CPU (median of `repeats`)."""
    import numpy as np

    from model.augment import StainAugmentation

    batch = tf.constant(
        np.random.default_rng(0).integers(0, 256, (batch_size, image_size, image_size, 4), dtype=np.uint8)
    )
    variants = {
        "dihedral": StainAugmentation(seed=0),
        f"dihedral + crop {image_size // 2}": StainAugmentation(crop_size=image_size // 2, seed=0),
        "dihedral + jitter 0.1": StainAugmentation(intensity_jitter=0.1, seed=0),
    }
    rates = {}
    for name, layer in variants.items():
        fn = tf.function(lambda x, layer=layer: layer(x, training=True))
        fn(batch).numpy()  # trace
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(5):
                fn(batch).numpy()
            times.append((time.perf_counter() - t) / 5)
        rates[name] = batch_size / statistics.median(times)
    return rates


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
    p.add_argument("--cache_dir", default=None, help="where (d) writes its disk caches (default: work dir)")
    args = p.parse_args(argv)

    data_dir = args.data_dir
    if data_dir is None:
        if not os.path.isdir(os.path.join(args.source, "train")):
            print(f"error: {args.source}/train not found (pass --source or --data_dir)", file=sys.stderr)
            return 2
        work = args.work_dir or tempfile.mkdtemp(prefix="bench-input-")
        args.work_dir = work
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
    cache_root = args.cache_dir or os.path.join(args.work_dir or tempfile.mkdtemp(prefix="bench-"), "caches")
    fills: dict[str, list[float]] = {"memory": [], "disk": []}

    def cached(kind: str, repeat: int):
        cache = "memory" if kind == "memory" else os.path.join(cache_root, f"r{repeat}")
        if kind == "disk" and os.path.isdir(cache):
            shutil.rmtree(cache)  # each repeat fills its own cache
        ds, seconds = cached_pipeline(data_dir, folds, dataclasses.replace(shipped_cfg, cache=cache), total)
        fills[kind].append(seconds)
        return ds

    def cache_files(repeat: int) -> list[str]:
        root = os.path.join(cache_root, f"r{repeat}")
        return [os.path.join(d, n) for d, _, names in os.walk(root) for n in names]

    cold_share: dict[str, list] = {"after eviction": [], "after the timed pass": []}

    def evict_cache(repeat: int) -> None:
        files = cache_files(repeat)
        evict(files)
        cold_share["after eviction"].append(cached_share(files))

    def reuse_cache(repeat: int):
        """The DIR cache the warm arm of this repeat filled, read again (no fill: it is complete)."""
        cache = os.path.join(cache_root, f"r{repeat}")
        cfg = dataclasses.replace(shipped_cfg, cache=cache)
        return data_lib.make_dataset(data_dir, folds, cfg, training=True)

    pipelines = {
        "(a) decode ceiling": (lambda r: decode_ceiling(files, image_size), False),
        "(b) training pipeline as shipped": (
            lambda r: data_lib.make_dataset(data_dir, folds, shipped_cfg, training=True),
            True,
        ),
        "(c) original project's shape, tf.data optimisations off": (
            lambda r: original_shape(files, image_size, args.batch_size),
            True,
        ),
        "(d) cached, --cache memory": (lambda r: cached("memory", r), True),
        "(d) cached, --cache DIR": (lambda r: cached("disk", r), True),
        EVICTED: (reuse_cache, True),
        "(e) original project's shape, tf.data defaults": (
            lambda r: original_shape(files, image_size, args.batch_size, optimised=True),
            True,
        ),
    }
    print(f"uptime: {os.popen('uptime').read().strip()}", flush=True)
    rates: dict[str, list[float]] = {name: [] for name in pipelines}
    for r in range(args.repeats):
        for name, (make, batched) in pipelines.items():
            ds = make(r)
            hook = (lambda r=r: evict_cache(r)) if name == EVICTED else None
            rate = samples_per_second(ds, n, batched, args.warmup, before_timing=hook)
            del ds
            if name == EVICTED:
                cold_share["after the timed pass"].append(cached_share(cache_files(r)))
            rates[name].append(rate)
            print(f"  repeat {r + 1}/{args.repeats} {name}: {rate:.1f} samples/s", flush=True)
    aug = augmentation_cost(image_size, args.batch_size, args.repeats)
    print(f"uptime: {os.popen('uptime').read().strip()}", flush=True)

    med = {name: statistics.median(v) for name, v in rates.items()}
    names = list(med)
    a, b, c, dm, dd, dcold, e = (med[k] for k in names)
    print()
    print(f"| pipeline | samples/s (median of {args.repeats}) | per core ({cores}) | runs |")
    print("| --- | --- | --- | --- |")
    for name, v in med.items():
        runs = ", ".join(f"{x:.0f}" for x in rates[name])
        print(f"| {name} | {v:.1f} | {v / cores:.1f} | {runs} |")
    print()
    for kind, secs in fills.items():
        m = statistics.median(secs)
        print(
            f"cache fill ({kind}): median {m:.1f} s for {total} samples ({total / m:.0f} samples/s); "
            f"runs {', '.join(f'{x:.1f}' for x in secs)} s"
        )
    print(f"cache size: {cache_lib.cache_bytes(total, image_size) / 2**20:.0f} MiB (samples x H x W x 4)")
    for when, shares in cold_share.items():
        text = ", ".join("?" if v is None else f"{v:.0%}" for v in shares)
        print(f"DIR cache files in the page cache {when} (evicted arm, per repeat): {text}")
    print()
    print(f"(b)/(a) = {b / a:.2f}  (target >= 0.90)")
    print(f"(b)/(c) = {b / c:.2f}  (target >= 3)")
    print(
        f"(d) memory = {dm:.0f}, disk (warm: in the page cache) = {dd:.0f}, disk (pages evicted: read "
        f"from the disk) = {dcold:.0f} samples/s  (target >= {args.gpu_rate:.0f})"
    )
    print(
        f"(d)/(b): memory {dm / b:.1f}x, disk warm {dd / b:.1f}x, disk evicted {dcold / b:.1f}x "
        "(target >= 5)"
    )
    print(f"(e)/(c) = {e / c:.2f}  (the original shape with and without current tf.data's rewrites)")
    print(
        f"GPU consumption (FACTS.md, ResNet50 H200 uint8): {args.gpu_rate:.0f} samples/s = "
        f"{args.gpu_rate / (b / cores):.1f} cores at (b)'s per-core rate of {b / cores:.1f} samples/s, "
        f"{args.gpu_rate / (dd / cores):.1f} cores at (d) disk warm's {dd / cores:.1f}, "
        f"{args.gpu_rate / (dcold / cores):.1f} cores at (d) disk evicted's {dcold / cores:.1f}"
    )
    print()
    print(f"augmentation layer alone on this CPU (in the model), batch {args.batch_size} x {image_size}px:")
    for name, v in aug.items():
        print(f"  {name}: {v:.0f} samples/s ({v / cores:.0f} per core if it ran on the host)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
