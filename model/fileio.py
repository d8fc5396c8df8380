"""File access for local paths and URLs alike: local paths directly, `gs://...` through tf.io.gfile.

Every read and write of the model side (training, evaluation, thresholds, prediction, scoring) goes through
these functions. TensorFlow is imported only when a URL is used, so numpy-only modules (thresholds,
evaluation) stay light.

Every write is all or nothing (docs/interrupts.md): a local file is written under a temporary name beside
its target (`.name.tmp-<pid>`, `schemas/atomic.py`), flushed to disk and renamed over the target, so a kill
leaves the old file or the new one, never a truncated one; an object store's object appears only when its
upload completes, so a `gs://` write goes straight to its name. `save_file` and `replace_dir` do the same
for a file or directory that a library writes (Keras' `model.save`, its export).
"""

from __future__ import annotations

import glob as _glob
import os
import posixpath
import shutil
import tempfile
from typing import Callable

from schemas import atomic


def is_remote(path: str) -> bool:
    """True for URLs such as gs://bucket/x (anything with a scheme)."""
    return "://" in path


def join(base: str, *names: str) -> str:
    """Joins with `/` for URLs and the OS separator for local paths."""
    return posixpath.join(base, *names) if is_remote(base) else os.path.join(base, *names)


def dirname(path: str) -> str:
    """The parent directory of a path or URL."""
    return posixpath.dirname(path) if is_remote(path) else os.path.dirname(path)


def basename(path: str) -> str:
    """The last component of a path or URL."""
    return posixpath.basename(path) if is_remote(path) else os.path.basename(path)


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def exists(path: str) -> bool:
    """True when the file or directory exists."""
    return _gfile().exists(path) if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    """True when the path is a directory."""
    return _gfile().isdir(path) if is_remote(path) else os.path.isdir(path)


def makedirs(path: str) -> None:
    """Creates a directory and its parents (no error when it exists)."""
    if is_remote(path):
        _gfile().makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def glob(pattern: str) -> list[str]:
    """Sorted paths matching a glob pattern."""
    return sorted(_gfile().glob(pattern) if is_remote(pattern) else _glob.glob(pattern))


def listdir(path: str) -> list[str]:
    """Sorted names in a directory (without a trailing `/`)."""
    names = _gfile().listdir(path) if is_remote(path) else os.listdir(path)
    return sorted(n.rstrip("/") for n in names)


def remove(path: str) -> None:
    """Deletes a file (no error when it does not exist)."""
    if not exists(path):
        return
    if is_remote(path):
        _gfile().remove(path)
    else:
        os.remove(path)


def rmtree(path: str) -> None:
    """Deletes a directory tree (no error when it does not exist)."""
    if not exists(path):
        return
    if is_remote(path):
        _gfile().rmtree(path)
    else:
        shutil.rmtree(path)


def read_bytes(path: str) -> bytes:
    """The file's bytes; FileNotFoundError when there is none."""
    if is_remote(path):
        if not _gfile().exists(path):
            raise FileNotFoundError(path)
        with _gfile().GFile(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    """The file's text (UTF-8); FileNotFoundError when there is none."""
    return read_bytes(path).decode("utf-8")


def write_bytes(path: str, data: bytes) -> None:
    """Writes a whole file, all or nothing (see the module docstring), creating its parent directory."""
    parent = dirname(path)
    if parent and not exists(parent):
        makedirs(parent)
    if is_remote(path):
        with _gfile().GFile(path, "wb") as f:  # the object appears when the upload completes
            f.write(data)
        return
    atomic.write_bytes(path, data)


def save_file(path: str, save: Callable[[str], object], suffix: str | None = None) -> None:
    """Writes a file with a library's `save(local_path)` (Keras' `model.save`), all or nothing.

    The library writes a temporary file that keeps the target's extension (Keras checks it); locally it is
    renamed over `path`, to an object store it is copied. `suffix`: the extension the library wants (default
    the target's, e.g. `.keras`; `.weights.h5` for Keras' weight files).
    """
    ext = suffix or os.path.splitext(path)[1]
    if is_remote(path):
        tmp = os.path.join(tempfile.mkdtemp(prefix="hpa-save-"), basename(path))
        save(tmp)
        _gfile().copy(tmp, path, overwrite=True)
        shutil.rmtree(os.path.dirname(tmp), ignore_errors=True)
        return
    makedirs(dirname(path) or ".")
    tmp = atomic.temp_name(path) + ext
    try:
        save(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def replace_dir(path: str, write: Callable[[str], object]) -> None:
    """Writes a directory with `write(tmp_dir)` beside `path`, then puts it in place of `path`.

    Locally the old directory is renamed aside and the new one renamed in (two renames: a kill between them
    leaves no `path` but the complete new one under its temporary name, and readers treat a missing output
    as absent). On an object store, where a directory is a prefix, the files are written in place by
    `write(path)` after the old ones are removed: the run's own completion marker (a model dir's backup
    removed last) says whether they are complete.
    """
    if is_remote(path):
        rmtree(path)
        write(path)
        return
    tmp = atomic.temp_name(path)
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    old = tmp + ".old"
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def remove_temporaries(directory: str) -> None:
    """Deletes what killed writers left in a local directory (`schemas.atomic`); no-op for URLs."""
    if not is_remote(directory):
        atomic.remove_temporaries(directory)


def write_text(path: str, text: str) -> None:
    """Writes a UTF-8 text file, creating its parent directory."""
    write_bytes(path, text.encode("utf-8"))


def sha256(path: str) -> str:
    """The hex SHA-256 of a file's bytes."""
    import hashlib

    digest = hashlib.sha256()
    if is_remote(path):
        digest.update(read_bytes(path))
    else:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def local_copy(path: str, prefix: str = "hpa-") -> str:
    """A local path holding the file: the path itself when local, else a copy in a fresh temp dir.

    Keras loads some formats only from local files.
    """
    if not is_remote(path):
        return path
    local = os.path.join(tempfile.mkdtemp(prefix=prefix), basename(path))
    _gfile().copy(path, local, overwrite=True)
    return local
