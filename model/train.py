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
import io
import json
import sys
import warnings
from typing import Sequence

import numpy as np

from model import devices as devices_lib
from model import fileio, presets, rundir
from model.config import (
    BACKBONES,
    BACKUP_DIR,
    BEST_WEIGHTS,
    CACHE_NONE,
    EXPORT_DIR,
    F1_METRIC,
    HISTORY_FILE,
    INPUT_NORM_CHOICES,
    LOGS_DIR,  # noqa: F401 - one of this module's names (callers use train.LOGS_DIR)
    LOSSES,
    LR_SCALINGS,
    LR_SCHEDULES,
    MODEL_FILE,
    PLOTS_FILE,
    PRECISIONS,
    RARE_CLASS_MODES,
    RUN_INFO_FILE,
    TTA_CHOICES,
    VAL_IDS,
    VAL_LABELS,
    VAL_PREDICTIONS_FILE,
    VAL_SCORES,
    WEIGHTS_IMAGENET,
    ConfigError,
    DataConfig,
    ModelConfig,
    TrainConfig,
    resolve_input_norm,
    tta_transforms,
)
from model.rundir import plot_history, read_history, truncate_history
from schemas import cli

PROG = "hpa-train"
AUC_METRIC = "auc"


def build_parser() -> argparse.ArgumentParser:
    """The job's flags (defaults from the config dataclasses)."""
    d, m, t = DataConfig(), ModelConfig(), TrainConfig(data_dir="", model_dir="")
    p = argparse.ArgumentParser(
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
        "range, see README), yellow in the same units; zscore: the dataset's per-stain mean and std",
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
        "--shuffle_buffer", type=int, default=d.shuffle_buffer, help="records in the shuffle buffer"
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
        help="keep the decoded stains of the training and validation folds after one pass, so later epochs "
        "skip the PNG decoding (the cost that limits training on few cores); they take samples x H x W x 4 "
        "bytes (1 MiB per 512 px sample, 32 GiB for 31,072 samples). memory: filled during the first epoch, "
        "when that fits in free memory. DIR: a directory on a local disk, filled before the first epoch and "
        "reused by later runs on the same data (keyed by the manifest and shards; a cache of other data or "
        "a half-written one is rebuilt). none: decode every epoch (enough when the accelerator is slower "
        "than the cores' decoding)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace a model_dir holding another or finished run"
    )
    p.add_argument("--verbose", type=int, choices=(0, 1, 2), default=1, help="Keras fit verbosity")
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
        lr_scaling=args.lr_scaling,
        reference_batch=args.reference_batch,
        val_tta=args.val_tta,
        preset=args.preset,
        data=data,
        model=model,
    )


# ---------------------------------------------------------------------------------------------------------
# Inputs and the model directory.


def _read_manifest(data_dir: str) -> dict:
    import schemas

    try:
        return schemas.read_manifest(data_dir)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from e


def resolve_config(cfg: TrainConfig, manifest: dict) -> tuple[TrainConfig, list[int], dict[int, int]]:
    """Checks the config against the dataset; fills the image size from the manifest, the input_norm.

    Returns:
      (resolved config, training folds, {fold: records written}).

    Raises:
      ConfigError: missing validation fold, image size mismatch, empty training set.
    """
    import dataclasses

    import schemas

    num_folds = int(manifest[schemas.MANIFEST_NUM_FOLDS])
    written = {
        f: int(manifest[schemas.MANIFEST_WRITTEN].get(schemas.written_key(f), 0)) for f in range(num_folds)
    }
    if not 0 <= cfg.val_fold < num_folds:
        raise ConfigError(
            f"--val_fold {cfg.val_fold} does not exist: "
            f"{cfg.data_dir} has {num_folds} folds (0..{num_folds - 1})"
        )
    if written[cfg.val_fold] == 0:
        raise ConfigError(f"validation fold {cfg.val_fold} of {cfg.data_dir} holds no records")
    height, width = (int(v) for v in manifest[schemas.MANIFEST_IMAGE_SIZE])
    if height != width:
        raise ConfigError(f"{cfg.data_dir} holds {height}x{width} images; training needs square images")
    preset = presets.PRESETS.get(cfg.preset or "")
    preset_size = preset.settings.get("image_size") if preset else None
    if preset_size is not None and cfg.data.image_size == preset_size.value != height:
        raise ConfigError(
            f"the preset {cfg.preset} sets --image_size {preset_size.value}; {cfg.data_dir} holds {height} "
            f"px images: pass --image_size {height} to override (or preprocess at {preset_size.value} px)"
        )
    if cfg.data.image_size is not None and cfg.data.image_size != height:
        raise ConfigError(
            f"--image_size {cfg.data.image_size} does not match the records of {cfg.data_dir} "
            f"({height}x{width}); "
            f"rerun preprocessing with --image_size {cfg.data.image_size} or drop the flag"
        )
    if cfg.data.crop_size is not None and cfg.data.crop_size > height:
        raise ConfigError(f"--crop_size {cfg.data.crop_size} is larger than the images ({height})")
    train_folds = [f for f in range(num_folds) if f != cfg.val_fold]
    if sum(written[f] for f in train_folds) == 0:
        raise ConfigError(f"empty training set: folds {train_folds} of {cfg.data_dir} hold no records")
    data = dataclasses.replace(cfg.data, image_size=height)
    model = dataclasses.replace(cfg.model, input_norm=resolve_input_norm(cfg.model))
    return dataclasses.replace(cfg, data=data, model=model), train_folds, written


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


