"""Run by tests/test_workers.py in each worker of a loopback cluster (TF_CONFIG set by the test):
`python -m tests.worker_checks DATA_DIR MODEL_ROOT FOLD:CACHE[,FOLD:CACHE...]`.

The training job's own steps (`model.train` flags, `train_steps.prepare_devices`, `resolve_settings`,
`make_data`, `build_and_compile`) under MultiWorkerMirroredStrategy, `--deterministic --seed 5`, global
batch 4. First the augmentation each worker's replica draws from the same images on two steps; then for each
FOLD:CACHE (validation fold, `--cache`), one after the other on the same model:
- the training and validation batches each local replica receives, through the strategy's distributed
  dataset (what Keras' fit and evaluate iterate): rows and a fingerprint of each image (and its sample
  weight in validation), two epochs of training;
- one epoch of the job's `fit` with validation (the small backbone has BatchNormalization), then `evaluate`
  under the strategy, beside the same weights evaluated on one device on the unpadded fold;
- on the chief, the ids the job's prediction (`model.predict_with_ids`, as for val_predictions.npz) scores;
- a fingerprint of the model's weights.
Prints one line `RESULT {json}`.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time

import numpy as np

GLOBAL_BATCH = 4
SEED = 5


def fingerprint(array: np.ndarray) -> str:
    """A short hash of an array's bytes (an image is found again by its fingerprint)."""
    return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def _argv(data_dir: str, model_dir: str, fold: int, cache: str) -> list[str]:
    return [
        "--data_dir",
        data_dir,
        "--model_dir",
        model_dir,
        "--val_fold",
        str(fold),
        "--cache",
        cache,
        "--backbone",
        "small",
        "--weights",
        "none",
        "--small_filters",
        "4",
        "--batch_size",
        str(GLOBAL_BATCH),
        "--epochs",
        "1",
        "--seed",
        str(SEED),
        "--deterministic",
        "--strategy",
        "multiworker",
    ]


def _batches(strategy, dataset, steps: int | None) -> list[list[dict]]:
    """For each step (all of them when steps is None), each local replica's rows, image fingerprints and
    sample weights (when the dataset has them)."""
    import tensorflow as tf

    out = []
    iterator = iter(strategy.experimental_distribute_dataset(dataset))
    while steps is None or len(out) < steps:
        try:
            batch = next(iterator)
        except (StopIteration, tf.errors.OutOfRangeError):
            break
        parts = zip(*(strategy.experimental_local_results(t) for t in batch))
        step = []
        for part in parts:
            images = part[0].numpy()
            entry = {"rows": len(images), "images": [fingerprint(i) for i in images]}
            if len(part) > 2:
                entry["weights"] = part[2].numpy().tolist()
            step.append(entry)
        out.append(step)
    return out


def _draws(model, strategy) -> list[list[str]]:
    """Two steps of the model's augmentation layer on the same 8 images on every worker: for each step, the
    fingerprint of each local replica's output."""
    import tensorflow as tf

    from model import augment

    layer = model.get_layer(augment.AUGMENTATION_NAME)
    images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 4), dtype=np.uint8)

    @tf.function
    def step():
        return strategy.run(lambda: layer(tf.constant(images), training=True))

    return [[fingerprint(t.numpy()) for t in strategy.experimental_local_results(step())] for _ in range(2)]


def _weights(model) -> dict[str, str]:
    """Each weight's fingerprint by its path (the value `get_weights` reads: the first local replica's)."""
    return {w.path: fingerprint(np.asarray(w.numpy())) for w in model.weights}


def main(data_dir: str, model_root: str, spec: str) -> dict:
    started = time.monotonic()
    from model import train, train_steps

    runs = [(int(f), c) for f, c in (item.split(":") for item in spec.split(","))]

    def plan_of(fold: int, cache: str, dev=None):
        args = train.parse_args(_argv(data_dir, f"{model_root}/fold{fold}_{cache}", fold, cache))
        train.check_flags(args)
        cfg = train.config_from_args(args)
        if dev is None:
            return args, cfg
        train.check_batch(cfg.data.batch_size, dev.replicas)
        return train_steps.resolve_settings(cfg, dev)

    dev = train_steps.prepare_devices(*plan_of(*runs[0]))  # first: the strategy before any other TF op
    from model import data as data_lib
    from model import keras_compat
    from model import model as model_lib

    strategy = dev.strategy
    out: dict = {
        "task": dev.cluster.task_name,
        "chief": dev.is_chief,
        "replicas": dev.replicas,
        "local_replicas": len(dev.devices),
        "runs": [],
        "seconds": {"setup": round(time.monotonic() - started, 1), "runs": []},  # where a cluster's time goes
    }
    model = None
    for fold, cache in runs:
        run_started = time.monotonic()
        plan = plan_of(fold, cache, dev)
        cfg = plan.cfg
        train_ds, val_ds = train_steps.make_data(plan, dev)
        if model is None:
            model = train_steps.build_and_compile(plan, dev, train_ds)
            out["draws"] = _draws(model, strategy)
        run = {
            "fold": fold,
            "cache": cache,
            "steps": plan.steps_per_epoch,
            "validation_steps": plan.validation_steps,
            "train": _batches(strategy, train_ds, 2 * plan.steps_per_epoch),
            "val": _batches(strategy, val_ds, None),
        }
        work = train_steps.prepare_work_dir(plan, dev, overwrite=False)
        rows = train_steps.fit(model, plan, dev, work, train_ds, val_ds)
        run["fit"] = {k: float(v) for k, v in rows[-1].items() if k.startswith("val_")}
        with keras_compat.scalar_mean_across_workers(True):
            run["evaluate"] = model.evaluate(val_ds, steps=plan.validation_steps, verbose=0, return_dict=True)
        plain = train_steps.compiled_model(
            cfg, plan.stain_stats, None, False, weights=False, steps_per_epoch=plan.steps_per_epoch
        )
        train_steps._copy_state(model, plain)
        one_device = data_lib.make_eval_dataset(cfg.data_dir, [fold], cfg.data, manifest=plan.manifest)
        run["single"] = plain.evaluate(one_device, verbose=0, return_dict=True)
        if dev.is_chief:
            with_ids = data_lib.make_eval_dataset(
                cfg.data_dir, [fold], cfg.data, with_ids=True, manifest=plan.manifest
            )
            run["predicted_ids"] = model_lib.predict_with_ids(plain, with_ids)[0].tolist()
        run["weights"] = _weights(model)
        out["runs"].append(run)
        out["seconds"]["runs"].append(round(time.monotonic() - run_started, 1))
    return out


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(*sys.argv[1:4])), flush=True)
