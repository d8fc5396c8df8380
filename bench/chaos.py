"""The fault-injection campaign: kill every job at random instants, rerun the same command, compare outputs.

    .venv/bin/python bench/chaos.py [--jobs download preprocess train folds predict] [--kills 4]
        [--signals KILL INT] [--seed 0] [--workdir DIR]

For each job, on small generated data: one uninterrupted run (the reference, timed), then `--kills` runs,
each stopped by a signal (SIGKILL, or SIGINT where a person would press Ctrl-C, alternating) at an instant
drawn uniformly over the reference's wall time, then the same command rerun until it exits 0 (at most
`--max_reruns` times). After each kill and at the end the outputs are checked:
- `looks complete, is not`: right after the kill, the job's completion marker is there (the dataset's
  manifest, a model dir without its backup, a submission...) but the output differs from the reference;
- `recovered`: the same command, rerun, finished with exit 0 (no manual step);
- `identical`: the final outputs equal the reference's (byte for byte for files; for training with
  `--deterministic --seed`, the final weights and `val_predictions.npz`);
- `stuck`: the reruns did not finish;
- `lost`: finished work done again (training: the rerun resumed from an earlier epoch than the backup left
  by the kill, or a finished fold trained again).
It prints one row per job and the totals. Each kill restarts from the state the kill left (no cleaning).
Figures depend on the machine's load: the table says which reference times it drew from.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

BIN = os.path.join(os.path.dirname(sys.executable))
SIGNALS = {"KILL": signal.SIGKILL, "INT": signal.SIGINT, "TERM": signal.SIGTERM}
SMALL_TRAIN = ["--backbone", "small", "--weights", "none", "--small_filters", "4", "--batch_size", "4"]
SMALL_TRAIN += ["--epochs", "3", "--steps_per_epoch", "6", "--seed", "0", "--deterministic", "--verbose", "2"]


@dataclasses.dataclass
class Job:
    """A command of the campaign: how to run it in a fresh dir, what its outputs are, when they look done."""

    name: str
    argv: Callable[[str], list[str]]  # run dir -> command line
    outputs: Callable[[str], dict[str, str]]  # run dir -> {name: digest} of its final outputs
    looks_complete: Callable[[str], bool]  # run dir -> the job's completion marker is present
    resumed_from: Callable[[str], int | None] = lambda out: None  # rerun output -> epoch it resumed after
    progress: Callable[[str], int | None] = lambda d: None  # run dir -> finished work (epochs) at the kill


@dataclasses.dataclass
class Tally:
    kills: int = 0
    recovered: int = 0
    identical: int = 0
    stuck: int = 0
    lost: int = 0
    false_complete: int = 0
    reruns: int = 0
    notes: list = dataclasses.field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------
# Digests of outputs.


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _tree(root: str, skip: Callable[[str], bool] = lambda rel: False) -> dict[str, str]:
    found = {}
    for dirpath, dirnames, names in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if name.startswith(".") or skip(rel):
                continue
            with open(os.path.join(dirpath, name), "rb") as f:
                found[rel] = _digest(f.read())
    return found


def _manifest_digest(path: str) -> str:
    with open(path) as f:
        manifest = json.load(f)
    for key in ("wall_time_s", "arguments", "beam_args"):  # the run's own time and spelling
        manifest.pop(key, None)
    # tf.Transform's mean and std sum in the order its workers combine: equal to float32 rounding only.
    stats = manifest.get("stain_stats", {})
    manifest["stain_stats"] = {k: [round(float(v), 4) for v in vals] for k, vals in stats.items()}
    return _digest(json.dumps(manifest, sort_keys=True).encode())


def _npz_digest(path: str) -> str:
    import numpy as np

    with np.load(path) as z:
        return _digest(b"".join(z[k].tobytes() for k in sorted(z.files)))


def _model_digest(model_dir: str) -> dict[str, str]:
    """The final weights and validation predictions of a model dir (the deterministic outputs)."""
    import keras
    import numpy as np

    from model import model as _registers_the_layers  # noqa: F401 - the model's own layers, for loading

    model = keras.saving.load_model(os.path.join(model_dir, "model.keras"), compile=False)
    weights = _digest(b"".join(np.asarray(w).tobytes() for w in model.get_weights()))
    return {
        "weights": weights,
        "val_predictions": _npz_digest(os.path.join(model_dir, "val_predictions.npz")),
    }


def _finished_model_dir(model_dir: str) -> bool:
    return all(
        os.path.exists(os.path.join(model_dir, n)) for n in ("model.keras", "val_predictions.npz")
    ) and (not os.path.exists(os.path.join(model_dir, "backup")))


def _backup_epoch(model_dir: str) -> int | None:
    from model import rundir

    return rundir.backup_epoch(model_dir)


def _resumed_after(output: str) -> int | None:
    found = re.findall(r"resum\w+ .*after epoch (\d+)", output)
    return int(found[-1]) if found else 0


# ---------------------------------------------------------------------------------------------------------
# The jobs, on small data made once in the campaign's work dir.


def make_jobs(work: str, server_url: str | None) -> dict[str, Job]:
    data = os.path.join(work, "synthetic")
    dataset = os.path.join(work, "dataset")  # a reference preprocessing output (for train/folds/predict)
    model_dir = os.path.join(work, "model")  # a reference model (for predict)

    def pre_outputs(d):
        out = os.path.join(d, "out")
        # transform_output/ holds tf.Transform's SavedModel, whose bytes change from run to run (its
        # statistics are compared in the manifest).
        found = _tree(out, skip=lambda rel: rel == "manifest.json" or rel.startswith("transform_output"))
        found["manifest.json"] = _manifest_digest(os.path.join(out, "manifest.json"))
        return found

    def pre_complete(d):
        return os.path.exists(os.path.join(d, "out", "manifest.json"))

    def folds_outputs(d):
        out = os.path.join(d, "cv")
        found = {}
        for k in (0, 1):
            found.update({f"fold{k}/{n}": v for n, v in _model_digest(os.path.join(out, f"fold{k}")).items()})
        found["submission.csv"] = _tree(out)["submission.csv"]
        found["test_probabilities.npz"] = _npz_digest(os.path.join(out, "test_probabilities.npz"))
        return found

    def folds_progress(d):
        from model import cv

        return sum(cv.fold_status(cv.fold_dir(os.path.join(d, "cv"), k)) == cv.FINISHED for k in (0, 1))

    def predict_outputs(d):
        return _tree(d, skip=lambda rel: not rel.startswith("submission"))

    jobs = {
        "preprocess": Job(
            "preprocess",
            lambda d: [
                f"{BIN}/hpa-preprocess",
                *(
                    "--labels_csv",
                    os.path.join(data, "train.csv"),
                    "--input_dir",
                    os.path.join(data, "train"),
                ),
                *("--labels_csv", os.path.join(data, "sample_submission.csv")),
                *("--input_dir", os.path.join(data, "test"), "--source", "train", "--source", "test"),
                *("--output_dir", os.path.join(d, "out"), "--num_folds", "2", "--num_shards", "2"),
                *("--progress_seconds", "60"),
            ],
            pre_outputs,
            pre_complete,
        ),
        "train": Job(
            "train",
            lambda d: [
                f"{BIN}/hpa-train",
                *("--data_dir", dataset, "--model_dir", os.path.join(d, "run"), *SMALL_TRAIN),
            ],
            lambda d: _model_digest(os.path.join(d, "run")),
            lambda d: _finished_model_dir(os.path.join(d, "run")),
            _resumed_after,
            lambda d: _backup_epoch(os.path.join(d, "run")),
        ),
        "folds": Job(
            "folds",
            lambda d: [
                f"{BIN}/hpa-folds",
                *("--data_dir", dataset, "--out", os.path.join(d, "cv"), "--tta", "1"),
                *("--ids_csv", os.path.join(data, "sample_submission.csv"), *SMALL_TRAIN),
            ],
            folds_outputs,
            lambda d: os.path.exists(os.path.join(d, "cv", "summary.json")),
            lambda out: len(re.findall(r"skipped \(finished\)", out)),
            folds_progress,
        ),
        "predict": Job(
            "predict",
            lambda d: [
                f"{BIN}/hpa-predict",
                *("--data_dir", dataset, "--model_dir", model_dir, "--tta", "2"),
                *("--ids_csv", os.path.join(data, "sample_submission.csv")),
                *("--out", os.path.join(d, "submission.csv")),
                *("--probabilities", os.path.join(d, "submission.probabilities.npz")),
            ],
            predict_outputs,
            lambda d: os.path.exists(os.path.join(d, "submission.csv")),
        ),
    }
    if server_url:
        jobs["download"] = Job(
            "download",
            lambda d: [
                f"{BIN}/hpa-download",
                *(
                    "--labels_csv",
                    os.path.join(work, "hpav18.csv"),
                    "--output_dir",
                    os.path.join(d, "hpav18"),
                ),
                *("--base_url", server_url, "--direct_num_workers", "1", "--progress_seconds", "60"),
            ],
            lambda d: {
                **_tree(os.path.join(d, "hpav18"), skip=lambda rel: rel.endswith(".csv")),
                "report": _report_digest(os.path.join(d, "hpav18", "download_report.csv")),
            },
            lambda d: os.path.exists(os.path.join(d, "hpav18", "download_report.csv")),
        )
    return jobs


def _report_digest(path: str) -> str:
    """The report's rows with `present` counted as `downloaded` (a rerun finds the files it already has)."""
    with open(path, newline="") as f:
        rows = [
            (r["Id"], r["stain"], r["status"].replace("present", "downloaded")) for r in csv.DictReader(f)
        ]
    return _digest(json.dumps(rows).encode())


