"""`hpa-doctor`: a two-minute self-check of a GPU host before a long training run (see docs/gpu.md).

    hpa-doctor                       # on a GPU host: every preset at its own size and batch
    hpa-doctor --allow_cpu           # no GPU: the same checks on the CPU at a small size (says so)

Prints what TensorFlow sees (GPUs, compute capability, the CUDA / cuDNN it was built with, the driver from
nvidia-smi), then for each preset ~30 training steps on generated uint8 images of the preset's size and
batch, built and compiled the way hpa-train builds them (no pretrained weights are loaded: speed and memory do
not depend on them):
  - samples/s of the steps after the first (which compiles), beside the anchors of ../shared/FACTS.md
    (H200, 512x512x4, mixed_bfloat16: ResNet50 944/s at batch 64, DenseNet121 399/s at batch 32), labelled as
    such, and compared only at 512 px on a GPU;
  - peak GPU memory (TensorFlow's allocator; on the CPU the process's peak resident memory, labelled);
  - ops of the training step that would leave the GPU (`model.gpu_kernels`: no GPU kernel for their dtypes,
    or image-sized data in host memory), read from TensorFlow's kernel registry;
  - whether the step was compiled with XLA;
  - whether the input pipeline keeps up: the decoded-data part of the training pipeline (cache, shuffle,
    batch, prefetch from memory) timed alone against the training rate. PNG decoding is not in it: that is
    bench/input_pipeline.py's subject (about 60 samples/s per core, ../shared/FACTS.md).
Without a GPU and without --allow_cpu it stops with one line (exit 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import shutil
import subprocess
import sys
import time
import warnings
from typing import Sequence

from model import presets
from model.config import ConfigError, DataConfig, ModelConfig, TrainConfig
from schemas import cli

PROG = "hpa-doctor"
# ../shared/FACTS.md: NVIDIA H200, Keras 3.15 on JAX, mixed_bfloat16, 512x512x4 uint8/float32 synthetic input.
FACTS_ANCHORS = {"resnet50": (944.0, 64), "densenet121": (399.0, 32)}
ANCHOR_SIZE = 512
CPU_IMAGE_SIZE, CPU_BATCH = 32, 4


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Self-check of a GPU host: devices, and ~30 training steps per preset on generated data.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--presets", default=",".join(presets.PRESETS), help="comma-separated preset names")
    p.add_argument("--steps", type=int, default=30, help="training steps per preset (the first compiles)")
    p.add_argument(
        "--image_size",
        type=int,
        default=None,
        help=f"default: the preset's on a GPU, {CPU_IMAGE_SIZE} on a CPU",
    )
    p.add_argument(
        "--batch_size",
        type=int,
        default=None,
        help=f"global batch; default: the preset's (per replica x GPUs) on a GPU, {CPU_BATCH} on a CPU",
    )
    p.add_argument(
        "--allow_cpu", action="store_true", help="no GPU: run the checks on the CPU at a small size"
    )
    return p


@dataclasses.dataclass
class Check:
    """One preset's measurements."""

    preset: str
    backbone: str
    image_size: int
    batch: int
    precision: str
    xla: bool
    samples_per_s: float
    peak_memory: str
    leaves_gpu: list[str]
    input_samples_per_s: float

    def lines(self, on_gpu: bool) -> list[str]:
        out = [
            f"preset {self.preset}: {self.backbone} at {self.image_size} px, batch {self.batch}, "
            f"{self.precision}, XLA {'compiled the step' if self.xla else 'off'}",
            f"  training: {self.samples_per_s:.1f} samples/s (steps after the first){self._anchor(on_gpu)}",
            f"  peak memory: {self.peak_memory}",
        ]
        if self.leaves_gpu:
            out.append(f"  ops of the step that would leave the GPU ({len(self.leaves_gpu)}):")
            out += [f"    {p}" for p in self.leaves_gpu[:10]]
        else:
            out.append(
                "  device placement: every op of the training step has a GPU kernel that keeps its data on "
                "the GPU (TensorFlow's kernel registry; XLA, when on, compiles the step whole)"
            )
        keeps = self.input_samples_per_s >= self.samples_per_s
        out.append(
            f"  input pipeline (decoded, cached in memory, shuffled, batched): "
            f"{self.input_samples_per_s:.0f} samples/s: "
            f"{'keeps up' if keeps else 'does NOT keep up: the steps wait for data'}"
        )
        return out

    def _anchor(self, on_gpu: bool) -> str:
        anchor = FACTS_ANCHORS.get(self.backbone)
        if anchor is None:
            return ""
        rate, batch = anchor
        label = f"FACTS anchor (H200, {ANCHOR_SIZE} px, bf16, batch {batch}): {rate:.0f}/s"
        if not on_gpu or self.image_size != ANCHOR_SIZE:
            return f"; {label}, not comparable here ({'CPU' if not on_gpu else f'{self.image_size} px'})"
        return f"; {label}, this host x{self.samples_per_s / rate:.2f}"


