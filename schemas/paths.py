"""Path identity: two spellings of one place compare equal (docs/interrupts.md).

A rerun is recognised as the same command by what its paths point to, not how they are spelt: a local path
is made absolute with symbolic links resolved and no trailing slash; a URL (`gs://b//x/`) keeps its scheme
and bucket, its path normalised. Standard library only (`schemas` sits below both jobs).
"""

from __future__ import annotations

import os
import posixpath


def normalise(path: str) -> str:
    """The canonical spelling of a local path or URL (see the module docstring)."""
    if not path:
        return path
    if "://" in path:
        scheme, rest = path.split("://", 1)
        bucket, _, key = rest.partition("/")
        key = posixpath.normpath("/" + key).lstrip("/") if key.strip("/") else ""
        return f"{scheme.lower()}://{bucket}" + (f"/{key}" if key else "")
    return os.path.realpath(os.path.expanduser(path))
