"""Progress of the preprocessing job's local runs, per phase, on the counter files of `progress_files`.

Each DoFn instance that does long per-sample work owns one `ProgressFile` (its done and rejected counts under
its phase's keys); `Progress` sums the files of every phase every few seconds and prints one line.
"""

from __future__ import annotations

import collections

from pipelines import progress_files


def _keys(phase: str) -> tuple[str, str]:
    return f"{phase}.done", f"{phase}.rejected"


class ProgressFile:
    """Counts of one worker's DoFn instance, written at most every `interval` seconds (and on flush)."""

    def __init__(self, progress_dir: str | None, phase: str, interval: float = 2.0):
        self._file = progress_files.CounterFile(progress_dir, interval) if progress_dir else None
        self._done_key, self._rejected_key = _keys(phase)
        self.done = self.rejected = 0

    def add(self, done: int = 0, rejected: int = 0) -> None:
        self.done += done
        self.rejected += rejected
        self._write(force=False)

    def flush(self) -> None:
        self._write(force=True)

    def _write(self, force: bool) -> None:
        if self._file is not None:
            self._file.update({self._done_key: self.done, self._rejected_key: self.rejected}, force=force)


class Progress(progress_files.Printer):
    """Prints, every `interval` seconds, each phase's done/total, rejections and rate (a context manager)."""

    def __init__(self, progress_dir: str, total: int, interval: float, phases: tuple[str, ...], prog: str):
        self._total, self._phases, self._prog = total, phases, prog
        super().__init__(progress_dir, interval, self._format)

    def _format(self, counts: collections.Counter, elapsed: float) -> str:
        parts = []
        total_work = 0
        for phase in self._phases:
            done_key, rejected_key = _keys(phase)
            rejected = counts[rejected_key]
            n = counts[done_key] + rejected
            total_work += n
            pct = 100.0 * n / self._total if self._total else 100.0
            parts.append(f"{phase} {n}/{self._total} ({pct:.0f}%, {rejected} rejected)")
        if total_work == 0:
            return f"{self._prog}: starting the Beam workers (loading TensorFlow), {elapsed:.0f} s"
        if total_work >= self._total * len(self._phases):
            return f"{self._prog}: every sample handled; Beam finishes its last steps, {elapsed:.0f} s"
        rate = total_work / max(elapsed, 1e-9)
        return f"{self._prog}: {', '.join(parts)}, {rate:.1f} samples/s, {elapsed:.0f} s"
