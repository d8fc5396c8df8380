"""Progress of a local Beam run: each DoFn instance writes its counts to a small JSON file in a local folder;
a thread of the launcher sums the files and prints a line every few seconds.

Beam's own metrics are only read after a local run ends, and workers of the multi-processing DirectRunner
are other processes: files work for both. Remote runs (Dataflow) show Beam counters in their console instead.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import threading
import time
import uuid
from typing import Callable, Mapping


class CounterFile:
    """The worker side: `update(counts)` rewrites this instance's file, at most every `min_seconds`."""

    def __init__(self, folder: str, min_seconds: float = 2.0):
        self._path = os.path.join(folder, uuid.uuid4().hex + ".json")
        self._min_seconds = min_seconds
        self._last = 0.0

    def update(self, counts: Mapping[str, int], force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self._min_seconds:
            return
        self._last = now
        with open(self._path + ".tmp", "w") as f:
            json.dump(dict(counts), f)
        os.replace(self._path + ".tmp", self._path)


def read_counts(folder: str) -> collections.Counter:
    """The sum of every worker's counts in `folder` (files being replaced are skipped this time)."""
    total = collections.Counter()
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if name.endswith(".json"):
            try:
                with open(os.path.join(folder, name)) as f:
                    total.update(json.load(f))
            except (OSError, ValueError):
                continue
    return total


class Printer:
    """The launcher side, a context manager: every `interval` seconds prints `line(counts, elapsed_s)`."""

    def __init__(self, folder: str, interval: float, line: Callable[[collections.Counter, float], str]):
        self._folder, self._interval, self._line = folder, interval, line
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            print(
                self._line(read_counts(self._folder), time.monotonic() - self._t0),
                file=sys.stderr,
                flush=True,
            )

    def __enter__(self) -> "Printer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
