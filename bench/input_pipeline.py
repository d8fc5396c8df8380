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
  (d) the training pipeline with a cache, in steady state (after the fill, which is timed on its own):
      `--cache memory` and `--cache DIR` (model.cache: one record file for every fold, a new uniform
      permutation every epoch), the DIR cache warm (its files read once after the warm-up) and with its
      pages evicted first (posix_fadvise DONTNEED after the warm-up), fincore's share of its bytes in the
      page cache printed for both, beside today's (d) before issue 18 (bench/_old_cache.py: a tf.data
      snapshot in 16 files, read back through the 1,024-record shuffle buffer), warm and evicted alike;
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
from bench import _old_cache  # noqa: E402
from bench._common import REAL_SMOKE, build_real_shards, cached_share, evict, warm  # noqa: E402
from model import cache as cache_lib  # noqa: E402
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
    ds: tf.data.Dataset, samples: int, batched: bool, warmup: int, after_warmup=None
) -> float:
    """Steady-state samples/s: `warmup` samples first (buffers filled, threads started), then `samples` timed.

    Startup is excluded on purpose: a shuffle buffer of 1,000 decoded images costs 1,000 decodes before the
    first batch, which would count against the original shape on a short run but not over a whole epoch.
    `after_warmup()` runs between the two (e.g. evicting a cache's pages).
    """
    it = iter(ds.repeat())
    seen = 0
    while seen < warmup:
        element = next(it)
        seen += int(element[0].shape[0]) if batched else 1
    if after_warmup is not None:
        after_warmup()
    start = time.perf_counter()
    seen = 0
    while seen < samples:
        element = next(it)
        seen += int(element[0].shape[0]) if batched else 1
    return seen / (time.perf_counter() - start)


def cache_files(path: str) -> list[str]:
    """The files of a cache folder."""
    return [os.path.join(root, name) for root, _, names in os.walk(path) for name in names]


def evict_cache(path: str, store=None) -> None:
    """Drops a cache folder's pages from the page cache: first this process's mapping of them (madvise
    DONTNEED; a mapped page is not dropped), then the files' clean pages (posix_fadvise DONTNEED)."""
    import mmap

    if store is not None and getattr(store.images, "_mmap", None) is not None:
        store.images._mmap.madvise(mmap.MADV_DONTNEED)
    evict(cache_files(path))


