"""The training job's steps, in the order `model.train.run` calls them.

`prepare_devices` (strategy, precision, XLA) -> `resolve_settings` (the config checked against the dataset's
manifest, cache room, weights, seeds, step counts: a `Plan`) -> `preflight` (one step at the batch, on a
GPU) -> `prepare_work_dir` (the chief's model dir or a
worker's own, and the epoch a restarted run resumes after) -> `make_data` (tf.data, split between workers) ->
`build_and_compile` -> `fit` (callbacks, then the best checkpoint) -> `write_outputs` (the chief alone, from a
copy of the model outside the strategy).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import warnings

import numpy as np

from model import devices as devices_lib
from model import fileio, rundir
from model.config import (
    BACKUP_DIR,
    BEST_WEIGHTS,
    CACHE_NONE,
    EXPORT_DIR,
    F1_METRIC,
    HISTORY_FILE,
    MODEL_FILE,
    PLOTS_FILE,
    RUN_INFO_FILE,
    VAL_IDS,
    VAL_LABELS,
    VAL_PREDICTIONS_FILE,
    VAL_SCORES,
    WEIGHTS_IMAGENET,
    ConfigError,
    TrainConfig,
    resolve_input_norm,
    tta_transforms,
)
from model.rundir import plot_history, read_history, truncate_history
from schemas import locks

AUC_METRIC = "auc"


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
    from model import presets

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


# ---------------------------------------------------------------------------------------------------------
# Outputs.


def _save_npz(path: str, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    fileio.write_bytes(path, buf.getvalue())


def _print(msg: str) -> None:
    print(msg, flush=True)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The run's settings resolved against the dataset: what `run`'s later steps read.

    Attributes:
      cfg: the config, image size and input_norm filled in.
      manifest: the preprocessing job's manifest.
      train_folds: the folds trained on (every fold but cfg.val_fold).
      n_train, n_val: records in the training and validation folds.
      counts: per-class positives of the training folds (None unless --rare_class).
      positive_weights: the loss's per-class weights (--rare_class weight), else None.
      epoch_samples: samples in one (oversampled) epoch.
      steps_per_epoch, validation_steps: the fit's step counts.
    """

    cfg: TrainConfig
    manifest: dict
    train_folds: list[int]
    n_train: int
    n_val: int
    counts: np.ndarray | None
    positive_weights: np.ndarray | None
    epoch_samples: float
    steps_per_epoch: int
    validation_steps: int

    @property
    def stain_stats(self) -> dict:
        import schemas

        return self.manifest[schemas.MANIFEST_STAIN_STATS]


@dataclasses.dataclass(frozen=True)
class WorkDir:
    """Where this task trains: the model dir (chief) or its own worker dir, and the epoch it resumes after."""

    path: str
    initial_epoch: int
    history_rows: list[dict[str, str]]


def prepare_devices(args: argparse.Namespace, cfg: TrainConfig) -> devices_lib.Devices:
    """The strategy, precision and XLA choice of the device flags (checked before any data is read)."""
    return devices_lib.setup(
        args.strategy,
        args.jit_compile,
        cfg.precision,
        args.cpu_replicas,
        cfg.model.backbone,
        args.allow_cpu,
        deterministic=cfg.data.deterministic,
    )


