"""Thresholds for the fold ensemble: tuned on single models' out-of-fold scores, applied to an average.

    python bench/ensemble_thresholds.py [--work_dir /tmp/hpa-ensemble-thr] [--seeds 0 1] [--num_samples 1000]
        [--image_size 48] [--epochs 12]

For each seed: a synthetic set with a held-out test part (`bench/recipe.py`'s `make_data`: 5 folds), the fold
driver (`model.cv`, the demo's plateau flags, validation TTA 8) trains 5 models and tunes thresholds on their
pooled out-of-fold predictions; the bench then scores the test part with each model (TTA 8) and reports the
held-out macro F1 (against the hidden answers, top class kept for rows with none, as `hpa-predict` does) of:
  as tuned      the 5 models' average, thresholds as tuned on the single models' out-of-fold scores (before)
  rate matched  the average, thresholds from `model.thresholds.ensemble_thresholds` (each class keeps the
                share of positive decisions the single models make on the same test samples:
                `hpa-folds` / `hpa-predict --ensemble_thresholds rate`)
  one model     each model alone with the tuned thresholds (the mean of the 5, and fold 0's)
and how much less spread the average is (mean over classes of the standard deviation of the scores).
Runs resume: data and finished folds in WORK are reused. Prints the load average before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import recipe  # noqa: E402

METHODS = ("as tuned", "rate matched", "one model (mean of 5)", "one model (fold 0)")


def member_scores(arm_dir: str, data_dir: str, raw_dir: str, tta: int) -> tuple[np.ndarray, np.ndarray]:
    """([K, n, C] each fold model's test scores, [n, C] hidden answers), in the sample submission's order."""
    import schemas
    from model import data as data_lib
    from model import predict, score
    from model.config import DataConfig
    from model.submission import order_by_ids, read_id_list
    from pipelines import synthetic

    dirs = sorted(
        (os.path.join(arm_dir, d) for d in os.listdir(arm_dir) if d.startswith("fold")),
        key=lambda d: int(os.path.basename(d)[4:]),
    )
    if not dirs:
        sys.exit(f"no fold dirs in {arm_dir}")
    wanted = read_id_list(os.path.join(raw_dir, synthetic.SUBMISSION_CSV))
    size = int(schemas.read_manifest(data_dir)[schemas.MANIFEST_IMAGE_SIZE][0])
    members = []
    transforms = predict.tta_transforms(tta)
    for d in dirs:
        cfg = DataConfig(image_size=size)
        ds = data_lib.make_eval_dataset(data_dir, [schemas.UNLABELED_FOLD], cfg, with_ids=True)
        ids, scores = predict.predict_scores([predict.load_model_dir(d)], ds, transforms, log=None)
        members.append(order_by_ids(ids, scores, wanted))
    answers = score.read_label_table(os.path.join(raw_dir, synthetic.TEST_LABELS_CSV), schemas.CSV_TARGET)
    return np.stack(members), np.stack([answers[i] for i in wanted])


def compare(members: np.ndarray, answers: np.ndarray, tuned: np.ndarray) -> dict[str, float]:
    """Held-out macro F1 of each method (METHODS), and the scores' spread."""
    from model import thresholds as thr

    def f1(scores, values):
        pred = thr.apply_thresholds(scores, values, at_least_one=True)
        return thr.score_predictions(answers, pred).macro_f1

    average = members.mean(axis=0)
    matched = thr.ensemble_thresholds(tuned, members)
    singles = [f1(m, tuned) for m in members]
    return {
        "as tuned": f1(average, tuned),
        "rate matched": f1(average, matched),
        "one model (mean of 5)": float(np.mean(singles)),
        "one model (fold 0)": singles[0],
        "spread single": float(members.std(axis=1).mean()),
        "spread average": float(average.std(axis=0).mean()),
        "positives per row as tuned": float(
            thr.apply_thresholds(average, tuned, at_least_one=True).sum(1).mean()
        ),
        "positives per row rate matched": float(
            thr.apply_thresholds(average, matched, at_least_one=True).sum(1).mean()
        ),
        "positives per row (answers)": float(answers.sum(1).mean()),
    }


def run_seed(cfg: recipe.BenchConfig) -> dict:
    from model import cv
    from model import thresholds as thr
    from model.config import THRESHOLDS_FILE

    raw, data = recipe.make_data(cfg)
    arm_dir = os.path.join(cfg.work_dir, "arm-plateau")
    if not os.path.exists(os.path.join(arm_dir, cv.SUMMARY_JSON)):
        t0 = time.time()
        flags = ["--backbone", "small", "--weights", "none", "--epochs", str(cfg.epochs), "--batch_size"]
        flags += [str(cfg.batch_size), "--seed", str(cfg.seed), "--verbose", "2"]
        cmd = [sys.executable, "-m", "model.cv", "--data_dir", data, "--out", arm_dir, "--tta", str(cfg.tta)]
        env = dict(os.environ, PYTHONPATH=recipe.ROOT, TF_CPP_MIN_LOG_LEVEL="2")
        cmd += flags + recipe.DEFAULT_ARMS["plateau"].split()
        subprocess.run(cmd, check=True, cwd=recipe.ROOT, env=env)
        print(f"fold driver: {time.time() - t0:.0f} s", flush=True)
    tuned = thr.load_thresholds(os.path.join(arm_dir, "eval", THRESHOLDS_FILE)).values
    members, answers = member_scores(arm_dir, data, raw, cfg.tta)
    return {"seed": cfg.seed, **compare(members, answers, tuned)}


def main(argv: list[str] | None = None) -> int:
    d = recipe.BenchConfig(work_dir="/tmp/hpa-ensemble-thr")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work_dir", default=d.work_dir, help="data and runs, one subdir per seed (resumed)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--num_samples", type=int, default=d.num_samples)
    p.add_argument("--test_samples", type=int, default=d.test_samples)
    p.add_argument("--image_size", type=int, default=d.image_size)
    p.add_argument("--epochs", type=int, default=d.epochs)
    args = p.parse_args(argv)
    print(f"load average before: {'%.2f %.2f %.2f' % os.getloadavg()}", flush=True)
    rows = []
    for seed in args.seeds:
        cfg = dataclasses.replace(
            d,
            work_dir=os.path.join(args.work_dir, f"seed{seed}"),
            seed=seed,
            num_samples=args.num_samples,
            test_samples=args.test_samples,
            image_size=args.image_size,
            epochs=args.epochs,
        )
        rows.append(run_seed(cfg))
        print("RESULT " + json.dumps(rows[-1]), flush=True)
    print()
    print(
        f"held-out macro F1, {args.num_samples} labeled + {args.test_samples} test samples, "
        f"{args.image_size} px, {args.epochs} epochs, 5 folds, TTA 8"
    )
    print("| seed | " + " | ".join(METHODS) + " | rate matched - as tuned | spread: one model / average |")
    print("|---" * (len(METHODS) + 3) + "|")
    for r in rows:
        cells = [f"{r[m]:.4f}" for m in METHODS]
        gain = r["rate matched"] - r["as tuned"]
        spread = f"{r['spread single']:.3f} / {r['spread average']:.3f}"
        print(f"| {r['seed']} | " + " | ".join(cells) + f" | {gain:+.4f} | {spread} |")
    if len(rows) > 1:
        gain = [r["rate matched"] - r["as tuned"] for r in rows]
        mid = statistics.median(gain)
        print(f"rate matched - as tuned: median {mid:+.4f}, min {min(gain):+.4f}, max {max(gain):+.4f}")
    for r in rows:
        print(
            f"seed {r['seed']}: labels per row as tuned {r['positives per row as tuned']:.2f}, rate matched "
            f"{r['positives per row rate matched']:.2f}, answers {r['positives per row (answers)']:.2f}"
        )
    print(f"load average after: {'%.2f %.2f %.2f' % os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
