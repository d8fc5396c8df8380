"""A cache of decoded stains, so that the PNGs of the training folds are decoded once, not every epoch.

`--cache memory` keeps the decoded uint8 images in a `tf.data` memory cache, filled during the first epoch.
`--cache DIR` writes them once, before training, with `tf.data.Dataset.save` into `DIR/<key>.partial-...`
and renames that to `DIR/<key>` only after the full pass: a directory without the suffix is complete by
construction, a half-written one from a killed run keeps its suffix, is never read, and is removed (with a
message) by the next run on the same host. Later runs with the same data read `DIR/<key>` with
`tf.data.Dataset.load`, its files in a new random order every epoch.

The key is a hash of what defines the cached data: the manifest (schema version, image size, counts, stain
statistics), the shard files (names and sizes) and the folds. Data rewritten by a new preprocessing run
gets a new key, so a cache of other data is never used: a new one is built, with a message.

A cache takes samples x H x W x 4 bytes (1 MiB per 512 px sample): checked before anything is filled
against the free memory or the free space of DIR.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from typing import Callable, Sequence

import tensorflow as tf

import schemas
from model.config import CACHE_MEMORY, CACHE_NONE, ConfigError

_PARTIAL = ".partial-"
_SAVE_SHARDS = 16  # files the saved cache is split into, read in a random interleaved order


def cache_bytes(num_samples: int, image_size: int) -> int:
    """Bytes the decoded stains of `num_samples` samples take: samples x H x W x NUM_STAINS (uint8)."""
    return int(num_samples) * int(image_size) * int(image_size) * schemas.NUM_STAINS


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def available_memory() -> int:
    """Bytes of memory available to new allocations (MemAvailable of /proc/meminfo, else free pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def free_disk(path: str) -> int:
    """Free bytes on the file system holding `path`."""
    return shutil.disk_usage(path).free


def check_cache(cache: str, num_samples: int, image_size: int) -> int:
    """Checks, before any work, that a cache of `num_samples` decoded samples fits where it is asked for.

    A directory cache that already exists complete for this data needs no new room; call with the samples
    still to be written.

    Returns:
      the estimated bytes.

    Raises:
      ConfigError: a directory that cannot be created or written, not enough free space or memory.
    """
    need = cache_bytes(num_samples, image_size)
    size = f"{num_samples} samples x {image_size} x {image_size} x {schemas.NUM_STAINS} bytes = {_gib(need)}"
    if cache == CACHE_NONE or num_samples == 0:
        return need
    if cache == CACHE_MEMORY:
        free = available_memory()
        if need > free:
            raise ConfigError(
                f"--cache memory needs {size} but only {_gib(free)} of memory is available; "
                "use --cache DIR (a directory on a local disk) instead"
            )
        return need
    if "://" in cache:
        raise ConfigError(f"--cache {cache}: the cache directory must be on a local disk")
    try:
        os.makedirs(cache, exist_ok=True)
        probe = os.path.join(cache, f".write-test-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"0")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--cache {cache}: cannot write there ({e.strerror or e})") from e
    free = free_disk(cache)
    if need > free:
        raise ConfigError(
            f"--cache {cache}: the cache needs {size} but the disk has {_gib(free)} free; "
            "free space or choose another directory"
        )
    return need


def cache_key(data_dir: str, manifest: dict, files: Sequence[str], folds: Sequence[int]) -> str:
    """A name for the cache of these folds of this dataset: `folds<f>-<hash of manifest and shard files>`."""
    shards = []
    for path in files:
        try:
            size = tf.io.gfile.stat(path).length
        except tf.errors.NotFoundError:
            size = -1
        shards.append([os.path.basename(path), int(size)])
    identity = {
        "manifest": manifest,
        "shards": shards,
        "folds": list(folds),
        "schema_version": schemas.SCHEMA_VERSION,
        "image_size": manifest.get(schemas.MANIFEST_IMAGE_SIZE),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
    return "folds" + "_".join(str(f) for f in folds) + "-" + digest


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_dead_partials(cache_dir: str, log: Callable[[str], None]) -> None:
    """Removes half-written caches of killed runs on this host (their writer process is gone)."""
    host = socket.gethostname()
    for name in sorted(os.listdir(cache_dir)):
        if _PARTIAL not in name:
            continue
        owner = name.split(_PARTIAL, 1)[1]
        owner_host, _, pid = owner.rpartition("-")
        if owner_host != host or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        log(f"cache: removing {name}, a half-written cache of a run that did not finish it")
        shutil.rmtree(os.path.join(cache_dir, name), ignore_errors=True)


def complete_path(cache_dir: str, key: str) -> str | None:
    """The directory of a complete cache of `key` in cache_dir, or None."""
    path = os.path.join(cache_dir, key)
    return path if os.path.isdir(path) else None


def _save_shard(index, *_):
    return index % _SAVE_SHARDS


def _reader(seed: int | None, shuffle: bool):
    def reader(datasets):
        if shuffle:
            datasets = datasets.shuffle(_SAVE_SHARDS, seed=seed)
        return datasets.interleave(
            lambda d: d, cycle_length=_SAVE_SHARDS, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )

    return reader


def fill_dir_cache(
    decoded: tf.data.Dataset,
    cache_dir: str,
    key: str,
    num_samples: int,
    log: Callable[[str], None] = print,
) -> str:
    """Writes one full pass of `decoded` into `cache_dir/key` (unless complete already); returns its path.

    Writes into `key.partial-<host>-<pid>` and renames it only after the pass ended, so that a killed run
    leaves nothing that is trusted. Other keys in cache_dir are left alone (named in a message).
    """
    os.makedirs(cache_dir, exist_ok=True)
    _remove_dead_partials(cache_dir, log)
    done = complete_path(cache_dir, key)
    if done:
        log(f"cache: reusing {done} (complete, same data)")
        return done
    others = sorted(n for n in os.listdir(cache_dir) if _PARTIAL not in n and not n.startswith("."))
    prefix = key.split("-", 1)[0] + "-"
    stale = [n for n in others if n.startswith(prefix)]
    if stale:
        log(
            f"cache: {cache_dir} holds {', '.join(stale)} of other data (another manifest or shards): not "
            f"used, building {key}; remove the old directory to free its space"
        )
    partial = os.path.join(cache_dir, f"{key}{_PARTIAL}{socket.gethostname()}-{os.getpid()}")
    log(f"cache: decoding {num_samples} samples once into {partial} ...")
    start = time.perf_counter()
    every = max(1, num_samples // 10)

    def progress(index, element):
        tf.cond(
            tf.equal(index % every, every - 1),
            lambda: tf.print("cache:", index + 1, "/", num_samples, "samples decoded"),
            lambda: tf.no_op(),
        )
        return index, element

    counted = decoded.enumerate().map(progress)
    counted.save(partial, shard_func=_save_shard)
    os.replace(partial, os.path.join(cache_dir, key))
    seconds = time.perf_counter() - start
    log(f"cache: {num_samples} samples written in {seconds:.0f} s ({num_samples / max(seconds, 1e-9):.0f}/s)")
    return os.path.join(cache_dir, key)


def load_dir_cache(path: str, seed: int | None, shuffle: bool = True) -> tf.data.Dataset:
    """The elements of a complete cache directory, its files interleaved (in a new random order per pass
    when `shuffle`, else in the order they were written)."""
    ds = tf.data.Dataset.load(path, reader_func=_reader(seed, shuffle))
    return ds.map(lambda index, element: element)