def _preflight(cfg: TrainConfig, stats: dict, dev, steps_per_epoch: int) -> None:
    """One step of a throwaway model at the configured batch (model/preflight.py); ConfigError on OOM."""
    import gc

    import schemas
    from model import preflight

    _print(f"preflight: one training step at batch {cfg.data.batch_size} on blank images ...")
    step = preflight.model_step(
        lambda: compiled_model(
            cfg, stats, None, dev.jit_compile, weights=False, steps_per_epoch=steps_per_epoch
        ),
        cfg.data.image_size,
        schemas.NUM_CLASSES,
        dev.strategy,
    )
    preflight.check_batch_fits(step, cfg.data.batch_size, dev.replicas, ", ".join(dev.devices))
    del step
    gc.collect()


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


def _save_npz(path: str, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    fileio.write_bytes(path, buf.getvalue())


def _print(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------------------
# The job.


def run(argv: Sequence[str] | None = None) -> dict:
    """Runs the training job with command-line flags; returns a summary dict (paths, epochs, final metrics).

    Raises:
      ConfigError: bad flags or inputs (the message says what to change).
    """
    args = parse_args(argv)
    check_flags(args)
    cfg = config_from_args(args)
    dev = devices_lib.setup(
        args.strategy,
        args.jit_compile,
        cfg.precision,
        args.cpu_replicas,
        cfg.model.backbone,
        args.allow_cpu,
        deterministic=cfg.data.deterministic,
    )
    cfg = _global_batch(cfg, args, argv, dev.replicas)
    check_batch(cfg.data.batch_size, dev.replicas)
    manifest = _read_manifest(cfg.data_dir)
    cfg, train_folds, written = resolve_config(cfg, manifest)
    from model import data as data_lib

    data_lib.check_cache_room(cfg.data, cfg.data_dir, manifest, [train_folds, [cfg.val_fold]])

    import keras
    import tensorflow as tf

    import schemas
    from model import losses
    from model import schedules as schedules_lib
    from model.callbacks import make_callbacks

    if cfg.model.weights == WEIGHTS_IMAGENET:  # before anything is written: an offline host stops here
        from model import model as model_lib

        model_lib.fetch_imagenet_weights(cfg.model.backbone)
    if cfg.data.seed is not None:
        keras.utils.set_random_seed(cfg.data.seed)
    if cfg.data.deterministic:
        tf.config.experimental.enable_op_determinism()

    n_train = sum(written[f] for f in train_folds)
    n_val = written[cfg.val_fold]
    counts = None
    positive_weights = None
    epoch_samples = float(n_train)
    if cfg.data.rare_class != "none":
        counts = data_lib.class_counts(cfg.data_dir, train_folds, manifest)
        factors = losses.class_factors(counts, cfg.data.rare_power, cfg.data.rare_max_factor)
        if cfg.data.rare_class == "weight":
            positive_weights = factors
        else:
            epoch_samples = float(data_lib.oversampled_size(n_train, counts, factors))
    steps_per_epoch = cfg.steps_per_epoch or max(1, int(epoch_samples) // cfg.data.batch_size)
    validation_steps = cfg.validation_steps or -(-n_val // cfg.data.batch_size)

    _print(
        f"data: {cfg.data_dir}  image {cfg.data.image_size}px  "
        f"train folds {train_folds} = {n_train} samples, "
        f"val fold {cfg.val_fold} = {n_val} samples"
        + (
            f" (oversampled epoch ~ {int(epoch_samples)} samples)"
            if cfg.data.rare_class == "oversample"
            else ""
        )
    )
    _print(
        f"training: {cfg.epochs} epochs x {steps_per_epoch} steps of batch {cfg.data.batch_size} "
        f"({steps_per_epoch * cfg.data.batch_size} samples per epoch; the stream runs on across epochs, so "
        f"a remainder is seen in the next); "
        f"backbone {cfg.model.backbone} (weights {cfg.model.weights}, input_norm {cfg.model.input_norm}), "
        f"loss {cfg.loss}" + (f"; preset {cfg.preset}" if cfg.preset else "")
    )
    _print(f"schedule: {schedules_lib.describe(cfg)}")
    _print(
        dev.describe() + (f"; tf.data service {cfg.data.tf_data_service}" if cfg.data.tf_data_service else "")
    )

    run_facts = {**dev.facts(), "tensorflow": tf.__version__, "keras": keras.__version__}
    if dev.is_chief:
        work_dir = cfg.model_dir
        initial_epoch = rundir.prepare_model_dir(cfg, args.overwrite, run_facts)
        run_info = {
            **run_facts,
            "steps_per_epoch": steps_per_epoch,
            "train_samples": n_train,
            "val_samples": n_val,
        }
        fileio.write_text(fileio.join(cfg.model_dir, RUN_INFO_FILE), json.dumps(run_info, indent=2))
    else:
        work_dir = rundir.worker_dir(cfg.model_dir, dev.cluster.task_name)
        initial_epoch = rundir.prepare_worker_dir(cfg, work_dir, args.overwrite)
    devices_lib.check_same_epoch(dev, initial_epoch)
    if initial_epoch:
        _print(f"resuming {work_dir} after epoch {initial_epoch} (backup found)")
    history_rows = truncate_history(fileio.join(work_dir, HISTORY_FILE), initial_epoch)

    stats = manifest[schemas.MANIFEST_STAIN_STATS]
    if args.preflight == "on" or (args.preflight == "auto" and any("GPU" in d for d in dev.devices)):
        _preflight(cfg, stats, dev, steps_per_epoch)
    train_ds = data_lib.make_dataset(
        cfg.data_dir, train_folds, cfg.data, training=True, manifest=manifest, counts=counts
    )
    val_ds = data_lib.make_eval_dataset(
        cfg.data_dir, [cfg.val_fold], cfg.data, cached=True, manifest=manifest
    )
    if dev.replicas > 1:  # no replica may get an empty last batch: pads of weight 0
        val_ds = data_lib.pad_for_replicas(val_ds, n_val, dev.replicas, cfg.data.batch_size)
    if dev.cluster is not None:
        files = len(data_lib.list_shards(cfg.data_dir, train_folds))
        # A cache serves decoded elements, not files: split those.
        by_file = files >= dev.cluster.workers and cfg.data.cache == CACHE_NONE
        train_ds = devices_lib.shard_by(train_ds, "FILE" if by_file else "DATA")
        # Every worker reads the fold in the same order: an exact split.
        val_ds = devices_lib.shard_by(val_ds, "DATA")

    with dev.strategy.scope():
        model = compiled_model(cfg, stats, positive_weights, dev.jit_compile, steps_per_epoch=steps_per_epoch)
    if dev.kind != "default":
        devices_lib.build_before_fit(model, train_ds, dev.strategy)

    warnings.filterwarnings("ignore", message="`shuffle=True` was passed")  # our datasets shuffle themselves
    with devices_lib.scalar_mean_across_workers(dev.cluster is not None):
        model.fit(
            train_ds,
            epochs=cfg.epochs,
            steps_per_epoch=steps_per_epoch,
            validation_data=val_ds,
            validation_steps=validation_steps,
            callbacks=make_callbacks(
                cfg, work_dir, history_rows, steps_per_epoch, _schedule(cfg, steps_per_epoch), warn=_print
            ),
            verbose=args.verbose,
        )

    # Every worker loads its best checkpoint (the same weights everywhere: validation loss is global), then
    # only the chief writes, with a copy of the model outside the strategy: no collective op runs on one
    # worker alone, and predictions have one row per record whatever the number of replicas.
    best = fileio.join(work_dir, BEST_WEIGHTS)
    if fileio.exists(best):
        model.load_weights(fileio.local_copy(best))
    summary = {"model_dir": cfg.model_dir, "precision": dev.precision, "steps_per_epoch": steps_per_epoch}
    rows = read_history(fileio.join(work_dir, HISTORY_FILE))
    summary.update(epochs=len(rows), history=rows)
    if not dev.is_chief:
        _print(f"done: {len(rows)} epochs; task {dev.cluster.task_name} leaves the outputs to the chief")
        return summary
    plain = compiled_model(
        cfg, stats, positive_weights, dev.jit_compile, weights=False, steps_per_epoch=steps_per_epoch
    )
    _copy_state(model, plain)
    _print(f"writing outputs to {cfg.model_dir} ...")
    plain.save(fileio.join(cfg.model_dir, MODEL_FILE))
    from model import model as model_lib

    model_lib.export_serving(plain, fileio.join(cfg.model_dir, EXPORT_DIR), cfg.data.image_size)
    val_ids_ds = data_lib.make_eval_dataset(cfg.data_dir, [cfg.val_fold], cfg.data, with_ids=True)
    ids, y_true, scores = model_lib.predict_with_ids(plain, val_ids_ds, tta_transforms(cfg.val_tta))
    _save_npz(
        fileio.join(cfg.model_dir, VAL_PREDICTIONS_FILE),
        **{VAL_IDS: ids, VAL_LABELS: y_true, VAL_SCORES: scores},
    )
    plot_history(rows, fileio.join(cfg.model_dir, PLOTS_FILE))
    fileio.rmtree(fileio.join(cfg.model_dir, BACKUP_DIR))  # last: the run is complete
    _print(f"done: {len(rows)} epochs; outputs in {cfg.model_dir}")
    return summary


def compiled_model(
    cfg: TrainConfig,
    stats: dict,
    positive_weights,
    jit_compile: bool,
    weights: bool = True,
    steps_per_epoch: int | None = None,
):
    """The classifier compiled with the run's optimizer, loss and metrics (in the current strategy's scope).

    `weights=False` skips loading pretrained weights (the caller copies trained ones in). The optimizer is
    Adam with the config's learning-rate schedule (`cosine` and `step` need steps_per_epoch) and, with
    `cfg.ema`, an exponential moving average of the weights.
    """
    import dataclasses

    import keras

    import schemas
    from model import augment, losses
    from model import model as model_lib
    from model import schedules as schedules_lib
    from model.config import WEIGHTS_NONE

    model_cfg = cfg.model if weights else dataclasses.replace(cfg.model, weights=WEIGHTS_NONE)
    model = model_lib.build_model(
        model_cfg, stats["mean"], stats["std"], augmentation=augment.from_data_config(cfg.data)
    )
    model.compile(
        optimizer=keras.optimizers.Adam(
            schedules_lib.learning_rate(cfg, steps_per_epoch),
            use_ema=cfg.ema,
            ema_momentum=cfg.ema_momentum_for(steps_per_epoch or 1),
        ),
        loss=losses.make_loss(cfg.loss, cfg.focal_gamma, positive_weights),
        # Weighted: the pads that keep a replica's last validation batch non-empty have weight 0.
        weighted_metrics=[
            keras.metrics.F1Score(average="macro", threshold=0.5, name=F1_METRIC),
            keras.metrics.AUC(multi_label=True, num_labels=schemas.NUM_CLASSES, name=AUC_METRIC),
        ],
        jit_compile=jit_compile,
    )
    return model


def _copy_state(source, target) -> None:
    """Copies weights and optimizer state of a (distributed) model into the same model built without one."""
    target.set_weights(source.get_weights())
    target.optimizer.build(target.trainable_variables)
    src, dst = source.optimizer.variables, target.optimizer.variables
    if len(src) != len(dst):
        _print("warning: optimizer state not copied to model.keras (different layout)")
        return
    for s, d in zip(src, dst, strict=True):
        d.assign(np.asarray(s.numpy() if hasattr(s, "numpy") else s))
    if getattr(target.optimizer, "inner_optimizer", target.optimizer).use_ema:  # loss scaling wraps it
        # The weights came from the best checkpoint, which holds the average as the weights.
        from model.callbacks import average_into_optimizer

        average_into_optimizer(target)


def _schedule(cfg: TrainConfig, steps_per_epoch: int):
    """The run's learning-rate schedule (as the optimizer's), or None when the optimizer holds a rate."""
    from model import schedules as schedules_lib

    rate = schedules_lib.learning_rate(cfg, steps_per_epoch)
    return None if isinstance(rate, float) else rate


@cli.command(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: runs the job, turning ConfigError into a one-line error and exit status 2."""
    try:
        run(argv)
    except ConfigError as e:
        return cli.bad_input(PROG, e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
