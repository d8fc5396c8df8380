"""Tests of model/fileio.py on local paths (gs:// goes through tf.io.gfile, covered by the emulator tests)."""

from __future__ import annotations

import os

import pytest

from model import fileio


def test_local_round_trip_and_directory_operations(tmp_path):
    root = str(tmp_path / "d")
    path = fileio.join(root, "sub", "a.txt")
    assert path == os.path.join(root, "sub", "a.txt") and not fileio.exists(path)
    fileio.write_text(path, "héllo\n")  # creates the parent directories
    assert fileio.read_text(path) == "héllo\n" and fileio.read_bytes(path) == "héllo\n".encode()
    fileio.write_bytes(fileio.join(root, "b.bin"), b"\x00\x01")
    assert fileio.listdir(root) == ["b.bin", "sub"]
    assert fileio.isdir(fileio.join(root, "sub")) and not fileio.isdir(fileio.join(root, "b.bin"))
    assert fileio.glob(fileio.join(root, "*", "*.txt")) == [path]
    assert fileio.local_copy(path) == path  # local files are used in place
    fileio.remove(fileio.join(root, "b.bin"))
    fileio.remove(fileio.join(root, "b.bin"))  # absent: no error
    fileio.rmtree(fileio.join(root, "sub"))
    fileio.rmtree(fileio.join(root, "sub"))
    assert fileio.listdir(root) == []
    with pytest.raises(FileNotFoundError):
        fileio.read_bytes(path)


def test_urls_join_with_slashes():
    assert fileio.is_remote("gs://b/x") and not fileio.is_remote("/tmp/x")
    assert fileio.join("gs://b/run", "workers", "worker_1") == "gs://b/run/workers/worker_1"
    assert fileio.dirname("gs://b/run/config.json") == "gs://b/run"
    assert fileio.basename("gs://b/run/config.json") == "config.json"
