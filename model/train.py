"""The training job: `python -m model.train --data_dir out/ --model_dir runs/r1 [...]` (see `--help`).

Reads the preprocessing job's shards and manifest, trains a four-stain classifier with Keras callbacks
(`model/callbacks.py`: ReduceLROnPlateau or a `model/schedules.py` schedule, EarlyStopping, ModelCheckpoint
of the best epoch, BackupAndRestore, CSVLogger, TensorBoard; with --ema the averaged weights) and writes
into --model_dir: config.json, model.keras, export/ (SavedModel taking serialized tf.Examples), history.csv,
plots.png, logs/ (TensorBoard) and val_predictions.npz.

Restarting the same command after a crash or preemption resumes from the last finished epoch: weights,
optimizer state (learning rate, schedule position, weight average) come from BackupAndRestore's backup,
the callbacks' plateau counters and history.csv are restored from the epochs already logged.

Devices and strategies (`model/devices.py`): one device, MirroredStrategy over local GPUs or logical CPUs
(`--cpu_replicas`), or MultiWorkerMirroredStrategy over the machines of TF_CONFIG. Every worker trains and
keeps its own backup (`model/rundir.py`); the chief alone writes the outputs, from a copy of the trained model
outside the strategy.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from model import devices as devices_lib
from model import presets, rundir
from model.config import (  # noqa: F401 - the output names are also this module's (train.MODEL_FILE, ...)
    BACKBONES,
    BACKUP_DIR,
    CACHE_MEMORY,
    CACHE_NONE,
    EXPORT_DIR,
    HISTORY_FILE,
    INPUT_NORM_CHOICES,
    LOGS_DIR,
    LOSSES,
    LR_SCALINGS,
    LR_SCHEDULES,
    MODEL_FILE,
    PLOTS_FILE,
    PRECISIONS,
    RARE_CLASS_MODES,
    RUN_INFO_FILE,
    TTA_CHOICES,
    VAL_PREDICTIONS_FILE,
    ConfigError,
    DataConfig,
    ModelConfig,
    TrainConfig,
)
from model.rundir import plot_history  # noqa: F401 - callers use train.plot_history
from model.train_steps import (  # noqa: F401 - compiled_model, resolve_config: callers use train.<name>
    build_and_compile,
    compiled_model,
    fit,
    make_data,
    preflight,
    prepare_devices,
    prepare_work_dir,
    resolve_config,
    resolve_settings,
    write_outputs,
)
from schemas import cli

PROG = "hpa-train"


def build_parser() -> argparse.ArgumentParser:
    """The job's flags (defaults from the config dataclasses)."""
    d, m, t = DataConfig(), ModelConfig(), TrainConfig(data_dir="", model_dir="")
    p = cli.ArgumentParser(
        prog=PROG,
        description="Train a four-stain protein localisation classifier on the preprocessing job's shards.",
        formatter_class=_HelpFormatter,
        epilog=presets.epilog(),
    )
    p.add_argument(
        "--preset",
        default=None,
        metavar="NAME",
        help="fill the flags of a named recipe (listed below); flags given on the command line win",
    )
    p.add_argument("--data_dir", required=True, help="preprocessing output (local or gs://)")
    p.add_argument("--model_dir", required=True, help="where to write the run's outputs (local or gs://)")
    p.add_argument("--val_fold", type=int, default=t.val_fold, help="fold held out for validation")
    p.add_argument("--backbone", choices=BACKBONES, default=m.backbone)
    p.add_argument(
        "--weights",
        default=None,
        help="imagenet (from the Keras cache $KERAS_HOME/models, else downloaded there), none, or a saved "
        "3/4-channel backbone file (default: imagenet for a keras.applications backbone, none for small)",
    )
    p.add_argument(
        "--input_norm",
        choices=INPUT_NORM_CHOICES,
        default=m.input_norm,
        help="auto: imagenet for a keras.applications backbone with pretrained weights (ImageNet or a file), "
        "else zscore; imagenet: the red, green, blue stains as the weights were trained (channel order and "
        "range, see docs/train.md), yellow in the same units; zscore: the dataset's per-stain mean and std",
    )
    p.add_argument("--dropout", type=float, default=m.dropout)
    p.add_argument("--small_filters", type=int, default=m.small_filters, help="width of the small backbone")
    p.add_argument(
        "--image_size", type=int, default=None, help="must match the records (default: manifest's)"
    )
    p.add_argument("--batch_size", type=int, default=d.batch_size, help="global batch size")
    p.add_argument("--epochs", type=int, default=t.epochs)
    p.add_argument(
        "--steps_per_epoch", type=int, default=None, help="default: one pass over the training folds"
    )
    p.add_argument("--validation_steps", type=int, default=None, help="default: the whole validation fold")
    p.add_argument("--learning_rate", type=float, default=t.learning_rate)
    p.add_argument("--loss", choices=LOSSES, default=t.loss)
    p.add_argument("--focal_gamma", type=float, default=t.focal_gamma)
    p.add_argument("--precision", choices=PRECISIONS, default=t.precision)
    p.add_argument(
        "--strategy",
        default="auto",
        metavar="{" + ",".join(devices_lib.STRATEGIES) + "}",
        help="auto = multiworker when TF_CONFIG names several machines, mirrored with several GPUs "
        "(or --cpu_replicas > 1), else default (one device)",
    )
    p.add_argument(
        "--cpu_replicas",
        type=int,
        default=None,
        metavar="N",
        help="split the CPU into N logical devices, one replica each (tests, laptops; not with GPUs)",
    )
    p.add_argument(
        "--jit_compile",
        default="auto",
        metavar="{" + ",".join(devices_lib.JIT_CHOICES) + "}",
        help="XLA for the training step: auto = on with a GPU, off on a CPU, whatever the strategy (but off "
        "when one process drives several devices, which Keras 3 cannot compile as one step)",
    )
    p.add_argument(
        "--allow_cpu", action="store_true", help="train a backbone other than small without a GPU (slow)"
    )
    p.add_argument(
        "--lr_schedule",
        choices=LR_SCHEDULES,
        default=t.lr_schedule,
        help="plateau: ReduceLROnPlateau on validation loss; cosine: cosine decay to --min_lr over the "
        "epochs after the warm-up; step: x --lr_factor at each of --lr_steps (Keras schedules of the "
        "optimizer step)",
    )
    p.add_argument(
        "--warmup_epochs",
        type=int,
        default=t.warmup_epochs,
        help="linear warm-up from 1%% of --learning_rate, step by step, with any schedule (plateau watches "
        "the epochs after it)",
    )
    p.add_argument(
        "--lr_steps",
        type=_epoch_list,
        default=t.lr_steps,
        metavar="E1,E2,...",
        help="epochs at which the step schedule multiplies the rate by --lr_factor (default: 1/2 and 3/4 of "
        "--epochs)",
    )
    p.add_argument(
        "--lr_factor", type=float, default=t.lr_factor, help="ReduceLROnPlateau and step schedule factor"
    )
    p.add_argument(
        "--lr_patience", type=int, default=t.lr_patience, help="ReduceLROnPlateau patience (epochs)"
    )
    p.add_argument("--min_lr", type=float, default=t.min_lr, help="plateau's floor, cosine's end")
    p.add_argument(
        "--ema",
        action="store_true",
        help="keep an exponential moving average of the weights (the Keras optimizer's use_ema) and use it "
        "for validation, the best checkpoint, model.keras, export/ and val_predictions.npz",
    )
    p.add_argument(
        "--no_ema", action="store_true", help="no weight averaging, even when --preset turns --ema on"
    )
    p.add_argument(
        "--ema_momentum", type=float, default=t.ema_momentum, help="weight of the old average at each step"
    )
    p.add_argument(
        "--ema_epochs",
        type=float,
        default=t.ema_epochs,
        metavar="E",
        help="the average's horizon in epochs: momentum = 1 - 1 / (E x steps per epoch), in place of "
        "--ema_momentum",
    )
    p.add_argument(
        "--ema_bn_batches",
        type=int,
        default=t.ema_bn_batches,
        metavar="N",
        help="with --ema: recompute BatchNorm's moving statistics for the averaged weights (a training-mode "
        "forward pass over N training batches of the per-replica batch) before each validation and "
        "checkpoint; default: about 2048 samples (every training sample when fewer); 0: off",
    )
    p.add_argument(
        "--lr_scaling",
        choices=LR_SCALINGS,
        default=t.lr_scaling,
        help="linear: --learning_rate is the rate at --reference_batch; the run uses it x batch / "
        "reference_batch (and --min_lr stays as given)",
    )
    p.add_argument("--reference_batch", type=int, default=t.reference_batch, help="see --lr_scaling")
    p.add_argument(
        "--batch_per_replica",
        type=int,
        default=None,
        metavar="N",
        help="global batch = N x replicas (instead of --batch_size; a preset's per-GPU batch)",
    )
    p.add_argument(
        "--preflight",
        choices=("auto", "on", "off"),
        default="auto",
        help="one training step on blank images at the configured batch before reading data; on "
        "out-of-memory, say which batch fits (auto: with a GPU)",
    )
    p.add_argument("--early_stopping_patience", type=int, default=t.early_stopping_patience)
    p.add_argument(
        "--val_tta",
        type=int,
        choices=TTA_CHOICES,
        default=t.val_tta,
        help="test-time augmentation of val_predictions.npz; use the --tta you will predict with, so that "
        "thresholds tuned on it fit the prediction's scores",
    )
    p.add_argument(
        "--shuffle_buffer",
        type=int,
        default=d.shuffle_buffer,
        help="records in the shuffle buffer (without --cache; a cache serves a new permutation every epoch)",
    )
    p.add_argument("--no_augment", action="store_true", help="no flips / right-angle rotations")
    p.add_argument(
        "--crop_size",
        type=int,
        default=None,
        help="random crop side while training (whole images at inference)",
    )
    p.add_argument("--intensity_jitter", type=float, default=d.intensity_jitter, help="max relative change")
    p.add_argument("--rare_class", choices=RARE_CLASS_MODES, default=d.rare_class)
    p.add_argument("--rare_power", type=float, default=d.rare_power)
    p.add_argument("--rare_max_factor", type=float, default=d.rare_max_factor)
    p.add_argument("--tf_data_service", default=None, help="grpc://host:port of a tf.data service dispatcher")
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seeds the shuffles of files and records, the oversampling draws, the augmentation layer's "
        "draws (its keras.random.SeedGenerator) and the weight initialisation (keras.utils.set_random_seed); "
        "without --deterministic, parallel tf.data stages still hand on records in the order they finish, "
        "so runs differ",
    )
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="reproducible runs (needs --seed; not with --tf_data_service): tf.data stages keep their order "
        "and TF ops run deterministically (tf.config.experimental.enable_op_determinism), so the same seed, "
        "data and flags give bit-identical weights, history.csv and val_predictions.npz on the same machine; "
        "slower than the default",
    )
    p.add_argument(
        "--cache",
        default=d.cache,
        metavar="none|memory|DIR",
        help="decode every labelled record of the dataset once (all folds) and train from the decoded stains "
        "in a new uniformly random order every epoch, skipping the PNG decoding (the cost that limits "
        "training on few cores); they take samples x H x W x 4 bytes (1 MiB per 512 px sample, 30 GiB for "
        "31,072 samples). DIR: a directory on a local disk, filled before the first epoch, shared by every "
        "fold and every process on the host (one fills, the others wait, all read one copy through the page "
        "cache), reused by later runs on the same data (see docs/cache.md). memory: the same in this "
        "process's memory, one copy per process. none: decode every epoch (enough when the accelerator is "
        "slower than the cores' decoding)",
    )
    p.add_argument(
        "--cache_keep",
        type=int,
        default=d.cache_keep,
        metavar="N",
        help="caches --cache DIR keeps, this dataset's included: caches of other data beyond N - 1 are "
        "removed (least recently used first), one line each",
    )
    p.add_argument(
        "--cache_info",
        action="store_true",
        help="list what the --cache DIR folder holds (each cache: data, samples, folds, size, last use) and "
        "exit; needs no other flag",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace a model_dir holding another or finished run"
    )
    return p


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the flags' help; the epilog's preset list kept one line each."""


def _epoch_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epoch numbers, got {text!r}") from None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The job's flags, with those of `--preset` filled in where the command line gives none.

    Raises:
      ConfigError: an unknown preset.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    return presets.apply(build_parser, build_parser().parse_args(argv), argv)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Flags -> TrainConfig (raises ConfigError on bad values, naming the values a preset set)."""
    try:
        return _config_from_args(args)
    except ConfigError as e:
        raise ConfigError(presets.name_preset_flags(args.preset, str(e))) from e


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    data = DataConfig(
        image_size=args.image_size,
        batch_size=args.batch_size,
        shuffle_buffer=args.shuffle_buffer,
        augment=not args.no_augment,
        crop_size=args.crop_size,
        intensity_jitter=args.intensity_jitter,
        rare_class=args.rare_class,
        rare_power=args.rare_power,
        rare_max_factor=args.rare_max_factor,
        tf_data_service=args.tf_data_service,
        seed=args.seed,
        cache=args.cache,
        cache_keep=args.cache_keep,
        deterministic=args.deterministic,
    )
    model = ModelConfig(
        backbone=args.backbone,
        weights=args.weights,  # None: what the backbone has (config.default_weights)
        dropout=args.dropout,
        small_filters=args.small_filters,
        input_norm=args.input_norm,
    )
    return TrainConfig(
        data_dir=args.data_dir.rstrip("/"),
        model_dir=args.model_dir.rstrip("/"),
        val_fold=args.val_fold,
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        validation_steps=args.validation_steps,
        learning_rate=args.learning_rate,
        loss=args.loss,
        focal_gamma=args.focal_gamma,
        precision=args.precision,
        lr_schedule=args.lr_schedule,
        warmup_epochs=args.warmup_epochs,
        lr_steps=args.lr_steps,
        lr_factor=args.lr_factor,
        lr_patience=args.lr_patience,
        min_lr=args.min_lr,
        early_stopping_patience=args.early_stopping_patience,
        ema=args.ema and not args.no_ema,
        ema_momentum=args.ema_momentum,
        ema_epochs=args.ema_epochs,
        ema_bn_batches=args.ema_bn_batches,
        lr_scaling=args.lr_scaling,
        reference_batch=args.reference_batch,
        val_tta=args.val_tta,
        preset=args.preset,
        data=data,
        model=model,
    )


