"""File access for local paths and URLs alike: local paths directly, `gs://...` through tf.io.gfile.

TensorFlow is imported only when a URL is used, so numpy-only modules (thresholds, evaluation) stay light.
"""

from __future__ import annotations

import os
import posixpath


def is_remote(path: str) -> bool:
    """True for URLs such as gs://bucket/x (anything with a scheme)."""
    return "://" in path


def join(base: str, name: str) -> str:
    """Joins with `/` for URLs and the OS separator for local paths."""
    return posixpath.join(base, name) if is_remote(base) else os.path.join(base, name)


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def exists(path: str) -> bool:
    return _gfile().exists(path) if is_remote(path) else os.path.exists(path)


def makedirs(path: str) -> None:
    if is_remote(path):
        _gfile().makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def read_bytes(path: str) -> bytes:
    """The file's bytes; FileNotFoundError when there is none."""
    if is_remote(path):
        if not _gfile().exists(path):
            raise FileNotFoundError(path)
        with _gfile().GFile(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def write_bytes(path: str, data: bytes) -> None:
    if is_remote(path):
        with _gfile().GFile(path, "wb") as f:
            f.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)
