"""Tests of model/cache.py and model/epoch_order.py: one decoded cache per dataset shared by every fold and
process, a fresh random order every epoch, exact worker splits, housekeeping, never trusted half-done."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import schemas
from model import cache as cache_lib
from model import data as data_lib
from model import epoch_order, train
from model.config import ConfigError, DataConfig
from tests.fixtures import sigkill_when
from tests.test_data import write_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _fresh_process_memo():
    """Each make_dataset call below stands for a new process unless the test says otherwise."""
    data_lib._STORES.clear()
    yield
    data_lib._STORES.clear()


def _images(ds, batches: int) -> list[bytes]:
    return [img.tobytes() for images, _ in ds.take(batches) for img in images.numpy()]


def _caches(cache_dir: str) -> list[str]:
    return sorted(n for n in os.listdir(cache_dir) if n.startswith("hpa-cache-") and "." not in n)


def test_one_decode_serves_every_fold_and_other_data_is_evicted(tmp_path, capsys):
    data_dir, cache_dir = str(tmp_path / "data"), str(tmp_path / "cache")
    samples = write_dataset(data_dir, per_fold=(6, 5, 5), seed=1)
    cfg = DataConfig(batch_size=4, cache=cache_dir, seed=0, deterministic=True)
    by_fold = {f: {v["image"].tobytes() for v in samples.values() if v["fold"] == f} for f in range(3)}

    # "fold 0's run": trains on folds 1, 2, validates on 0: every fold decoded once, into one cache.
    served = _images(data_lib.make_dataset(data_dir, [1, 2], cfg, training=True, steps_per_epoch=2), 2)
    assert set(served) <= by_fold[1] | by_fold[2] and len(set(served)) == 8
    val = data_lib.make_eval_dataset(data_dir, [0], cfg, cached=True)
    plain = data_lib.make_eval_dataset(data_dir, [0], DataConfig(batch_size=4))
    assert _images(val, 99) == _images(plain, 99)  # the uncached pipeline's order
    out = capsys.readouterr().out
    assert out.count("decoding 16 samples of every fold once") == 1
    (key,) = _caches(cache_dir)

    # "fold 1's run", a new process: nothing decoded (the shards are even unreadable now).
    data_lib._STORES.clear()
    for shard in data_lib.list_shards(data_dir, [0, 1, 2]):
        with open(shard, "r+b") as f:  # same size, other bytes
            f.write(b"\0" * 16)
    served = _images(data_lib.make_dataset(data_dir, [0, 2], cfg, training=True, steps_per_epoch=2), 2)
    assert set(served) <= by_fold[0] | by_fold[2]
    assert set(_images(data_lib.make_eval_dataset(data_dir, [1], cfg, cached=True), 99)) == by_fold[1]
    out = capsys.readouterr().out
    assert "reusing" in out and "decoding" not in out and _caches(cache_dir) == [key]

    # Rewritten data: a new cache; the old one (other data) removed with one line (--cache_keep 1).
    data_lib._STORES.clear()
    samples = write_dataset(data_dir, per_fold=(6, 5, 5), seed=2)
    served = _images(data_lib.make_dataset(data_dir, [0], cfg, training=True, steps_per_epoch=1), 1)
    assert set(served) <= {v["image"].tobytes() for v in samples.values() if v["fold"] == 0}
    out = capsys.readouterr().out
    assert f"removing {key}" in out and "of other data (--cache_keep 1)" in out
    (new_key,) = _caches(cache_dir)
    assert new_key != key
    # --cache_keep 2 keeps the newest other cache.
    data_lib._STORES.clear()
    write_dataset(data_dir, per_fold=(6, 5, 5), seed=3)
    keep2 = DataConfig(batch_size=4, cache=cache_dir, seed=0, cache_keep=2)
    data_lib.make_eval_dataset(data_dir, [0], keep2, cached=True)
    assert new_key in _caches(cache_dir) and len(_caches(cache_dir)) == 2
    lines = cache_lib.cache_info(cache_dir)
    assert sum("complete  16 samples of 16px" in line for line in lines) == 2


def test_epoch_orders_are_independent_uniform_permutations():
    pool = np.arange(1000, 3000)
    a, b = (epoch_order.epoch_order(pool, seed=7, epoch=e) for e in (0, 1))
    assert sorted(a) == sorted(b) == list(pool)  # every record exactly once per epoch
    np.testing.assert_array_equal(a, epoch_order.epoch_order(pool, seed=7, epoch=0))  # (seed, epoch) only
    rank_a, rank_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    position_a = np.empty(len(pool))
    position_a[a - 1000] = np.arange(len(pool))  # noqa: E702
    position_b = np.empty(len(pool))
    position_b[b - 1000] = np.arange(len(pool))  # noqa: E702
    rho = np.corrcoef(position_a, position_b)[0, 1]
    assert abs(rho) < 4 / np.sqrt(len(pool)), rho  # 4 standard errors of independent draws
    assert np.corrcoef(rank_a, rank_b)[0, 1] != 1.0
    # A longer epoch continues with another permutation; a shorter one takes a prefix.
    long = epoch_order.epoch_order(pool, 7, 0, length=5000)
    assert np.bincount(long - 1000).max() == 3 and sorted(long[:2000]) == list(pool)
    # Oversampling: factor 2.5 repeats a record 2 or 3 times (about half each), others once.
    factors = np.where(pool % 10 == 0, 2.5, 1.0)
    over = epoch_order.epoch_order(pool, 7, 3, factors=factors)
    copies = np.bincount(over - 1000, minlength=len(pool))
    assert set(copies[pool % 10 != 0]) == {1} and set(copies[pool % 10 == 0]) == {2, 3}
    assert 0.35 < np.mean(copies[pool % 10 == 0] == 3) < 0.65
    # Workers: disjoint contiguous parts that cover the epoch.
    parts = [epoch_order.worker_part(a, w, 4) for w in range(4)]
    np.testing.assert_array_equal(np.concatenate(parts), a)
    with pytest.raises(ValueError, match="do not split evenly"):
        epoch_order.worker_part(a[:-1], 0, 4)


def test_cached_epochs_hold_each_record_once_and_a_resume_gets_the_same_order(tmp_path):
    data_dir = str(tmp_path / "data")
    samples = write_dataset(data_dir, per_fold=(12, 4))
    fold0 = {v["image"].tobytes() for v in samples.values() if v["fold"] == 0}
    cfg = DataConfig(batch_size=4, cache=str(tmp_path / "cache"), seed=3, deterministic=True)

    def epochs(initial: int, n: int) -> list[list[bytes]]:
        ds = data_lib.make_dataset(
            data_dir, [0], cfg, training=True, initial_epoch=initial, steps_per_epoch=3
        )
        served = _images(ds, 3 * n)
        return [served[i * 12 : (i + 1) * 12] for i in range(n)]

    run = epochs(0, 4)
    for epoch in run:
        assert sorted(epoch) == sorted(fold0)  # every record once per epoch
    assert len({tuple(e) for e in run}) == 4  # a new order each epoch
    assert epochs(2, 2) == run[2:]  # resumed at epoch 2: epochs 2 and 3 as the uninterrupted run read them
    # --cache memory: the same layout and order, in this process's memory.
    memory = DataConfig(batch_size=4, cache="memory", seed=3, deterministic=True)
    ds = data_lib.make_dataset(data_dir, [0], memory, training=True, steps_per_epoch=3)
    assert _images(ds, 3) == run[0]


def test_workers_read_disjoint_parts_of_one_epoch_order(tmp_path):
    data_dir = str(tmp_path / "data")
    write_dataset(data_dir, per_fold=(16, 4))
    cfg = DataConfig(batch_size=4, cache=str(tmp_path / "cache"), seed=5)
    single = _images(data_lib.make_dataset(data_dir, [0], cfg, training=True, steps_per_epoch=4), 4)
    parts = []
    for w in range(2):
        split = data_lib.WorkerSplit(index=w, count=2, replicas=2)
        assert data_lib.training_shard_policy(cfg, 4, split) == "OFF"
        ds = data_lib.make_dataset(data_dir, [0], cfg, training=True, steps_per_epoch=4, split=split)
        parts.append(_images(ds, 2))  # one epoch: 4 global steps x 2 records per worker and step
    # Disjoint, together exactly the epoch's records (each worker's per-replica pieces are read sorted,
    # one device's whole batches).
    assert not set(parts[0]) & set(parts[1]) and sorted(parts[0] + parts[1]) == sorted(single)
    odd = data_lib.WorkerSplit(index=0, count=2, replicas=2)
    assert data_lib.training_shard_policy(DataConfig(batch_size=3, cache="memory"), 4, odd) == "DATA"


def test_a_workers_part_that_leaves_a_partial_batch_keeps_epochs_apart_and_resumes_exactly(tmp_path):
    """3 steps of global batch 4 over 2 workers: each worker's part of an epoch is 6 records, so its third
    batch of 4 holds 2 records of the next epoch. tf.distribute hands a worker's batch out in per-replica
    pieces of 2, one a step, in order (tests/test_workers.py checks that over two workers)."""
    data_dir = str(tmp_path / "data")
    samples = write_dataset(data_dir, per_fold=(12, 4))
    fold0 = sorted(v["image"].tobytes() for v in samples.values() if v["fold"] == 0)
    cfg = DataConfig(batch_size=4, cache="memory", seed=3, deterministic=True)

    def steps(worker: int, initial: int, epochs: int) -> list[bytes]:
        split = data_lib.WorkerSplit(index=worker, count=2, replicas=2)
        ds = data_lib.make_dataset(
            data_dir, [0], cfg, training=True, initial_epoch=initial, steps_per_epoch=3, split=split
        )
        return _images(ds, -(-epochs * 6 // 4))[: epochs * 6]  # the pieces the worker's steps take

    runs = [steps(w, 0, 3) for w in range(2)]
    for e in range(3):
        parts = [r[e * 6 : (e + 1) * 6] for r in runs]
        assert sorted(parts[0] + parts[1]) == fold0, e  # every record once in each epoch
    for w in range(2):
        assert steps(w, 1, 2) == runs[w][6:]  # resumed after epoch 1: what the uninterrupted run read


_FILL = """
import sys, time
import numpy as np
from model import cache
n, delay = int(sys.argv[2]), float(sys.argv[3])
def source():
    for i in range(0, n, 2):
        time.sleep(delay)
        yield (np.full((2, 4, 4, 4), i, np.uint8), np.zeros((2, 28)), np.zeros(2), np.array([b"a", b"b"]))
