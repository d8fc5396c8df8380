"""Progress of a local run: workers write small count files, a launcher thread prints their totals.

Each DoFn instance that does long per-sample work owns one `ProgressFile` (a JSON file named after its phase
and a random token); `Progress` sums the files of every phase every few seconds and prints one line.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid


class ProgressFile:
    """Counts of one worker's DoFn instance, written at most every `interval` seconds (and on flush)."""

    def __init__(self, progress_dir: str | None, phase: str, interval: float = 2.0):
        self._path = os.path.join(progress_dir, f"{phase}-{uuid.uuid4().hex}.json") if progress_dir else None
        self._interval = interval
        self._last = 0.0
        self.done = self.rejected = 0

    def add(self, done: int = 0, rejected: int = 0) -> None:
        self.done += done
        self.rejected += rejected
        if self._path and time.monotonic() - self._last > self._interval:
            self.flush()

    def flush(self) -> None:
        if self._path is None:
            return
        with open(self._path + ".tmp", "w") as f:
            json.dump({"done": self.done, "rejected": self.rejected}, f)
        os.replace(self._path + ".tmp", self._path)
        self._last = time.monotonic()


def read_counts(progress_dir: str) -> dict[str, tuple[int, int]]:
    """Phase -> (done, rejected), summed over the progress files."""
    out: dict[str, tuple[int, int]] = {}
    for name in os.listdir(progress_dir) if os.path.isdir(progress_dir) else []:
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(progress_dir, name)) as f:
                d = json.load(f)
        except (OSError, ValueError):
            continue
        phase = name.rsplit("-", 1)[0]
        done, rejected = out.get(phase, (0, 0))
        out[phase] = (done + d["done"], rejected + d["rejected"])
    return out


class Progress:
    """Prints, every `interval` seconds, each phase's done/total, rejections and rate (a context manager)."""

    def __init__(self, progress_dir: str, total: int, interval: float, phases: tuple[str, ...], prog: str):
        self._dir, self._total, self._interval = progress_dir, total, interval
        self._phases, self._prog = phases, prog
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def line(self) -> str:
        counts = read_counts(self._dir)
        elapsed = time.monotonic() - self._t0
        parts = []
        for phase in self._phases:
            done, rejected = counts.get(phase, (0, 0))
            n = done + rejected
            pct = 100.0 * n / self._total if self._total else 100.0
            parts.append(f"{phase} {n}/{self._total} ({pct:.0f}%, {rejected} rejected)")
        total_work = sum(sum(counts.get(p, (0, 0))) for p in self._phases)
        rate = total_work / max(elapsed, 1e-9)
        return f"{self._prog}: {', '.join(parts)}, {rate:.1f} samples/s, {elapsed:.0f} s"

    def _run(self):
        while not self._stop.wait(self._interval):
            print(self.line(), file=sys.stderr, flush=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
