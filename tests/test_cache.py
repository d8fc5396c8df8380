"""Tests of model/cache.py: decoded-stain caches reused, rebuilt for other data, never trusted half-done."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import tensorflow as tf

import schemas
from model import cache as cache_lib
from model import data as data_lib
from model.config import ConfigError, DataConfig
from tests.fixtures import sigkill_when
from tests.test_data import write_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _served(ds, batches: int) -> list[bytes]:
    return [img.tobytes() for images, _ in ds.take(batches) for img in images.numpy()]


def test_dir_cache_is_reused_for_the_same_data_and_rebuilt_for_changed_data(tmp_path, capsys):
    data_dir, cache_dir = str(tmp_path / "data"), str(tmp_path / "cache")
    samples = write_dataset(data_dir, per_fold=(6, 5), seed=1)
    cfg = DataConfig(batch_size=4, shuffle_buffer=4, cache=cache_dir, seed=0, deterministic=True)
    stored = {v["image"].tobytes() for v in samples.values() if v["fold"] == 0}
    served = _served(data_lib.make_dataset(data_dir, [0], cfg, training=True), 8)
    assert set(served) == stored  # every stored image, decoded exactly, and nothing else
    out = capsys.readouterr().out
    assert "decoding 6 samples once" in out and "reusing" not in out
    (built,) = [n for n in os.listdir(cache_dir) if n.startswith("folds0-")]

    # Same data: the complete cache is read, nothing decoded again (the shards may even be gone).
    for shard in data_lib.list_shards(data_dir, [0]):
        with open(shard, "r+b") as f:  # same size, other bytes: only the cache can serve the images now
            f.write(b"\0" * 16)
    served = _served(data_lib.make_dataset(data_dir, [0], cfg, training=True), 8)
    assert set(served) == stored and "reusing" in capsys.readouterr().out
    # Validation reads its own cache entry, in the order of the uncached evaluation pipeline.
    val = data_lib.make_eval_dataset(data_dir, [1], cfg, cached=True)
    plain = data_lib.make_eval_dataset(data_dir, [1], DataConfig(batch_size=4))
    assert len(os.listdir(cache_dir)) == 2
    assert _served(val, 99) == _served(plain, 99)

    # Rewritten data (a new preprocessing run): a new key, a message, the new images.
    samples = write_dataset(data_dir, per_fold=(6, 5), seed=2)
    served = _served(data_lib.make_dataset(data_dir, [0], cfg, training=True), 8)
    assert set(served) == {v["image"].tobytes() for v in samples.values() if v["fold"] == 0}
    out = capsys.readouterr().out
    assert f"holds {built} of other data" in out and "decoding 6 samples once" in out


_FILL_SLOWLY = """
import sys, time
import tensorflow as tf
from model import cache
def slow(i):
    tf.py_function(lambda: time.sleep(0.05), [], [])
    return tf.fill([4, 4, 4], tf.cast(i, tf.uint8)), tf.zeros([28])
ds = tf.data.Dataset.range(400).map(slow)
cache.fill_dir_cache(ds, sys.argv[1], "folds0-abc", 400)
"""


def test_a_killed_cache_build_is_never_trusted(tmp_path, capsys):
    cache_dir = str(tmp_path / "cache")
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.Popen([sys.executable, "-c", _FILL_SLOWLY, cache_dir], cwd=ROOT, env=env)

    def some_written() -> bool:
        partial = [n for n in os.listdir(cache_dir) if ".partial-" in n] if os.path.isdir(cache_dir) else []
        if partial and any(files for _, _, files in os.walk(os.path.join(cache_dir, partial[0]))):
            time.sleep(0.5)  # some elements written, far from all 400
            return True
        return False

    killed = sigkill_when(proc, some_written, poll=0.05)
    assert killed and proc.returncode == -signal.SIGKILL, "the build was not killed while writing"
    assert cache_lib.complete_path(cache_dir, "folds0-abc") is None  # nothing looks complete

    ds = tf.data.Dataset.range(10).map(lambda i: (tf.fill([4, 4, 4], tf.cast(i, tf.uint8)), tf.zeros([28])))
    path = cache_lib.fill_dir_cache(ds, cache_dir, "folds0-abc", 10)
    out = capsys.readouterr().out
    assert "half-written" in out and "decoding 10 samples once" in out
    assert os.listdir(cache_dir) == ["folds0-abc"]
    loaded = cache_lib.load_dir_cache(path, seed=0).as_numpy_iterator()
    values = sorted(int(img[0, 0, 0]) for img, _ in loaded)
    assert values == list(range(10))


def test_bad_cache_places_fail_before_any_work(tmp_path, monkeypatch):
    data_dir = str(tmp_path / "data")
    write_dataset(data_dir, per_fold=(6, 5))
    manifest = schemas.read_manifest(data_dir)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")

    def check(cache):
        data_lib.check_cache_room(DataConfig(cache=cache), data_dir, manifest, [[0], [1]])

    with pytest.raises(ConfigError, match="cannot write there"):
        check(str(blocker / "cache"))
    monkeypatch.setattr(cache_lib, "free_disk", lambda path: 1000)
    with pytest.raises(ConfigError, match=r"11 samples x 16 x 16 x 4 bytes = 0.0 GiB but the disk has"):
        check(str(tmp_path / "cache"))
    monkeypatch.setattr(cache_lib, "available_memory", lambda: 1000)
    with pytest.raises(ConfigError, match=r"--cache memory needs 11 samples .* use --cache DIR"):
        check("memory")
    with pytest.raises(ConfigError, match="local disk"):
        check("gs://bucket/cache")
    check("none")
    assert cache_lib.cache_bytes(31072, 512) == 31072 * 2**20


def test_memory_cache_serves_every_record_in_a_new_order_each_pass(tmp_path):
    data_dir = str(tmp_path / "data")
    samples = write_dataset(data_dir, per_fold=(16,))
    cfg = DataConfig(batch_size=8, shuffle_buffer=16, cache="memory", seed=0)
    served = _served(data_lib.make_dataset(data_dir, [0], cfg, training=True), 8)
    passes = [served[i : i + 16] for i in range(0, 48, 16)]
    assert set(served) == {v["image"].tobytes() for v in samples.values()}
    assert len({tuple(p) for p in passes}) > 1  # the epochs differ in order
