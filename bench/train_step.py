"""Training throughput: what the device can train, what the input pipeline delivers, and the two together.

    .venv/bin/python bench/train_step.py --data_dir out/ --backbone resnet50 --image_size 512 \\
        --batch_size 64 [--precision auto] [--steps 50] [--warmup 10] [--repeats 3] \\
        [--jit_compile auto|on|off] [any other flag of the training job, e.g. --crop_size 384]
    .venv/bin/python bench/train_step.py --real_samples 1008 --backbone small ...   # shards built here first

Measures training samples/s in one run, each figure the median over --repeats, the three taken in turn:
  (a) the model alone, the device's ceiling: the model as `model.model.build_model` makes it, run in training
      mode (so whatever it does only while training counts), compiled as the training job compiles it (its
      loss, metrics, Adam, precision), its compiled train step repeated on one synthetic batch of the input
      pipeline's shape and dtype (uint8 images) held on the device: no host work, no transfer;
  (b) the input pipeline alone: `model.data.make_dataset` over the training folds, as the job builds it,
      batches pulled and dropped on the host;
  (c) the two together: Keras `fit` on that pipeline, as the job trains (without validation).
Every measurement starts after --warmup steps (tracing, XLA compilation, filled buffers: steady state, as
over a long epoch) and ends on a read of the optimizer's step counter, so queued device work is included.
The verdict says which of (a) and (b) limits (c), by how much, and how many host cores at (b)'s per-core
rate would feed (a).

The model and its pipeline come from the training job's own functions and flag parser (any flag of
`run_train.sh --help` is accepted and means the same); --weights defaults to `none` here, since weights do
not change the speed. (a) is one device: with N GPUs under MirroredStrategy the ceiling is about N x (a).
On a CPU-only host (a) and (b) share the same cores: (a) is no device ceiling, and (c) should stay below
both.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from typing import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script too

STAGES = ("(a) model on a synthetic batch", "(b) input pipeline alone", "(c) fit on the input pipeline")


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's own flags; the rest go to the training job's parser."""
    from model.config import BACKBONES, PRECISIONS, DataConfig, ModelConfig

    d, m = DataConfig(), ModelConfig()
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # unknown flags pass to the training job's parser untouched
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data_dir", help="the preprocessing job's output (local or gs://)")
    source.add_argument(
        "--real_samples",
        type=int,
        help="instead: build a dataset of this many samples from the real PNGs of --source with the "
        "preprocessing job (into --work_dir) and measure on it",
    )
    p.add_argument("--backbone", choices=BACKBONES, default=m.backbone)
    p.add_argument("--weights", default="none", help="as the training job's; speed does not depend on it")
    p.add_argument("--image_size", type=int, default=None, help="must match the records (default: theirs)")
    p.add_argument("--batch_size", type=int, default=d.batch_size, help="global batch size")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="as the training job's")
    p.add_argument("--steps", type=int, default=20, help="timed training steps per measurement")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before each measurement (>= 1)")
    p.add_argument("--repeats", type=int, default=3, help="measurements of each stage; medians are shown")
    p.add_argument(
        "--jit_compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="XLA for the train step (Keras' auto: on with one GPU, off on CPU and under tf.distribute)",
    )
    p.add_argument("--source", default=None, help="with --real_samples: folder of real samples")
    p.add_argument("--build_image_size", type=int, default=None, help="with --real_samples: resize to this")
    p.add_argument("--work_dir", default=None, help="with --real_samples: where to build (default: temp)")
    return p


def parse(argv: Sequence[str] | None):
    """(benchmark args, the training job's argv for the same flags, the training job's parser)."""
    from model import train

    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    for name in ("steps", "warmup", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.real_samples is not None and args.real_samples < 1:
        parser.error("--real_samples must be >= 1")
    if args.real_samples is None and (args.source or args.build_image_size or args.work_dir):
        parser.error("--source, --build_image_size and --work_dir go with --real_samples")
    job_argv = [
        "--data_dir",
        args.data_dir or "",
        "--model_dir",
        "unused",  # nothing is written
        "--backbone",
        args.backbone,
        "--weights",
        args.weights,
        "--batch_size",
        str(args.batch_size),
        "--precision",
        args.precision,
    ]
    if args.image_size is not None:
        job_argv += ["--image_size", str(args.image_size)]
    job_parser = train.build_parser()
    job_parser.prog = "train_step.py (training flags)"
    return args, job_argv + rest, job_parser


def synthetic_batch(element_spec, seed: int = 0) -> tuple:
    """Random arrays of a batched dataset's element spec: the first element (images) in 0..255, the others
    (labels, weights) 0/1 with 10% ones."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    specs = tf.nest.flatten(element_spec)
    arrays = []
    for i, spec in enumerate(specs):
        shape, dtype = spec.shape.as_list(), spec.dtype.as_numpy_dtype
        if any(s is None for s in shape):
            raise ValueError(
                f"the input pipeline's batches have no static shape ({spec}); cannot mirror them"
            )
        if i == 0:
            arrays.append(rng.integers(0, 256, size=shape).astype(dtype))
        else:
            arrays.append((rng.random(shape) < 0.1).astype(dtype))
    return tuple(tf.nest.pack_sequence_as(element_spec, arrays))


def _sync(model) -> int:
    """Waits for every queued step: reading the step counter needs the last update."""
    return int(model.optimizer.iterations.numpy())


def model_rate(model, batch, batch_size: int, steps: int) -> float:
    """(a) samples/s of the compiled train step repeated on one batch that stays on the device."""
    step = model.train_function
    before = _sync(model)
    start = time.perf_counter()
    for _ in range(steps):
        step([batch])  # Keras' one-step function, as fit calls it, on an iterable of one batch
    done = _sync(model) - before
    seconds = time.perf_counter() - start
    if done != steps:  # every call must be one real optimizer step
        raise RuntimeError(f"{steps} train steps called, the optimizer counted {done}")
    return steps * batch_size / seconds


def fit_rate(model, dataset, batch_size: int, steps: int, warmup: int) -> float:
    """(c) samples/s of Keras fit on the dataset over `steps` steps after `warmup` steps (one epoch)."""
    import keras

    marks: dict[str, float] = {}

    class StepTimer(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == warmup - 1:
                _sync(self.model)
                marks["start"] = time.perf_counter()
            elif batch == warmup + steps - 1:
                _sync(self.model)
                marks["end"] = time.perf_counter()

    warnings.filterwarnings("ignore", message="`shuffle=True` was passed")  # the dataset shuffles itself
    model.fit(dataset, epochs=1, steps_per_epoch=warmup + steps, callbacks=[StepTimer()], verbose=0)
    return steps * batch_size / (marks["end"] - marks["start"])


def verdict(a: float, b: float, c: float, cores: int) -> list[str]:
    """Which of (a) the model and (b) the input pipeline limits (c), and by how much (pure arithmetic)."""
    lines = []
    if b < a:
        lines.append(
            f"limit: the input pipeline: (b) delivers {b / a:.0%} of what the model can train ((a)/(b) = "
            f"{a / b:.2f}x); a pipeline {a / b:.2f}x faster (more host cores, or --tf_data_service workers) "
            "would let training reach (a)"
        )
    else:
        lines.append(
            f"limit: the model: (a) trains {a / b:.0%} of what the input pipeline delivers; the pipeline "
            f"could feed a model {b / a:.2f}x faster"
        )
    together = f"(c) = {c / min(a, b):.0%} of the slower stage, {c / a:.0%} of the device's ceiling (a)"
    if c > 1.05 * min(a, b):
        together += " (above it: the runs vary, see them and the load average)"
    lines.append(together)
    per_core = b / cores
    lines.append(
        f"feeding (a) takes {a / per_core:.1f} cores at (b)'s {per_core:.1f} samples/s per core "
        f"({cores} here)"
    )
    return lines


def _warm_page_cache(files: list[str]) -> str:
    """Reads local shard files once so that every measurement finds them in the page cache."""
    if any("://" in f for f in files):
        return "remote shards: read over the network by every stage"
    total = sum(os.path.getsize(f) for f in files)
    avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if total > avail // 2:
        return f"{total / 1e6:.0f} MB of shards, more than half the free memory: not all page-cached"
    for path in files:
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    return f"{total / 1e6:.0f} MB of shards read once before timing (in the page cache)"


def _device_details() -> str:
    """Name and compute capability of the first GPU (empty without one)."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return ""
    details = tf.config.experimental.get_device_details(gpus[0])
    return f" ({details.get('device_name', 'GPU')}, compute capability {details.get('compute_capability')})"


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: measures (a), (b), (c) and prints the table and verdict; 2 on bad input."""
    args, job_argv, job_parser = parse(argv)

    import keras
    import tensorflow as tf

    import schemas
    from bench._common import print_table
    from bench.input_pipeline import samples_per_second
    from model import data as data_lib
    from model import devices, train
    from model.config import ConfigError

    if args.real_samples is not None:
        from bench._common import REAL_SMOKE, build_real_shards

        source = args.source or REAL_SMOKE
        if not os.path.isdir(os.path.join(source, "train")):
            print(f"error: {source}/train not found (pass --source or --data_dir)", file=sys.stderr)
            return 2
        work = args.work_dir or tempfile.mkdtemp(prefix="bench-train-step-")
        data_dir = build_real_shards(work, args.real_samples, source, args.build_image_size)
        job_argv[1] = data_dir
    try:
        cfg = train.config_from_args(job_parser.parse_args(job_argv))
        manifest = schemas.read_manifest(cfg.data_dir)
        cfg, train_folds, written = train.resolve_config(cfg, manifest)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    gpus = tf.config.list_logical_devices("GPU")
    device = gpus[0].name if gpus else "/device:CPU:0"
    precision = devices.resolve_precision(cfg.precision)
    jit = {"auto": "auto", "on": True, "off": False}[args.jit_compile]
    batch_size = cfg.data.batch_size
    n_train = sum(written[f] for f in train_folds)
    load_start = _load()
    cache = _warm_page_cache(data_lib.list_shards(cfg.data_dir, train_folds))

    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(precision)
    try:
        if cfg.data.seed is not None:
            keras.utils.set_random_seed(cfg.data.seed)
        train_ds = data_lib.make_dataset(cfg.data_dir, train_folds, cfg.data, training=True)
        # The job's own model and compile step; no rare-class positive weights (element-wise, no cost).
        model = train.compiled_model(cfg, manifest[schemas.MANIFEST_STAIN_STATS], None, jit)
        model.make_train_function()
        with tf.device(device):  # the synthetic batch lives on the device for the whole of (a)
            batch = tf.nest.map_structure(tf.identity, synthetic_batch(train_ds.element_spec))
        image_spec = tf.nest.flatten(train_ds.element_spec)[0]
        print(
            f"{cfg.model.backbone} (weights {cfg.model.weights}), batch {batch_size} of "
            f"{image_spec.shape.as_list()[1:]} {image_spec.dtype.name}, precision {precision}, "
            f"XLA {model.jit_compile}; device {device}{_device_details()}; {cores} host cores; "
            f"TF {tf.__version__}, Keras {keras.__version__}",
            flush=True,
        )
        print(
            f"data: {cfg.data_dir}, training folds {train_folds} = {n_train} samples; {cache}; "
            f"{args.repeats} x {args.steps} steps after {args.warmup} warm-up steps; "
            f"load average {load_start}",
            flush=True,
        )

        print(f"warm-up of (a): {args.warmup} steps (tracing, compilation) ...", flush=True)
        model_rate(model, batch, batch_size, args.warmup)
        rates: dict[str, list[float]] = {name: [] for name in STAGES}
        measure = {
            STAGES[0]: lambda: model_rate(model, batch, batch_size, args.steps),
            STAGES[1]: lambda: samples_per_second(
                data_lib.make_dataset(cfg.data_dir, train_folds, cfg.data, training=True),
                args.steps * batch_size,
                batched=True,
                warmup=args.warmup * batch_size,
            ),
            STAGES[2]: lambda: fit_rate(
                model,
                data_lib.make_dataset(cfg.data_dir, train_folds, cfg.data, training=True),
                batch_size,
                args.steps,
                args.warmup,
            ),
        }
        for r in range(args.repeats):
            for name, fn in measure.items():
                rate = fn()
                rates[name].append(rate)
                print(f"  repeat {r + 1}/{args.repeats} {name}: {rate:.1f} samples/s", flush=True)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)

    med = {name: statistics.median(v) for name, v in rates.items()}
    print()
    print_table(
        ["stage", f"training samples/s (median of {args.repeats})", "runs"],
        [[name, f"{v:.1f}", ", ".join(f"{x:.1f}" for x in rates[name])] for name, v in med.items()],
    )
    print()
    for line in verdict(*med.values(), cores):
        print(line)
    print(f"load average: {load_start} at start, {_load()} at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
