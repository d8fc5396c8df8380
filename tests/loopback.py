"""Clusters of worker processes on the loopback interface, for the multi-worker tests.

Each worker is a subprocess with its own TF_CONFIG naming every worker at 127.0.0.1 and a port the OS chose
free. A worker whose peer died waits forever in a collective op, so `run_cluster` polls them all, stops the
whole cluster (each worker's process group) as soon as one fails or the deadline passes, and returns every
worker's log for the failure message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POLL = 0.2  # seconds between two looks at the workers


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on the loopback interface."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def cluster_configs(ports: list[int]) -> list[dict]:
    """The TF_CONFIG of each worker of a cluster of workers (no chief: worker 0 leads)."""
    workers = [f"127.0.0.1:{p}" for p in ports]
    return [
        {"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}} for i in range(len(ports))
    ]


def env(tf_config: dict | None = None) -> dict:
    """The environment of a test subprocess: this checkout importable, TF quiet, TF_CONFIG as given."""
    out = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    out.pop("TF_CONFIG", None)
    if tf_config is not None:
        out["TF_CONFIG"] = json.dumps(tf_config)
    return out


def start(cmd: list[str], environment: dict, log_path: str) -> subprocess.Popen:
    """A subprocess in its own process group (so that it is stopped with its children), output to log_path."""
    log = open(log_path, "ab")  # noqa: SIM115 - closed by finish
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    proc.log = log
    proc.log_path = log_path
    return proc


def stop(proc: subprocess.Popen) -> None:
    """Kills the process's group (if it still runs) and reaps it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a worker ended: its exit status (None: stopped by the deadline) and its whole log."""

    returncode: int | None
    log: str

    def tail(self, chars: int = 3000) -> str:
        return self.log[-chars:]


def finish(procs: list[subprocess.Popen], timeout: float, stop_on_failure: bool = True) -> list[Outcome]:
    """Waits until every process has ended, polling; kills them all when `timeout` seconds pass or (with
    `stop_on_failure`) when one exits with an error (its peers would wait for it forever)."""
    deadline = time.monotonic() + timeout
    timed_out = set()
    try:
        while any(p.poll() is None for p in procs):
            failed = stop_on_failure and any(p.poll() not in (None, 0) for p in procs)
            if failed or time.monotonic() > deadline:
                timed_out = {id(p) for p in procs if p.poll() is None}
                break
            time.sleep(POLL)
    finally:
        for p in procs:
            stop(p)
            p.log.close()
    outcomes = []
    for p in procs:
        with open(p.log_path, errors="replace") as f:
            outcomes.append(Outcome(None if id(p) in timed_out else p.returncode, f.read()))
    return outcomes


def report(outcomes: list[Outcome]) -> str:
    """Every worker's exit status and log tail, for an assertion message."""
    return "\n".join(
        f"--- worker {i}: exit {_status(o.returncode)}\n{o.tail()}" for i, o in enumerate(outcomes)
    )


def _status(returncode: int | None) -> str:
    return "(killed: deadline or a failed peer)" if returncode is None else str(returncode)