def prepare(work: str, jobs_wanted: list[str], samples: int) -> None:
    """The campaign's inputs: a synthetic set, its dataset and a reference model when later jobs need them."""
    env = _env()
    data = os.path.join(work, "synthetic")
    if not os.path.exists(os.path.join(data, "train.csv")):
        _check(
            [f"{BIN}/hpa-synthetic", "--output_dir", data, "--num_samples", str(samples)]
            + ["--image_size", "32", "--test_samples", "6", "--seed", "0"],
            env,
        )
        with (
            open(os.path.join(data, "test_labels.csv")) as f,
            open(os.path.join(data, "sample_submission.csv"), "w") as g,
        ):
            g.write("Id,Predicted\n" + "".join(f"{r['Id']},0\n" for r in csv.DictReader(f)))
    needs_data = {"train", "folds", "predict"} & set(jobs_wanted)
    dataset = os.path.join(work, "dataset")
    if needs_data and not os.path.exists(os.path.join(dataset, "manifest.json")):
        argv = make_jobs(work, None)["preprocess"].argv(work)
        _check([a if a != os.path.join(work, "out") else dataset for a in argv], env)
    model_dir = os.path.join(work, "model")
    if "predict" in jobs_wanted and not _finished_model_dir(model_dir):
        _check([f"{BIN}/hpa-train", "--data_dir", dataset, "--model_dir", model_dir, *SMALL_TRAIN], env)
        _check([f"{BIN}/hpa-evaluate", "--model_dir", model_dir], env)
    if "download" in jobs_wanted:
        ids = [f"{60 + i}_A{i}_1" for i in range(6)]
        with open(os.path.join(work, "hpav18.csv"), "w") as f:
            f.write("Id,Target\n" + "".join(f"{i},0\n" for i in ids))


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=_ROOT, TF_CPP_MIN_LOG_LEVEL="3")