def new_cached(data_dir: str, folds: list[int], cfg: DataConfig) -> tuple[tf.data.Dataset, float]:
    """(d) `make_dataset` with `cfg.cache`; returns the dataset and the seconds to build it (the fill, when
    the cache is not there yet). A directory cache is opened afresh, as a new process would; a memory
    cache is filled once per run."""
    start = time.perf_counter()
    ds = data_lib.make_dataset(data_dir, folds, cfg, training=True)
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
    p.add_argument(
        "--cached_only", action="store_true", help="measure only the (d) rows (the caches, old and new)"
    )
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
    new_dir = os.path.join(cache_root, "new")
    old_dir = os.path.join(cache_root, "old", "folds-all")
    for d in (new_dir, old_dir):
        if os.path.isdir(d):
            shutil.rmtree(d)  # every run times its own fills
    t = time.perf_counter()
    _old_cache.fill(files, image_size, old_dir)
    fills = {"today's --cache DIR (format 1)": time.perf_counter() - t}
    disk_cfg = dataclasses.replace(shipped_cfg, cache=new_dir)
    memory_cfg = dataclasses.replace(shipped_cfg, cache="memory")
    fills["--cache DIR"] = new_cached(data_dir, folds, disk_cfg)[1]
    fills["--cache memory"] = new_cached(data_dir, folds, memory_cfg)[1]
    (new_path,) = [os.path.join(new_dir, n) for n in os.listdir(new_dir) if "." not in n]
    evicted_share: dict[str, list] = {"today's": [], "new": []}
    warm_share: dict[str, list] = {"today's": [], "new": []}

    def warm_old():
        warm(cache_files(old_dir))
        warm_share["today's"].append(cached_share(cache_files(old_dir)))

    def warm_new():
        warm(cache_files(new_path))
        warm_share["new"].append(cached_share(cache_files(new_path)))

    def evict_old():
        evict(cache_files(old_dir))
        evicted_share["today's"].append(cached_share(cache_files(old_dir)))

    def evict_new():
        (store,) = [v for k, v in data_lib._STORES.items() if k[0] != "memory"]
        evict_cache(new_path, store)
        evicted_share["new"].append(cached_share(cache_files(new_path)))

    def old_training(r):
        return _old_cache.old_cached_training(old_dir, args.batch_size)

    def new_training(cfg):
        return lambda r: new_cached(data_dir, folds, cfg)[0]

    pipelines = {
        "(a) decode ceiling": (lambda r: decode_ceiling(files, image_size), False, None),
        "(b) training pipeline as shipped": (
            lambda r: data_lib.make_dataset(data_dir, folds, shipped_cfg, training=True),
            True,
            None,
        ),
        "(c) original project's shape, tf.data optimisations off": (
            lambda r: original_shape(files, image_size, args.batch_size),
            True,
            None,
        ),
        "(d) today's --cache DIR (16 files + shuffle 1024), warm": (old_training, True, warm_old),
        "(d) today's --cache DIR, pages evicted": (old_training, True, evict_old),
        "(d) --cache memory, per-epoch permutation": (new_training(memory_cfg), True, None),
        "(d) --cache DIR, per-epoch permutation, warm": (new_training(disk_cfg), True, warm_new),
        "(d) --cache DIR, per-epoch permutation, pages evicted": (new_training(disk_cfg), True, evict_new),
        "(e) original project's shape, tf.data defaults": (
            lambda r: original_shape(files, image_size, args.batch_size, optimised=True),
            True,
            None,
        ),
    }
    if args.cached_only:
        pipelines = {name: v for name, v in pipelines.items() if name.startswith("(d)")}
    print(f"uptime: {os.popen('uptime').read().strip()}", flush=True)
    rates: dict[str, list[float]] = {name: [] for name in pipelines}
    for r in range(args.repeats):
        for name, (make, batched, after_warmup) in pipelines.items():
            ds = make(r)
            rate = samples_per_second(ds, n, batched, args.warmup, after_warmup)
            del ds
            for key in [k for k in data_lib._STORES if k[0] != "memory"]:  # memory: filled once per run
                del data_lib._STORES[key]
            rates[name].append(rate)
            print(f"  repeat {r + 1}/{args.repeats} {name}: {rate:.1f} samples/s", flush=True)
    aug = {} if args.cached_only else augmentation_cost(image_size, args.batch_size, args.repeats)
    print(f"uptime: {os.popen('uptime').read().strip()}", flush=True)

    med = {name: statistics.median(v) for name, v in rates.items()}
    d_old, d_old_cold, dm, dd, dd_cold = (med[k] for k in med if k.startswith("(d)"))
    print()
    print(f"| pipeline | samples/s (median of {args.repeats}) | per core ({cores}) | runs |")
    print("| --- | --- | --- | --- |")
    for name, v in med.items():
        runs = ", ".join(f"{x:.0f}" for x in rates[name])
        print(f"| {name} | {v:.1f} | {v / cores:.1f} | {runs} |")
    print()
    for kind, secs in fills.items():
        print(f"cache fill ({kind}): {secs:.1f} s for {total} samples ({total / secs:.0f} samples/s)")
    print(f"cache size: {cache_lib.cache_bytes(total, image_size) / 2**20:.0f} MiB (samples x H x W x 4)")
    for label, table in (("warming", warm_share), ("eviction", evicted_share)):
        for kind, shares in table.items():
            shown = ", ".join("n/a" if x is None else f"{x:.0%}" for x in shares)
            print(f"share of {kind} cache's bytes in the page cache right after {label} (fincore): {shown}")
    print()
    print(
        f"(d) per-epoch permutation: memory {dm:.0f}, DIR warm {dd:.0f}, DIR evicted {dd_cold:.0f} samples/s "
        f"(target >= {args.gpu_rate:.0f}); today's DIR: warm {d_old:.0f}, evicted {d_old_cold:.0f}"
    )
    print(f"(d) DIR new / today's: warm {dd / d_old:.2f}x, evicted {dd_cold / d_old_cold:.2f}x")
    if args.cached_only:
        return 0
    a, b, c, e = (med[k] for k in med if not k.startswith("(d)"))
    print(f"(b)/(a) = {b / a:.2f}  (target >= 0.90)")
    print(f"(b)/(c) = {b / c:.2f}  (target >= 3)")
    print(f"(d)/(b): memory {dm / b:.1f}x, DIR warm {dd / b:.1f}x  (target >= 5)")
    print(f"(e)/(c) = {e / c:.2f}  (the original shape with and without current tf.data's rewrites)")
    print(
        f"GPU consumption (FACTS.md, ResNet50 H200 uint8): {args.gpu_rate:.0f} samples/s = "
        f"{args.gpu_rate / (b / cores):.1f} cores at (b)'s per-core rate of {b / cores:.1f} samples/s, "
        f"{args.gpu_rate / (dd / cores):.1f} cores at (d) disk's {dd / cores:.1f}"
    )
    print()
    print(f"augmentation layer alone on this CPU (in the model), batch {args.batch_size} x {image_size}px:")
    for name, v in aug.items():
        print(f"  {name}: {v:.0f} samples/s ({v / cores:.0f} per core if it ran on the host)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