store = cache.dir_store(sys.argv[1], {"data": "x"}, n, 4, source)
assert sorted(set(store.images[:, 0, 0, 0].tolist())) == list(range(0, n, 2))
print("read", len(store.images), flush=True)
"""


def _fill(cache_dir: str, n: int, delay: float, log: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT)
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-c", _FILL, cache_dir, str(n), str(delay)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def test_two_processes_share_one_fill_and_a_killed_fill_is_taken_over(tmp_path):
    cache_dir = str(tmp_path / "cache")
    key = cache_lib.cache_key({"data": "x"})
    logs = [str(tmp_path / f"p{i}.log") for i in range(3)]
    first = _fill(cache_dir, 40, 0.1, logs[0])
    assert sigkill_when(
        first, lambda: os.path.exists(os.path.join(cache_dir, key + ".partial", "images.npy"))
    )
    assert first.returncode == -signal.SIGKILL
    assert cache_lib.complete_path(cache_dir, key) is None  # nothing looks complete

    procs = [_fill(cache_dir, 40, 0.05, logs[1])]
    time.sleep(0.5)
    procs.append(_fill(cache_dir, 40, 0.05, logs[2]))
    for p in procs:
        assert p.wait(timeout=120) == 0
    outs = [open(log).read() for log in logs[1:]]
    both = "".join(outs)
    assert both.count("decoding 40 samples") == 1, both  # one fill ...
    assert "taking over" in both and "did not finish" in both  # ... which took over the killed one
    assert "waiting for it" in both and "filled by another process" in both  # the other waited, then read
    assert all("read 40" in o for o in outs)
    assert sorted(os.listdir(cache_dir)) == [key, key + ".lock"]


def test_other_format_versions_are_rebuilt_with_a_message(tmp_path, capsys):
    data_dir, cache_dir = str(tmp_path / "data"), str(tmp_path / "cache")
    write_dataset(data_dir, per_fold=(4, 4))
    cfg = DataConfig(batch_size=4, cache=cache_dir)
    data_lib.make_eval_dataset(data_dir, [0], cfg, cached=True)
    (key,) = _caches(cache_dir)
    meta_path = os.path.join(cache_dir, key, "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    with open(meta_path, "w") as f:
        json.dump({**meta, "format": 99}, f)
    old = os.path.join(cache_dir, "folds0_1-0123456789abcdef0123")  # format 1 (tf.data snapshots)
    os.makedirs(old)
    mine = os.path.join(cache_dir, "notes")  # not ours: never touched
    os.makedirs(mine)
    data_lib._STORES.clear()
    capsys.readouterr()
    val = data_lib.make_eval_dataset(data_dir, [1], cfg, cached=True)
    assert len(_images(val, 9)) == 4
    out = capsys.readouterr().out
    assert "another version of the cache format (99); rebuilt" in out
    assert "removing folds0_1-0123456789abcdef0123: written by another version of the cache format" in out
    assert not os.path.exists(old) and os.path.isdir(mine)
    assert cache_lib.complete_path(cache_dir, key)


def test_cache_info_lists_the_folder_and_room_is_checked_for_the_whole_dataset(tmp_path, monkeypatch, capsys):
    data_dir, cache_dir = str(tmp_path / "data"), str(tmp_path / "cache")
    write_dataset(data_dir, per_fold=(6, 5))
    manifest = schemas.read_manifest(data_dir)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")

    def check(cache):
        data_lib.check_cache_room(DataConfig(cache=cache), data_dir, manifest)

    with pytest.raises(ConfigError, match="cannot write there"):
        check(str(blocker / "cache"))
    monkeypatch.setattr(cache_lib, "free_disk", lambda path: 1000)
    with pytest.raises(
        ConfigError, match=r"whole dataset \(every fold\) needs 11 samples x 16 x 16 x 4 bytes"
    ):
        check(cache_dir)
    monkeypatch.setattr(cache_lib, "available_memory", lambda: 1000)
    with pytest.raises(ConfigError, match=r"--cache memory needs 11 samples .* use --cache DIR"):
        check("memory")
    with pytest.raises(ConfigError, match="local disk"):
        check("gs://bucket/cache")
    check("none")
    monkeypatch.undo()
    data_lib.make_eval_dataset(data_dir, [0], DataConfig(cache=cache_dir), cached=True)
    monkeypatch.setattr(cache_lib, "free_disk", lambda path: 1000)
    check(cache_dir)  # complete already: no room needed
    monkeypatch.undo()
    capsys.readouterr()
    assert train.main(["--cache", cache_dir, "--cache_info"]) == 0
    out = capsys.readouterr().out
    assert "complete  11 samples of 16px  records per fold 0:6 1:5" in out and "1 folder(s)" in out
    assert train.main(["--cache", "memory", "--cache_info"]) == 2
    assert cache_lib.cache_bytes(31072, 512) == 31072 * 2**20


_WORKER = """
import hashlib, json, sys
from model import devices as devices_lib
dev = devices_lib.setup("multiworker", "off", "float32", None, "small", False)
from model import data as data_lib
from model.config import DataConfig
data_dir, cache, out = sys.argv[1:4]
cfg = DataConfig(batch_size=4, cache=cache, seed=1)
split = data_lib.worker_split(dev.cluster, dev.strategy.num_replicas_in_sync)
train = data_lib.make_dataset(data_dir, [1, 2], cfg, training=True, steps_per_epoch=4, split=split)
train = devices_lib.shard_by(train, data_lib.training_shard_policy(cfg, 4, split))
val = devices_lib.shard_by(data_lib.make_eval_dataset(data_dir, [0], cfg, cached=True), "DATA")
def served(ds, steps):  # what each step hands this worker's replicas, as the trainer's loop gets it
    it = iter(dev.strategy.experimental_distribute_dataset(ds))
    rows = []
    for _ in range(steps):
        parts = dev.strategy.experimental_local_results(next(it)[0])
        rows.append([hashlib.md5(x.tobytes()).hexdigest() for t in parts for x in t.numpy()])
    return rows
