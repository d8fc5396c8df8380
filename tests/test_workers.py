"""Any dataset size and per-replica augmentation over two workers on loopback (MultiWorkerMirroredStrategy).

Two clusters of two worker processes (TF_CONFIG, free ports on 127.0.0.1) run tests/worker_checks.py side by
side, `--deterministic --seed 5`, global batch 4 (2 per replica):
- run A, validation folds of 8, 9 and 11 records (remainders 0, 1 = replicas - 1, and 3 = batch - 1, a last
  batch that leaves one worker a single record), whose training folds hold 32, 31 and 29 (remainders 0, 3,
  1), with `--cache memory`; and the 11-record fold again with `--cache none` (records read from the shard
  files);
- run B, the first of those alone: the same draws and weights as run A (two runs, bit for bit).
The logical-CPU variants are in test_replicas.py; the training job end to end on two workers is in
test_strategies.py.
"""

from __future__ import annotations

import collections
import json
import math
import sys

import numpy as np
import pytest

from tests import loopback
from tests.test_data import write_dataset
from tests.worker_checks import GLOBAL_BATCH, fingerprint

PER_FOLD = (8, 9, 11, 12)
RUNS_A = "0:memory,1:memory,2:memory,2:none"
RUNS_B = "0:memory"
WORKERS = 2
TIMEOUT = 900  # seconds for a cluster on a loaded machine; it is polled and stopped at once if a worker fails

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster_runs(tmp_path_factory):
    """(samples, {"A": [worker 0's result, worker 1's], "B": [...]}) of the two clusters."""
    root = tmp_path_factory.mktemp("workers")
    data_dir = str(root / "data")
    samples = write_dataset(data_dir, per_fold=PER_FOLD)
    procs = {}
    for name, spec in (("A", RUNS_A), ("B", RUNS_B)):
        procs[name] = [
            loopback.start(
                [sys.executable, "-m", "tests.worker_checks", data_dir, str(root / f"{name}{i}"), spec],
                loopback.env(conf),
                str(root / f"{name}{i}.log"),
            )
            for i, conf in enumerate(loopback.cluster_configs(loopback.free_ports(WORKERS)))
        ]
    outcomes = loopback.finish(procs["A"] + procs["B"], TIMEOUT)
    if any(o.returncode != 0 for o in outcomes):
        pytest.fail("a worker failed (clusters A, B):\n" + loopback.report(outcomes))
    results = [
        json.loads([line for line in o.log.splitlines() if line.startswith("RESULT ")][-1][len("RESULT ") :])
        for o in outcomes
    ]
    return samples, {"A": results[:WORKERS], "B": results[WORKERS:]}


def _ids(samples: dict) -> dict[str, str]:
    """Image fingerprint -> record id; the blank image of a validation pad -> 'pad'."""
    ids = {fingerprint(s["image"]): sid for sid, s in samples.items()}
    assert len(ids) == len(samples)
    ids[fingerprint(np.zeros_like(next(iter(samples.values()))["image"]))] = "pad"
    return ids


def _runs(workers: list[dict]):
    """(worker 0's run, worker 1's run) of each run of a cluster."""
    assert [w["task"] for w in workers] == ["worker_0", "worker_1"]
    assert [w["replicas"] for w in workers] == [WORKERS, WORKERS]
    assert [w["local_replicas"] for w in workers] == [1, 1]
    return list(zip(workers[0]["runs"], workers[1]["runs"], strict=True))


