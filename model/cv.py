"""The fold driver: one model per fold, pooled out-of-fold thresholds, the fold ensemble's submission.

    ./run_folds.sh --data_dir D --out R [--folds 0,1,2,3,4] [--test_data_dir T] [--ids_csv ids.csv]
        [--tta N] [--overwrite] [any run_train.sh flag]

For every fold k (default: every fold of D's manifest that holds records) the training job runs as a
subprocess (`python -m model.train --data_dir D --model_dir R/fold{k} --val_fold k` plus the other flags), so
each fold is isolated and a kill stops it cleanly. A fold whose run is finished (model, validation
predictions, no backup left) is skipped; an interrupted one resumes from its last finished epoch
(BackupAndRestore), so rerunning the same command after a crash completes the job. Then `model.evaluate`
tunes the thresholds on the pooled out-of-fold predictions and writes its report to R/eval; with a test set
(--test_data_dir, or --ids_csv alone for test shards in D), `model.predict` scores it with the ensemble of
all folds' models into R/submission.csv (and R/test_probabilities.npz). A summary table (per-fold and pooled
macro F1, time per fold) ends the run and goes to R/summary.json and R/summary.tsv.

Every check runs before any training, each a one-line error with exit status 2: the training flags (parsed
with the training job's own parser; --data_dir, --model_dir and --val_fold belong to the driver), the folds
(empty, repeated, not in the manifest, without records), the test set (no test shards, another image size
than the training set's, a missing Id list), and fold dirs holding a run with other settings.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import subprocess
import sys
import time
from typing import NamedTuple, Sequence

import numpy as np

import schemas
from model import fileio, rundir
from model.config import (
    BACKUP_DIR,
    CONFIG_FILE,
    HISTORY_FILE,
    MODEL_FILE,
    TTA_CHOICES,
    VAL_PREDICTIONS_FILE,
    ConfigError,
    TrainConfig,
)
from schemas import cli, locks, paths

EVAL_DIR = "eval"
SUBMISSION_FILE = "submission.csv"
TEST_PROBABILITIES_FILE = "test_probabilities.npz"
SUMMARY_JSON = "summary.json"
SUMMARY_TSV = "summary.tsv"
REPORT_MD_FILE = "report.md"  # model.evaluate's (not imported here: it loads matplotlib)
OWNED_FLAGS = ("data_dir", "model_dir", "val_fold")  # training flags the driver sets for each fold

FINISHED, INTERRUPTED, NEW = "finished", "interrupted", "new"


def fold_dir(out: str, fold: int) -> str:
    """R/fold{k}: the model dir of fold k's run."""
    return fileio.join(out, f"fold{fold}")


def parse_folds(text: str | None, manifest: dict, data_dir: str) -> list[int]:
    """The folds to train: `--folds 0,2,4`, or (None) every fold of the manifest that holds records.

    Raises:
      ConfigError: an empty list, a non-integer, a repeated fold, a fold not in the manifest or without
        records.
    """
    num_folds = int(manifest[schemas.MANIFEST_NUM_FOLDS])
    written = manifest.get(schemas.MANIFEST_WRITTEN, {})
    has_records = [f for f in range(num_folds) if int(written.get(schemas.written_key(f), 0)) > 0]
    if text is None:
        if not has_records:
            raise ConfigError(f"{data_dir} holds no labeled records")
        return has_records
    parts = [p.strip() for p in text.split(",")]
    if not any(parts):
        raise ConfigError("--folds is empty: give fold numbers like 0,1,2 (or leave it out for all folds)")
    try:
        folds = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(f"--folds {text!r}: expected comma-separated fold numbers like 0,1,2") from None
    if len(set(folds)) != len(folds):
        raise ConfigError(f"--folds {text!r} repeats a fold")
    for f in folds:
        if not 0 <= f < num_folds:
            raise ConfigError(
                f"fold {f} is not in the manifest of {data_dir}: "
                f"it has {num_folds} folds (0..{num_folds - 1})"
            )
        if f not in has_records:
            raise ConfigError(f"fold {f} of {data_dir} holds no records")
    return folds


