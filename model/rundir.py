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
from schemas import atomic

BACKUP_METADATA = "training_metadata.json"  # Keras' BackupAndRestore's name; {"epoch": N}
LEGACY_BACKUP_WEIGHTS = "latest.weights.h5"  # Keras' BackupAndRestore's one slot (runs before the two slots)
BACKUP_SLOTS_KEPT = 2
WORKERS_DIR = "workers"


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


def find_backup(work_dir: str) -> Backup | None:
    """The newest whole backup of work_dir (None when there is no backup at all).

    A slot is whole when its record (`epoch-N.json`, written after the weights) exists and the weights'
    size and SHA-256 match it. A damaged newest slot falls back to the one before it; when no slot is whole
    the run starts from epoch 0 (Backup(0, None, ...)), never a loop of failing resumes.
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
    damaged = []
    for epoch in epochs:
        weights, record = (fileio.join(directory, n) for n in backup_slot(epoch))
        problem = _slot_problem(weights, record)
        if problem is None:
            return Backup(epoch, weights, tuple(damaged))
        damaged.append(f"the backup after epoch {epoch} is unusable ({problem})")
    legacy = fileio.join(directory, LEGACY_BACKUP_WEIGHTS)
    meta = fileio.join(directory, BACKUP_METADATA)
    if not epochs and fileio.exists(legacy) and fileio.exists(meta):
        try:
            return Backup(int(json.loads(fileio.read_text(meta))["epoch"]), legacy)
        except (ValueError, KeyError, TypeError):
            damaged.append(f"{meta} is unreadable")
    if not epochs and not damaged:
        return None
    return Backup(0, None, tuple(damaged))


def _slot_problem(weights: str, record: str) -> str | None:
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
    if fileio.sha256(weights) != digest:
        return f"{fileio.basename(weights)} does not match its checksum"
    return None


def _size(path: str) -> int:
    if fileio.is_remote(path):
        import tensorflow as tf

        return int(tf.io.gfile.stat(path).length)
    return os.path.getsize(path)


def record_backup(work_dir: str, epoch: int) -> None:
    """After the weights of `epoch` were written: their record, the epoch marker, and old slots removed."""
    directory = fileio.join(work_dir, BACKUP_DIR)
    weights_name, record_name = backup_slot(epoch)
    weights = fileio.join(directory, weights_name)
    record = {"epoch": epoch, "bytes": _size(weights), "sha256": fileio.sha256(weights)}
    fileio.write_text(fileio.join(directory, record_name), json.dumps(record))
    fileio.write_text(fileio.join(directory, BACKUP_METADATA), json.dumps({"epoch": epoch, "batch": 0}))
    keep = {n for e in (epoch - k for k in range(BACKUP_SLOTS_KEPT)) for n in backup_slot(e)}
    for name in fileio.listdir(directory):
        if name.startswith("epoch-") and name not in keep or name == LEGACY_BACKUP_WEIGHTS:
            fileio.remove(fileio.join(directory, name))
    if not fileio.is_remote(directory):
        atomic.remove_temporaries(directory)


def backup_notes(work_dir: str) -> list[str]:
    """One line when the newest backup is unusable and the run falls back (empty otherwise)."""
    found = find_backup(work_dir)
    if found is None or not found.damaged:
        return []
    start = "starting from epoch 0"
    if found.weights:
        start = f"resuming from the backup after epoch {found.epoch}"
    return [f"warning: {'; '.join(found.damaged)}: {start}"]


def backup_epoch(work_dir: str) -> int | None:
    """Epochs finished according to the newest whole backup in work_dir, or None without a backup."""
    found = find_backup(work_dir)
    return None if found is None else found.epoch


def config_json(cfg: TrainConfig, run: dict[str, Any] | None = None) -> str:
    """config.json's text: the config, and the run facts under RUN_SECTION."""
    d = config_to_dict(cfg)
    if run is not None:
        d[RUN_SECTION] = run
    return json.dumps(d, indent=2, sort_keys=True)


def prepare_model_dir(cfg: TrainConfig, overwrite: bool, run: dict[str, Any] | None = None) -> int:
    """The chief's check of model_dir against the config; writes config.json; returns the epoch to start from.

    With `overwrite` an existing run is removed (except other workers' dirs, which each worker clears).

    Raises:
      ConfigError: model_dir holds another run's config, or a finished run (without --overwrite).
    """
    config_path = fileio.join(cfg.model_dir, CONFIG_FILE)
    if overwrite and fileio.exists(cfg.model_dir):
        for name in fileio.listdir(cfg.model_dir):
            if name != WORKERS_DIR:
                _remove(fileio.join(cfg.model_dir, name))
    epoch = 0
    if fileio.exists(config_path):
        _check_same_config(cfg, config_path)
        found = backup_epoch(cfg.model_dir)
        if found is None and fileio.exists(fileio.join(cfg.model_dir, MODEL_FILE)):
            raise ConfigError(f"{cfg.model_dir} holds a finished run; use another --model_dir or --overwrite")
        epoch = found or 0
    fileio.makedirs(cfg.model_dir)
    fileio.write_text(config_path, config_json(cfg, run))
    return epoch


def prepare_worker_dir(cfg: TrainConfig, work_dir: str, overwrite: bool) -> int:
    """A non-chief worker's check of its own dir; returns the epoch its backup has reached (0 without).

    Raises:
      ConfigError: the chief's outputs say the run is finished (visible when model_dir is shared).
    """
    if overwrite:
        fileio.rmtree(work_dir)
    finished = fileio.exists(fileio.join(cfg.model_dir, MODEL_FILE)) and not fileio.exists(
        fileio.join(cfg.model_dir, BACKUP_DIR)
    )
    if finished and not overwrite:
        raise ConfigError(f"{cfg.model_dir} holds a finished run; use another --model_dir or --overwrite")
    fileio.makedirs(work_dir)
    return backup_epoch(work_dir) or 0


def _remove(path: str) -> None:
    if fileio.isdir(path):
        fileio.rmtree(path)
    else:
        fileio.remove(path)


def _check_same_config(cfg: TrainConfig, config_path: str) -> None:
    try:
        previous = config_from_dict(json.loads(fileio.read_text(config_path)))
    except (ValueError, ConfigError) as e:
        raise ConfigError(f"{config_path} is not a training config ({e}); use another --model_dir") from e
    if previous != cfg:
        diff = dict_diff(config_to_dict(previous), config_to_dict(cfg))
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
