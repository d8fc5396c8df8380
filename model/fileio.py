"""File access for local paths and URLs alike: local paths directly, `gs://...` through tf.io.gfile.

Every read and write of the model side (training, evaluation, thresholds, prediction, scoring) goes through
these functions. TensorFlow is imported only when a URL is used, so numpy-only modules (thresholds,
evaluation) stay light.
"""

from __future__ import annotations

import glob as _glob
import os
import posixpath
import shutil
import tempfile


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
    """Writes a file, creating its parent directory."""
    parent = dirname(path)
    if parent and not exists(parent):
        makedirs(parent)
    if is_remote(path):
        with _gfile().GFile(path, "wb") as f:
            f.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)


def write_text(path: str, text: str) -> None:
    """Writes a UTF-8 text file, creating its parent directory."""
    write_bytes(path, text.encode("utf-8"))


def local_copy(path: str, prefix: str = "hpa-") -> str:
    """A local path holding the file: the path itself when local, else a copy in a fresh temp dir.

    Keras loads some formats only from local files.
    """
    if not is_remote(path):
        return path
    local = os.path.join(tempfile.mkdtemp(prefix=prefix), basename(path))
    _gfile().copy(path, local, overwrite=True)
    return local
