"""Tests of model/batchnorm.py: BatchNorm statistics recomputed for averaged weights, against numpy."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from model import batchnorm

BATCHES, BATCH = 3, 5


def _model() -> keras.Model:
    """1x1 conv -> BN -> ReLU -> pool -> dense -> BN -> dropout -> dense: BN over 4-D and 2-D inputs."""
    inputs = keras.Input((4, 4, 2))
    x = keras.layers.Conv2D(3, 1, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(4, name="dense")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    x = keras.layers.Dropout(0.5, seed=1)(x)
    outputs = keras.layers.Dense(2, activation="sigmoid", name="out")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(0.05, use_ema=True, ema_momentum=0.6), loss="bce")
    return model


def _reference(model: keras.Model, batches: list[np.ndarray]) -> list[np.ndarray]:
    """The mean over batches of each BN layer's per-batch input mean and (biased) variance, in numpy.

    In training mode each BN layer normalises with its batch's statistics, so the second layer's inputs
    follow from the first layer's batch statistics, not from any moving statistic.
    """
    w = {layer.name: [np.asarray(v, np.float64) for v in layer.get_weights()] for layer in model.layers}
    stats = {name: [] for name in ("bn1", "bn2")}

    def bn(name, h, axes):
        gamma, beta = w[name][0], w[name][1]
        mean, var = h.mean(axis=axes), h.var(axis=axes)
        stats[name].append((mean, var))
        eps = model.get_layer(name).epsilon
        return gamma * (h - mean) / np.sqrt(var + eps) + beta

    for x in batches:
        kernel, bias = w["conv"]
        h = np.einsum("bhwc,cd->bhwd", x.astype(np.float64), kernel[0, 0]) + bias
        h = np.maximum(bn("bn1", h, (0, 1, 2)), 0.0).mean(axis=(1, 2))
        bn("bn2", h @ w["dense"][0] + w["dense"][1], (0,))
    out = []
    for name in ("bn1", "bn2"):
        out += [np.mean([m for m, _ in stats[name]], axis=0), np.mean([v for _, v in stats[name]], axis=0)]
    return out


def _trained() -> tuple[keras.Model, list[np.ndarray]]:
    """A model trained a few steps with an average, the average in it (Keras' finalize), and its batches."""
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    model = _model()
    x = rng.normal(1.0, 2.0, (40, 4, 4, 2)).astype(np.float32)
    y = (rng.random((40, 2)) < 0.5).astype(np.float32)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)  # ends with the average as the weights
    batches = [rng.normal(0.5, 1.5, (BATCH, 4, 4, 2)).astype(np.float32) for _ in range(BATCHES)]
    return model, batches


def test_recomputed_statistics_are_the_mean_of_the_per_batch_statistics_under_the_average():
    model, batches = _trained()
    want = _reference(model, batches)
    weights = [np.array(v) for v in model.trainable_variables]
    seeds = [np.array(v) for v in model.variables if "seed_generator_state" in v.path]
    before = batchnorm.statistics(model)
    # Without the recompute the averaged weights carry the last raw weights' statistics: not these.
    assert max(float(np.abs(b - r).max()) for b, r in zip(before, want, strict=True)) > 0.1

    lines = []
    assert batchnorm.recompute(model, batches, lines.append) == BATCHES
    got = batchnorm.statistics(model)
    assert len(got) == 4  # two layers: mean and variance each
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
    # Nothing else moved: the trainable weights, the dropout layer's random state, the layers' momentum.
    for a, b in zip(weights, model.trainable_variables, strict=True):
        np.testing.assert_array_equal(a, np.array(b))
    for a, b in zip(seeds, [v for v in model.variables if "seed_generator_state" in v.path], strict=True):
        np.testing.assert_array_equal(a, np.array(b))
    assert {layer.momentum for layer in batchnorm.layers_of(model)} == {0.99}
    assert lines and lines[0].startswith("BatchNorm statistics of the averaged weights: 2 layers recomputed")


def test_averaged_statistics_recompute_once_per_step_and_restore_the_raw_ones():
    model, batches = _trained()
    raw = batchnorm.statistics(model)
    averaged = batchnorm.AveragedStatistics(batches, say=None)
    at_validation, before, after = averaged.callbacks()
    for cb in (at_validation, before, after):
        cb.set_model(model)
    at_validation.on_test_begin()
    recomputed = batchnorm.statistics(model)
    at_validation.on_test_end()
    assert all(np.array_equal(a, b) for a, b in zip(raw, batchnorm.statistics(model), strict=True))
    before.on_epoch_end(0)  # the checkpoint's turn: the same statistics, not computed again
    assert all(np.array_equal(a, b) for a, b in zip(recomputed, batchnorm.statistics(model), strict=True))
    after.on_epoch_end(0)
    assert all(np.array_equal(a, b) for a, b in zip(raw, batchnorm.statistics(model), strict=True))
    assert len(averaged.seconds) == 1
    np.testing.assert_allclose(recomputed[0], _reference(model, batches)[0], rtol=1e-5, atol=1e-6)


