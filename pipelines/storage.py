"""File helpers over Beam's FileSystems: the same calls for local paths and gs:// (any registered scheme)."""

from __future__ import annotations

import os
import posixpath
import shutil

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from schemas import atomic


class ReadError(OSError):
    """A file that cannot be read (the message names it)."""


def read_bytes(path: str, limit: int | None = None) -> bytes:
    """The file's bytes (at most `limit` of them from the start, when given)."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return f.read() if limit is None else f.read(limit)


def read_text(path: str, what: str) -> str:
    """A UTF-8 text file (a leading BOM is dropped). Raises ReadError naming `what` and the path."""
    try:
        data = read_bytes(path)
    except Exception as e:  # Beam wraps IO errors in BeamIOError and others
        raise ReadError(f"cannot read {what} {path}: {e}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ReadError(f"{what} {path} line {line}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def write_bytes(path: str, data: bytes) -> None:
    """Writes a whole file, all or nothing (local folders are created).

    Locally the bytes go to a temporary name beside the target, then are renamed over it; an object store's
    object appears only when its upload completes.
    """
    if "://" in path:
        with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            f.write(data)
        return
    atomic.write_bytes(path, data)


def exists(path: str) -> bool:
    return FileSystems.exists(path)


def list_files(root: str) -> list[str]:
    """Every file under root, sorted (empty when root does not exist)."""
    if "://" not in root and not os.path.isdir(root):  # object stores have prefixes, not directories
        return []
    return sorted(m.path for m in FileSystems.match([posixpath.join(root, "**")])[0].metadata_list)


def has_files(pattern: str) -> bool:
    return bool(FileSystems.match([pattern], limits=[1])[0].metadata_list)


def move_tree(src: str, dst: str) -> None:
    """Moves every file under src to the same relative path under dst (local and gs://)."""
    files = list_files(src)
    targets = [posixpath.join(dst, posixpath.relpath(f, src)) for f in files]
    for t in targets:
        parent = posixpath.dirname(t)
        if "://" not in parent:
            os.makedirs(parent, exist_ok=True)
    if files:
        FileSystems.rename(files, targets)


def upload_tree(src: str, dst: str) -> None:
    """Copies a local folder's files to dst through Beam's FileSystems (any scheme, e.g. gs://)."""
    for dirpath, _, names in os.walk(src):
        for name in names:
            local = os.path.join(dirpath, name)
            target = posixpath.join(dst, os.path.relpath(local, src).replace(os.sep, "/"))
            if "://" not in target:
                os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(local, "rb") as f_in, FileSystems.create(target) as f_out:
                shutil.copyfileobj(f_in, f_out)


def delete(path: str) -> None:
    """Deletes a file or a folder (local), or every object under a prefix (object stores)."""
    if FileSystems.exists(path):
        FileSystems.delete([path])
    elif "://" in path:  # object stores have no directories: delete the prefix's objects
        files = list_files(path)
        if files:
            FileSystems.delete(files)


def move_file(src: str, dst: str) -> None:
    """Moves one file (local and gs://)."""
    FileSystems.rename([src], [dst])
