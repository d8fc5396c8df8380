"""Any dataset size on any number of replicas (MirroredStrategy over logical CPUs, one fresh process each):
validation sets leaving remainders 0, 1 and replicas - 1 of the global batch are scored exactly as on one
device; each replica draws its own augmentation; BatchNormalization's statistics are averaged over the
replicas. The training job's own remainder checks are in
test_train.py (batch sizes) and test_strategies.py (the issue's recipe end to end).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _checks(replicas: int) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_CONFIG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.replica_checks", str(replicas)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.mark.slow
@pytest.mark.parametrize("replicas", [2, 3])
def test_every_record_scored_once_and_each_replica_draws_its_own(replicas):
    out = _checks(replicas)
    assert sorted(out["evaluate"]) == sorted({"0", "1", str(replicas - 1), str(replicas)})
    batch = 2 * replicas
    for remainder, r in out["evaluate"].items():
        assert r["rows"] == r["records"] + (-r["records"] % batch), remainder  # full batches, pads < batch
        for metric in ("loss", "f1", "auc"):
            assert r["mirrored"][metric] == pytest.approx(r["single"][metric], rel=1e-4, abs=1e-6), (
                remainder,
                metric,
            )
    # Without the pads a replica gets an empty last batch, and the small backbone's BatchNorm fails.
    assert out["unpadded_error"] == "InvalidArgumentError"
    for step in out["draws"]:
        assert len(set(step)) == replicas, "two replicas drew the same transforms"
    assert out["draws"][0] != out["draws"][1]
    # Each replica updates its own BatchNormalization statistics; the callback makes them one again.
    assert out["statistics_copies"] == {"without": replicas, "with": 1}
