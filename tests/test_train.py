"""Tests of model/train.py: real preprocessing then training, bad inputs, SIGKILL resume, tf.data service."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import schemas
from model import model as model_lib
from model import rundir, train
from model.config import (
    CONFIG_FILE,
    ConfigError,
    ModelConfig,
    config_from_dict,
    config_to_json,
    resolve_input_norm,
)
from tests.fixtures import WAIT_CEILING, make_dataset, sigkill_when
from tests.test_data import write_dataset
from tests.test_model import go_offline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--backbone", "small", "--weights", "none", "--verbose", "0"]


def _history(model_dir):
    with open(os.path.join(model_dir, train.HISTORY_FILE)) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A dataset written directly (fast), 3 folds of 8 samples, 16 px."""
    root = str(tmp_path_factory.mktemp("written"))
    write_dataset(root, per_fold=(8, 8, 8))
    return root


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory):
    """A tiny dataset through the real preprocessing job (the contract between the two halves)."""
    preprocess = pytest.importorskip("pipelines.preprocess")
    root = str(tmp_path_factory.mktemp("pre"))
    labels_csv, input_dir, labels = make_dataset(root, num_samples=24, size=16)
    out = os.path.join(root, "out")
    preprocess.run(
        ["--labels_csv", labels_csv, "--input_dir", input_dir, "--output_dir", out, "--num_folds", "3"]
        + ["--num_shards", "2"]
    )
    return out, labels


def test_end_to_end_real_preprocessing_then_training(preprocessed, tmp_path):
    data_dir, labels = preprocessed
    model_dir = str(tmp_path / "run")
    summary = train.run(
        ["--data_dir", data_dir, "--model_dir", model_dir, "--epochs", "3", "--steps_per_epoch", "8"]
        + ["--batch_size", "8", "--learning_rate", "0.01", "--seed", "0"]
        + SMALL
    )
    assert summary["epochs"] == 3
    rows = _history(model_dir)
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])  # loss goes down
    for name in (CONFIG_FILE, train.MODEL_FILE, train.PLOTS_FILE, train.LOGS_DIR, train.RUN_INFO_FILE):
        assert os.path.exists(os.path.join(model_dir, name)), name
    assert not os.path.exists(os.path.join(model_dir, train.BACKUP_DIR))
    assert tf.io.gfile.glob(os.path.join(model_dir, train.LOGS_DIR, "*", "events.out.tfevents.*"))

    # val_predictions.npz: exactly the validation fold, labels from the label file.
    manifest = schemas.read_manifest(data_dir)
    npz = np.load(os.path.join(model_dir, train.VAL_PREDICTIONS_FILE))
    assert len(npz["ids"]) == manifest[schemas.MANIFEST_WRITTEN][schemas.written_key(0)]
    assert npz["scores"].shape == npz["labels"].shape == (len(npz["ids"]), schemas.NUM_CLASSES)
    for sid, y in zip(npz["ids"], npz["labels"], strict=True):
        assert schemas.multi_hot_to_labels(y) == labels[str(sid)]

    # model.keras reloads and agrees with the exported signature and the saved validation scores.
    reloaded = keras.saving.load_model(os.path.join(model_dir, train.MODEL_FILE))
    records = [
        r.numpy() for r in tf.data.TFRecordDataset(tf.io.gfile.glob(schemas.shard_pattern(data_dir, 0)))
    ]
    served = tf.saved_model.load(os.path.join(model_dir, train.EXPORT_DIR)).signatures[
        model_lib.SERVING_SIGNATURE
    ](**{model_lib.SERVING_INPUT: tf.constant(records)})
    served_ids = [i.decode() for i in served[schemas.ID_KEY].numpy()]
    images = np.stack(
        [schemas.decode_stains(schemas.parse_example(tf.constant(r)), 16).numpy() for r in records]
    )
    keras_scores = reloaded.predict_on_batch(images)
    np.testing.assert_allclose(served[model_lib.PROBABILITIES].numpy(), keras_scores, rtol=1e-4, atol=1e-5)
    by_id = dict(zip(npz["ids"].tolist(), npz["scores"], strict=True))
    np.testing.assert_allclose(np.stack([by_id[i] for i in served_ids]), keras_scores, rtol=1e-4, atol=1e-5)

    # Same command again: the run is finished, a clear error rather than retraining.
    with pytest.raises(ConfigError, match="finished run"):
        train.run(
            ["--data_dir", data_dir, "--model_dir", model_dir, "--epochs", "3", "--steps_per_epoch", "8"]
            + ["--batch_size", "8", "--learning_rate", "0.01", "--seed", "0"]
            + SMALL
        )