# ---------------------------------------------------------------------------------------------------------
# Checks of the flags that need no data.


def check_flags(args: argparse.Namespace) -> None:
    """The flag checks that need neither TensorFlow nor data (hpa-folds runs them for every fold first).

    Raises:
      ConfigError: a bad device flag or TF_CONFIG, a bad combination of batch flags.
    """
    import os

    devices_lib.check_flags(args.strategy, args.jit_compile, args.cpu_replicas, os.environ.get("TF_CONFIG"))
    if args.batch_per_replica is not None and args.batch_per_replica < 1:
        raise ConfigError(f"--batch_per_replica must be >= 1, got {args.batch_per_replica}")


def _global_batch(cfg: TrainConfig, args: argparse.Namespace, argv, replicas: int) -> TrainConfig:
    """The config with --batch_per_replica x replicas as its global batch (a --batch_size given on the command
    line wins over a preset's --batch_per_replica)."""
    import dataclasses

    if args.batch_per_replica is None:
        return cfg
    argv = sys.argv[1:] if argv is None else list(argv)
    given = presets.given_flags(build_parser, argv, ["batch_size", "batch_per_replica"])
    if "batch_size" in given:
        if "batch_per_replica" in given:
            raise ConfigError("give --batch_size (global) or --batch_per_replica, not both")
        return cfg
    data = dataclasses.replace(cfg.data, batch_size=args.batch_per_replica * replicas)
    return dataclasses.replace(cfg, data=data)


