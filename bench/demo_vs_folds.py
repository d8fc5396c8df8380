"""`make demo` (one model) against `make folds` (the 5-fold ensemble), over several seeds.

    .venv/bin/python bench/demo_vs_folds.py [--seeds 0 1 2] [--work_dir /tmp/hpa-demo-vs-folds]

For each seed S, exactly what a newcomer runs, with DEMO_SEED=S (data, folds and training seeds) and its own
DEMO_DIR (WORK/seedS):
  demo          `run_demo.sh` (what `make demo` runs): one model, fold 0 held out, thresholds tuned on its
                validation predictions; held-out macro F1 from its `score.json`;
  folds         `run_demo.sh` with DEMO_FOLDS="0 1 2 3 4" and DEMO_REUSE_DATA=1 (what `make folds` runs, on
                the demo's data): the fold driver, pooled out-of-fold thresholds, the 5 models' average with
                the thresholds as tuned (`--ensemble_thresholds as_tuned`, the default);
  folds, rate   the same 5 models and thresholds, predicted again with `--ensemble_thresholds rate` (each
                class keeps the single models' decision rate on the test samples) and scored the same way.
The test part (500 samples) is never seen by training or tuning; its answers are kept apart by the generator.
Then per arm: mean, standard deviation, min and max over the seeds, and the per-seed gain of the folds arms
over the demo. Runs resume: a seed whose `score.json` files exist is read, not rerun (delete WORK to redo).
Wall times depend on the machine's load: the load average is printed before and after each run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDS = "0 1 2 3 4"
ARMS = ("demo", "folds", "folds, rate")


def _load() -> str:
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def _run(cmd: list[str], env: dict, log_path: str) -> float:
    """Runs cmd with its output in log_path; returns its wall time in seconds, stops the bench on failure."""
    t0 = time.time()
    print(f"  + {' '.join(cmd)}  (load {_load()}; log {log_path})", flush=True)
    with open(log_path, "w") as log:
        rc = subprocess.call(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc != 0:
        sys.exit(f"failed with exit status {rc}: {' '.join(cmd)} (see {log_path})")
    dt = time.time() - t0
    print(f"    {dt:.0f} s (load {_load()})", flush=True)
    return dt


def _macro_f1(score_json: str) -> float:
    with open(score_json) as f:
        return float(json.load(f)["macro_f1"])


def run_seed(seed: int, work: str, python: str) -> dict:
    """The three arms' held-out macro F1 (and wall times) for one seed; reuses finished runs."""
    demo_dir = os.path.join(work, f"seed{seed}")
    os.makedirs(demo_dir, exist_ok=True)
    env = dict(os.environ, DEMO_PYTHON=python, DEMO_SEED=str(seed), DEMO_DIR=demo_dir)
    runner = os.path.join(ROOT, "run_demo.sh")
    out: dict = {"seed": seed, "seconds": {}}

    demo_score = os.path.join(demo_dir, "run", "score.json")
    if not os.path.exists(demo_score):
        out["seconds"]["demo"] = _run([runner], env, os.path.join(demo_dir, "demo.log"))
    out["demo"] = _macro_f1(demo_score)

    folds_run = os.path.join(demo_dir, "folds")
    folds_score = os.path.join(folds_run, "score.json")
    if not os.path.exists(folds_score):
        fenv = dict(env, DEMO_FOLDS=FOLDS, DEMO_REUSE_DATA="1", DEMO_RUN_DIR=folds_run)
        out["seconds"]["folds"] = _run([runner], fenv, os.path.join(demo_dir, "folds.log"))
    out["folds"] = _macro_f1(folds_score)

    rate_score = os.path.join(folds_run, "score_rate.json")
    if not os.path.exists(rate_score):
        raw = os.path.join(demo_dir, "synthetic")
        models = [os.path.join(folds_run, f"fold{k}") for k in FOLDS.split()]
        submission = os.path.join(folds_run, "submission_rate.csv")
        predict = [python, "-m", "model.predict", "--data_dir", os.path.join(demo_dir, "data"), "--model_dir",
                   *models, "--ids_csv", os.path.join(raw, "sample_submission.csv"), "--out", submission,
                   "--tta", "8", "--ensemble_thresholds", "rate", "--thresholds",
                   os.path.join(folds_run, "eval", "thresholds.json")]
        out["seconds"]["folds, rate"] = _run(predict, env, os.path.join(demo_dir, "rate.log"))
        score = [python, "-m", "model.score", "--submission", submission, "--answers",
                 os.path.join(raw, "test_labels.csv"), "--out", rate_score]
        _run(score, env, os.path.join(demo_dir, "rate_score.log"))
    out["folds, rate"] = _macro_f1(rate_score)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="DEMO_SEED values [0 1 2]")
    p.add_argument("--work_dir", default="/tmp/hpa-demo-vs-folds", help="where the runs go (resumable)")
    p.add_argument("--python", default=os.path.join(ROOT, ".venv", "bin", "python"), help="interpreter")
    args = p.parse_args(argv)
    if not os.path.exists(args.python):
        sys.exit(f"{args.python} not found: run `make setup` first (or pass --python)")
    work = os.path.abspath(args.work_dir)
    rows = []
    for seed in args.seeds:
        print(f"seed {seed}:", flush=True)
        rows.append(run_seed(seed, work, os.path.abspath(args.python)))
        r = rows[-1]
        print("  held-out macro F1: " + ", ".join(f"{a} {r[a]:.4f}" for a in ARMS), flush=True)

    print()
    print("| seed | " + " | ".join(ARMS) + " | folds - demo | folds, rate - demo |")
    print("| --- " * (len(ARMS) + 3) + "|")
    for r in rows:
        cells = [f"{r[a]:.4f}" for a in ARMS]
        cells += [f"{r['folds'] - r['demo']:+.4f}", f"{r['folds, rate'] - r['demo']:+.4f}"]
        print(f"| {r['seed']} | " + " | ".join(cells) + " |")
    if len(rows) > 1:
        for name, f in (("mean", statistics.mean), ("sd", statistics.stdev), ("min", min), ("max", max)):
            cells = [f"{f([r[a] for r in rows]):.4f}" for a in ARMS]
            cells += [f"{f([r['folds'] - r['demo'] for r in rows]):+.4f}",
                      f"{f([r['folds, rate'] - r['demo'] for r in rows]):+.4f}"]
            print(f"| {name} | " + " | ".join(cells) + " |")
    wins = {a: sum(r[a] > r["demo"] for r in rows) for a in ARMS[1:]}
    print()
    print("seeds where the ensemble beats the single model: "
          + ", ".join(f"{a} {wins[a]} of {len(rows)}" for a in ARMS[1:]))
    for r in rows:
        if r["seconds"]:
            print(f"seed {r['seed']} wall times (this invocation): "
                  + ", ".join(f"{a} {s:.0f} s" for a, s in r["seconds"].items()))


if __name__ == "__main__":
    main()
