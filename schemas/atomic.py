"""All-or-nothing local files, shared by both jobs (docs/interrupts.md).

A file is written under a temporary name beside its target (`.name.tmp-<pid>`), flushed to disk and renamed
over the target, so a kill at any instant leaves the old file or the new one, never a truncated one under
the final name. Object stores need no such step: an object appears only when its upload completes.

Standard library only: `schemas` sits below both job packages.
"""

from __future__ import annotations

import contextlib
import os
import shutil

TMP_MARK = ".tmp-"  # in the names of files and directories being written (never read as outputs)


def temp_name(path: str) -> str:
    """A temporary name in the same directory as `path` (a rename onto `path` stays on one file system)."""
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}{TMP_MARK}{os.getpid()}")


def write_bytes(path: str, data: bytes, sync: bool = True) -> None:
    """Writes a local file all or nothing, creating its parent directory.

    `sync=False` skips the flush to disk: still never a half-written file after a kill of the process, only
    not after a power loss (for many small regenerable files).
    """
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def remove_temporaries(directory: str) -> list[str]:
    """Deletes what killed writers left in a local directory (names starting `.` holding TMP_MARK).

    Returns the names removed.
    """
    if not os.path.isdir(directory):
        return []
    removed = []
    for name in sorted(os.listdir(directory)):
        if name.startswith(".") and TMP_MARK in name:
            target = os.path.join(directory, name)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.remove(target)
            removed.append(name)
    return removed
