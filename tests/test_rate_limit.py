"""The download job's job-wide request rate, shared Retry-After pauses and --dry_run (rate_limit)."""

from __future__ import annotations

import os
import threading

import pytest

import schemas
from pipelines import download, rate_limit
from tests.image_server import ImageServer, status
from tests.test_download import FAST, write_labels


class FakeClock:
    """A clock that only moves when someone sleeps (thread-safe)."""

    def __init__(self):
        self.now = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


def test_requests_are_spaced_at_the_rate_and_a_pause_holds_everyone():
    clock = FakeClock()
    rate = rate_limit.RequestRate(4.0, clock=clock, sleep=clock.sleep)
    starts = []
    for _ in range(5):
        rate.acquire()
        starts.append(clock())
    assert starts == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    rate.pause(3.0)  # a Retry-After seen by one request
    assert rate.acquire() == pytest.approx(3.0) and clock() == pytest.approx(4.0)
    unlimited = rate_limit.RequestRate(None, clock=clock, sleep=clock.sleep)
    assert [unlimited.acquire() for _ in range(3)] == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        rate_limit.RequestRate(0)


def test_threads_share_one_rate():
    rate = rate_limit.RequestRate(50.0)
    starts, lock = [], threading.Lock()

    def worker():
        for _ in range(5):
            rate.acquire()
            with lock:
                starts.append(rate._clock())

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    starts.sort()
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert (
        len(starts) == 20 and min(gaps) >= 0.02 * 0.99
    )  # 20 requests of 4 threads, never closer than 1/50 s


@pytest.mark.parametrize(
    "flags, processes",
    [
        ([], 1),
        (["--direct_num_workers", "3"], 3),
        (["--runner", "DataflowRunner", "--max_num_workers", "10", "--machine_type", "n2-standard-4"], 40),
        (
            ["--runner", "DataflowRunner", "--max_num_workers", "10", "--machine_type", "n2-standard-4"]
            + ["--experiments", "no_use_multiple_sdk_containers"],
            10,
        ),
        (["--runner", "DataflowRunner", "--num_workers", "5"], 5),
        (["--runner", "PortableRunner", "--max_num_workers", "2"], 2),
    ],
)
def test_the_job_rate_is_split_among_its_processes(flags, processes):
    assert rate_limit.processes_of_job(flags)[0] == processes
    remote = ["--temp_location", "gs://b/t", "--sdk_container_image", "img"]
    argv = ["--labels_csv", "gs://b/x.csv", "--output_dir", "gs://b/o", "--max_requests_per_second", "80"]
    cfg, _ = download.parse_args([*argv, *flags, *remote])
    assert cfg.process_rate == pytest.approx(80 / processes)


def _starts(server: ImageServer) -> list[float]:
    return sorted(start for start, _ in server.times)


def test_the_job_keeps_to_its_rate_and_a_retry_after_pauses_every_request(tmp_path):
    ids = [f"{k}_1610_C1_1" for k in range(3)]
    labels = write_labels(str(tmp_path / "labels.csv"), ids)
    with ImageServer() as server:
        for k, sid in enumerate(ids):
            server.add_sample(sid, seed=k)
        summary = download.run(
            [
                "--labels_csv",
                labels,
                "--output_dir",
                str(tmp_path / "a"),
                "--base_url",
                server.base_url,
                "--max_requests_per_second",
                "20",
                "--concurrency",
                "8",
                *FAST,
            ]
        )
        assert summary["by_status"] == {download.DOWNLOADED: 12}
        starts = _starts(server)
        # turns are 1/20 s apart on the client; the server sees them with some jitter, so the span
        assert starts[-1] - starts[0] >= 11 * 0.05 * 0.9  # 8 in flight would take a few ms without the rate

    with ImageServer() as server:
        for k, sid in enumerate(ids):
            server.add_sample(sid, seed=k)
        server.first = status(503, retry_after=1)  # the first request, whichever it is
        download.run(
            [
                "--labels_csv",
                labels,
                "--output_dir",
                str(tmp_path / "b"),
                "--base_url",
                server.base_url,
                "--concurrency",
                "4",
                *FAST,
                "--backoff",
                "0.01",
                "--backoff_max",
                "5",
            ]
        )
        t_refused = server.first_answered
        starts = [start - t_refused for start, _ in server.times if start > t_refused]
        # Requests already past their turn when the 503 came may still start (4 in flight, a 0.2 s grace
        # for a loaded machine); then none until the pause ends, and the others (11 first attempts, at most
        # 3 of them in flight, and the retry) after it.
        assert not [t for t in starts if 0.2 <= t < 0.95], starts
        assert len([t for t in starts if t >= 0.95]) >= 12 - 4, starts
        assert len(server.log) == 13


def test_dry_run_sends_nothing_and_prints_requests_bytes_and_time(tmp_path, capsys):
    ids = [f"{k}_1610_C1_1" for k in range(5)]
    labels = write_labels(str(tmp_path / "labels.csv"), ids)
    out = tmp_path / "out"
    out.mkdir()
    (out / f"{ids[0]}_red.jpg").write_bytes(b"x" * 1000)  # one stain present: measured, not requested
    with ImageServer() as server:
        summary = download.run(
            [
                "--labels_csv",
                labels,
                "--output_dir",
                str(out),
                "--base_url",
                server.base_url,
                "--max_requests_per_second",
                "2",
                "--dry_run",
            ]
        )
        assert server.log == []
    assert summary["requests"] == 5 * schemas.NUM_STAINS - 1 and summary["bytes"] == 19 * 1000
    assert summary["seconds_at_rate"] == pytest.approx(19 / 2)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "dry run: 19 requests" in line and "nothing sent" in line
    assert sorted(os.listdir(out)) == [f"{ids[0]}_red.jpg"]  # nothing written
