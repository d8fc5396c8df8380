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
import contextlib
import csv
import dataclasses
import functools
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
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # this process loads models to compare them
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

BIN = os.path.join(os.path.dirname(sys.executable))
JOBS = ("download", "preprocess", "train", "mirrored", "workers", "cache", "folds", "predict")
JOBS += ("batch-predict", "inspect")
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
    # run dir -> [(argv, extra environment)] of processes run together (loopback workers); default: argv
    commands: Callable[[str], list[tuple[list[str], dict]]] | None = None
    # run dir -> the event that half of the kills wait for (then signal at once), e.g. a cache fill begun
    trigger: Callable[[str], bool] | None = None
    # run dir -> arrays compared with a tolerance when the outputs are not bit-identical (training)
    arrays: Callable[[str], dict] | None = None

    def processes(self, d: str) -> list[tuple[list[str], dict]]:
        return self.commands(d) if self.commands else [(self.argv(d), {})]


@dataclasses.dataclass
class Tally:
    kills: int = 0
    recovered: int = 0
    identical: int = 0
    stuck: int = 0
    lost: int = 0
    false_complete: int = 0
    reruns: int = 0
    close: int = 0  # not bit-identical, equal within the tolerance of `_close`
    int_kills: int = 0  # kills by SIGINT / SIGTERM ...
    int_clean: int = 0  # ... that ended with 130 / 143 and the one `interrupted` line, no traceback
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


def _model_arrays(model_dir: str) -> dict:
    """The final weights (one flat array) and validation scores of a model dir."""
    import keras
    import numpy as np

    from model import model as _registers_the_layers  # noqa: F401 - the model's own layers, for loading

    model = keras.saving.load_model(os.path.join(model_dir, "model.keras"), compile=False)
    with np.load(os.path.join(model_dir, "val_predictions.npz")) as z:
        scores = z["scores"].copy()
    return {"weights": np.concatenate([np.ravel(w) for w in model.get_weights()]), "val_scores": scores}


def _model_digest(model_dir: str) -> dict[str, str]:
    """The final weights and validation predictions of a model dir (the deterministic outputs)."""
    arrays = _model_arrays(model_dir)
    return {
        "weights": _digest(arrays["weights"].tobytes()),
        "val_predictions": _npz_digest(os.path.join(model_dir, "val_predictions.npz")),
    }


CLOSE = {"rtol": 1e-4, "atol": 1e-5}  # what "close" means when training is not bit-identical


def _close(a: dict, b: dict) -> bool:
    import numpy as np

    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and np.allclose(a[k], b[k], **CLOSE) for k in a
    )


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

    jobs: dict[str, Job] = {
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

    def train_job(name: str, *extra: str, **kw) -> Job:
        return Job(
            name,
            lambda d: [
                f"{BIN}/hpa-train",
                *("--data_dir", dataset, "--model_dir", os.path.join(d, "run"), *SMALL_TRAIN, *extra),
            ],
            lambda d: _model_digest(os.path.join(d, "run")),
            lambda d: _finished_model_dir(os.path.join(d, "run")),
            _resumed_after,
            lambda d: _backup_epoch(os.path.join(d, "run")),
            arrays=lambda d: _model_arrays(os.path.join(d, "run")),
            **kw,
        )

    jobs["train"] = train_job("train")
    jobs["mirrored"] = train_job("mirrored", "--strategy", "mirrored", "--cpu_replicas", "2")

    def cache_begun(d):
        cache = os.path.join(d, "cache")
        return os.path.isdir(cache) and bool(os.listdir(cache))

    jobs["cache"] = train_job("cache", "--cache", "CACHE", trigger=cache_begun)
    jobs["cache"].argv = lambda d, argv=jobs["cache"].argv: [
        os.path.join(d, "cache") if a == "CACHE" else a for a in argv(d)
    ]

    def worker_commands(d):
        base = jobs["train"].argv(d) + ["--cpu_replicas", "1"]
        ports = _ports(d, 2)
        cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
        return [
            (base, {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})})
            for i in range(2)
        ]

    jobs["workers"] = train_job("workers", commands=worker_commands)
    jobs["batch-predict"] = Job(
        "batch-predict",
        lambda d: [
            f"{BIN}/hpa-batch-predict",
            *("--data_dir", dataset, "--model_dir", model_dir, "--tta", "2"),
            *("--ids_csv", os.path.join(data, "sample_submission.csv")),
            *("--out", os.path.join(d, "submission.csv")),
            *("--probabilities", os.path.join(d, "submission.probabilities.npz")),
            *("--direct_num_workers", "2", "--progress_seconds", "60"),
        ],
        predict_outputs,
        lambda d: os.path.exists(os.path.join(d, "submission.csv")),
    )
    jobs["inspect"] = Job(
        "inspect",
        lambda d: [
            f"{BIN}/hpa-inspect",
            *("--model_dir", model_dir, "--data_dir", dataset, "--out", os.path.join(d, "gallery")),
            *("--per_class", "2", "--tta", "1"),
        ],
        lambda d: _tree(os.path.join(d, "gallery")),
        lambda d: os.path.exists(os.path.join(d, "gallery", "index.html")),
    )
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