def resolve_settings(cfg: TrainConfig, dev: devices_lib.Devices) -> Plan:
    """Checks the config against the dataset, the cache room and the weights; seeds; counts the steps.

    Prints the run's description (data, training, schedule, devices).
    """
    manifest = _read_manifest(cfg.data_dir)
    cfg, train_folds, written = resolve_config(cfg, manifest)
    from model import data as data_lib

    data_lib.check_cache_room(cfg.data, cfg.data_dir, manifest)
    _fetch_weights_and_seed(cfg)

    n_train = sum(written[f] for f in train_folds)
    n_val = written[cfg.val_fold]
    counts, positive_weights, epoch_samples = _rare_class_plan(cfg, train_folds, manifest, n_train)
    plan = Plan(
        cfg=cfg,
        manifest=manifest,
        train_folds=train_folds,
        n_train=n_train,
        n_val=n_val,
        counts=counts,
        positive_weights=positive_weights,
        epoch_samples=epoch_samples,
        steps_per_epoch=cfg.steps_per_epoch or max(1, int(epoch_samples) // cfg.data.batch_size),
        validation_steps=cfg.validation_steps or -(-n_val // cfg.data.batch_size),
    )
    _describe(plan, dev)
    return plan


def _fetch_weights_and_seed(cfg: TrainConfig) -> None:
    """Fetches ImageNet weights (before any write: an offline host stops here); seeds Keras and TF."""
    import keras
    import tensorflow as tf

    if cfg.model.weights == WEIGHTS_IMAGENET:
        from model import model as model_lib

        model_lib.fetch_imagenet_weights(cfg.model.backbone)
    if cfg.data.seed is not None:
        keras.utils.set_random_seed(cfg.data.seed)
    if cfg.data.deterministic:
        tf.config.experimental.enable_op_determinism()


def _rare_class_plan(
    cfg: TrainConfig, train_folds: list[int], manifest: dict, n_train: int
) -> tuple[np.ndarray | None, np.ndarray | None, float]:
    """(class counts, loss weights, samples per epoch) of --rare_class none, weight or oversample."""
    if cfg.data.rare_class == "none":
        return None, None, float(n_train)
    from model import data as data_lib
    from model import losses

    counts = data_lib.class_counts(cfg.data_dir, train_folds, manifest)
    factors = losses.class_factors(counts, cfg.data.rare_power, cfg.data.rare_max_factor)
    if cfg.data.rare_class == "weight":
        return counts, factors, float(n_train)
    return counts, None, float(data_lib.oversampled_size(n_train, counts, factors))


def _describe(plan: Plan, dev: devices_lib.Devices) -> None:
    from model import schedules as schedules_lib

    cfg = plan.cfg
    _print(
        f"data: {cfg.data_dir}  image {cfg.data.image_size}px  "
        f"train folds {plan.train_folds} = {plan.n_train} samples, "
        f"val fold {cfg.val_fold} = {plan.n_val} samples"
        + (
            f" (oversampled epoch ~ {int(plan.epoch_samples)} samples)"
            if cfg.data.rare_class == "oversample"
            else ""
        )
    )
    _print(
        f"training: {cfg.epochs} epochs x {plan.steps_per_epoch} steps of batch {cfg.data.batch_size} "
        f"({plan.steps_per_epoch * cfg.data.batch_size} samples per epoch; the stream runs on across epochs, "
        f"so a remainder is seen in the next); "
        f"backbone {cfg.model.backbone} (weights {cfg.model.weights}, input_norm {cfg.model.input_norm}), "
        f"loss {cfg.loss}" + (f"; preset {cfg.preset}" if cfg.preset else "")
    )
    _print(f"schedule: {schedules_lib.describe(cfg)}")
    _print(
        dev.describe() + (f"; tf.data service {cfg.data.tf_data_service}" if cfg.data.tf_data_service else "")
    )


def preflight(plan: Plan, dev: devices_lib.Devices, mode: str) -> None:
    """--preflight (auto: with a GPU): one step of a throwaway model at the configured batch on blank images
    (model/preflight.py).

    Raises:
      ConfigError: out of memory; the message names a batch that fits.
    """
    if mode == "off" or (mode == "auto" and not any("GPU" in d for d in dev.devices)):
        return
    import gc

    import schemas
    from model import preflight as preflight_lib

    cfg = plan.cfg
    _print(f"preflight: one training step at batch {cfg.data.batch_size} on blank images ...")
    step = preflight_lib.model_step(
        lambda: compiled_model(
            cfg, plan.stain_stats, None, dev.jit_compile, weights=False, steps_per_epoch=plan.steps_per_epoch
        ),
        cfg.data.image_size,
        schemas.NUM_CLASSES,
        dev.strategy,
    )
    preflight_lib.check_batch_fits(step, cfg.data.batch_size, dev.replicas, ", ".join(dev.devices))
    del step
    gc.collect()


def prepare_work_dir(plan: Plan, dev: devices_lib.Devices, overwrite: bool) -> WorkDir:
    """The chief's model dir (config.json, run_info.json written) or a worker's own dir; the resume epoch.

    Raises:
      ConfigError: a model dir of another or a finished run (without --overwrite).
    """
    import keras
    import tensorflow as tf

    cfg = plan.cfg
    run_facts = {**dev.facts(), "tensorflow": tf.__version__, "keras": keras.__version__}
    run_facts[rundir.DATASET_ID] = rundir.dataset_id(plan.manifest)  # a moved data folder is the same data
    if dev.is_chief:
        path = cfg.model_dir
        initial_epoch = rundir.prepare_model_dir(cfg, overwrite, run_facts)
        run_info = {
            **run_facts,
            "steps_per_epoch": plan.steps_per_epoch,
            "train_samples": plan.n_train,
            "val_samples": plan.n_val,
        }
        fileio.write_text(fileio.join(cfg.model_dir, RUN_INFO_FILE), json.dumps(run_info, indent=2))
    else:
        path = rundir.worker_dir(cfg.model_dir, dev.cluster.task_name)
        initial_epoch = rundir.prepare_worker_dir(cfg, path, overwrite)
    for line in rundir.backup_notes(path):
        _print(line)
    own = initial_epoch
    initial_epoch = devices_lib.agree_on_backup_epoch(
        dev, own, lambda bound: rundir.backup_epoch(path, verify=True, at_most=bound) or 0, cfg.epochs
    )
    if initial_epoch < own:
        _print(
            f"the workers' backups reached different epochs: this worker resumes from its backup after "
            f"epoch {initial_epoch}, the newest one every worker holds (its backup after epoch {own} is "
            "passed over)"
        )
    if initial_epoch:
        _print(f"resuming {path} after epoch {initial_epoch} (backup found)")
    history_rows = truncate_history(fileio.join(path, HISTORY_FILE), initial_epoch)
    return WorkDir(path=path, initial_epoch=initial_epoch, history_rows=history_rows)


def make_data(plan: Plan, dev: devices_lib.Devices, initial_epoch: int = 0):
    """(training, validation) tf.data datasets, split between the workers of a multi-worker run.

    With a cache the training order of epoch e is a function of (seed, e): a run resumed after
    `initial_epoch` epochs reads the orders the uninterrupted run would have. Without a cache, a resumed
    `--deterministic` run skips the batches of the finished epochs in the one seeded stream.
    """
    from model import data as data_lib

    cfg = plan.cfg
    split = data_lib.worker_split(dev.cluster, dev.strategy.num_replicas_in_sync)
    train_ds = data_lib.make_dataset(
        cfg.data_dir,
        plan.train_folds,
        cfg.data,
        training=True,
        manifest=plan.manifest,
        counts=plan.counts,
        initial_epoch=initial_epoch,
        steps_per_epoch=plan.steps_per_epoch,
        split=split,
    )
    val_ds = data_lib.make_eval_dataset(
        cfg.data_dir, [cfg.val_fold], cfg.data, cached=True, manifest=plan.manifest
    )
    if dev.replicas > 1:  # no replica may get an empty last batch: pads of weight 0
        val_ds = data_lib.pad_for_replicas(val_ds, plan.n_val, dev.replicas, cfg.data.batch_size)
    policy = None
    if split is not None:
        files = len(data_lib.list_shards(cfg.data_dir, plan.train_folds))
        policy = data_lib.training_shard_policy(cfg.data, files, split)
        train_ds = devices_lib.shard_by(train_ds, policy)
        # Every worker reads the fold in the same order: an exact split.
        val_ds = devices_lib.shard_by(val_ds, "DATA")
    if cfg.data.deterministic and initial_epoch and cfg.data.cache == CACHE_NONE:
        # Without a cache the training stream is one seeded sequence of batches: a resumed reproducible
        # run takes up where its epoch begins, at the cost of reading the finished epochs' batches.
        steps = initial_epoch * plan.steps_per_epoch
        batch = cfg.data.batch_size
        if policy == "FILE" and batch % split.replicas == 0:
            # Each worker reads its own files, and tf.distribute cuts every global batch of that stream into
            # per-replica pieces: a step takes 1/workers of a batch from it, not a whole one (skipping whole
            # batches made a resumed two-worker run differ from the uninterrupted one: bench/chaos.py).
            train_ds = train_ds.unbatch().skip(steps * (batch // split.count))
            train_ds = train_ds.batch(batch, drop_remainder=True)
        else:  # one stream (one worker, or the DATA policy: every worker makes it and takes its pieces)
            train_ds = train_ds.skip(steps)
    return train_ds, val_ds


def build_and_compile(plan: Plan, dev: devices_lib.Devices, train_ds):
    """The compiled classifier in the strategy's scope, built from the data's shapes under a strategy."""
    with dev.strategy.scope():
        model = compiled_model(
            plan.cfg,
            plan.stain_stats,
            plan.positive_weights,
            dev.jit_compile,
            steps_per_epoch=plan.steps_per_epoch,
        )
    if dev.kind != "default":
        from model import keras_compat

        keras_compat.build_before_fit(model, train_ds, dev.strategy)
    return model


def fit(model, plan: Plan, dev: devices_lib.Devices, work: WorkDir, train_ds, val_ds):
    """Trains with the run's callbacks, then loads the best checkpoint; returns history.csv's rows.

    Progress: Keras' bar on a terminal, else a line per epoch (model/progress.py).

    Every worker loads its best checkpoint (the same weights everywhere: validation loss is global).
    """
    from model import callbacks as callbacks_lib
    from model import keras_compat, progress

    cfg = plan.cfg
    warnings.filterwarnings("ignore", message="`shuffle=True` was passed")  # our datasets shuffle themselves
    bn_batches = batchnorm_batches(plan, dev)
    callbacks = (
        replica_callbacks(dev)
        + callbacks_lib.make_callbacks(
            cfg,
            work.path,
            work.history_rows,
            plan.steps_per_epoch,
            _schedule(cfg, plan.steps_per_epoch),
            warn=_print,
            bn_batches=bn_batches,
            resume_epoch=work.initial_epoch,
        )
        + progress.progress_callbacks()
    )
    with keras_compat.scalar_mean_across_workers(dev.cluster is not None):
        model.fit(
            train_ds,
            epochs=cfg.epochs,
            steps_per_epoch=plan.steps_per_epoch,
            validation_data=val_ds,
            validation_steps=plan.validation_steps,
            callbacks=callbacks,
            verbose=progress.fit_verbosity(),
        )
    best = fileio.join(work.path, BEST_WEIGHTS)
    if fileio.exists(best):
        model.load_weights(fileio.local_copy(best))  # with --ema: the average and its BatchNorm statistics
    elif bn_batches is not None:  # no checkpoint: Keras left the average in the model, with raw statistics
        from model import batchnorm

        batchnorm.recompute(model, bn_batches, _print)
    return read_history(fileio.join(work.path, HISTORY_FILE))


def replica_callbacks(dev: devices_lib.Devices) -> list:
    """With several replicas, the callback that keeps BatchNormalization's statistics the same on all of
    them (model/replica_stats.py); first, before the callbacks that save weights."""
    if dev.replicas == 1:
        return []
    from model import replica_stats

    return [replica_stats.AverageReplicaStatistics(dev.strategy)]


def batchnorm_batches(plan: Plan, dev: devices_lib.Devices):
    """The training batches BatchNorm's statistics are recomputed over for the averaged weights, or None.

    `--ema_bn_batches` batches (default `batchnorm.default_batches`) of the per-replica batch, the size each
    replica's BatchNormalization computed its batch statistics over in training, read in the one fixed order
    of the training folds (every worker reads the same). None without `--ema` or with `--ema_bn_batches 0`.
    """
    from model import batchnorm
    from model import data as data_lib

    cfg = plan.cfg
    if not cfg.ema or cfg.ema_bn_batches == 0:
        return None
    per_replica = max(1, cfg.data.batch_size // dev.replicas)
    count = cfg.ema_bn_batches or batchnorm.default_batches(plan.n_train, per_replica)
    ds = data_lib.make_eval_dataset(
        cfg.data_dir, plan.train_folds, cfg.data, batch_size=per_replica, cached=True, manifest=plan.manifest
    )
    return ds.map(lambda images, labels: images).take(count)


def write_outputs(model, plan: Plan, dev: devices_lib.Devices, work: WorkDir, rows: list[dict]) -> dict:
    """The chief writes model.keras, export/, val_predictions.npz and plots.png; returns the run's summary.

    Only the chief writes, with a copy of the model outside the strategy: no collective op runs on one
    worker alone, and predictions have one row per record whatever the number of replicas. The backup is
    removed last: the run is then complete.
    """
    cfg = plan.cfg
    summary = {
        "model_dir": cfg.model_dir,
        "precision": dev.precision,
        "steps_per_epoch": plan.steps_per_epoch,
    }
    summary.update(epochs=len(rows), history=rows)
    if not dev.is_chief:
        _print(f"done: {len(rows)} epochs; task {dev.cluster.task_name} leaves the outputs to the chief")
        return summary
    from model import data as data_lib
    from model import model as model_lib

    plain = compiled_model(
        cfg,
        plan.stain_stats,
        plan.positive_weights,
        dev.jit_compile,
        weights=False,
        steps_per_epoch=plan.steps_per_epoch,
    )
    _copy_state(model, plain)
    _print(f"writing outputs to {cfg.model_dir} ...")
    fileio.save_file(fileio.join(cfg.model_dir, MODEL_FILE), plain.save)  # all or nothing
    fileio.replace_dir(
        fileio.join(cfg.model_dir, EXPORT_DIR),
        lambda d: model_lib.export_serving(plain, d, cfg.data.image_size),
    )
    val_ids_ds = data_lib.make_eval_dataset(cfg.data_dir, [cfg.val_fold], cfg.data, with_ids=True)
    ids, y_true, scores = model_lib.predict_with_ids(plain, val_ids_ds, tta_transforms(cfg.val_tta))
    _save_npz(
        fileio.join(cfg.model_dir, VAL_PREDICTIONS_FILE),
        **{VAL_IDS: ids, VAL_LABELS: y_true, VAL_SCORES: scores},
    )
    plot_history(rows, fileio.join(cfg.model_dir, PLOTS_FILE))
    fileio.rmtree(fileio.join(cfg.model_dir, BACKUP_DIR))  # last: the run is complete
    locks.release(cfg.model_dir)
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
        from model import keras_compat

        keras_compat.average_into_optimizer(target)


def _schedule(cfg: TrainConfig, steps_per_epoch: int):
    """The run's learning-rate schedule (as the optimizer's), or None when the optimizer holds a rate."""
    from model import schedules as schedules_lib

    rate = schedules_lib.learning_rate(cfg, steps_per_epoch)
    return None if isinstance(rate, float) else rate