def fold_status(model_dir: str) -> str:
    """FINISHED (model and validation predictions written, no backup), INTERRUPTED (started) or NEW."""
    if not fileio.exists(fileio.join(model_dir, CONFIG_FILE)):
        return NEW
    done = all(fileio.exists(fileio.join(model_dir, n)) for n in (MODEL_FILE, VAL_PREDICTIONS_FILE))
    if done and not fileio.exists(fileio.join(model_dir, BACKUP_DIR)):
        return FINISHED
    return INTERRUPTED


def check_same_run(model_dir: str, cfg: TrainConfig, data_id: str | None = None) -> None:
    """Raises ConfigError when model_dir's config.json is not the config this fold would train with.

    Paths count by what they point to, and a data folder moved elsewhere by its manifest (`data_id`).
    """
    path = fileio.join(model_dir, CONFIG_FILE)
    try:
        diff = rundir.config_difference(json.loads(fileio.read_text(path)), cfg, data_id)
    except (ValueError, ConfigError) as e:
        raise ConfigError(f"{path} is not a training config ({e}); use another --out") from e
    if diff is not None:
        raise ConfigError(
            f"{model_dir} holds a run with other settings ({diff}); "
            "rerun with the same flags, use another --out, or --overwrite to retrain every fold"
        )


def fold_scores(labels: np.ndarray, scores: np.ndarray, thresholds: np.ndarray) -> dict[str, float]:
    """Macro F1 of one fold's validation predictions at 0.5 and at the pooled thresholds."""
    from model import thresholds as thr

    at_half = thr.score_predictions(labels, thr.apply_thresholds(scores, np.full(labels.shape[1], 0.5)))
    tuned = thr.score_predictions(labels, thr.apply_thresholds(scores, thresholds))
    return {"macro_f1_at_0.5": at_half.macro_f1, "macro_f1_pooled_thresholds": tuned.macro_f1}


