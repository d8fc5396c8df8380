"""A job-wide request rate for the download job, split among the processes that send requests.

`--max_requests_per_second R` is the rate the image server sees from the whole job. Each SDK process holds
one `RequestRate` (shared by all its DoFn instances and their threads, `shared_rate`) allowing
R / (processes of the job) requests per second, so the job cannot exceed R however many DoFn instances a
process runs. The processes are counted from the options (`processes_of_job`):

- Dataflow: --max_num_workers (else --num_workers, else 1) workers x SDK processes per worker, which is one
  per vCPU of --machine_type (`n2-standard-4` -> 4) unless the `no_use_multiple_sdk_containers` experiment
  is given;
- a local run: --direct_num_workers processes (or threads: one process, then one share per thread would be
  too strict, so it counts the DirectRunner's workers either way);
- a portable runner: --max_num_workers (else 1) processes.

A `Retry-After` answer (429 or 503) pauses every request of the process (`pause`), not only the retry of the
one that got it. No Beam or network code here: a clock and a sleep are injectable for tests.
"""

from __future__ import annotations

import re
import threading
import time
from typing import Callable, Sequence


class RequestRate:
    """Spaces requests at least 1 / rate seconds apart (no bursts) and honours pauses; thread-safe."""

    def __init__(
        self,
        rate: float | None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if rate is not None and rate <= 0:
            raise ValueError(f"a request rate must be positive; got {rate}")
        self.interval = 0.0 if rate is None else 1.0 / rate
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next = float("-inf")
        self._paused_until = float("-inf")

    def acquire(self) -> float:
        """Waits for this caller's turn. Returns the seconds waited."""
        waited = 0.0
        while True:
            with self._lock:
                now = self._clock()
                start = max(now, self._next, self._paused_until)
                if start <= now:
                    self._next = now + self.interval
                    return waited
            self._sleep(start - now)  # another thread may take this turn: look again after the wait
            waited += start - now

    def pause(self, seconds: float) -> None:
        """No request of this process starts in the next `seconds` (a server's Retry-After)."""
        with self._lock:
            self._paused_until = max(self._paused_until, self._clock() + seconds)


_SHARED: dict[tuple, RequestRate] = {}
_SHARED_LOCK = threading.Lock()


def shared_rate(rate: float | None, key: str = "") -> RequestRate:
    """The process-wide RequestRate for `rate` (one per process and key: all DoFn instances share it)."""
    with _SHARED_LOCK:
        if (rate, key) not in _SHARED:
            _SHARED[(rate, key)] = RequestRate(rate)
        return _SHARED[(rate, key)]


def _vcpus(machine_type: str | None) -> int | None:
    match = re.search(r"-(\d+)$", machine_type or "")
    return int(match.group(1)) if match else None


def processes_of_job(beam_args: Sequence[str]) -> tuple[int, str]:
    """How many processes send requests at once, and how that was counted (see the module docstring)."""
    from apache_beam.options.pipeline_options import (
        DebugOptions,
        DirectOptions,
        PipelineOptions,
        StandardOptions,
        WorkerOptions,
    )

    from pipelines.beam_options import LOCAL_RUNNERS

    options = PipelineOptions(list(beam_args))
    runner = options.view_as(StandardOptions).runner
    if runner in LOCAL_RUNNERS:
        n = max(1, options.view_as(DirectOptions).direct_num_workers or 1)
        return n, f"{n} local worker(s)"
    worker = options.view_as(WorkerOptions)
    workers = worker.max_num_workers or worker.num_workers or 1
    if runner in ("DataflowRunner", "dataflow"):
        experiments = options.view_as(DebugOptions).experiments or []
        per_worker = 1
        if "no_use_multiple_sdk_containers" not in experiments:
            per_worker = _vcpus(worker.machine_type) or 1
        return workers * per_worker, f"{workers} worker(s) x {per_worker} SDK process(es)"
    return workers, f"{workers} worker(s)"


def dry_run_estimate(requests: int, rate: float | None, bytes_per_request: float) -> dict:
    """What a run would ask of the server: requests, bytes and the time at the job-wide rate."""
    return {
        "requests": requests,
        "bytes": int(requests * bytes_per_request),
        "seconds_at_rate": None if rate is None else requests / rate,
    }