def _ports(d: str, n: int) -> list[int]:
    """n free loopback ports for the run dir's workers, chosen once (its reruns are the same commands)."""
    import socket

    path = os.path.join(d, "ports.json")
    if not os.path.exists(path):
        socks = [socket.socket() for _ in range(n)]
        try:
            for sock in socks:
                sock.bind(("127.0.0.1", 0))
            ports = [sock.getsockname()[1] for sock in socks]
        finally:
            for sock in socks:
                sock.close()
        with open(path, "w") as f:
            json.dump(ports, f)
    with open(path) as f:
        return json.load(f)


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
    needs_model = {"predict", "batch-predict", "inspect"} & set(jobs_wanted)
    needs_data = {"train", "mirrored", "workers", "cache", "folds"} & set(jobs_wanted) | needs_model
    dataset = os.path.join(work, "dataset")
    if needs_data and not os.path.exists(os.path.join(dataset, "manifest.json")):
        argv = make_jobs(work, None)["preprocess"].argv(work)
        _check([a if a != os.path.join(work, "out") else dataset for a in argv], env)
    model_dir = os.path.join(work, "model")
    if needs_model and not _finished_model_dir(model_dir):
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


@dataclasses.dataclass
class Ended:
    """How a run (all its processes) ended."""

    status: int  # the first non-zero exit status of its processes, else 0 (-999: stopped at the ceiling)
    output: str  # stdout and stderr of every process, in order
    stderr: list[str]  # each process' stderr
    finished_in: float  # seconds it ran when it ended before the signal, else -1
    statuses: list[int] = dataclasses.field(default_factory=list)


def _popen(argv: list[str], extra: dict) -> subprocess.Popen:
    """A process of a job in its own session (its own process group, as a shell's job is)."""
    return subprocess.Popen(
        argv,
        env={**_env(), **extra},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=_default_signals,
        start_new_session=True,
    )


class Running:
    """The processes of one run of a job, their outputs read as they come (threads)."""

    def __init__(self, job: Job, d: str, only: list[int] | None = None, keep: Running | None = None):
        """Starts the job's processes (`only` these indices; the others are `keep`'s, still running)."""
        import threading

        commands = job.processes(d)
        self.t0 = time.time()
        self.procs: list = [None] * len(commands)
        self.outs: list = [None] * len(commands)
        self.threads: list = [None] * len(commands)
        for i, (argv, extra) in enumerate(commands):
            if only is not None and i not in only:
                self.procs[i], self.threads[i] = keep.procs[i], keep.threads[i]
                continue
            self.procs[i] = _popen(argv, extra)
            self.threads[i] = threading.Thread(target=self._read, args=(self.outs, i, self.procs[i]))
            self.threads[i].start()
        self.kept = [i for i in range(len(commands)) if only is not None and i not in only]
        self.keep = keep

    @staticmethod
    def _read(outs, i, proc):
        outs[i] = [x.decode(errors="replace") for x in proc.communicate()]

    def alive(self) -> list[int]:
        return [i for i, p in enumerate(self.procs) if p.poll() is None]

    def wait(self, seconds: float, which: list[int] | None = None) -> bool:
        """Waits until the processes `which` (default: all) ended, at most `seconds`; whether they did."""
        deadline = time.time() + seconds
        for i in range(len(self.procs)) if which is None else which:
            self.threads[i].join(max(0.1, deadline - time.time()))
        return not [i for i in self.alive() if which is None or i in which]

    def stop(self) -> None:
        """SIGKILLs what still runs (a run that hit its ceiling: status -999)."""
        for i in self.alive():
            with contextlib.suppress(OSError):
                os.killpg(self.procs[i].pid, signal.SIGKILL)
            self.procs[i].wait()
            self.procs[i].returncode = -999
        for t in self.threads:
            t.join()

    def ended(self, finished_in: float | None = None) -> Ended:
        for i in self.kept:  # a kept process' output is read by the run that started it
            self.threads[i].join()
            self.outs[i] = self.keep.outs[i]
        statuses = [p.returncode for p in self.procs]
        status = next((c for c in statuses if c != 0), 0)
        outs = [self.outs[i] or ["", ""] for i in range(len(self.procs))]
        output = "".join(o + e for o, e in outs)
        took = time.time() - self.t0 if finished_in is None else finished_in
        return Ended(status, output, [e for _, e in outs], took, statuses)


