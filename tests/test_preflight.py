"""The training job's GPU-host settings checked on a CPU: the preflight's out-of-memory path (the error
injected), the global batch from --batch_per_replica, --lr_scaling, --ema_epochs and --no_ema under a preset.
"""

from __future__ import annotations

import pytest
import tensorflow as tf

from model import preflight, train
from model.config import ConfigError
from tests.test_data import write_dataset


def _oom_above(limit: int, tried: list[int]):
    def step(n: int) -> None:
        tried.append(n)
        if n > limit:
            raise tf.errors.ResourceExhaustedError(
                None, None, f"OOM when allocating tensor with shape[{n},..]"
            )

    return step


def test_halving_finds_the_batch_that_fits():
    tried: list[int] = []
    assert preflight.largest_fitting_batch(_oom_above(10, tried), 64, 2) == 8
    assert tried == [64, 32, 16, 8]  # per replica 32, 16, 8, 4: multiples of the replicas
    assert preflight.largest_fitting_batch(_oom_above(0, []), 8, 2) is None
    with pytest.raises(
        ConfigError, match=r"--batch_size 32 \(32 per replica\) runs out of memory.*--batch_size 8"
    ):
        preflight.check_batch_fits(_oom_above(10, []), 32, 1, "GPU:0")
    with pytest.raises(ValueError, match="other"):  # not out-of-memory: not handled

        def broken(n):
            raise ValueError("other")

        preflight.largest_fitting_batch(broken, 8, 1)


def test_train_stops_before_reading_data_and_names_a_batch_that_fits(tmp_path, monkeypatch, capsys):
    data_dir = str(tmp_path / "data")
    write_dataset(data_dir, per_fold=(4, 4, 4))
    tried: list[int] = []
    monkeypatch.setattr(preflight, "model_step", lambda *a, **k: _oom_above(4, tried))
    argv = ["--data_dir", data_dir, "--model_dir", str(tmp_path / "m"), "--backbone", "small"]
    argv += ["--weights", "none", "--batch_size", "16", "--preflight", "on", "--epochs", "1"]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert (
        "--batch_size 16 (16 per replica) runs out of memory" in err
        and "--batch_size 4 (4 per replica) fits" in err
    )
    assert tried == [16, 8, 4]


def _cfg(argv, replicas=1):
    args = train.parse_args(["--data_dir", "d", "--model_dir", "m", *argv])
    cfg = train.config_from_args(args)
    return train._global_batch(cfg, args, ["--data_dir", "d", "--model_dir", "m", *argv], replicas)


def test_global_batch_learning_rate_and_averaging_flags():
    assert _cfg(["--batch_per_replica", "6"], replicas=3).data.batch_size == 18
    top = ["--preset", "top-densenet121-512"]
    assert (
        _cfg(top, replicas=2).data.batch_size
        == 2 * train.presets.get(top[1]).settings["batch_per_replica"].value
    )
    assert _cfg([*top, "--batch_size", "8"], replicas=2).data.batch_size == 8  # the command line wins
    with pytest.raises(ConfigError, match="not both"):
        _cfg(["--batch_per_replica", "6", "--batch_size", "8"], replicas=3)
    cfg = _cfg(["--batch_size", "64", "--learning_rate", "0.001", "--lr_scaling", "linear"])
    assert cfg.scaled_learning_rate() == pytest.approx(0.002)  # reference batch 32
    assert _cfg(["--batch_size", "64", "--learning_rate", "0.001"]).scaled_learning_rate() == 0.001
    cfg = _cfg(["--ema", "--ema_epochs", "2"])
    assert cfg.ema_momentum_for(500) == pytest.approx(1 - 1 / 1000)
    preset = _cfg(["--preset", "top-densenet121-512"])
    assert preset.ema and not _cfg(["--preset", "top-densenet121-512", "--no_ema"]).ema
    with pytest.raises(ConfigError, match="does not split evenly over 3 replicas.*--batch_size 9"):
        train.check_batch(10, 3)


def test_messages_name_the_preset_and_weights_follow_the_backbone(tmp_path):
    data_dir = str(tmp_path / "data")
    write_dataset(data_dir, per_fold=(2, 2))
    import schemas

    manifest = schemas.read_manifest(data_dir)
    argv = ["--data_dir", data_dir, "--model_dir", "m", "--preset", "top-densenet121-512"]
    cfg = train.config_from_args(train.parse_args(argv))
    with pytest.raises(ConfigError) as e:
        train.resolve_config(cfg, manifest)
    assert str(e.value).startswith("the preset top-densenet121-512 sets --image_size 512; ")
    assert "pass --image_size 16 to override" in str(e.value)
    assert train.resolve_config(
        train.config_from_args(train.parse_args([*argv, "--image_size", "16"])), manifest
    )
    weights = {
        b: train.config_from_args(train.parse_args([*argv[:4], "--backbone", b])).model.weights
        for b in ("small", "resnet50")
    }
    assert weights == {"small": "none", "resnet50": "imagenet"}
