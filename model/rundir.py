"""The model directory of a training run: config check on restart, run facts, history, backups.

`config.json` holds the resolved `TrainConfig` plus a `run` section (devices, strategy, replicas, precision,
XLA, versions) rewritten by each attempt; only the config part is compared when a run restarts, so a resume
on other devices continues the same experiment. Only the chief writes the model directory's files; other
workers of a multi-machine run keep their checkpoints and backups in `workers/<task>/` (`worker_dir`), where
the same command finds them again after a restart.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from typing import Any

from model import fileio
from model.config import (
    BACKUP_DIR,
    CONFIG_FILE,
    F1_METRIC,
    MODEL_FILE,
    RUN_SECTION,
    ConfigError,
    TrainConfig,
    config_from_dict,
    config_to_dict,
)
from schemas import locks, paths

BACKUP_METADATA = "training_metadata.json"  # Keras' BackupAndRestore's name; {"epoch": N}
LEGACY_BACKUP_WEIGHTS = "latest.weights.h5"  # Keras' BackupAndRestore's one slot (runs before the two slots)
BACKUP_SLOTS_KEPT = 2
WORKERS_DIR = "workers"


class AlreadyFinished(ConfigError):
    """model_dir holds the finished run of this same config: the command has nothing left to do (exit 0)."""


def worker_dir(model_dir: str, task_name: str) -> str:
    """The stable directory of a non-chief worker's checkpoints, backup and history."""
    return fileio.join(model_dir, WORKERS_DIR, task_name)


def backup_slot(epoch: int) -> tuple[str, str]:
    """(weights file, its record) of the backup taken after `epoch` finished epochs."""
    return f"epoch-{epoch:04d}.weights.h5", f"epoch-{epoch:04d}.json"


@dataclasses.dataclass(frozen=True)
class Backup:
    """The backup a resumed run starts from: `epoch` epochs finished, their weights in `weights`.

    `damaged`: one line per newer slot that could not be used (cut short by a kill, corrupt), newest first.
    """

    epoch: int
    weights: str | None
    damaged: tuple[str, ...] = ()


def find_backup(work_dir: str, verify: bool = True, at_most: int | None = None) -> Backup | None:
    """The newest whole backup of work_dir (None when there is no backup at all).

    A slot is whole when its record (`epoch-N.json`, written after the weights) exists and the weights'
    size and SHA-256 match it. A damaged newest slot falls back to the one before it; when no slot is whole
    the run starts from epoch 0 (Backup(0, None, ...)), never a loop of failing resumes. `verify=False`
    skips the checksum (sizes only): cheap enough for status queries in a loop. `at_most`: slots of later
    epochs are passed over (the workers of a multi-worker run resume from an epoch they all have).
    """
    directory = fileio.join(work_dir, BACKUP_DIR)
    if not fileio.exists(directory):
        return None
    names = fileio.listdir(directory)
    epochs = sorted(
        {
            int(n[len("epoch-") : -len(suffix)])
            for n in names
            for suffix in (".weights.h5", ".json")
            if n.startswith("epoch-") and n.endswith(suffix) and n[len("epoch-") : -len(suffix)].isdigit()
        },
        reverse=True,
    )
    if at_most is not None:
        epochs = [e for e in epochs if e <= at_most]
    damaged = []
    for epoch in epochs:
        weights, record = (fileio.join(directory, n) for n in backup_slot(epoch))
        problem = _slot_problem(weights, record, verify)
        if problem is None:
            return Backup(epoch, weights, tuple(damaged))
        damaged.append(f"the backup after epoch {epoch} is unusable ({problem})")
    legacy = fileio.join(directory, LEGACY_BACKUP_WEIGHTS)
    meta = fileio.join(directory, BACKUP_METADATA)
    if not epochs and fileio.exists(legacy) and fileio.exists(meta):
        try:
            legacy_epoch = int(json.loads(fileio.read_text(meta))["epoch"])
            if at_most is None or legacy_epoch <= at_most:
                return Backup(legacy_epoch, legacy)
        except (ValueError, KeyError, TypeError):
            damaged.append(f"{meta} is unreadable")
    if not epochs and not damaged:
        return None
    return Backup(0, None, tuple(damaged))


