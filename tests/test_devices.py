"""Tests of model/devices.py: TF_CONFIG parsing, strategy / XLA / precision choices, bad device flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from model import devices, train
from model.config import ConfigError
from tests.test_data import write_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tf_config(cluster: dict, kind: str = "worker", index: int = 0) -> str:
    return json.dumps({"cluster": cluster, "task": {"type": kind, "index": index}})


def test_tf_config_names_the_task_and_the_chief():
    assert devices.parse_tf_config(None) is None and devices.parse_tf_config("  ") is None
    two = {"worker": ["127.0.0.1:2222", "127.0.0.1:2223"]}
    first, second = (devices.parse_tf_config(_tf_config(two, index=i)) for i in (0, 1))
    assert first.workers == second.workers == 2
    assert first.is_chief and not second.is_chief and second.task_name == "worker_1"
    with_chief = {"chief": ["h0:1"], "worker": ["h1:1", "h2:1"]}
    chief = devices.parse_tf_config(_tf_config(with_chief, "chief", 0))
    worker0 = devices.parse_tf_config(_tf_config(with_chief, "worker", 0))
    assert chief.workers == 3 and chief.is_chief and not worker0.is_chief


@pytest.mark.parametrize(
    "raw, message",
    [
        ("{not json", "not valid JSON"),
        ("[]", '"cluster" object'),
        (json.dumps({"task": {"type": "worker", "index": 0}}), '"cluster" object'),
        (_tf_config({"worker": ["h:1"], "ps": ["p:1"]}), "only chief and worker"),
        (_tf_config({"worker": ["h1"]}), '"host:port"'),
        (_tf_config({"worker": "h:1"}), '"host:port"'),
        (_tf_config({"chief": ["a:1", "b:1"]}, "chief"), "at most one"),
        (_tf_config({"worker": []}), "no chief or worker"),
        (json.dumps({"cluster": {"worker": ["h:1"]}}), '"task" object'),
        (_tf_config({"worker": ["h:1"]}, "worker", 1), "not in its cluster"),
        (_tf_config({"worker": ["h:1"]}, "chief", 0), "not in its cluster"),
        (json.dumps({"cluster": {"worker": ["h:1"]}, "task": {"type": "worker", "index": "0"}}), "not in"),
    ],
)
def test_malformed_tf_config_is_a_one_line_error(raw, message):
    with pytest.raises(ConfigError, match=message) as e:
        devices.parse_tf_config(raw)
    assert "\n" not in str(e.value)


def test_strategy_choice():
    two = devices.Cluster(workers=2, task_type="worker", task_index=0)
    one = devices.Cluster(workers=1, task_type="worker", task_index=0)
    assert devices.choose_strategy("auto", None, 0, None) == "default"
    assert devices.choose_strategy("auto", None, 1, None) == "default"
    assert devices.choose_strategy("auto", None, 4, None) == "mirrored"
    assert devices.choose_strategy("auto", None, 0, 2) == "mirrored"
    assert devices.choose_strategy("auto", two, 4, None) == "multiworker"
    assert devices.choose_strategy("auto", one, 0, None) == "default"
    assert devices.choose_strategy("mirrored", None, 0, None) == "mirrored"


def test_jit_is_one_explicit_choice():
    assert devices.resolve_jit("auto", 0, 1) is False
    assert devices.resolve_jit("auto", 1, 1) is True  # one GPU, default strategy
    assert devices.resolve_jit("auto", 1, 1, multiworker=True) is True  # one GPU per worker: the same
    assert devices.resolve_jit("auto", 0, 1, multiworker=True) is False
    with pytest.raises(ConfigError, match="XLA has no collective ops on CPU"):
        devices.resolve_jit("on", 0, 1, multiworker=True)
    assert devices.resolve_jit("on", 0, 1) is True and devices.resolve_jit("off", 8, 1) is False
    assert devices.resolve_jit("auto", 2, 2) is False  # several devices in one process
    with pytest.raises(ConfigError, match="--jit_compile on cannot compile a step spanning 2 devices"):
        devices.resolve_jit("on", 2, 2)


def test_precision_choice():
    assert devices.resolve_precision("auto", []) == "float32"
    assert devices.resolve_precision("auto", [(9, 0), (8, 0)]) == "mixed_bfloat16"
    assert devices.resolve_precision("auto", [(7, 0)]) == "mixed_float16"
    assert devices.resolve_precision("float32", [(9, 0)]) == "float32"


def test_gpu_checks():
    devices.check_gpus("small", 0, False, None)
    devices.check_gpus("resnet50", 1, False, None)
    devices.check_gpus("resnet50", 0, True, None)  # --allow_cpu
    with pytest.raises(
        ConfigError, match="no GPU is visible .*make setup-gpu.*constraints-gpu.txt.*--allow_cpu"
    ):
        devices.check_gpus("densenet121", 0, False, None)
    with pytest.raises(ConfigError, match="--cpu_replicas splits the CPU .* 2 GPU"):
        devices.check_gpus("small", 2, False, 2)


@pytest.mark.parametrize(
    "flags, tf_config, message",
    [
        (
            ["--strategy", "fast"],
            None,
            "--strategy 'fast' is not one of auto, default, mirrored, multiworker",
        ),
        (["--jit_compile", "yes"], None, "--jit_compile 'yes' is not one of"),
        (["--cpu_replicas", "0"], None, "--cpu_replicas must be >= 1"),
        (["--strategy", "multiworker"], None, "--strategy multiworker needs TF_CONFIG"),
        (["--strategy", "default", "--cpu_replicas", "2"], None, "needs --strategy mirrored"),
        ([], "{oops", "TF_CONFIG is not valid JSON"),
        ([], _tf_config({"worker": ["h:1", "h:2"]}, "worker", 5), "not in its cluster"),
        (["--strategy", "mirrored"], _tf_config({"worker": ["h:1", "h:2"]}), "names 2 machines"),
        (["--cpu_replicas", "2"], _tf_config({"worker": ["h:1", "h:2"]}), "one CPU device per worker"),
    ],
)
def test_bad_device_flags_stop_before_any_work(flags, tf_config, message, tmp_path, monkeypatch, capsys):
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    model_dir = str(tmp_path / "m")
    argv = ["--data_dir", str(tmp_path / "no-data"), "--model_dir", model_dir, "--backbone", "small"]
    argv += ["--weights", "none", *flags]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hpa-train: error: ") and message in err[0], err
    assert not os.path.exists(model_dir)


def test_large_backbone_without_gpu_stops_before_reading_data(tmp_path):
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("a GPU is visible")
    data_dir = str(tmp_path / "data")
    write_dataset(data_dir, per_fold=(2, 2))
    model_dir = str(tmp_path / "m")
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("TF_CONFIG", None)
    cmd = [sys.executable, "-m", "model.train", "--data_dir", data_dir, "--model_dir", model_dir]
    proc = subprocess.run(
        cmd + ["--backbone", "resnet50"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("hpa-train: error: no GPU is visible") and "make setup-gpu" in last
    assert "data:" not in proc.stdout and not os.path.exists(model_dir)  # no data read, nothing written


def test_deterministic_turns_xla_off_on_a_gpu_with_a_reason():
    assert devices.resolve_jit("auto", 1, 1, deterministic=True) is False
    assert devices.resolve_jit("auto", 1, 1, multiworker=True, deterministic=True) is False
    assert devices.resolve_jit("auto", 0, 1, deterministic=True) is False  # CPU: off anyway
    with pytest.raises(ConfigError, match="--deterministic on a GPU"):
        devices.resolve_jit("on", 1, 1, deterministic=True)
    assert devices.resolve_jit("on", 0, 1, deterministic=True) is True  # only a GPU is refused
    assert "max-pool gradient" in devices.DETERMINISTIC_NO_XLA


def test_every_command_lets_tensorflow_grow_gpu_memory(monkeypatch):
    from schemas import cli

    monkeypatch.delenv(cli.GPU_GROWTH_ENV, raising=False)
    seen = {}

    @cli.command("hpa-x")
    def main(argv=None):
        seen["growth"] = os.environ.get(cli.GPU_GROWTH_ENV)
        return 0

    assert main([]) == 0 and seen["growth"] == "true"
    monkeypatch.setenv(cli.GPU_GROWTH_ENV, "false")  # the user's choice stands
    main([])
    assert seen["growth"] == "false"