def _base(data_dir, model_dir, *extra):
    return ["--data_dir", data_dir, "--model_dir", model_dir, *SMALL, *extra]


def test_bad_inputs_give_clear_errors(written, tmp_path, capsys):
    model_dir = str(tmp_path / "m")
    with pytest.raises(ConfigError, match="manifest.json not found"):
        train.run(_base(str(tmp_path / "nothing"), model_dir))
    with pytest.raises(ConfigError, match="--val_fold 3 does not exist"):
        train.run(_base(written, model_dir, "--val_fold", "3"))
    with pytest.raises(ConfigError, match="--image_size 32 does not match"):
        train.run(_base(written, model_dir, "--image_size", "32"))
    empty = str(tmp_path / "empty")
    write_dataset(empty, per_fold=(4, 0, 0))
    with pytest.raises(ConfigError, match="empty training set"):
        train.run(_base(empty, model_dir))
    assert not os.path.exists(model_dir)  # nothing written before the inputs are checked

    other = str(tmp_path / "other")
    os.makedirs(other)
    cfg = train.config_from_args(
        train.build_parser().parse_args(_base(written, other, "--learning_rate", "0.5"))
    )
    cfg, _, _ = train.resolve_config(cfg, schemas.read_manifest(written))
    with open(os.path.join(other, CONFIG_FILE), "w") as f:
        f.write(config_to_json(cfg))
    with pytest.raises(ConfigError, match=r"another run .*learning_rate: 0.5 -> 0.0001"):
        train.run(_base(written, other))
    assert train.main(_base(written, other)) == 2
    assert "error:" in capsys.readouterr().err


def test_input_norm_is_resolved_into_config_json(written):
    def resolved(backbone, weights="imagenet", input_norm="auto"):
        return resolve_input_norm(ModelConfig(backbone=backbone, weights=weights, input_norm=input_norm))

    assert resolved("small", "none") == resolved("small", "rgb.keras") == "zscore"
    assert resolved("resnet50", "none") == resolved("resnet50", input_norm="zscore") == "zscore"
    assert resolved("resnet50") == resolved("resnet50", "rgb.weights.h5") == "caffe"
    assert resolved("resnet50", "none", "imagenet") == resolved("resnet50", input_norm="caffe") == "caffe"
    assert resolved("densenet121") == resolved("efficientnetv2b3") == "torch"
    assert resolved("efficientnetv2s") == resolved("efficientnetv2l") == "pm1"
    with pytest.raises(ConfigError, match="small backbone has no ImageNet"):
        ModelConfig(backbone="small", input_norm="imagenet")
    with pytest.raises(ConfigError, match="'caffe' does not fit densenet121"):
        ModelConfig(backbone="densenet121", input_norm="caffe")
    with pytest.raises(ConfigError, match="input_norm must be one of"):
        ModelConfig(input_norm="bgr")

    args = ["--backbone", "efficientnetv2s", "--input_norm", "imagenet"]
    cfg = train.config_from_args(train.build_parser().parse_args(_base(written, "m", *args)))
    cfg, _, _ = train.resolve_config(cfg, schemas.read_manifest(written))
    saved = json.loads(config_to_json(cfg))
    assert saved["model"]["input_norm"] == "pm1" and config_from_dict(saved) == cfg
    del saved["model"]["input_norm"]  # a config.json from before the field: those runs were z-scored
    assert config_from_dict(saved).model.input_norm == "zscore"


def test_imagenet_weights_offline_exit_2_with_one_line_before_writing(written, tmp_path, monkeypatch, capsys):
    home = tmp_path / "keras_home"
    tried = go_offline(monkeypatch, home)
    fname, url, _ = model_lib.imagenet_weights_file("resnet50")
    model_dir = str(tmp_path / "run")
    argv = [
        "--data_dir",
        written,
        "--model_dir",
        model_dir,
        "--backbone",
        "resnet50",
        "--weights",
        "imagenet",
    ]
    if "--allow_cpu" in train.build_parser().format_help():  # large backbones on a CPU need it
        argv.append("--allow_cpu")
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("hpa-train: error: --weights imagenet:")
    assert fname in err and url in err and f"KERAS_HOME={home}" in err and "--weights PATH" in err
    assert tried == [url]
    assert not os.path.exists(model_dir)