def format_table(rows: list[dict]) -> str:
    """The summary rows as an aligned text table."""
    cols = list(rows[0])
    cells = [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


# ---------------------------------------------------------------------------------------------------------
# Flags and checks.


PROG = "hpa-folds"


def build_parser() -> argparse.ArgumentParser:
    """The driver's own flags; every other flag goes to the training job."""
    p = cli.ArgumentParser(
        prog=PROG,
        description="Train one model per fold (any hpa-train flag passes through), tune thresholds on the "
        "pooled out-of-fold predictions (R/eval) and predict a test set with the fold ensemble "
        "(R/submission.csv). Rerunning the same command skips finished folds and resumes an interrupted one.",
        epilog="Example: hpa-folds --data_dir out/ --out runs/cv --ids_csv sample_submission.csv "
        "--tta 8 --backbone densenet121 --epochs 30",
        allow_abbrev=False,
    )
    p.add_argument(
        "--data_dir", required=True, help="preprocessing output with fold-tagged shards (or gs://)"
    )
    p.add_argument("--out", required=True, help="run dir: fold{k}/, eval/, submission.csv, summary.*")
    p.add_argument(
        "--folds", default=None, help="comma-separated folds to train (default: all in the manifest)"
    )
    p.add_argument(
        "--test_data_dir",
        default=None,
        help="preprocessing output holding the test-* shards to predict (default with --ids_csv: --data_dir)",
    )
    p.add_argument(
        "--ids_csv", default=None, help="the submission's Ids in order (sample_submission.csv; default: all)"
    )
    p.add_argument(
        "--tta",
        type=int,
        choices=TTA_CHOICES,
        default=None,
        help="test-time augmentation of the validation predictions (the thresholds) and of the test "
        "prediction (default: the training job's --val_tta)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="retrain every fold from scratch (else finished folds are skipped, interrupted ones resume)",
    )
    p.add_argument(
        "--ensemble_thresholds",
        choices=("rate", "as_tuned"),
        default="as_tuned",  # rate: no consistent gain in bench/ensemble_thresholds.py (docs/quality.md)
        help="the test prediction: rate = the pooled thresholds matched to the ensemble's average (each "
        "class keeps the single models' decision rate), as_tuned = applied unchanged (hpa-predict --help)",
    )
    return p


def _train_parser() -> argparse.ArgumentParser:
    from model import train

    p = train.build_parser()
    for action in p._actions:  # the driver sets these per fold: None shows a user gave one
        if action.dest in OWNED_FLAGS:
            action.required = False
            action.default = None
    p.exit_on_error = False
    return p


def parse_train_flags(passthrough: Sequence[str]) -> argparse.Namespace:
    """Parses the flags meant for the training job with its own parser.

    Raises:
      ConfigError: an unknown flag, a bad value, or a flag the driver sets for each fold.
    """
    try:
        args, unknown = _train_parser().parse_known_args(list(passthrough))
    except argparse.ArgumentError as e:
        raise ConfigError(f"bad training flag: {e}") from None
    if unknown:
        known = build_parser().long_flags() + _train_parser().long_flags()
        raise ConfigError(f"{cli.unrecognized(unknown, known)} (see {PROG} --help, hpa-train --help)")
    given = [f"--{d}" for d in OWNED_FLAGS if getattr(args, d) is not None]
    if given:
        raise ConfigError(
            f"{', '.join(given)}: set by the fold driver for each fold (use --data_dir/--out/--folds)"
        )
    return args


def fold_argv(passthrough: Sequence[str], data_dir: str, out: str, fold: int, overwrite: bool) -> list[str]:
    """The training job's command-line flags for one fold."""
    argv = [*passthrough, "--data_dir", data_dir, "--model_dir", fold_dir(out, fold), "--val_fold", str(fold)]
    return argv + (["--overwrite"] if overwrite else [])


class Plan(NamedTuple):
    """What the checks resolved: the training flags, folds, each fold's config, the test set (or None)."""

    passthrough: list[str]
    folds: list[int]
    configs: dict[int, TrainConfig]
    test_dir: str | None


def plan(args: argparse.Namespace, passthrough: Sequence[str]) -> Plan:
    """Every check before training (see the module docstring).

    Raises:
      ConfigError: the first problem found.
    """
    from model import train

    passthrough = list(passthrough)
    given = parse_train_flags(passthrough).val_tta
    if args.tta is not None:
        if any(a.startswith("--val_tta") for a in passthrough) and given != args.tta:
            raise ConfigError(f"--tta {args.tta} and --val_tta {given} differ: give one of them")
        passthrough += ["--val_tta", str(args.tta)]
    manifest = _manifest(args.data_dir)
    folds = parse_folds(args.folds, manifest, args.data_dir)
    configs = {}
    for k in folds:
        targs = train.parse_args(fold_argv(passthrough, args.data_dir, args.out, k, False))
        train.check_flags(targs)  # the training job's own checks that need no TensorFlow
        cfg, _, _ = train.resolve_config(train.config_from_args(targs), manifest)
        configs[k] = cfg
        if not args.overwrite and fold_status(fold_dir(args.out, k)) != NEW:
            check_same_run(fold_dir(args.out, k), cfg, rundir.dataset_id(manifest))
    from model import data as data_lib

    # One cache serves every fold: room for the whole dataset, checked once before the first fold.
    data_lib.check_cache_room(configs[folds[0]].data, args.data_dir, manifest)
    test_dir = args.test_data_dir or (args.data_dir if args.ids_csv else None)
    if test_dir is not None:
        test_manifest = manifest if test_dir == args.data_dir else _manifest(test_dir)
        size = manifest[schemas.MANIFEST_IMAGE_SIZE]
        test_size = test_manifest[schemas.MANIFEST_IMAGE_SIZE]
        if list(test_size) != list(size):
            raise ConfigError(
                f"the test set {test_dir} holds {test_size[0]}x{test_size[1]} images but the training set "
                f"{args.data_dir} holds {size[0]}x{size[1]}: "
                f"preprocess the test set with --image_size {size[0]}"
            )
        n_test = int(
            test_manifest.get(schemas.MANIFEST_WRITTEN, {}).get(
                schemas.written_key(schemas.UNLABELED_FOLD), 0
            )
        )
        if n_test == 0:
            raise ConfigError(
                f"{test_dir} holds no test shards: preprocess the test folder with its Id list "
                "(--labels_csv sample_submission.csv --source test)"
            )
        if args.ids_csv and not fileio.exists(args.ids_csv):
            raise ConfigError(f"--ids_csv {args.ids_csv} not found")
    return Plan(passthrough, folds, configs, test_dir)


def _manifest(data_dir: str) -> dict:
    try:
        return schemas.read_manifest(data_dir)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None


# ---------------------------------------------------------------------------------------------------------
# The job.


class FoldFailed(Exception):
    """A fold's training subprocess ended with a non-zero status."""

    def __init__(self, fold: int, returncode: int):
        super().__init__(f"training of fold {fold} failed (exit status {returncode})")
        self.fold = fold
        self.returncode = returncode


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the training subprocess is killed when the driver dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def train_fold(argv: Sequence[str]) -> int:
    """Runs `python -m model.train argv` as a subprocess streaming to this process's output; its status.

    Ended with the driver: on an exception (Ctrl-C, SIGTERM) the subprocess is terminated first.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = cli.child_env()  # the driver, not the fold's process, reports an interrupt
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    sys.stdout.flush()
    proc = subprocess.Popen(
        [sys.executable, "-m", "model.train", *argv],
        env=env,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )
    try:
        return proc.wait()
    except BaseException:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise


def _previous_seconds(out: str) -> dict[int, float]:
    path = fileio.join(out, SUMMARY_JSON)
    if not fileio.exists(path):
        return {}
    try:
        rows = json.loads(fileio.read_text(path))["folds"]
        return {int(r["fold"]): float(r["seconds"]) for r in rows if r.get("seconds") is not None}
    except (ValueError, KeyError, TypeError):
        return {}


def _print(msg: str) -> None:
    print(msg, flush=True)


DRIVER_FILE = "driver.json"  # R/driver.json: the invocation the driver runs, the folds it began, finished


def invocation(args: argparse.Namespace, p: Plan) -> dict:
    """What makes two runs of the driver the same command (paths by what they point to)."""
    return {
        "data_dir": paths.normalise(args.data_dir),
        "folds": p.folds,
        "test_data_dir": paths.normalise(p.test_dir) if p.test_dir else None,
        "ids_csv": paths.normalise(args.ids_csv) if args.ids_csv else None,
        "training_flags": p.passthrough,
    }


def read_driver_record(out: str) -> dict | None:
    path = fileio.join(out, DRIVER_FILE)
    if not fileio.exists(path):
        return None
    try:
        return json.loads(fileio.read_text(path))
    except ValueError:
        return None


def folds_to_replace(args: argparse.Namespace, p: Plan) -> set[int]:
    """The folds --overwrite retrains from scratch: all, except those this same command already began in an
    interrupted run (R/driver.json says so): the same command rerun never redoes its own finished work."""
    if not args.overwrite:
        return set()
    record = read_driver_record(args.out)
    if record and record.get("overwrite") and not record.get("finished"):
        if record.get("invocation") == invocation(args, p):
            return set(p.folds) - set(record.get("started", []))
    return set(p.folds)


def _write_driver_record(out: str, args, p: Plan, started, finished: bool) -> None:
    record = {
        "invocation": invocation(args, p),
        "overwrite": bool(args.overwrite),
        "started": sorted(started),
        "finished": finished,
    }
    fileio.write_text(fileio.join(out, DRIVER_FILE), json.dumps(record, indent=1) + "\n")


def run(argv: Sequence[str] | None = None) -> dict:
    """Runs the fold driver with command-line flags; returns the summary (also written to R/summary.json).

    Raises:
      ConfigError: bad flags or inputs, found before any training.
      FoldFailed: a fold's training failed (finished folds stay; rerunning resumes).
    """
    args, passthrough = build_parser().parse_known_args(argv)
    args.data_dir = args.data_dir.rstrip("/")
    args.out = args.out.rstrip("/")
    p = plan(args, passthrough)
    locks.acquire(args.out, PROG)
    replace = folds_to_replace(args, p)
    record = read_driver_record(args.out)
    started = set() if replace == set(p.folds) else set((record or {}).get("started", []))
    _write_driver_record(args.out, args, p, started, finished=False)
    n = len(p.folds)
    tta = p.configs[p.folds[0]].val_tta
    _print(
        f"{n} fold(s) {p.folds} of {args.data_dir} -> {args.out}; validation and test TTA {tta}"
        + (f"; test set {p.test_dir}" if p.test_dir else "; no test set (give --ids_csv or --test_data_dir)")
    )
    seconds_before = _previous_seconds(args.out)
    t_all = time.time()
    rows = []
    for i, k in enumerate(p.folds, 1):
        d = fold_dir(args.out, k)
        status = NEW if k in replace else fold_status(d)
        head = f"fold {i}/{n} (validation fold {k})"
        if status == FINISHED:
            _print(f"{head}: skipped (finished) {d}")
            rows.append({"fold": k, "status": "skipped (finished)", "seconds": seconds_before.get(k)})
            continue
        if status == INTERRUPTED:
            epoch = rundir.backup_epoch(d)
            _print(f"{head}: resumed after epoch {epoch} -> {d}" if epoch else f"{head}: restarted -> {d}")
        else:
            _print(f"{head}: training -> {d}")
        t0 = time.time()
        started.add(k)
        _write_driver_record(args.out, args, p, started, finished=False)
        done = [f for f in p.folds[: i - 1]]
        cli.set_stage(functools.partial(_fold_stage, d, k, done))
        rc = train_fold(fold_argv(p.passthrough, args.data_dir, args.out, k, k in replace))
        if (
            rc in cli.EXIT_INTERRUPTED.values()
        ):  # the fold's process was stopped by a signal: so is the driver
            raise cli.Terminated() if rc == cli.EXIT_INTERRUPTED[signal.SIGTERM] else KeyboardInterrupt()
        if rc != 0:
            raise FoldFailed(k, rc)
        dt = time.time() - t0
        _print(f"{head}: done in {dt:.0f} s")
        rows.append({"fold": k, "status": "resumed" if status == INTERRUPTED else "trained", "seconds": dt})

    from model import evaluate
    from model import thresholds as thr
    from model.config import THRESHOLDS_FILE

    cli.set_stage(f"the evaluation after all {n} folds finished")

    dirs = [fold_dir(args.out, k) for k in p.folds]
    eval_dir = fileio.join(args.out, EVAL_DIR)
    _print(f"thresholds on the pooled out-of-fold predictions of {n} fold(s) -> {eval_dir}")
    try:
        report = evaluate.run(dirs, eval_dir)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
    values = thr.load_thresholds(fileio.join(eval_dir, THRESHOLDS_FILE)).values
    for row, d in zip(rows, dirs, strict=True):
        preds = evaluate.load_val_predictions(d)
        row.update(
            epochs=len(rundir.read_history(fileio.join(d, HISTORY_FILE))),
            val_samples=len(preds.ids),
            **fold_scores(preds.labels, preds.scores, values),
        )
    summary = report["summary"]
    pooled = {
        "fold": "pooled",
        "status": "",
        "epochs": None,
        "val_samples": report["num_samples"],
        "macro_f1_at_0.5": summary["base_threshold"]["macro_f1"],
        "macro_f1_pooled_thresholds": summary["tuned_in_sample"]["macro_f1"],
        "macro_f1_cross_fitted": summary["tuned_cross_fitted"]["macro_f1"],
        "seconds": sum(r["seconds"] or 0.0 for r in rows),
    }
    result = {
        "data_dir": args.data_dir,
        "out": args.out,
        "tta": tta,
        "folds": rows,
        "pooled": pooled,
        "eval": eval_dir,
        "submission": None,
    }
    if p.test_dir is not None:
        result.update(_predict(args, p, dirs, tta))
    result["seconds_this_run"] = time.time() - t_all
    _write_summary(args.out, result)
    _write_driver_record(args.out, args, p, started, finished=True)
    locks.release(args.out)
    return result


def _fold_stage(model_dir: str, fold: int, done: list[int]) -> str:
    """`epoch 4 of fold 2 (folds 0, 1 finished)`: the interrupt line's stage while a fold trains."""
    epoch = (rundir.backup_epoch(model_dir) or 0) + 1
    finished = f" (folds {', '.join(map(str, done))} finished)" if done else ""
    return f"epoch {epoch} of fold {fold}{finished}"


def _predict(args: argparse.Namespace, p: Plan, dirs: list[str], tta: int) -> dict:
    from model import predict

    submission = fileio.join(args.out, SUBMISSION_FILE)
    probabilities = fileio.join(args.out, TEST_PROBABILITIES_FILE)
    _print(f"prediction of {p.test_dir} by the ensemble of {len(dirs)} model(s), TTA {tta} -> {submission}")
    try:
        predict.run(
            predict.PredictConfig(
                data_dir=p.test_dir,
                model_dirs=tuple(dirs),
                out=submission,
                ids_csv=args.ids_csv,
                tta=tta,
                probabilities=probabilities,
                ensemble_thresholds=args.ensemble_thresholds,
            )
        )
    except predict.PredictError as e:
        raise ConfigError(str(e)) from None
    return {"submission": submission, "test_probabilities": probabilities}


def _write_summary(out: str, result: dict) -> None:
    table_rows = [{**r, "macro_f1_cross_fitted": r.get("macro_f1_cross_fitted")} for r in result["folds"]]
    table_rows.append(result["pooled"])
    cols = [
        "fold",
        "status",
        "epochs",
        "val_samples",
        "macro_f1_at_0.5",
        "macro_f1_pooled_thresholds",
        "macro_f1_cross_fitted",
        "seconds",
    ]
    table_rows = [{c: r.get(c) for c in cols} for r in table_rows]
    tsv = "\t".join(cols) + "\n"
    tsv += "".join("\t".join("" if r[c] is None else str(r[c]) for c in cols) + "\n" for r in table_rows)
    fileio.write_text(fileio.join(out, SUMMARY_TSV), tsv)
    fileio.write_text(fileio.join(out, SUMMARY_JSON), json.dumps(result, indent=2) + "\n")
    _print("")
    _print(format_table(table_rows))
    pooled = result["pooled"]
    _print(
        f"pooled out-of-fold macro F1: {pooled['macro_f1_cross_fitted']:.4f} (thresholds cross-fitted), "
        f"{pooled['macro_f1_pooled_thresholds']:.4f} (in-sample)"
    )
    _print(f"evaluation report: {fileio.join(result['eval'], REPORT_MD_FILE)}")
    if result["submission"]:
        _print(f"submission:        {result['submission']}")
    _print(f"summary:           {fileio.join(out, SUMMARY_TSV)}, {fileio.join(out, SUMMARY_JSON)}")


@cli.command(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: one-line errors with exit status 2 for bad input, a failed fold's status otherwise."""
    # cli.command turns SIGTERM into an exception, so the running fold's subprocess is terminated first.
    try:
        run(argv)
    except ConfigError as e:
        return cli.bad_input(PROG, e)
    except FoldFailed as e:
        print(
            f"{PROG}: error: {e}; finished folds are kept: rerun the same command to resume",
            file=sys.stderr,
        )
        return e.returncode if e.returncode > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
