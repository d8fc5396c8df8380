"""bench/train_step.py runs end to end on a tiny dataset and names the limiting stage (no timing asserted)."""

from __future__ import annotations

import re

import keras
import pytest

from bench import train_step
from tests.test_data import write_dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """3 folds of 8 samples, 16 px."""
    root = str(tmp_path_factory.mktemp("tiny"))
    write_dataset(root, per_fold=(8, 8, 8))
    return root


def test_benchmark_prints_the_three_figures_and_the_limit(tiny, capsys):
    policy = keras.mixed_precision.global_policy().name
    argv = ["--data_dir", tiny, "--backbone", "small", "--batch_size", "4"]
    argv += ["--steps", "2", "--warmup", "1", "--repeats", "2", "--small_filters", "4"]  # a training flag
    assert train_step.main(argv) == 0
    out = capsys.readouterr().out
    for stage in train_step.STAGES:
        row = re.search(rf"^\| {re.escape(stage)} +\| ([0-9.]+) +\| ([0-9.]+), ([0-9.]+) +\|$", out, re.M)
        assert row, f"no table row for {stage}:\n{out}"
        rate, runs = float(row.group(1)), sorted(float(row.group(i)) for i in (2, 3))
        assert rate > 0 and rate == pytest.approx(sum(runs) / 2, abs=0.06)  # the median of two runs
    assert re.search(r"^limit: the (input pipeline|model): ", out, re.M), out
    assert "batch 4 of [16, 16, 4] uint8" in out  # (a)'s batch has the pipeline's shape and dtype
    assert "training folds [1, 2] = 16 samples" in out
    assert keras.mixed_precision.global_policy().name == policy  # restored


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--backbone", "small"], "one of the arguments --data_dir --real_samples is required"),
        (["--data_dir", "D", "--steps", "0"], "--steps must be >= 1"),
        (["--data_dir", "D", "--source", "S"], "go with --real_samples"),
    ],
)
def test_bad_usage_exits_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        train_step.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_bad_dataset_or_training_flag_is_a_one_line_error(tiny, tmp_path, capsys):
    assert train_step.main(["--data_dir", str(tmp_path), "--backbone", "small"]) == 2
    assert "manifest.json" in capsys.readouterr().err
    assert train_step.main(["--data_dir", tiny, "--backbone", "small", "--image_size", "32"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --image_size 32 does not match") and err.count("\n") == 1


def test_verdict_names_the_slower_stage():
    pipeline_bound = train_step.verdict(a=944.0, b=122.6, c=120.0, cores=2)
    assert pipeline_bound[0].startswith("limit: the input pipeline: (b) delivers 13%")
    assert "7.70x" in pipeline_bound[0]
    assert "15.4 cores at (b)'s 61.3 samples/s per core" in pipeline_bound[2]
    model_bound = train_step.verdict(a=10.0, b=120.0, c=8.0, cores=2)
    assert model_bound[0].startswith("limit: the model: (a) trains 8%")
    assert "could feed a model 12.00x faster" in model_bound[0]
    assert model_bound[1] == "(c) = 80% of the slower stage, 80% of the device's ceiling (a)"
    assert "the runs vary" in train_step.verdict(a=10.0, b=120.0, c=12.0, cores=2)[1]