def _run(job: Job, d: str, timeout: float, only=None, keep: Running | None = None) -> Ended:
    """Runs the job (or its processes `only`, beside `keep`'s still running) until all ended."""
    run = Running(job, d, only, keep)
    if not run.wait(timeout):
        run.stop()
    return run.ended()


def _signal(p: subprocess.Popen, signum: int) -> None:
    """SIGINT / SIGTERM to the process' group, as a terminal's Ctrl-C reaches a command and the processes it
    started; SIGKILL to the process alone (`kill -9 PID`: its children are left to notice)."""
    with contextlib.suppress(OSError):
        if signum == signal.SIGKILL:
            p.send_signal(signum)
        else:
            os.killpg(p.pid, signum)


SURVIVOR_GRACE = 60.0  # seconds a worker whose peer was killed may take to end before it is left running


def _run_and_kill(
    job: Job, d: str, after: float | None, signum: int, victims: list[int], ceiling: float = 600
) -> tuple[Ended, Running | None]:
    """Runs the job, sends `signum` to its processes `victims` after `after` s (None: when `job.trigger`
    holds); `finished_in` is >= 0 when every process ended before the signal.

    Returns the run's end and, when a process that was not signalled still runs `SURVIVOR_GRACE` s after
    its peers ended (a worker waiting for a peer that never joined the cluster), the run holding it: the
    rerun then starts only the ended processes' commands, as one restarts a lost worker.
    """
    run = Running(job, d)
    deadline = run.t0 + (ceiling if after is None else after)
    fired = False
    while time.time() < deadline and run.alive():
        if after is None and job.trigger(d):
            break
        time.sleep(0.01)
    if run.alive():
        for i in victims:
            if run.procs[i].poll() is None:
                _signal(run.procs[i], signum)
                fired = True
    finished_in = -1.0 if fired else time.time() - run.t0
    if not run.wait(ceiling, victims):
        run.stop()
        return run.ended(finished_in), None
    if run.wait(SURVIVOR_GRACE) or not fired:
        if run.alive():
            run.stop()
        return run.ended(finished_in), None
    survivors = run.alive()
    ended = Ended(1, "", [""] * len(run.procs), finished_in, [p.poll() or 0 for p in run.procs])
    for i in range(len(run.procs)):
        if i not in survivors:
            out, err = run.outs[i] or ["", ""]
            ended.output += out + err
            ended.stderr[i] = err
            ended.statuses[i] = run.procs[i].returncode
    return ended, run


def _clean_interrupt(ended: Ended, victims: list[int], signum: int) -> bool:
    """Every signalled process ended with 130 / 143 and its one `interrupted` line last, or (the signal came
    while it exited after its work) with status 0; no traceback."""
    for i in victims:
        lines = ended.stderr[i].strip().splitlines()
        if ended.statuses[i] not in (0, 128 + signum) or "Traceback" in ended.stderr[i]:
            return False
        if ended.statuses[i] and not (lines and ": interrupted" in lines[-1]):
            return False
        if sum(": interrupted" in x for x in lines) != (1 if ended.statuses[i] else 0):
            return False
    return True


