"""Progress files of local runs (pipelines.progress_files)."""

from __future__ import annotations

import time

from pipelines import progress_files


def test_counts_of_all_workers_are_summed(tmp_path):
    a = progress_files.CounterFile(str(tmp_path), min_seconds=60)
    b = progress_files.CounterFile(str(tmp_path), min_seconds=60)
    a.update({"done": 2, "bytes": 10})
    b.update({"done": 3})
    a.update({"done": 5, "bytes": 50})  # too soon: not written
    assert progress_files.read_counts(str(tmp_path)) == {"done": 5, "bytes": 10}
    a.update({"done": 5, "bytes": 50}, force=True)
    assert progress_files.read_counts(str(tmp_path)) == {"done": 8, "bytes": 50}
    (tmp_path / "torn.json").write_text('{"done": ')  # a file being written is skipped
    assert progress_files.read_counts(str(tmp_path))["done"] == 8
    assert progress_files.read_counts(str(tmp_path / "missing")) == {}


def test_printer_prints_lines(tmp_path, capsys):
    progress_files.CounterFile(str(tmp_path)).update({"done": 4})
    with progress_files.Printer(str(tmp_path), 0.05, lambda c, s: f"job: {c['done']} done"):
        time.sleep(0.3)
    lines = capsys.readouterr().err.splitlines()
    assert lines and set(lines) == {"job: 4 done"}