def check_batch(batch_size: int, replicas: int) -> None:
    """The global batch must split into equal per-replica batches (training drops the last partial one).

    Raises:
      ConfigError: a batch that is not a multiple of the replicas (some replica would get a smaller or an
        empty batch).
    """
    if batch_size % replicas:
        fit = max(replicas, batch_size // replicas * replicas)
        raise ConfigError(
            f"--batch_size {batch_size} does not split evenly over {replicas} replicas: the global batch is "
            f"per-replica batch x replicas; use --batch_size {fit}"
        )


# ---------------------------------------------------------------------------------------------------------
# Outputs.


# ---------------------------------------------------------------------------------------------------------
# The job: each step is a function of model/train_steps.py.


def run(argv: Sequence[str] | None = None) -> dict:
    """Runs the training job with command-line flags; returns a summary dict (paths, epochs, final metrics).

    Raises:
      ConfigError: bad flags or inputs (the message says what to change).
    """
    args = parse_args(argv)
    check_flags(args)
    cfg = config_from_args(args)
    dev = prepare_devices(args, cfg)  # first: MultiWorkerMirroredStrategy must exist before any other TF op
    cfg = _global_batch(cfg, args, argv, dev.replicas)
    check_batch(cfg.data.batch_size, dev.replicas)
    plan = resolve_settings(cfg, dev)
    preflight(plan, dev, args.preflight)  # before anything is written or read
    work = prepare_work_dir(plan, dev, args.overwrite)
    train_ds, val_ds = make_data(plan, dev, work.initial_epoch)
    model = build_and_compile(plan, dev, train_ds)
    rows = fit(model, plan, dev, work, train_ds, val_ds)
    return write_outputs(model, plan, dev, work, rows)


def _cache_info(argv: list[str]) -> int:
    """`--cache DIR --cache_info`: prints what the cache folder holds (no other flag needed)."""
    p = argparse.ArgumentParser(prog=PROG)
    p.add_argument("--cache", required=True)
    p.add_argument("--cache_info", action="store_true")
    args, _ = p.parse_known_args(argv)
    if args.cache in (CACHE_NONE, CACHE_MEMORY):
        raise ConfigError("--cache_info needs --cache DIR (a cache directory)")
    from model import cache as cache_lib

    for line in cache_lib.cache_info(args.cache):
        print(line, flush=True)
    return 0


@cli.command(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: runs the job, turning ConfigError into a one-line error and exit status 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--cache_info" in argv:
        return cli.run_or_bad_input(PROG, ConfigError, lambda: _cache_info(argv))
    return cli.run_or_bad_input(PROG, ConfigError, lambda: _run_unless_finished(argv))


def _run_unless_finished(argv: list[str]) -> None:
    """run(), where a model dir holding this same command's finished run is done, not an error: a rerun
    after a kill that landed once the outputs were written ends with exit 0 (docs/interrupts.md)."""
    try:
        run(argv)
    except rundir.AlreadyFinished as e:
        print(f"{PROG}: {e}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
