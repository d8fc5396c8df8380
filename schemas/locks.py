"""One process per output directory: a lock file naming its holder (docs/interrupts.md).

`acquire(directory, prog)` creates `directory/.hpa-lock` (host, pid, process start time, since when, the
command) with O_EXCL. A second process on the same directory stops at once with one line naming the holder
(`Locked`, a FileExistsError: exit status 2). A lock whose holder is dead (same host, no such process, or the
pid reused by another process) is taken over with one line saying so; a lock from another host is trusted
(its holder cannot be checked from here: delete the file when that machine is known to be gone).
The lock is released by `release(directory)`, by `release_all()` (every command does at its end, see
`schemas/cli.py`) and at interpreter exit; a killed process leaves it behind, for the next run to take over.

Local directories only: object stores (gs://) have no exclusive create here, so runs writing there are not
locked (give each machine its own folds or output).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import sys
import time

LOCK_FILE = ".hpa-lock"
_held: dict[str, str] = {}  # directory (normalised) -> lock file path, held by this process


class Locked(FileExistsError):
    """Another live process holds the directory's lock (the message names it)."""


def _start_time(pid: int) -> str | None:
    """The process' start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # cannot check another machine's processes
    pid = int(holder.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except (OSError, ValueError):
        return False
    start = holder.get("start")
    return start is None or _start_time(pid) in (None, start)


def describe(holder: dict) -> str:
    return (
        f"{holder.get('command', '?')} (host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
        f"since {holder.get('since', '?')})"
    )


def acquire(directory: str, prog: str, log=None) -> None:
    """Takes `directory`'s lock for this process (creating the directory); no-op for URLs.

    Raises:
      Locked: a live process holds it.
    """
    if "://" in directory:
        return
    key = os.path.realpath(directory)
    if key in _held:
        return
    os.makedirs(key, exist_ok=True)
    path = os.path.join(key, LOCK_FILE)
    me = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "start": _start_time(os.getpid()),
        "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join([prog, *sys.argv[1:]])[:300],
    }
    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(path) as f:
                    holder = json.load(f)
            except (OSError, ValueError):
                holder = {}  # being written right now, or cut short by a kill
                time.sleep(0.2)
                with contextlib.suppress(OSError, ValueError), open(path) as f:
                    holder = json.load(f)
            mine = holder.get("host") == me["host"] and holder.get("pid") == me["pid"]
            if mine:  # this process' own lock (a copied directory, an earlier call): keep it
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                continue
            if holder and _alive(holder):
                raise Locked(
                    f"{directory} is in use by {describe(holder)}: wait for it to end or stop it"
                ) from None
            note = f"{prog}: taking over the lock of {directory} left by {describe(holder)}, which ended"
            (log or _stderr)(note)
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        _held[key] = path
        return
    raise Locked(f"{directory}: could not take its lock {path}")


def release(directory: str) -> None:
    """Gives up this process' lock of `directory` (no-op when it holds none)."""
    path = _held.pop(os.path.realpath(directory), None) if "://" not in directory else None
    if path:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def release_all() -> None:
    """Gives up every lock this process holds."""
    for key in list(_held):
        release(key)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


atexit.register(release_all)