def campaign(
    job: Job, work: str, kills: int, signals: list[int], rng: random.Random, max_reruns: int, log=None
) -> tuple[Tally, float]:
    log = log or functools.partial(print, flush=True)
    ref_dir = os.path.join(work, f"{job.name}-reference")
    shutil.rmtree(ref_dir, ignore_errors=True)
    os.makedirs(ref_dir)
    ref = _run(job, ref_dir, timeout=1800)
    ref_seconds = ref.finished_in
    if ref.status != 0:
        raise SystemExit(
            f"chaos: the reference run of {job.name} failed ({ref.status}):\n{ref.output[-3000:]}"
        )
    reference = job.outputs(ref_dir)
    ref_arrays = job.arrays(ref_dir) if job.arrays else None
    log(f"{job.name}: reference in {ref_seconds:.1f} s, {len(reference)} outputs")
    tally = Tally()
    duration = ref_seconds
    n_procs = len(job.processes(ref_dir))
    for k in range(kills):
        d = os.path.join(work, f"{job.name}-kill{k}")
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        signum = signals[k % len(signals)]
        # Several processes (loopback workers): kill the first, the second, or both, in turn.
        victims = [[0], [1], [0, 1]][k % 3] if n_procs == 2 else list(range(n_procs))
        at_trigger = job.trigger is not None and (k // len(signals)) % 2 == 0
        for _ in range(4):  # the machine's load varies: a run that ended before its instant is not a kill
            after = None if at_trigger else rng.uniform(0, duration)
            ended, survivors = _run_and_kill(job, d, after, signum, victims)
            if ended.finished_in < 0:
                break
            duration = ended.finished_in  # draw the next instant over this run's wall time
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
        when = "at the trigger" if after is None else f"at {after:.1f} s"
        what = f"SIG{signal.Signals(signum).name[3:]} to process(es) {victims} {when}"
        if ended.finished_in >= 0:
            tally.notes.append(f"kill {k}: every run ended before its instant (no kill)")
            continue
        tally.kills += 1
        if signum != signal.SIGKILL:
            tally.int_kills += 1
            if _clean_interrupt(ended, victims, signum):
                tally.int_clean += 1
            else:
                tail = " | ".join(ended.output.strip().splitlines()[-4:])
                tally.notes.append(
                    f"kill {k}: {what}: not one line + {128 + signum}: {ended.statuses}: {tail}"
                )
        interrupted = ended.status != 0
        done_note = "finished before the signal" if not interrupted else f"exit {ended.statuses}"
        progress = job.progress(d)
        if job.looks_complete(d):
            try:
                if job.outputs(d) != reference and interrupted:
                    tally.false_complete += 1
                    tally.notes.append(f"kill {k} {when}: looks complete, differs")
            except Exception as e:  # an output that cannot be read but looks complete
                tally.false_complete += 1
                tally.notes.append(f"kill {k}: looks complete, unreadable ({e})")
        finished = not interrupted
        reruns = 0
        rerun_out = ""
        if survivors is not None:
            tally.notes.append(
                f"kill {k}: process(es) {survivors.alive()} still ran {SURVIVOR_GRACE:.0f} s after the "
                "others ended: only the others' commands were rerun"
            )
        while not finished and reruns < max_reruns:
            reruns += 1
            if survivors is not None:  # restart the ended workers beside the one waiting for them
                only = [i for i in range(n_procs) if i not in survivors.alive()]
                rerun = _run(job, d, max(600, 6 * ref_seconds), only, survivors)
                survivors = None
            else:
                rerun = _run(job, d, timeout=max(600, 6 * ref_seconds))
            rerun_out = rerun.output
            finished = rerun.status == 0
            if not finished:
                tally.notes.append(
                    f"kill {k}: rerun {reruns} exit {rerun.statuses}: {rerun_out.strip()[-300:]}"
                )
        tally.reruns += reruns
        if not finished:
            tally.stuck += 1
            log(f"  kill {k}: {what} ({done_note}): STUCK")
            continue
        tally.recovered += 1
        resumed = job.resumed_from(rerun_out) if reruns else None
        if progress is not None and resumed is not None and resumed < progress:
            tally.lost += 1
            tally.notes.append(
                f"kill {k}: {progress} finished before the kill, rerun resumed after {resumed}"
            )
        outputs = job.outputs(d)
        same = outputs == reference
        tally.identical += same
        verdict = "identical"
        if not same:
            differ = sorted(n for n in set(outputs) | set(reference) if outputs.get(n) != reference.get(n))
            verdict = f"DIFFERENT ({', '.join(differ[:6])})"
            if ref_arrays is not None and _close(job.arrays(d), ref_arrays):
                tally.close += 1
                verdict = f"close, not identical ({', '.join(differ[:6])})"
            tally.notes.append(f"kill {k}: {verdict}")
        left = f", work left by the kill: {progress}" if progress is not None else ""
        log(f"  kill {k}: {what} ({done_note}{left}), {reruns} rerun(s), {verdict}")
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
    p.add_argument("--jobs", nargs="+", default=list(JOBS), choices=JOBS)
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
    header = "| job | reference s | kills | recovered by rerunning | identical | close, not identical | "
    header += "looks complete, is not | stuck | lost work | SIGINT/TERM kills | "
    header += "of them one line + 130/143 | reruns |"
    fields = ("kills", "recovered", "identical", "close", "false_complete", "stuck", "lost", "int_kills")
    fields += ("int_clean", "reruns")
    print("\n" + header + "\n|" + " --- |" * 12)
    total = Tally()
    for name, seconds, t in rows:
        print(f"| {name} | {seconds:.1f} | " + " | ".join(str(getattr(t, f)) for f in fields) + " |")
        for field in fields:
            setattr(total, field, getattr(total, field) + getattr(t, field))
    print("| all | | " + " | ".join(str(getattr(total, f)) for f in fields) + " |")
    print(
        f"load average before {' '.join(load_before)}, after {' '.join(load_after)}; signals {args.signals}, "
        f"instants uniform over each reference's wall time, seed {args.seed}"
    )
    for name, _, t in rows:
        for note in t.notes:
            print(f"note: {name}: {note}")
    ok = total.recovered == total.kills and total.identical + total.close == total.kills
    ok = ok and not total.false_complete and total.int_clean == total.int_kills
    return 0 if ok and not total.lost else 1


if __name__ == "__main__":
    sys.exit(main())