def test_frozen_batchnorm_layers_are_left_alone_and_bad_values_rejected():
    model, batches = _trained()
    model.get_layer("bn1").trainable = False
    assert [layer.name for layer in batchnorm.layers_of(model)] == ["bn2"]
    frozen = [np.array(v) for v in model.get_layer("bn1").non_trainable_variables]
    batchnorm.recompute(model, batches)
    for a, b in zip(frozen, model.get_layer("bn1").non_trainable_variables, strict=True):
        np.testing.assert_array_equal(a, np.array(b))
    with pytest.raises(ValueError, match="expected 2 arrays"):
        batchnorm.set_statistics(model, [])
    assert batchnorm.default_batches(10_000, 16) == 128
    assert batchnorm.default_batches(30, 8) == 4  # every training sample when fewer than 2048


def _history(model_dir: str) -> list[dict[str, str]]:
    import csv
    import os

    from model import train

    with open(os.path.join(model_dir, train.HISTORY_FILE)) as f:
        return list(csv.DictReader(f))


def test_hpa_train_ema_outputs_carry_the_averages_statistics_and_stay_deterministic(tmp_path, capsys):
    import os

    from model import data as data_lib
    from model import train
    from model.config import DataConfig
    from tests.test_data import write_dataset

    data_dir = str(tmp_path / "data")
    samples = write_dataset(data_dir, per_fold=(7, 8, 8))
    flags = ["--data_dir", data_dir, "--backbone", "small", "--weights", "none", "--small_filters", "4"]
    flags += ["--epochs", "1", "--steps_per_epoch", "3", "--batch_size", "4", "--learning_rate", "0.02"]
    flags += ["--seed", "5", "--deterministic", "--no_augment", "--ema", "--ema_momentum", "0.5"]
    runs = {}
    for name, count in (("a", "3"), ("b", "3"), ("off", "0")):
        model_dir = str(tmp_path / name)
        train.run([*flags, "--model_dir", model_dir, "--ema_bn_batches", count])
        model = keras.saving.load_model(os.path.join(model_dir, train.MODEL_FILE))
        npz = np.load(os.path.join(model_dir, train.VAL_PREDICTIONS_FILE))
        runs[name] = (model, _history(model_dir), npz["scores"])
    out = capsys.readouterr().out
    line = "BatchNorm statistics of the averaged weights: 4 layers recomputed over 3 batches"
    assert out.count(line) == 2  # one per epoch and run
    (a, ha, sa), (b, hb, sb), (off, hoff, _) = runs["a"], runs["b"], runs["off"]
    # --deterministic: bit-identical weights (statistics included), history.csv and val_predictions.npz.
    assert all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights(), strict=True))
    assert ha == hb and np.array_equal(sa, sb)
    # The recompute leaks nothing into training: the same averaged weights as without it, other statistics.
    for x, y in zip(a.trainable_variables, off.trainable_variables, strict=True):
        np.testing.assert_array_equal(np.array(x), np.array(y))
    assert [r["loss"] for r in ha] == [r["loss"] for r in hoff]
    assert any(not np.allclose(x, y) for x, y in zip(batchnorm.statistics(a), batchnorm.statistics(off)))
    assert [r["val_loss"] for r in ha] != [r["val_loss"] for r in hoff]
    # model.keras holds the statistics the averaged weights give over those 3 training batches ...
    batches = data_lib.make_eval_dataset(data_dir, [1, 2], DataConfig(batch_size=4)).take(3)
    saved = batchnorm.statistics(a)
    batchnorm.recompute(a, batches)
    for x, y in zip(saved, batchnorm.statistics(a), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
    # ... and the best epoch's validation loss was measured with them (and so were val_predictions).
    val = sorted(sid for sid, s in samples.items() if s["fold"] == 0)
    images = np.stack([samples[s]["image"] for s in val])
    labels = np.stack([samples[s]["labels"] for s in val]).astype("float32")
    loss = a.evaluate(images, labels, batch_size=4, verbose=0, return_dict=True)["loss"]
    assert min(float(r["val_loss"]) for r in ha) == pytest.approx(loss, rel=1e-4)