def describe_devices() -> tuple[list[str], int]:
    """Lines on what TensorFlow sees, and the number of GPUs."""
    import tensorflow as tf

    build = tf.sysconfig.get_build_info()
    gpus = tf.config.list_physical_devices("GPU")
    lines = [
        f"TensorFlow {tf.__version__}, built with CUDA: {tf.test.is_built_with_cuda()} "
        f"(CUDA {build.get('cuda_version', '-')}, cuDNN {build.get('cudnn_version', '-')})"
    ]
    for gpu in gpus:
        details = tf.config.experimental.get_device_details(gpu)
        cap = details.get("compute_capability")
        lines.append(
            f"GPU {gpu.name}: {details.get('device_name', '?')}, compute capability "
            f"{'.'.join(map(str, cap)) if cap else '?'}"
        )
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
            lines.append(f"driver (nvidia-smi): {out.splitlines()[0] if out else 'no answer'}")
        except (OSError, subprocess.SubprocessError) as e:
            lines.append(f"driver: nvidia-smi failed ({e})")
    else:
        lines.append("driver: nvidia-smi not found")
    if not gpus:
        lines.append("NO GPU FOUND: TensorFlow sees no GPU on this host")
    return lines, len(gpus)


def check_preset(name: str, args: argparse.Namespace, dev, on_gpu: bool) -> Check:
    """Builds the preset's model as hpa-train does and times `args.steps` steps on generated uint8 data."""
    import keras
    import numpy as np
    import tensorflow as tf

    import schemas
    from model import gpu_kernels, train

    settings = {dest: s.value for dest, s in presets.get(name).settings.items()}
    size = args.image_size or (settings.get("image_size", 512) if on_gpu else CPU_IMAGE_SIZE)
    if args.batch_size:
        batch = args.batch_size
    elif on_gpu:
        per = settings.get("batch_per_replica")
        batch = per * dev.replicas if per else settings.get("batch_size", DataConfig().batch_size)
    else:
        batch = CPU_BATCH
    cfg = TrainConfig(
        data_dir="",
        model_dir="",
        epochs=max(2, settings.get("warmup_epochs", 0) + 1),
        loss=settings.get("loss", "bce"),
        lr_schedule=settings.get("lr_schedule", "plateau"),
        warmup_epochs=settings.get("warmup_epochs", 0),
        ema=settings.get("ema", False),
        ema_epochs=settings.get("ema_epochs"),
        data=DataConfig(image_size=size, batch_size=batch, seed=0),
        model=ModelConfig(backbone=settings.get("backbone", "resnet50"), weights="none", small_filters=16),
    )
    stats = {"mean": [30.0] * schemas.NUM_STAINS, "std": [40.0] * schemas.NUM_STAINS}
    keras.utils.set_random_seed(0)
    with dev.strategy.scope():
        model = train.compiled_model(cfg, stats, None, dev.jit_compile, steps_per_epoch=args.steps)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch * 4, size, size, schemas.NUM_STAINS), dtype=np.uint8)
    labels = (rng.random((batch * 4, schemas.NUM_CLASSES)) < 0.1).astype(np.float32)
    ds = tf.data.Dataset.from_tensor_slices((images, labels)).cache().repeat()
    ds = ds.shuffle(batch * 4, seed=0).batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    input_rate = _input_rate(ds, batch, max(args.steps, 10))

    timer = _StepTimer()
    warnings.filterwarnings("ignore", message="`shuffle=True` was passed")  # the dataset shuffles itself
    model.fit(ds, epochs=1, steps_per_epoch=args.steps, callbacks=[timer], verbose=0)
    rate = batch / float(np.median(timer.durations[1:] or timer.durations))
    if on_gpu:
        peak = max(tf.config.experimental.get_memory_info(d)["peak"] for d in dev.devices)
        peak_memory = f"{peak / 2**30:.2f} GiB on the busiest GPU (TensorFlow's allocator)"
    else:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        peak_memory = f"no GPU: the process's peak resident memory so far, {rss:.2f} GiB"
    leaves = gpu_kernels.gpu_problems(_step_graph(model, ds), size * size)
    return Check(
        preset=name,
        backbone=cfg.model.backbone,
        image_size=size,
        batch=batch,
        precision=dev.precision,
        xla=bool(model.jit_compile),
        samples_per_s=rate,
        peak_memory=peak_memory,
        leaves_gpu=leaves,
        input_samples_per_s=input_rate,
    )


