"""Benchmark of batch prediction on Beam (DirectRunner, in-process) against `model.predict` on the same data.

Writes N unlabeled test records of random stains (--image_size px, two shards) and --models exported model
dirs with the `small` backbone (untrained: the time does not depend on the weights), then times, in the same
run and alternating, medians of --repeats whole jobs: (a) `model.predict.run`, the baseline (tf.data and
Keras on one host), and (b) `pipelines.batch_predict.run` (Beam's DirectRunner: TFRecord reading, decoding,
one RunInference per model, the ensemble, the outputs). Both run in this process, so neither pays for
starting Python and importing TensorFlow. Checks that both wrote the same submission and prints the largest
probability difference. Prints the load average before and after; the records sit in the page cache after
the first pass (written just before).

Usage:
  python bench/batch_predict.py [--num_records 400] [--image_size 64] [--models 2] [--tta 8] [--repeats 3]
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num_records", type=int, default=400)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--models", type=int, default=2)
    p.add_argument("--tta", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    from model import predict
    from pipelines import batch_predict
    from tests.test_batch_predict import _model_dir
    from tests.test_predict import write_test_set

    root = tempfile.mkdtemp(prefix="bench-batch-predict-")
    data_dir = os.path.join(root, "data")
    write_test_set(data_dir, [f"b{i:05d}" for i in range(args.num_records)], size=args.image_size)
    thresholds = np.random.default_rng(1).uniform(0.4, 0.6, 28)
    dirs = [
        _model_dir(os.path.join(root, f"m{k}"), k, thresholds, args.image_size) for k in range(args.models)
    ]
    print(f"{args.num_records} records of {args.image_size} px, {args.models} model(s), --tta {args.tta}")
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