def test_history_truncation_and_plot(tmp_path):
    path = str(tmp_path / "h.csv")
    with open(path, "w") as f:
        f.write("epoch,f1,loss,val_f1,val_loss\n0,0.1,1.0,0.1,1.1\n1,0.2,0.9,0.2,1.0\n2,0.3,0.8,0.3,0.95\n")
    rows = rundir.truncate_history(path, 2)
    assert [r["epoch"] for r in rows] == ["0", "1"] and [r["epoch"] for r in rundir.read_history(path)] == [
        "0",
        "1",
    ]
    train.plot_history(rows, str(tmp_path / "p.png"))
    with open(tmp_path / "p.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_sigkill_mid_training_then_same_command_resumes(written, tmp_path):
    model_dir = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "model.train", *_base(written, model_dir)]
    cmd += ["--epochs", "3", "--steps_per_epoch", "150", "--batch_size", "4", "--verbose", "2"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    metadata = os.path.join(model_dir, train.BACKUP_DIR, rundir.BACKUP_METADATA)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    # The slot's record comes before Keras' metadata file: wait for both (a loaded machine showed the gap).
    sigkill_when(proc, lambda: rundir.backup_epoch(model_dir) == 1 and os.path.exists(metadata))
    first_out = proc.stdout.read().decode()
    assert proc.returncode == -signal.SIGKILL, f"not killed mid-training:\n{first_out[-3000:]}"
    with open(metadata) as f:
        assert json.load(f)["epoch"] == 1
    first_row = _history(model_dir)[0]

    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3 * WAIT_CEILING)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming" in second.stdout and "after epoch 1" in second.stdout
    assert "Epoch 1/3" not in second.stdout and "Epoch 2/3" in second.stdout  # epoch 1 was not redone
    rows = _history(model_dir)
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert rows[0] == first_row  # the first run's epoch, kept
    assert os.path.exists(os.path.join(model_dir, train.MODEL_FILE))


def test_training_through_a_tf_data_service_on_loopback(written, tmp_path):
    dispatcher = tf.data.experimental.service.DispatchServer()
    worker = tf.data.experimental.service.WorkerServer(
        tf.data.experimental.service.WorkerConfig(dispatcher_address=dispatcher.target.split("://")[1])
    )
    try:
        model_dir = str(tmp_path / "svc")
        summary = train.run(
            _base(written, model_dir, "--epochs", "1", "--steps_per_epoch", "3", "--batch_size", "4")
            + ["--tf_data_service", dispatcher.target]
        )
        assert summary["epochs"] == 1
        assert worker._num_tasks() >= 1  # the worker ran the training pipeline
    finally:
        worker._stop()
        dispatcher._stop()


def test_deterministic_runs_are_bit_identical_and_a_cached_run_trains_alike(written, tmp_path):
    flags = ["--epochs", "2", "--steps_per_epoch", "6", "--batch_size", "4", "--learning_rate", "0.01"]
    flags += ["--seed", "7", "--deterministic", "--crop_size", "12", "--rare_class", "oversample"]
    outputs = []
    for name, cache in (("a", "none"), ("b", "none"), ("c", str(tmp_path / "cache"))):
        model_dir = str(tmp_path / name)
        train.run(_base(written, model_dir, *flags, "--cache", cache))
        model = keras.saving.load_model(os.path.join(model_dir, train.MODEL_FILE))
        npz = np.load(os.path.join(model_dir, train.VAL_PREDICTIONS_FILE))
        outputs.append((model.get_weights(), _history(model_dir), npz["scores"], npz["ids"]))
    (wa, ha, sa, ia), (wb, hb, sb, ib), (_, hc, _, ic) = outputs
    assert len(wa) == len(wb) and all(np.array_equal(x, y) for x, y in zip(wa, wb, strict=True))
    # Every history.csv column of every epoch, as written (the README says bit-identical history.csv).
    assert len(ha) == 2 and {"epoch", "loss", "val_loss", "learning_rate"} <= set(ha[0]), ha
    assert ha == hb
    assert np.array_equal(sa, sb) and np.array_equal(ia, ib)
    # Through the cache the records come in another order (the only difference): a similar loss curve.
    loss_a, loss_c = float(ha[-1]["loss"]), float(hc[-1]["loss"])
    assert loss_c < float(hc[0]["loss"]) and loss_a < float(ha[0]["loss"])
    assert abs(loss_a - loss_c) < 0.25 * loss_a, (ha, hc)
    assert sorted(ic) == sorted(ia)


def test_deterministic_with_tf_data_service_and_a_bad_cache_dir_are_usage_errors(written, tmp_path, capsys):
    argv = _base(written, str(tmp_path / "m"), "--seed", "1", "--deterministic")
    assert train.main([*argv, "--tf_data_service", "grpc://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hpa-train: error: --deterministic cannot be combined with --tf_data_service")
    assert "\n" not in err
    assert not os.path.exists(tmp_path / "m")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert train.main([*argv, "--cache", str(blocker / "cache")]) == 2
    assert "cannot write there" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "m")  # checked before the model dir is made