def read_backup_record(weights: str) -> dict:
    """The record written beside a slot's weights file (empty for a legacy backup)."""
    record = weights[: -len(".weights.h5")] + ".json"
    return json.loads(fileio.read_text(record)) if fileio.exists(record) else {}


def _slot_problem(weights: str, record: str, verify: bool = True) -> str | None:
    if not fileio.exists(record):
        return "its save was cut short" if fileio.exists(weights) else "no weights file"
    try:
        want = json.loads(fileio.read_text(record))
        size, digest = int(want["bytes"]), str(want["sha256"])
    except (ValueError, KeyError, TypeError):
        return f"{fileio.basename(record)} is unreadable"
    if not fileio.exists(weights):
        return "no weights file"
    if _size(weights) != size:
        return f"{fileio.basename(weights)} has {_size(weights)} bytes, {size} were written"
    if verify and fileio.sha256(weights) != digest:
        return f"{fileio.basename(weights)} does not match its checksum"
    return None


def _size(path: str) -> int:
    if fileio.is_remote(path):
        import tensorflow as tf

        return int(tf.io.gfile.stat(path).length)
    return os.path.getsize(path)


def record_backup(work_dir: str, epoch: int, extra: dict | None = None) -> None:
    """After the weights of `epoch` were written: their record, the epoch marker, and old slots removed.

    `extra`: more state to keep with the slot (the random generators' states).
    """
    directory = fileio.join(work_dir, BACKUP_DIR)
    weights_name, record_name = backup_slot(epoch)
    weights = fileio.join(directory, weights_name)
    record = {"epoch": epoch, "bytes": _size(weights), "sha256": fileio.sha256(weights), **(extra or {})}
    fileio.write_text(fileio.join(directory, record_name), json.dumps(record))
    fileio.write_text(fileio.join(directory, BACKUP_METADATA), json.dumps({"epoch": epoch, "batch": 0}))
    keep = {n for e in (epoch - k for k in range(BACKUP_SLOTS_KEPT)) for n in backup_slot(e)}
    for name in fileio.listdir(directory):
        if name.startswith("epoch-") and name not in keep or name == LEGACY_BACKUP_WEIGHTS:
            fileio.remove(fileio.join(directory, name))
    fileio.remove_temporaries(directory)


def backup_notes(work_dir: str) -> list[str]:
    """One line when the newest backup is unusable and the run falls back (empty otherwise)."""
    found = find_backup(work_dir)
    if found is None or not found.damaged:
        return []
    start = "starting from epoch 0"
    if found.weights:
        start = f"resuming from the backup after epoch {found.epoch}"
    return [f"warning: {'; '.join(found.damaged)}: {start}"]


def backup_epoch(work_dir: str, verify: bool = False, at_most: int | None = None) -> int | None:
    """Epochs finished according to the newest whole backup in work_dir, or None without a backup.

    Without `verify` a slot counts when its record is there and its size matches (no checksum): the
    training job itself resumes with `verify=True`. `at_most`: as in `find_backup`.
    """
    found = find_backup(work_dir, verify, at_most)
    return None if found is None else found.epoch


def config_json(cfg: TrainConfig, run: dict[str, Any] | None = None) -> str:
    """config.json's text: the config, and the run facts under RUN_SECTION."""
    d = config_to_dict(cfg)
    if run is not None:
        d[RUN_SECTION] = run
    return json.dumps(d, indent=2, sort_keys=True)


DATASET_ID = "dataset_id"  # config.json's run section: the identity of the data the run trains on
OVERWRITE_STARTED = "started_with_overwrite"  # config.json's run section: this run began by replacing one


def dataset_id(manifest: dict) -> str:
    """What the dataset is, whatever its path: a hash of the manifest's schema version, image size, folds,
    counts per fold, shard names and stain statistics (the manifest is written once per preprocessing run)."""
    import hashlib

    import schemas

    keys = (
        schemas.MANIFEST_SCHEMA_VERSION,
        schemas.MANIFEST_IMAGE_SIZE,
        schemas.MANIFEST_NUM_FOLDS,
        schemas.MANIFEST_WRITTEN,
        schemas.MANIFEST_STAIN_STATS,
        schemas.MANIFEST_CLASS_COUNTS,
        "shards",
        "input_rows",
    )
    chosen = {k: manifest.get(k) for k in keys}
    return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:16]


