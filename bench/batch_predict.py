"""Benchmark of batch prediction on Beam (DirectRunner, in-process) against `model.predict` on the same data.

Writes N unlabeled test records of random stains (--image_size px, two shards) and --models exported model
dirs of the demo's model: `build_model` with the training job's defaults and the demo's `--backbone small
--weights none` (16 filters, dropout, the augmentation layer that is off at inference), as `hpa-train` builds
it, untrained (the time does not depend on the weights; `--backbone resnet50` for a large backbone,
`--small_filters 4` for the 4-filter test fixture the bench used before), then times, in the same
run and alternating, medians of --repeats whole jobs: (a) `model.predict.run`, the baseline (tf.data and
Keras on one host), and (b) `pipelines.batch_predict.run` (Beam's DirectRunner: TFRecord reading, decoding,
one RunInference per model, the ensemble, the outputs). Both run in this process, so neither pays for
starting Python and importing TensorFlow. Checks that both wrote the same submission and prints the largest
probability difference. Prints the load average before and after; the records sit in the page cache after
the first pass (written just before).

Usage:
  python bench/batch_predict.py [--num_records 400] [--image_size 64] [--models 2] [--tta 8] [--repeats 3]
      [--backbone small|resnet50|...] [--small_filters 16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def demo_model_dir(path, seed, thresholds, size, backbone="small", small_filters=None) -> str:
    """An exported model dir (model.keras, config.json, export/, thresholds) of the model `hpa-train` builds.

    The training job's ModelConfig defaults with `backbone` and weights none (the demo's flags for `small`),
    and its augmentation layer; untrained, with fixed input statistics.
    """
    import dataclasses

    import keras

    from model import augment
    from model import model as model_lib
    from model.config import EXPORT_DIR, DataConfig, ModelConfig
    from tests import fixtures

    keras.utils.set_random_seed(seed)
    mcfg = ModelConfig(backbone=backbone, weights="none")
    if small_filters is not None:
        mcfg = dataclasses.replace(mcfg, small_filters=small_filters)
    model = model_lib.build_model(
        mcfg, [60.0] * 4, [50.0] * 4, augment.from_data_config(DataConfig(image_size=size), seed)
    )
    fixtures.write_model_dir(path, model, mcfg, size, thresholds)
    model_lib.export_serving(model, os.path.join(path, EXPORT_DIR), size)
    return path


def _params(model_dir: str) -> str:
    from model import predict

    return f"{predict.load_model_dir(model_dir).count_params():,}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num_records", type=int, default=400)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--models", type=int, default=2)
    p.add_argument("--tta", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backbone", default="small", help="the models' backbone (untrained; default: demo's)")
    p.add_argument(
        "--small_filters", type=int, default=None, help="small backbone's width (default: the training job's)"
    )
    args = p.parse_args(argv)

    from model import predict
    from pipelines import batch_predict
    from tests.test_predict import write_test_set

    root = tempfile.mkdtemp(prefix="bench-batch-predict-")
    data_dir = os.path.join(root, "data")
    write_test_set(data_dir, [f"b{i:05d}" for i in range(args.num_records)], size=args.image_size)
    thresholds = np.random.default_rng(1).uniform(0.4, 0.6, 28)
    dirs = [
        demo_model_dir(
            os.path.join(root, f"m{k}"), k, thresholds, args.image_size, args.backbone, args.small_filters
        )
        for k in range(args.models)
    ]
    print(
        f"{args.num_records} records of {args.image_size} px, {args.models} model(s) of backbone "
        f"{args.backbone} ({_params(dirs[0])} parameters each, untrained), --tta {args.tta}"
    )
    print(f"before: {_uptime()}")

    def baseline(out: str) -> None:
        cfg = predict.PredictConfig(
            data_dir=data_dir,
            model_dirs=tuple(dirs),
            out=os.path.join(out, "submission.csv"),
            tta=args.tta,
            probabilities=os.path.join(out, "p.npz"),
        )
        predict.run(cfg, log=lambda msg: None)

    def beam_job(out: str) -> None:
        argv = ["--data_dir", data_dir, "--model_dir", *dirs, "--out", os.path.join(out, "submission.csv")]
        argv += ["--tta", str(args.tta), "--probabilities", os.path.join(out, "p.npz")]
        batch_predict.run(argv + ["--progress_seconds", "1000"], log=lambda msg: None)

    times: dict[str, list[float]] = {"model.predict": [], "beam DirectRunner": []}
    for r in range(args.repeats):
        for name, fn in (("model.predict", baseline), ("beam DirectRunner", beam_job)):
            out = os.path.join(root, f"{name.split()[0]}{r}")
            start = time.perf_counter()
            fn(out)
            times[name].append(time.perf_counter() - start)
    print(f"after: {_uptime()}")
    base = statistics.median(times["model.predict"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(
            f"{name:18s} median {med:6.2f} s ({args.num_records / med:6.1f} records/s), x{med / base:.2f} "
            f"the baseline; runs {[round(t, 2) for t in ts]}"
        )
    with open(os.path.join(root, "model.predict0", "submission.csv"), "rb") as a:
        with open(os.path.join(root, "beam0", "submission.csv"), "rb") as b:
            same = a.read() == b.read()
    with (
        np.load(os.path.join(root, "model.predict0", "p.npz")) as a,
        np.load(os.path.join(root, "beam0", "p.npz")) as b,
    ):
        diff = float(np.abs(a["scores"] - b["scores"]).max())
    print(f"same submission: {same}; largest probability difference {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