def _check(argv: list[str], env: dict) -> None:
    done = subprocess.run(argv, env=env, capture_output=True, text=True, preexec_fn=_default_signals)
    if done.returncode != 0:
        raise SystemExit(
            f"chaos: setup step failed: {' '.join(argv)}\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )


# ---------------------------------------------------------------------------------------------------------
# The campaign.


def _default_signals() -> None:  # pragma: no cover - runs in the child between fork and exec
    """A job started from a background shell inherits SIGINT ignored; a person's Ctrl-C is not ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _run(argv: list[str], timeout: float) -> tuple[int, str, float]:
    t0 = time.time()
    try:
        done = subprocess.run(
            argv, env=_env(), capture_output=True, text=True, timeout=timeout, preexec_fn=_default_signals
        )
        return done.returncode, done.stdout + done.stderr, time.time() - t0
    except subprocess.TimeoutExpired as e:
        return -999, str(e.stdout or "") + str(e.stderr or ""), time.time() - t0


def _run_and_kill(argv: list[str], after: float, signum: int) -> tuple[int, str, float]:
    """Runs argv, sends `signum` after `after` s; returns (status, output, seconds it ran when it finished
    before the signal, else -1)."""
    t0 = time.time()
    proc = subprocess.Popen(
        argv, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=_default_signals
    )
    finished = -1.0
    try:
        proc.wait(timeout=after)
        finished = time.time() - t0
    except subprocess.TimeoutExpired:
        proc.send_signal(signum)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()  # a process that ignored the signal: counted by the caller (not recovered cleanly)
        out, _ = proc.communicate()
    return proc.returncode, out.decode(errors="replace"), finished


def campaign(
    job: Job, work: str, kills: int, signals: list[int], rng: random.Random, max_reruns: int, log=print
) -> tuple[Tally, float]:
    ref_dir = os.path.join(work, f"{job.name}-reference")
    shutil.rmtree(ref_dir, ignore_errors=True)
    os.makedirs(ref_dir)
    rc, out, ref_seconds = _run(job.argv(ref_dir), timeout=1800)
    if rc != 0:
        raise SystemExit(f"chaos: the reference run of {job.name} failed ({rc}):\n{out[-3000:]}")
    reference = job.outputs(ref_dir)
    log(f"{job.name}: reference in {ref_seconds:.1f} s, {len(reference)} outputs")
    tally = Tally()
    duration = ref_seconds
    for k in range(kills):
        d = os.path.join(work, f"{job.name}-kill{k}")
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        signum = signals[k % len(signals)]
        for _ in range(4):  # the machine's load varies: a run that ended before its instant is not a kill
            after = rng.uniform(0, duration)
            rc, out, finished_in = _run_and_kill(job.argv(d), after, signum)
            if finished_in < 0:
                break
            duration = finished_in  # draw the next instant over this run's wall time
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
        if finished_in >= 0:
            tally.notes.append(f"kill {k}: every run ended before its instant (no kill)")
            continue
        tally.kills += 1
        interrupted = rc != 0
        if signum == signal.SIGINT and rc == 130 and "Traceback" in out:
            tally.notes.append(f"kill {k}: a traceback after SIGINT")
        if rc == 0:
            done_note = "finished before the signal"
        else:
            done_note = f"exit {rc}"
        progress = job.progress(d)
        if job.looks_complete(d):
            try:
                if job.outputs(d) != reference and interrupted:
                    tally.false_complete += 1
                    tally.notes.append(f"kill {k} at {after:.1f} s: looks complete, differs")
            except Exception as e:  # an output that cannot be read but looks complete
                tally.false_complete += 1
                tally.notes.append(f"kill {k}: looks complete, unreadable ({e})")
        finished = rc == 0
        reruns = 0
        rerun_out = ""
        while not finished and reruns < max_reruns:
            reruns += 1
            rc2, rerun_out, _ = _run(job.argv(d), timeout=max(600, 6 * ref_seconds))
            finished = rc2 == 0
            if not finished:
                tally.notes.append(f"kill {k}: rerun {reruns} exit {rc2}: {rerun_out.strip()[-300:]}")
        tally.reruns += reruns
        if not finished:
            tally.stuck += 1
            log(f"  kill {k}: SIG{signal.Signals(signum).name[3:]} at {after:.1f} s ({done_note}): STUCK")
            continue
        tally.recovered += 1
        resumed = job.resumed_from(rerun_out) if reruns else None
        if progress is not None and resumed is not None and resumed < progress:
            tally.lost += 1
            tally.notes.append(
                f"kill {k}: {progress} finished before the kill, rerun resumed after {resumed}"
            )
        same = job.outputs(d) == reference
        tally.identical += same
        log(
            f"  kill {k}: SIG{signal.Signals(signum).name[3:]} at {after:.1f} s ({done_note}), "
            f"{reruns} rerun(s), {'identical' if same else 'DIFFERENT'}"
        )
    return tally, ref_seconds


def start_server(work: str):
    """The loopback image server of the download job (tests/image_server.py), serving 6 samples."""
    from tests.image_server import ImageServer

    server = ImageServer(latency=0.05)
    for i in range(6):
        server.add_sample(f"{60 + i}_A{i}_1", seed=i)
    server.__enter__()
    return server


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", nargs="+", default=["download", "preprocess", "train", "folds", "predict"])
    p.add_argument("--kills", type=int, default=4, help="kills per job")
    p.add_argument("--signals", nargs="+", default=["KILL", "INT"], choices=sorted(SIGNALS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=24, help="labeled synthetic samples (32 px)")
    p.add_argument("--max_reruns", type=int, default=3)
    p.add_argument("--workdir", default=None, help="default: a fresh temporary folder, removed at the end")
    args = p.parse_args(argv)
    work = args.workdir or tempfile.mkdtemp(prefix="hpa-chaos-")
    os.makedirs(work, exist_ok=True)
    rng = random.Random(args.seed)
    with open("/proc/loadavg") as f:
        load_before = f.read().split()[:3]
    prepare(work, args.jobs, args.samples)
    server = start_server(work) if "download" in args.jobs else None
    rows = []
    try:
        jobs = make_jobs(work, server.base_url if server else None)
        for name in args.jobs:
            tally, seconds = campaign(
                jobs[name], work, args.kills, [SIGNALS[s] for s in args.signals], rng, args.max_reruns
            )
            rows.append((name, seconds, tally))
    finally:
        if server:
            server.__exit__(None, None, None)
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    with open("/proc/loadavg") as f:
        load_after = f.read().split()[:3]
    header = "| job | reference s | kills | recovered by rerunning | identical | looks complete, is not | "
    header += "stuck | lost work | reruns |"
    print("\n" + header + "\n|" + " --- |" * 9)
    total = Tally()
    for name, seconds, t in rows:
        print(
            f"| {name} | {seconds:.1f} | {t.kills} | {t.recovered} | {t.identical} | {t.false_complete} | "
            f"{t.stuck} | {t.lost} | {t.reruns} |"
        )
        for field in ("kills", "recovered", "identical", "false_complete", "stuck", "lost", "reruns"):
            setattr(total, field, getattr(total, field) + getattr(t, field))
    print(
        f"| all | | {total.kills} | {total.recovered} | {total.identical} | {total.false_complete} | "
        f"{total.stuck} | {total.lost} | {total.reruns} |"
    )
    print(
        f"load average before {' '.join(load_before)}, after {' '.join(load_after)}; signals {args.signals}, "
        f"instants uniform over each reference's wall time, seed {args.seed}"
    )
    for name, _, t in rows:
        for note in t.notes:
            print(f"note: {name}: {note}")
    ok = total.recovered == total.kills and total.identical == total.kills and not total.false_complete
    return 0 if ok and not total.lost else 1


if __name__ == "__main__":
    sys.exit(main())
