"""Run in a fresh process by tests/test_replicas.py: `python -m tests.replica_checks REPLICAS`.

Splits the CPU into REPLICAS logical devices (before TensorFlow sets up its devices), then prints one JSON
object: for validation sets whose size leaves remainders 0, 1 and REPLICAS - 1 of the global batch, the
loss / F1 / AUC of `model.evaluate` under MirroredStrategy on the padded set (remainder = replicas too: a
last batch that a strategy may still hand to one replica alone) (`data.pad_for_replicas`) beside
the same weights evaluated on one device without padding; whether the unpadded set fails under the strategy;
the augmentation each replica drew from the same images; and how many distinct copies of BatchNormalization's
moving statistics the replicas hold after a training step without and with `AverageReplicaStatistics`.
"""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np


def main(replicas: int) -> dict:
    from model import devices

    devices.split_cpu(replicas)
    import keras
    import tensorflow as tf

    import schemas
    from model import augment, losses
    from model import data as data_lib
    from model import model as model_lib
    from model.config import ModelConfig

    strategy = devices.make_strategy("mirrored", replicas)
    cfg = ModelConfig(backbone="small", weights="none", small_filters=4)
    mean, std = [100.0] * 4, [50.0] * 4
    batch = 2 * replicas

    def compiled():
        model = model_lib.build_model(cfg, mean, std)
        model.compile(
            loss=losses.make_loss("bce"),
            weighted_metrics=[
                keras.metrics.F1Score(average="macro", threshold=0.5, name="f1"),
                keras.metrics.AUC(multi_label=True, num_labels=schemas.NUM_CLASSES, name="auc"),
            ],
        )
        return model

    keras.utils.set_random_seed(0)
    with strategy.scope():
        mirrored = compiled()
    single = compiled()
    single.set_weights(mirrored.get_weights())
    rng = np.random.default_rng(0)
    out: dict = {"evaluate": {}}
    for remainder in sorted({0, 1, replicas - 1, replicas}):  # replicas: a last batch that splits evenly
        n = 2 * batch + remainder
        images = rng.integers(0, 256, (n, 16, 16, 4), dtype=np.uint8)
        labels = (rng.random((n, schemas.NUM_CLASSES)) < 0.3).astype(np.float32)
        ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch)
        padded = data_lib.pad_for_replicas(ds, n, replicas, batch)
        rows = sum(int(b[0].shape[0]) for b in padded)
        got = mirrored.evaluate(padded, verbose=0, return_dict=True)
        want = single.evaluate(ds, verbose=0, return_dict=True)
        out["evaluate"][str(remainder)] = {"records": n, "rows": rows, "mirrored": got, "single": want}
    n = 2 * batch + 1
    ds = tf.data.Dataset.from_tensor_slices(
        (np.zeros((n, 16, 16, 4), np.uint8), np.zeros((n, schemas.NUM_CLASSES), np.float32))
    ).batch(batch)
    try:
        mirrored.evaluate(ds, verbose=0)
        out["unpadded_error"] = None
    except Exception as e:  # noqa: BLE001 - the error's type is what is reported
        out["unpadded_error"] = type(e).__name__

    # Each replica augments the same images in the same step.
    layer_holder = {}
    with strategy.scope():
        layer_holder["layer"] = augment.StainAugmentation(seed=7)
    image = rng.integers(0, 256, (1, 16, 16, 4), dtype=np.uint8)
    same = tf.constant(np.repeat(image, 16, axis=0))

    @tf.function
    def step():
        return strategy.run(lambda: layer_holder["layer"](same, training=True))

    draws = []
    for _ in range(2):
        per_replica = [t.numpy() for t in strategy.experimental_local_results(step())]
        draws.append([hashlib.sha1(r.tobytes()).hexdigest() for r in per_replica])
    out["draws"] = draws
    out["statistics_copies"] = _statistics_copies(mirrored, strategy, batch, rng)
    return out


def _statistics_copies(model, strategy, batch: int, rng) -> dict[str, int]:
    """The most distinct per-replica values of one BatchNormalization variable after one training step
    without the averaging callback, then after one with it."""
    import tensorflow as tf

    import schemas
    from model import replica_stats

    images = rng.integers(0, 256, (batch, 16, 16, 4), dtype=np.uint8)  # each replica its own half
    labels = (rng.random((batch, schemas.NUM_CLASSES)) < 0.3).astype(np.float32)
    ds = tf.data.Dataset.from_tensors((images, labels)).repeat()
    variables = replica_stats.moving_statistics(model)

    def copies() -> int:
        return max(len({v.numpy().tobytes() for v in var.value.values}) for var in variables)

    out = {}
    for name, callbacks in (("without", []), ("with", [replica_stats.AverageReplicaStatistics(strategy)])):
        model.fit(ds, epochs=1, steps_per_epoch=1, callbacks=callbacks, verbose=0)
        out[name] = copies()
    return out


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(int(sys.argv[1]))), flush=True)