def same_place(cfg: TrainConfig) -> TrainConfig:
    """cfg with data_dir and model_dir in their canonical spelling (`schemas.paths`), for comparisons."""
    return dataclasses.replace(
        cfg, data_dir=paths.normalise(cfg.data_dir), model_dir=paths.normalise(cfg.model_dir)
    )


def config_difference(previous_dict: dict, cfg: TrainConfig, data_id: str | None) -> str | None:
    """How a stored config.json differs from `cfg` (None when it is the same run).

    Paths are compared by what they point to; a data_dir spelt or placed differently is the same when the
    stored dataset id equals `data_id` (the data folder was moved or renamed).
    """
    previous = config_from_dict(previous_dict)
    stored_id = previous_dict.get(RUN_SECTION, {}).get(DATASET_ID)
    if stored_id and data_id and stored_id != data_id:
        return f"the dataset: {stored_id} -> {data_id} (data_dir holds other data than the run trained on)"
    if same_place(previous) == same_place(cfg):
        return None
    if data_id is not None and stored_id == data_id:
        moved = dataclasses.replace(previous, data_dir=cfg.data_dir)
        if same_place(moved) == same_place(cfg):
            return None
    return dict_diff(config_to_dict(same_place(previous)), config_to_dict(same_place(cfg)))


def resumes_overwrite(cfg: TrainConfig, run: dict[str, Any] | None) -> bool:
    """True when model_dir holds an unfinished run of this same config that --overwrite itself started.

    The same command rerun after an interruption then resumes instead of replacing its own work.
    """
    config_path = fileio.join(cfg.model_dir, CONFIG_FILE)
    if not fileio.exists(config_path) or find_backup(cfg.model_dir) is None:
        return False
    try:
        stored = json.loads(fileio.read_text(config_path))
        same = config_difference(stored, cfg, (run or {}).get(DATASET_ID)) is None
    except (ValueError, ConfigError):
        return False
    return same and bool(stored.get(RUN_SECTION, {}).get(OVERWRITE_STARTED))


def prepare_model_dir(cfg: TrainConfig, overwrite: bool, run: dict[str, Any] | None = None) -> int:
    """The chief's check of model_dir against the config; writes config.json; returns the epoch to start from.

    Takes model_dir's lock first (`schemas.locks`: a second process stops at once naming this one). With
    `overwrite` an existing run is removed (except other workers' dirs, which each worker clears), unless it
    is this same command's own unfinished run (`resumes_overwrite`).

    Raises:
      ConfigError: model_dir holds another run's config, or a finished run (without --overwrite).
      locks.Locked: another live process works in model_dir.
    """
    locks.acquire(cfg.model_dir, "hpa-train")
    config_path = fileio.join(cfg.model_dir, CONFIG_FILE)
    run = dict(run or {})
    if overwrite and resumes_overwrite(cfg, run):
        overwrite = False
        run[OVERWRITE_STARTED] = True
    elif overwrite:
        run[OVERWRITE_STARTED] = True
        if fileio.exists(cfg.model_dir):
            for name in fileio.listdir(cfg.model_dir):
                if name not in (WORKERS_DIR, locks.LOCK_FILE):
                    _remove(fileio.join(cfg.model_dir, name))
    elif fileio.exists(config_path):
        try:
            if json.loads(fileio.read_text(config_path)).get(RUN_SECTION, {}).get(OVERWRITE_STARTED):
                run[OVERWRITE_STARTED] = True  # still the run an --overwrite began
        except ValueError:
            pass  # _check_same_config names the problem
    fileio.remove_temporaries(cfg.model_dir)
    epoch = 0
    if fileio.exists(config_path):
        _check_same_config(cfg, config_path, run.get(DATASET_ID))
        found = backup_epoch(cfg.model_dir, verify=True)
        if found is None and fileio.exists(fileio.join(cfg.model_dir, MODEL_FILE)):
            raise AlreadyFinished(
                f"{cfg.model_dir} holds this command's finished run: nothing to do "
                "(another --model_dir, or --overwrite to train it again)"
            )
        epoch = found or 0
    fileio.makedirs(cfg.model_dir)
    fileio.write_text(config_path, config_json(cfg, run))
    return epoch