class _StepTimer:
    """A Keras callback recording the wall time of each training step."""

    def __new__(cls):
        import keras

        class Timer(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.durations: list[float] = []
                self._start = 0.0

            def on_train_batch_begin(self, batch, logs=None):
                self._start = time.perf_counter()

            def on_train_batch_end(self, batch, logs=None):
                self.durations.append(time.perf_counter() - self._start)

        return Timer()


def _input_rate(ds, batch: int, batches: int) -> float:
    it = iter(ds)
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batch * batches / (time.perf_counter() - start)


def _step_graph(model, ds):
    """The graph of one training step (forward, gradients, optimizer update) traced on the dataset's spec."""
    import tensorflow as tf

    from model import augment

    step = tf.function(lambda x, y: model.train_step((x, y)))
    with augment.traced_as_on_a_gpu():
        return step.get_concrete_function(*ds.element_spec).graph


def run(argv: Sequence[str] | None = None) -> list[Check]:
    """Runs the checks, printing as it goes; returns the per-preset measurements.

    Raises:
      ConfigError: no GPU without --allow_cpu, an unknown preset, bad sizes.
    """
    args = build_parser().parse_args(argv)
    names = [n for n in args.presets.split(",") if n]
    for n in names:
        presets.get(n)
    if args.steps < 2:
        raise ConfigError(f"--steps must be >= 2 (the first compiles), got {args.steps}")
    lines, gpus = describe_devices()
    if gpus == 0 and not args.allow_cpu:
        raise ConfigError(
            "no GPU is visible to TensorFlow (see docs/gpu.md: make setup-gpu); pass --allow_cpu to run the "
            "checks on the CPU at a small size"
        )
    for line in lines:
        print(line, flush=True)
    if gpus == 0:
        print(
            f"running the checks on the CPU at {args.image_size or CPU_IMAGE_SIZE} px, batch "
            f"{args.batch_size or CPU_BATCH} (--allow_cpu): they test this command, not a GPU",
            flush=True,
        )
    from model import devices as devices_lib

    dev = devices_lib.setup("auto", "auto", "auto", None, "small", True)
    print(dev.describe(), flush=True)
    checks = []
    for name in names:
        print(f"... {name}: building and running {args.steps} steps", flush=True)
        check = check_preset(name, args, dev, gpus > 0)
        for line in check.lines(gpus > 0):
            print(line, flush=True)
        checks.append(check)
    return checks


@cli.command(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: runs the checks, turning ConfigError into a one-line error and exit status 2."""
    return cli.run_or_bad_input(PROG, ConfigError, lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