def _check_full(steps: list[list[dict]]) -> None:
    """Every step hands each local replica a full per-replica batch."""
    for step in steps:
        assert [r["rows"] for r in step] == [GLOBAL_BATCH // WORKERS]
        assert len(step[0]["images"]) == GLOBAL_BATCH // WORKERS


def test_training_batches_are_full_and_an_epoch_sees_steps_x_batch_records(cluster_runs):
    samples, runs = cluster_runs
    ids = _ids(samples)
    for w0, w1 in _runs(runs["A"]):
        fold = w0["fold"]
        train_ids = {sid for sid, s in samples.items() if s["fold"] != fold}
        steps = (len(samples) - PER_FOLD[fold]) // GLOBAL_BATCH
        assert w0["steps"] == w1["steps"] == steps
        seen = []
        for w in (w0, w1):
            batches = w["train"]
            assert len(batches) == 2 * steps
            _check_full(batches)
            per_epoch = [
                [ids.get(f) for s in batches[e * steps : (e + 1) * steps] for f in s[0]["images"]]
                for e in range(2)
            ]
            seen.append(per_epoch)
        for epoch in range(2):
            both = seen[0][epoch] + seen[1][epoch]
            assert len(both) == steps * GLOBAL_BATCH  # the samples an epoch counts
            assert set(both) <= train_ids, (fold, set(both) - train_ids)  # no validation record, no unknown
            if w0["cache"] == "memory":  # a new permutation every epoch, split between the workers
                assert len(set(both)) == len(both), (fold, epoch, collections.Counter(both).most_common(3))
        if w0["cache"] == "none":  # each worker reads its own shard files (FILE sharding): no record in both
            assert not set(seen[0][0] + seen[0][1]) & set(seen[1][0] + seen[1][1])


def test_validation_scores_every_record_once_and_as_on_one_device(cluster_runs):
    samples, runs = cluster_runs
    ids = _ids(samples)
    for w0, w1 in _runs(runs["A"]):
        fold = w0["fold"]
        n = PER_FOLD[fold]
        val_ids = sorted(sid for sid, s in samples.items() if s["fold"] == fold)
        assert w0["validation_steps"] == math.ceil(n / GLOBAL_BATCH)
        scored = collections.Counter()
        for w in (w0, w1):
            batches = w["val"]
            assert len(batches) == w0["validation_steps"]  # the same number of steps on both workers
            _check_full(batches)
            for step in batches:
                for f, weight in zip(step[0]["images"], step[0]["weights"], strict=True):
                    sid = ids[f]
                    assert (weight == 0) == (sid == "pad"), (fold, sid, weight)
                    scored[sid] += 1
        pads = scored.pop("pad", 0)
        assert pads == -n % GLOBAL_BATCH
        assert sorted(scored.elements()) == val_ids, fold  # each record once, none missing
        # The chief's prediction (val_predictions.npz's rows) scores each record once, on one device.
        assert sorted(w0["predicted_ids"]) == val_ids and "predicted_ids" not in w1
        # One model on both workers (BatchNormalization's statistics averaged over the replicas) ...
        assert w0["weights"] == w1["weights"], [
            k for k in w0["weights"] if w0["weights"][k] != w1["weights"][k]
        ]
        # ... whose validation under the strategy is its score on one device over the unpadded fold.
        for w in (w0, w1):
            for metric in ("loss", "f1", "auc"):
                assert w["evaluate"][metric] == pytest.approx(w["single"][metric], rel=1e-4, abs=1e-6), (
                    fold,
                    w["task"],
                    metric,
                )
                assert w["fit"]["val_" + metric] == pytest.approx(w["evaluate"][metric], rel=1e-4, abs=1e-6)


def test_each_worker_draws_its_own_augmentation_reproducibly(cluster_runs):
    _, runs = cluster_runs
    a, b = runs["A"], runs["B"]
    for w in a:
        assert [len(step) for step in w["draws"]] == [1, 1]  # one replica per worker
        assert w["draws"][0] != w["draws"][1]  # a new draw each step
    for step in range(2):
        assert a[0]["draws"][step] != a[1]["draws"][step], "the two workers drew the same transforms"
    # Two deterministic runs: the same draws and, after the same training, bit-identical weights.
    for wa, wb in zip(a, b, strict=True):
        assert wa["draws"] == wb["draws"]
        assert wa["runs"][0]["weights"] == wb["runs"][0]["weights"]