with open(out, "w") as f:
    json.dump({"train": served(train, 8), "val": served(val, 2)}, f)
"""


@pytest.mark.slow
def test_two_loopback_workers_split_each_epoch_and_the_validation_fold_exactly(tmp_path):
    import hashlib

    from tests import loopback

    data_dir, cache_dir = str(tmp_path / "data"), str(tmp_path / "cache")
    samples = write_dataset(data_dir, per_fold=(7, 8, 8))  # validation: 7 records = batches of 4 and 3
    digest = {sid: hashlib.md5(v["image"].tobytes()).hexdigest() for sid, v in samples.items()}
    train_set = sorted(digest[s] for s, v in samples.items() if v["fold"] != 0)
    val_set = sorted(digest[s] for s, v in samples.items() if v["fold"] == 0)
    outs = [str(tmp_path / f"w{i}.json") for i in range(2)]
    procs = [
        loopback.start(
            [sys.executable, "-c", _WORKER, data_dir, cache_dir, outs[i]],
            loopback.env(conf),
            str(tmp_path / f"w{i}.log"),
        )
        for i, conf in enumerate(loopback.cluster_configs(loopback.free_ports(2)))
    ]
    outcomes = loopback.finish(procs, 600)
    assert all(o.returncode == 0 for o in outcomes), loopback.report(outcomes)
    assert sum("decoding 23 samples" in o.log for o in outcomes) == 1  # one host, one fill
    got = []
    for out in outs:
        with open(out) as f:
            got.append(json.load(f))
    for epoch in range(2):  # 4 global steps of 4 records: the 16 training records, each exactly once
        steps = range(4 * epoch, 4 * epoch + 4)
        served = [h for w in got for s in steps for h in w["train"][s]]
        assert sorted(served) == train_set
        assert all(len(w["train"][s]) == 2 for w in got for s in steps)  # 2 per worker and step
    val_served = [h for w in got for step in w["val"] for h in step]
    assert sorted(val_served) == val_set  # every validation record scored once over both workers


def test_hpa_folds_checks_room_for_the_whole_dataset_once_before_the_first_fold(
    tmp_path, monkeypatch, capsys
):
    from model import cv

    data_dir, out, cache_dir = str(tmp_path / "data"), str(tmp_path / "cv"), str(tmp_path / "cache")
    write_dataset(data_dir, per_fold=(6, 5, 5))
    checked = []
    monkeypatch.setattr(cache_lib, "free_disk", lambda path: checked.append(path) or 1000)
    argv = ["--data_dir", data_dir, "--out", out, "--backbone", "small", "--weights", "none"]
    assert cv.main([*argv, "--cache", cache_dir]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hpa-folds: error: --cache ") and "\n" not in err
    assert (
        "the cache of the whole dataset (every fold) needs 16 samples" in err
        and "the disk has 0.0 GiB" in err
    )
    assert checked == [cache_dir] and not os.path.exists(out)  # once, before any fold