def prepare_worker_dir(cfg: TrainConfig, work_dir: str, overwrite: bool) -> int:
    """A non-chief worker's check of its own dir; returns the epoch its backup has reached (0 without).

    Raises:
      AlreadyFinished: the chief's outputs say this same run is finished (visible when model_dir is shared):
        a worker rerun after a kill that came once the chief was done has nothing left to do.
      ConfigError: model_dir holds another run, finished.
    """
    locks.acquire(work_dir, "hpa-train")
    if overwrite:
        fileio.rmtree(work_dir)
    finished = fileio.exists(fileio.join(cfg.model_dir, MODEL_FILE)) and not fileio.exists(
        fileio.join(cfg.model_dir, BACKUP_DIR)
    )
    if finished and not overwrite:
        config_path = fileio.join(cfg.model_dir, CONFIG_FILE)
        try:
            same = config_difference(json.loads(fileio.read_text(config_path)), cfg, None) is None
        except (OSError, ValueError, ConfigError):
            same = False
        if same:
            raise AlreadyFinished(
                f"{cfg.model_dir} holds this command's finished run: nothing to do "
                "(another --model_dir, or --overwrite to train it again)"
            )
        raise ConfigError(f"{cfg.model_dir} holds a finished run; use another --model_dir or --overwrite")
    fileio.makedirs(work_dir)
    return backup_epoch(work_dir, verify=True) or 0


def _remove(path: str) -> None:
    if fileio.isdir(path):
        fileio.rmtree(path)
    else:
        fileio.remove(path)


def _check_same_config(cfg: TrainConfig, config_path: str, data_id: str | None = None) -> None:
    try:
        diff = config_difference(json.loads(fileio.read_text(config_path)), cfg, data_id)
    except (ValueError, ConfigError) as e:
        raise ConfigError(f"{config_path} is not a training config ({e}); use another --model_dir") from e
    if diff is not None:
        raise ConfigError(
            f"{cfg.model_dir} holds another run (config differs: {diff}); "
            "use another --model_dir, or --overwrite to replace it"
        )


def dict_diff(old: dict, new: dict, prefix: str = "") -> str:
    """`key: old -> new` for every differing (nested) key, comma-separated."""
    parts = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            sub = dict_diff(a, b, f"{prefix}{key}.")
            if sub:
                parts.append(sub)
        elif a != b:
            parts.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return ", ".join(parts)


def read_history(path: str) -> list[dict[str, str]]:
    """Rows of a CSVLogger file (empty when absent), without a last row cut short by a kill mid-append."""
    if not fileio.exists(path):
        return []
    rows = []
    for row in csv.DictReader(io.StringIO(fileio.read_text(path))):
        if None in row or any(v in (None, "") for v in row.values()) or not row.get("epoch", "").isdigit():
            continue  # a row CSVLogger did not finish (its epoch is not in the backup either)
        rows.append(row)
    return rows


def truncate_history(path: str, epochs: int) -> list[dict[str, str]]:
    """Keeps the rows of epochs < `epochs` (those the backup covers); returns them."""
    rows = [r for r in read_history(path) if int(r["epoch"]) < epochs]
    if not rows:
        fileio.remove(path)
        return []
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    fileio.write_text(path, buf.getvalue())
    return rows


def plot_history(rows: list[dict[str, str]], path: str) -> None:
    """Training and validation loss and macro F1 per epoch (the original project's figure) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [int(r["epoch"]) + 1 for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "loss", "loss"), (axes[1], F1_METRIC, "macro F1 (threshold 0.5)")):
        for name, style in ((key, "-o"), (f"val_{key}", "-s")):
            if rows and name in rows[0]:
                ax.plot(epochs, [float(r[name]) for r in rows], style, label=name)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    fileio.write_bytes(path, buf.getvalue())
