"""One cache of decoded stains per dataset, shared by every fold and every process on a host.

`--cache DIR` decodes every labelled record of a dataset once (all folds) into `DIR/hpa-cache-<hash>/`:
  images.npy   [N, H, W, 4] uint8, fixed-size records (a .npy file: a small header, then the raw bytes)
  index.npz    labels [N, 28] uint8, folds [N] int16, ids [N] bytes, in the order of the records
  meta.json    format version, the dataset's identity, N, image size, records per fold; written last
Training reads records by index, one `os.preadv` per record straight into the batch (`Store.read`): N
processes on one host share the kernel's page cache instead of holding N copies, any order costs the same,
and a fold is chosen at read time from `index.npz`, so `hpa-folds` and every `hpa-train --val_fold K` of
the same data decode it once and store it once.

The key (`hash`) is the dataset's identity: its manifest (schema version, image size, counts, stain
statistics, shard list and whatever checksums it records), the shard files' names and sizes, and the
image size; not the path, so a moved data folder keeps its cache.

Filling is shared between processes: a fill holds an exclusive `flock` on `DIR/<key>.lock` (which names
its host, pid and start time) and writes `DIR/<key>.partial/`, renamed to `DIR/<key>` after meta.json is
written. Other processes wait for the lock (one line naming the filler), then read. The kernel releases the
lock of a killed process, so the next process takes over: it removes the half-written folder (one line)
and fills again. A complete folder of another format version is rebuilt with a message.

Housekeeping: caches of other data in DIR are removed, oldest use first, keeping at most `--cache_keep`
caches (this one included), one line each; a cache being filled by a live process is never touched.
Only names this module writes are ever removed. `cache_info(DIR)` lists what a folder holds.

`--cache memory` decodes into this process's memory (same layout, same random order), one copy per process.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import time
from typing import Callable, Iterable, Sequence

import numpy as np

import schemas
from model.config import CACHE_MEMORY, CACHE_NONE, ConfigError

FORMAT_VERSION = 2  # 1: tf.data snapshots per fold set (folds0_2-<hash>), before this module's layout
_PREFIX = "hpa-cache-"
_PARTIAL = ".partial"
_LOCK = ".lock"
_IMAGES = "images.npy"
_INDEX = "index.npz"
_META = "meta.json"
_KEY_RE = re.compile(r"^hpa-cache-[0-9a-f]{20}$")
_OLD_FORMAT_RE = re.compile(r"^folds[0-9_-]*-[0-9a-f]{20}(\.partial-.*)?$")  # format 1's names
_WAIT_POLL = 0.5  # seconds between tries of a busy lock

Log = Callable[[str], None]


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

    A directory cache that already exists complete for this data needs no new room; call with 0 samples.

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
            f"--cache {cache}: the cache of the whole dataset (every fold) needs {size} but the disk has "
            f"{_gib(free)} free; free space or choose another directory"
        )
    return need


def dataset_identity(manifest: dict, shards: Sequence[tuple[str, int]], image_size: int) -> dict:
    """What defines the cached data: the manifest, the shard files (base name, size) and the image size."""
    return {
        "manifest": manifest,
        "shards": sorted([os.path.basename(name), int(size)] for name, size in shards),
        "schema_version": schemas.SCHEMA_VERSION,
        "image_size": int(image_size),
    }


def cache_key(identity: dict) -> str:
    """The folder name of a dataset's cache: `hpa-cache-<20 hex digits of the identity's sha256>`."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return _PREFIX + digest


# ---------------------------------------------------------------------------------------------------------
# Reading.


@dataclasses.dataclass(frozen=True)
class Store:
    """A filled cache: the records and their index, in the order they were written.

    Attributes:
      images: [N, H, W, 4] uint8 (a read-only np.memmap of images.npy for a directory cache, an array in
        memory for `--cache memory`).
      labels: [N, NUM_CLASSES] uint8 multi-hot labels.
      folds: [N] int16 fold of each record.
      ids: [N] bytes sample Ids.
      path: the cache folder, or None in memory.
    """

    images: np.ndarray
    labels: np.ndarray
    folds: np.ndarray
    ids: np.ndarray
    path: str | None = None

    def indices(self, folds: Sequence[int]) -> np.ndarray:
        """Positions of the records of the given folds, in the order they were written (a fold's order
        is that of the uncached evaluation pipeline)."""
        return np.flatnonzero(np.isin(self.folds, np.asarray(list(folds), np.int64)))

    def read(self, idx: np.ndarray) -> np.ndarray:
        """The images [len(idx), H, W, 4] of the records at positions idx (a new array).

        A directory cache is read with one `os.preadv` per record (1 MiB at 512 px), straight from the page
        cache (or the disk) into the batch: one copy, the GIL released while it runs, no pages mapped into
        this process (so N processes share the kernel's one copy and an eviction really evicts).
        """
        if self.path is None:
            return self.images[idx]
        out = np.empty((len(idx),) + self.images.shape[1:], np.uint8)
        record = out[0].nbytes if len(idx) else 0
        fd = _read_fd(os.path.join(self.path, _IMAGES))
        for j, i in enumerate(idx):
            got = os.preadv(fd, [out[j]], self.images.offset + int(i) * record)
            if got != record:
                raise OSError(f"{self.path}: short read of record {int(i)} ({got} of {record} bytes)")
        return out


_FDS: dict[str, int] = {}  # read-only descriptors of images.npy files, one per file and process


def _read_fd(path: str) -> int:
    if path not in _FDS:
        _FDS[path] = os.open(path, os.O_RDONLY)
    return _FDS[path]


def _read_meta(path: str) -> dict | None:
    try:
        with open(os.path.join(path, _META)) as f:
            meta = json.load(f)
        return meta if isinstance(meta, dict) else None
    except (OSError, ValueError):
        return None


def open_store(path: str) -> Store:
    """The complete cache folder `path`, its images mapped (read-only), its index in memory."""
    images = np.load(os.path.join(path, _IMAGES), mmap_mode="r")
    with np.load(os.path.join(path, _INDEX)) as index:
        labels, folds, ids = index["labels"], index["folds"], index["ids"]
    try:
        os.utime(os.path.join(path, _META))  # the last use, for eviction
    except OSError:
        pass  # a read-only cache folder
    return Store(images=images, labels=labels, folds=folds, ids=ids, path=path)


# ---------------------------------------------------------------------------------------------------------
# Filling.

# A source yields batches (images [b, H, W, 4] uint8, labels [b, C], folds [b], ids [b]) as numpy arrays.
Source = Iterable[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]


# A progress line at most this often while the cache fills (and one when it is full).
PROGRESS_SECONDS = 10.0


def fill_arrays(
    write: Callable[[int, np.ndarray], None], source: Source, num_samples: int, log: Log = print
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hands every batch of `source` to `write(first_position, images)` in order; returns labels, folds, ids.

    Raises:
      ConfigError: the source does not hold exactly `num_samples` records (the shards and the manifest
        disagree).
    """
    labels, folds, ids = [], [], []
    n = 0
    start = last = time.perf_counter()
    for batch_images, batch_labels, batch_folds, batch_ids in source:
        b = len(batch_images)
        if n + b > num_samples:
            raise ConfigError(f"the shards hold more than the manifest's {num_samples} labelled records")
        write(n, batch_images)
        labels.append(np.asarray(batch_labels, np.uint8))
        folds.append(np.asarray(batch_folds, np.int16))
        ids.append(np.asarray(batch_ids, np.bytes_))
        n += b
        now = time.perf_counter()
        if now - last >= PROGRESS_SECONDS and n < num_samples:
            last = now
            log(f"cache: {n} / {num_samples} samples decoded ({n / (now - start):.0f}/s)")
    if n != num_samples:
        raise ConfigError(f"the shards hold {n} labelled records, the manifest says {num_samples}")
    return np.concatenate(labels), np.concatenate(folds), np.concatenate(ids)


def memory_store(source: Source, num_samples: int, image_size: int, log: Log = print) -> Store:
    """`--cache memory`: the records decoded into this process's memory."""
    need = cache_bytes(num_samples, image_size)
    log(
        f"cache: memory: decoding {num_samples} samples into this process ({_gib(need)}; every process holds "
        "its own copy, N processes on a host N times that: --cache DIR shares one)"
    )
    images = np.empty((num_samples, image_size, image_size, schemas.NUM_STAINS), np.uint8)

    def write(first: int, batch: np.ndarray) -> None:
        images[first : first + len(batch)] = batch

    start = time.perf_counter()
    labels, folds, ids = fill_arrays(write, source, num_samples, log)
    seconds = time.perf_counter() - start
    log(f"cache: {num_samples} samples decoded in {seconds:.1f} s ({num_samples / max(seconds, 1e-9):.0f}/s)")
    return Store(images=images, labels=labels, folds=folds, ids=ids)


def _write_folder(
    partial: str, source: Source, num_samples: int, image_size: int, identity: dict, log: Log
) -> None:
    os.makedirs(partial)
    shape = (num_samples, image_size, image_size, schemas.NUM_STAINS)
    path = os.path.join(partial, _IMAGES)
    header = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)  # header + file size
    offset, record = header.offset, cache_bytes(1, image_size)
    del header
    with open(path, "r+b") as f:  # then plain sequential writes (no page faults of a mapping)

        def write(first: int, batch: np.ndarray) -> None:
            f.seek(offset + first * record)
            f.write(np.ascontiguousarray(batch, np.uint8).data)

        labels, folds, ids = fill_arrays(write, source, num_samples, log)
        f.flush()
        os.fsync(f.fileno())
    np.savez(os.path.join(partial, _INDEX), labels=labels, folds=folds, ids=ids)
    values, counts = np.unique(folds, return_counts=True)
    meta = {
        "format": FORMAT_VERSION,
        "num_samples": num_samples,
        "image_size": image_size,
        "bytes": cache_bytes(num_samples, image_size),
        "records_per_fold": {str(int(v)): int(c) for v, c in zip(values, counts)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "identity": identity,
    }
    with open(os.path.join(partial, _META), "w") as f:  # last: only a folder with it counts as complete
        json.dump(meta, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())


class _Lock:
    """An exclusive flock on `DIR/<key>.lock`, released when the process ends in any way."""

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    def try_acquire(self) -> bool:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise

    def owner(self) -> str:
        try:
            with open(self.path) as f:
                o = json.load(f)
            return f"pid {o['pid']} on {o['host']} since {o['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def claim(self) -> None:
        """Records this process as the holder (for the messages of those who wait)."""
        text = json.dumps(
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        ).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, text, 0)

    def release(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _complete(path: str) -> bool:
    meta = _read_meta(path)
    return meta is not None and meta.get("format") == FORMAT_VERSION


def complete_path(cache_dir: str, key: str) -> str | None:
    """The folder of a complete cache of `key` (this format version) in cache_dir, or None."""
    path = os.path.join(cache_dir, key)
    return path if _complete(path) else None


def dir_store(
    cache_dir: str,
    identity: dict,
    num_samples: int,
    image_size: int,
    make_source: Callable[[], Source],
    keep: int = 1,
    log: Log = print,
) -> Store:
    """The dataset's cache in `cache_dir`: read if complete, else filled by this process or, when another
    process is filling it, read after that one finished. Other caches beyond `keep` are removed first."""
    os.makedirs(cache_dir, exist_ok=True)
    key = cache_key(identity)
    path = os.path.join(cache_dir, key)
    evict(cache_dir, key, keep, log)
    if _complete(path):
        log(f"cache: reusing {path} ({num_samples} samples, every fold)")
        return open_store(path)
    lock = _Lock(path + _LOCK)
    try:
        if not lock.try_acquire():
            log(f"cache: {path} is being filled by {lock.owner()}; waiting for it ...")
            while not lock.try_acquire():
                time.sleep(_WAIT_POLL)
        if _complete(path):  # filled by the process we waited for
            log(f"cache: reusing {path} (filled by another process)")
            return open_store(path)
        partial = path + _PARTIAL
        if os.path.exists(partial):
            log(f"cache: taking over {partial}: the fill by {lock.owner()} did not finish; filling again")
            shutil.rmtree(partial)
        if os.path.exists(path):
            meta = _read_meta(path)
            version = meta.get("format") if meta else "unknown"
            log(f"cache: {path} was written by another version of the cache format ({version}); rebuilt")
            shutil.rmtree(path)
        lock.claim()
        log(f"cache: decoding {num_samples} samples of every fold once into {partial} ...")
        start = time.perf_counter()
        _write_folder(partial, make_source(), num_samples, image_size, identity, log)
        os.rename(partial, path)
        seconds = time.perf_counter() - start
        log(
            f"cache: {num_samples} samples ({_gib(cache_bytes(num_samples, image_size))}) written in "
            f"{seconds:.0f} s ({num_samples / max(seconds, 1e-9):.0f}/s) -> {path}"
        )
        return open_store(path)
    finally:
        lock.release()


# ---------------------------------------------------------------------------------------------------------
# Housekeeping.


def _size_on_disk(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def evict(cache_dir: str, key: str, keep: int, log: Log = print) -> list[str]:
    """Removes caches in cache_dir other than `key`: those of the old format, half-written ones whose
    filler is gone, and complete ones of other data beyond the `keep - 1` most recently used. A cache
    being filled by a live process is kept. Returns the removed names (each also logged)."""
    removed = []
    names = sorted(os.listdir(cache_dir))
    others = []
    for name in names:
        full = os.path.join(cache_dir, name)
        if _OLD_FORMAT_RE.match(name) and os.path.isdir(full):
            log(f"cache: removing {name}: written by another version of the cache format (1)")
            shutil.rmtree(full, ignore_errors=True)
            removed.append(name)
        elif _KEY_RE.match(name) and name != key and os.path.isdir(full):
            meta = _read_meta(full)
            used = os.path.getmtime(os.path.join(full, _META)) if meta else 0.0
            others.append((used, name))
    others.sort(reverse=True)  # most recently used first
    kept = 0
    for _, name in others:
        full = os.path.join(cache_dir, name)
        current = _complete(full)
        if current and kept < keep - 1:
            kept += 1
            continue
        lock = _Lock(full + _LOCK)
        try:
            if not lock.try_acquire():
                log(f"cache: keeping {name}: in use by {lock.owner()}")
                continue
            size = _size_on_disk(full)
            why = "of other data" if current else "written by another version of the cache format"
            log(f"cache: removing {name} ({_gib(size)}), a cache {why} (--cache_keep {keep})")
            shutil.rmtree(full, ignore_errors=True)  # its .lock stays: a process may be opening it now
            removed.append(name)
        finally:
            lock.release()
    for name in names:  # half-written folders of other keys whose filler is gone
        if (
            name.endswith(_PARTIAL)
            and _KEY_RE.match(name[: -len(_PARTIAL)])
            and name[: -len(_PARTIAL)] != key
        ):
            full = os.path.join(cache_dir, name)
            lock = _Lock(full[: -len(_PARTIAL)] + _LOCK)
            try:
                if lock.try_acquire():
                    log(f"cache: removing {name}: a half-written cache whose filler is gone")
                    shutil.rmtree(full, ignore_errors=True)
                    removed.append(name)
            finally:
                lock.release()
    return removed


def cache_info(cache_dir: str) -> list[str]:
    """Lines describing what a cache folder holds: each cache, its state, samples, folds, size, last use."""
    if not os.path.isdir(cache_dir):
        return [f"{cache_dir}: no such directory"]
    lines = []
    total = 0
    for name in sorted(os.listdir(cache_dir)):
        full = os.path.join(cache_dir, name)
        if not os.path.isdir(full):
            continue
        size = _size_on_disk(full)
        total += size
        meta = _read_meta(full)
        if _KEY_RE.match(name) and meta and meta.get("format") == FORMAT_VERSION:
            used = time.strftime("%Y-%m-%d %H:%M", time.gmtime(os.path.getmtime(os.path.join(full, _META))))
            manifest = meta.get("identity", {}).get("manifest", {})
            folds = " ".join(f"{k}:{v}" for k, v in meta.get("records_per_fold", {}).items())
            lines.append(
                f"{name}  complete  {meta['num_samples']} samples of {meta['image_size']}px  "
                f"records per fold {folds}  {_gib(size)}  created {meta.get('created')}  last used {used} UTC"
                f"  schema {manifest.get(schemas.MANIFEST_SCHEMA_VERSION, '?')}"
            )
        elif name.endswith(_PARTIAL):
            lines.append(f"{name}  half-written (being filled, or left by a killed fill)  {_gib(size)}")
        elif _OLD_FORMAT_RE.match(name) or (_KEY_RE.match(name) and meta):
            lines.append(
                f"{name}  another version of the cache format (removed by the next run)  {_gib(size)}"
            )
        else:
            lines.append(f"{name}  not a cache of this project (never touched)  {_gib(size)}")
    lines.append(
        f"{cache_dir}: {len(lines)} folder(s), {_gib(total)} on disk, {_gib(free_disk(cache_dir))} free"
    )
    return lines
