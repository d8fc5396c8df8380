"""The prediction job: unlabeled shards -> test-time-augmented ensemble probabilities -> a submission file.

    python -m model.predict --data_dir out/test --model_dir runs/fold0 [runs/fold1 ...] \\
        --ids_csv sample_submission.csv --out submission.csv [--tta 8] [--probabilities probs.npz]

Reads the test shards (`test-*`, fold -1) that the preprocessing job wrote for an unlabeled set (run on the
test folder with `sample_submission.csv`), scores every record with the model of each --model_dir under
test-time augmentation, averages the probabilities over the transforms and then over the models, applies
the per-class thresholds and writes the competition's submission file (`Id,Predicted`, space-separated class
indices) in the order of the Ids of --ids_csv.

Test-time augmentation (`--tta`): the images are decoded once per batch and each model scores the batch
under `n` symmetries of the square (`model.data.dihedral`): 1 = the image as is; 2 = + left-right flip;
4 = + up-down flip and 180-degree rotation (the flip group); 8 = all rotations and flips (the dihedral
group).

Thresholds: by default every model dir must hold `thresholds.json` (written by `python -m model.evaluate`),
and when several dirs are given they must hold the same values, which is what `model.evaluate` writes when
it pools the dirs' out-of-fold predictions. Thresholds tuned on one fold's predictions each would differ
per dir; they are not averaged, since thresholds for the ensemble's averaged probabilities should be tuned
on pooled predictions: the job stops and asks for `model.evaluate` over all dirs, or an explicit
`--thresholds PATH` (which then overrides the dirs' files).

When no class passes its threshold, `--empty top1` (default; every sample of the competition has at least
one label) predicts the class with the largest score - threshold margin, `--empty none` leaves the row empty.

Bad input stops the job with a one-line error: a model dir without thresholds, a dataset of another schema
version, records of another image size than the models were trained on, Ids of --ids_csv that have no record
(the preprocessing job's `rejected.csv` is quoted when it says why), repeated Ids. Records whose Id is not in
--ids_csv are reported and kept in the probabilities file, never silently dropped. Paths go through
`model.fileio`, so gs:// works for every input and output.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import sys
import time
from typing import Callable, Iterable, Sequence

import numpy as np

import schemas
from model import fileio
from model.config import (
    CONFIG_FILE,
    MODEL_FILE,
    THRESHOLDS_FILE,
    TTA_CHOICES,
    VAL_IDS,
    VAL_SCORES,
)
from model.config import tta_transforms as _tta_transforms
from pipelines import cli

__all__ = [
    "EMPTY_RULES",
    "TTA_CHOICES",
    "PredictConfig",
    "PredictError",
    "format_submission",
    "load_model_dir",
    "main",
    "order_by_ids",
    "predict_scores",
    "read_id_list",
    "resolve_thresholds",
    "run",
    "submission_rows",
    "tta_transforms",
]

PROG = "hpa-predict"
EMPTY_RULES = ("top1", "none")
# Arrays of the --probabilities .npz: Ids and scores named as in the training job's val_predictions.npz.
PROB_IDS, PROB_SCORES, PROB_CLASS_NAMES = VAL_IDS, VAL_SCORES, "class_names"


class PredictError(ValueError):
    """Bad flags or inputs; the message says what is wrong and what to do."""


@dataclasses.dataclass(frozen=True)
class PredictConfig:
    """One prediction run.

    Attributes:
      data_dir: the preprocessing job's output for the unlabeled set (local or gs://).
      model_dirs: training output dirs; their models are averaged.
      out: the submission CSV to write.
      ids_csv: the Id list whose order the submission follows (e.g. sample_submission.csv); None: every
        record, sorted by Id.
      tta: transforms averaged per model, one of TTA_CHOICES.
      thresholds: a thresholds.json overriding the model dirs' files.
      empty: what a row gets when no class passes: `top1` or `none`.
      probabilities: where to write the averaged probabilities (.npz or .csv), or None.
      batch_size: records per batch.
    """

    data_dir: str
    model_dirs: tuple[str, ...]
    out: str
    ids_csv: str | None = None
    tta: int = 8
    thresholds: str | None = None
    empty: str = "top1"
    probabilities: str | None = None
    batch_size: int = 32

    def __post_init__(self) -> None:
        if not self.model_dirs:
            raise PredictError("give at least one --model_dir")
        if len(set(self.model_dirs)) != len(self.model_dirs):
            raise PredictError(f"a model dir is given twice: {list(self.model_dirs)}")
        if self.tta not in TTA_CHOICES:
            raise PredictError(f"tta must be one of {TTA_CHOICES}, got {self.tta}")
        if self.empty not in EMPTY_RULES:
            raise PredictError(f"empty must be one of {EMPTY_RULES}, got {self.empty!r}")
        if self.batch_size < 1:
            raise PredictError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.probabilities is not None and not self.probabilities.endswith((".npz", ".csv")):
            raise PredictError(f"--probabilities must end in .npz or .csv, got {self.probabilities!r}")


# --- pure helpers ----------------------------------------------------------------------------------------


def tta_transforms(n: int) -> tuple[int, ...]:
    """The `model.data.dihedral` indices averaged for `--tta n` (n in TTA_CHOICES); 0 (identity) first."""
    try:
        return _tta_transforms(n)
    except ValueError as e:
        raise PredictError(str(e)) from None


def order_by_ids(
    ids: Sequence[str], scores: np.ndarray, wanted: Sequence[str], rejected: dict[str, str] | None = None
) -> np.ndarray:
    """Rows of `scores` (one per Id of `ids`) in the order of `wanted`.

    Args:
      ids: Ids of the scored records.
      scores: [len(ids), C] scores.
      wanted: the Ids to return, in order.
      rejected: Id -> why the preprocessing job rejected it, quoted in the error.

    Raises:
      PredictError: repeated Ids in either list, or Ids of `wanted` without a record.
    """
    ids = [str(i) for i in ids]
    if len(ids) != len(scores):
        raise PredictError(f"{len(ids)} Ids but {len(scores)} rows of scores")
    _check_unique(ids, "the records")
    _check_unique(wanted, "the Id list")
    index = {sid: row for row, sid in enumerate(ids)}
    missing = [sid for sid in wanted if sid not in index]
    if missing:
        rejected = rejected or {}
        why = [f"{sid} ({rejected[sid]})" for sid in missing[:5] if sid in rejected]
        raise PredictError(
            f"{len(missing)} of {len(wanted)} Ids in the Id list have no record in the shards, e.g. "
            f"{missing[:5]}"
            + (f"; rejected by preprocessing: {'; '.join(why)}" if why else "")
            + ": preprocess the set that the Id list belongs to (with that list as --labels_csv)"
        )
    return scores[[index[sid] for sid in wanted]]


def _check_unique(ids: Sequence[str], what: str) -> None:
    seen: set[str] = set()
    dup = [i for i in ids if i in seen or seen.add(i)]
    if dup:
        raise PredictError(f"{what} repeat{'s' if len(dup) == 1 else ''} Ids, e.g. {sorted(set(dup))[:5]}")


def submission_rows(ids: Sequence[str], predictions: np.ndarray) -> list[tuple[str, str]]:
    """(Id, Predicted) rows: Predicted is the space-separated class indices of each 0/1 prediction row."""
    predictions = np.asarray(predictions)
    if predictions.shape != (len(ids), schemas.NUM_CLASSES):
        raise PredictError(f"predictions of shape {predictions.shape} do not fit {len(ids)} Ids")
    return [(str(sid), schemas.format_target(row)) for sid, row in zip(ids, predictions, strict=True)]


def format_submission(ids: Sequence[str], predictions: np.ndarray) -> str:
    """The submission file's text: header `Id,Predicted`, one row per Id in the given order."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([schemas.CSV_ID, schemas.CSV_PREDICTED])
    w.writerows(submission_rows(ids, predictions))
    return buf.getvalue()


def read_id_list(path: str) -> list[str]:
    """The Ids of a CSV with an `Id` column (sample_submission.csv, a label file), in file order.

    Raises:
      PredictError: no such file, no `Id` column, no rows, empty or repeated Ids.
    """
    if not fileio.exists(path):
        raise PredictError(f"--ids_csv {path}: no such file")
    reader = csv.DictReader(io.StringIO(fileio.read_text(path)))
    if schemas.CSV_ID not in (reader.fieldnames or []):
        raise PredictError(f"{path}: no `{schemas.CSV_ID}` column (header: {reader.fieldnames})")
    ids = [(row[schemas.CSV_ID] or "").strip() for row in reader]
    if not ids:
        raise PredictError(f"{path} lists no Ids")
    if any(not i for i in ids):
        raise PredictError(f"{path}: row {ids.index('') + 2} has an empty Id")
    try:
        _check_unique(ids, path)
    except PredictError as e:
        raise PredictError(f"{e}: an Id list must name each sample once") from None
    return ids


def _read_rejected(data_dir: str) -> dict[str, str]:
    """Id -> the rest of its row in the preprocessing job's rejected.csv (empty when absent)."""
    path = fileio.join(data_dir, schemas.REJECTED_FILE)
    if not fileio.exists(path):
        return {}
    out = {}
    for row in csv.DictReader(io.StringIO(fileio.read_text(path))):
        sid = row.pop(schemas.CSV_ID, None)
        if sid:
            out[sid] = ", ".join(f"{k}: {v}" for k, v in row.items() if v)
    return out


# --- model dirs and thresholds ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _ModelDir:
    path: str
    image_size: int
    val_tta: int  # test-time augmentation of the validation predictions its thresholds were tuned on


def _inspect_model_dir(model_dir: str) -> _ModelDir:
    """Checks a model dir holds a finished training run; reads the image size it was trained on."""
    from model.config import ConfigError, config_from_dict

    for name in (MODEL_FILE, CONFIG_FILE):
        if not fileio.exists(fileio.join(model_dir, name)):
            raise PredictError(
                f"{model_dir} has no {name}: not the model dir of a finished training run (./run_train.sh)"
            )
    config_path = fileio.join(model_dir, CONFIG_FILE)
    try:
        cfg = config_from_dict(json.loads(fileio.read_text(config_path)))
    except (ValueError, ConfigError) as e:
        raise PredictError(f"{config_path} is not a training config: {e}") from None
    if cfg.data.image_size is None:
        raise PredictError(f"{config_path} does not record the image size the model was trained on")
    return _ModelDir(model_dir, int(cfg.data.image_size), int(cfg.val_tta))


def resolve_thresholds(model_dirs: Sequence[str], thresholds: str | None = None) -> tuple[np.ndarray, str]:
    """The per-class thresholds to apply, and where they came from.

    Args:
      model_dirs: the model dirs (each holding thresholds.json unless `thresholds` is given).
      thresholds: an explicit thresholds.json that overrides the dirs' files.

    Raises:
      PredictError: a dir without thresholds.json, dirs holding different thresholds, a malformed file.
    """
    from model import thresholds as thr

    def load(path: str) -> np.ndarray:
        try:
            return thr.load_thresholds(path).values
        except (FileNotFoundError, ValueError) as e:
            raise PredictError(str(e)) from None

    if thresholds is not None:
        return load(thresholds), thresholds
    files = []
    for d in model_dirs:
        path = fileio.join(d, THRESHOLDS_FILE)
        if not fileio.exists(path):
            raise PredictError(
                f"{d} has no {THRESHOLDS_FILE}: tune them first with "
                f"`python -m model.evaluate --model_dir {' '.join(model_dirs)}`, or give --thresholds PATH"
            )
        files.append(path)
    values = [load(p) for p in files]
    for path, v in zip(files[1:], values[1:]):
        if not np.array_equal(v, values[0]):
            raise PredictError(
                f"{files[0]} and {path} hold different thresholds (tuned separately per fold?): thresholds "
                "for an ensemble must be tuned on the folds' pooled predictions, "
                f"`python -m model.evaluate --model_dir {' '.join(model_dirs)} --out DIR`, "
                "or give one file with --thresholds PATH"
            )
    return values[0], files[0]


def load_model_dir(model_dir: str):
    """Loads a training run's model.keras (local or gs://) without its optimizer."""
    import keras

    from model import model as _model_lib  # noqa: F401 - registers the custom layers for loading

    path = fileio.join(model_dir, MODEL_FILE)
    try:
        return keras.saving.load_model(fileio.local_copy(path, prefix="hpa-predict-"), compile=False)
    except Exception as e:  # noqa: BLE001 - any loading failure is a bad model dir
        raise PredictError(f"cannot load {path}: {e}") from e


# --- scoring ---------------------------------------------------------------------------------------------


def predict_scores(
    models: Sequence,
    dataset: Iterable,
    transforms: Sequence[int],
    num_records: int | None = None,
    log: Callable[[str], None] | None = print,
    progress_seconds: float = 15.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Scores a dataset of (images, labels, ids) batches with every model under every transform.

    Each batch is decoded once; the probabilities are averaged over the transforms, then over the models.

    Returns:
      (ids as str [N], float64 scores [N, NUM_CLASSES]) in dataset order.
    """
    import tensorflow as tf

    from model.model import tta_average

    ids: list[str] = []
    chunks = []
    start = last = time.perf_counter()
    try:
        for images, _, batch_ids in dataset:
            per_model = [tta_average(m.predict_on_batch, images, transforms) for m in models]
            chunks.append(np.mean(per_model, axis=0))
            ids.extend(i.decode("utf-8") for i in batch_ids.numpy())
            now = time.perf_counter()
            if log is not None and now - last >= progress_seconds:
                total = f"/{num_records}" if num_records else ""
                log(f"  scored {len(ids)}{total} records ({len(ids) / (now - start):.1f} records/s)")
                last = now
    except tf.errors.InvalidArgumentError as e:
        raise PredictError(
            f"a record could not be decoded at the models' image size (mixed image sizes in the shards?): "
            f"{e.message.splitlines()[0]}"
        ) from None
    if not chunks:
        return np.array([], dtype=str), np.zeros((0, schemas.NUM_CLASSES))
    return np.array(ids, dtype=str), np.concatenate(chunks)


def _probabilities_bytes(path: str, ids: np.ndarray, scores: np.ndarray) -> bytes:
    if path.endswith(".npz"):
        buf = io.BytesIO()
        np.savez(
            buf,
            **{
                PROB_IDS: np.asarray(ids, dtype=str),
                PROB_SCORES: scores.astype(np.float32),
                PROB_CLASS_NAMES: np.asarray(schemas.CLASS_NAMES, dtype=str),
            },
        )
        return buf.getvalue()
    text = io.StringIO()
    w = csv.writer(text, lineterminator="\n")
    w.writerow([schemas.CSV_ID, *schemas.CLASS_NAMES])
    for sid, row in zip(ids, scores, strict=True):
        w.writerow([sid, *(f"{v:.6f}" for v in row)])
    return text.getvalue().encode("utf-8")


def _log(msg: str) -> None:
    print(msg, flush=True)


def run(cfg: PredictConfig, log: Callable[[str], None] = _log) -> dict:
    """Runs the prediction job; returns a summary (paths, counts, predicted labels per row).

    Raises:
      PredictError: bad inputs (the message says what to do).
    """
    from model.config import ConfigError

    wanted = read_id_list(cfg.ids_csv) if cfg.ids_csv else None
    dirs = [_inspect_model_dir(d) for d in cfg.model_dirs]
    thresholds, thresholds_source = resolve_thresholds(cfg.model_dirs, cfg.thresholds)
    sizes = {d.image_size for d in dirs}
    if len(sizes) > 1:
        raise PredictError(
            "the models were trained on different image sizes: "
            + ", ".join(f"{d.path}: {d.image_size}" for d in dirs)
        )
    image_size = sizes.pop()
    try:
        manifest = schemas.read_manifest(cfg.data_dir)
    except (FileNotFoundError, ValueError) as e:
        raise PredictError(str(e)) from None
    height, width = (int(v) for v in manifest[schemas.MANIFEST_IMAGE_SIZE])
    if (height, width) != (image_size, image_size):
        raise PredictError(
            f"{cfg.data_dir} holds {height}x{width} images but the models were trained on "
            f"{image_size}x{image_size}: preprocess the set with --image_size {image_size}"
        )
    num_records = int(
        manifest.get(schemas.MANIFEST_WRITTEN, {}).get(schemas.written_key(schemas.UNLABELED_FOLD), 0)
    )

    from model import data as data_lib
    from model.config import DataConfig

    try:
        data_lib.list_shards(cfg.data_dir, [schemas.UNLABELED_FOLD])
    except ConfigError:
        raise PredictError(
            f"{cfg.data_dir} holds no unlabeled (test) shards: run the preprocessing job on the test folder "
            "with its Id list (e.g. --labels_csv sample_submission.csv)"
        ) from None
    dataset = data_lib.make_eval_dataset(
        cfg.data_dir,
        [schemas.UNLABELED_FOLD],
        DataConfig(image_size=image_size, batch_size=cfg.batch_size),
        with_ids=True,
    )
    transforms = tta_transforms(cfg.tta)
    tuned_tta = sorted({d.val_tta for d in dirs})
    if cfg.thresholds is None and tuned_tta != [cfg.tta]:
        log(
            f"warning: the thresholds were tuned on validation predictions with TTA {tuned_tta} but this run "
            f"averages {cfg.tta} transform(s); averaging shrinks scores, so the thresholds may fit less well "
            f"(train with --val_tta {cfg.tta}, or predict with --tta {tuned_tta[0]})"
        )
    log(f"loading {len(dirs)} model(s): {', '.join(cfg.model_dirs)}")
    models = [load_model_dir(d) for d in cfg.model_dirs]
    log(
        f"scoring {num_records or '?'} records of {cfg.data_dir} ({image_size} px) with "
        f"{len(models)} model(s) x {len(transforms)} transform(s) {list(transforms)}"
    )
    start = time.perf_counter()
    ids, scores = predict_scores(models, dataset, transforms, num_records or None, log)
    seconds = time.perf_counter() - start
    log(f"scored {len(ids)} records in {seconds:.1f} s")
    if len(ids) == 0:
        raise PredictError(f"the test shards of {cfg.data_dir} hold no records")

    if wanted is None:
        order = np.argsort(ids, kind="stable")
        out_ids, out_scores = ids[order].tolist(), scores[order]
        _check_unique(out_ids, "the records")
        extra: list[str] = []
    else:
        out_scores = order_by_ids(ids, scores, wanted, _read_rejected(cfg.data_dir))
        out_ids = list(wanted)
        extra = sorted(set(ids.tolist()) - set(wanted))
        if extra:
            log(
                f"warning: {len(extra)} record(s) of {cfg.data_dir} are not in {cfg.ids_csv} and are left "
                f"out of the submission, e.g. {extra[:3]}"
                + (" (their probabilities are in --probabilities)" if cfg.probabilities else "")
            )
    predictions = _apply(out_scores, thresholds, cfg.empty)
    fileio.write_bytes(cfg.out, format_submission(out_ids, predictions).encode("utf-8"))
    empty_rows = int((predictions.sum(axis=1) == 0).sum())
    filled = int(((out_scores >= thresholds).sum(axis=1) == 0).sum()) if cfg.empty == "top1" else 0
    log(
        f"wrote {cfg.out}: {len(out_ids)} rows, {predictions.sum(axis=1).mean():.2f} labels per row "
        f"(thresholds from {thresholds_source}; "
        + (
            f"{filled} row(s) without a passing class got their top class)"
            if cfg.empty == "top1"
            else f"{empty_rows} empty row(s))"
        )
    )
    if cfg.probabilities:
        prob_ids = np.asarray(out_ids + extra, dtype=str)
        prob_scores = out_scores
        if extra:
            index = {sid: i for i, sid in enumerate(ids.tolist())}
            prob_scores = np.concatenate([out_scores, scores[[index[s] for s in extra]]])
        fileio.write_bytes(cfg.probabilities, _probabilities_bytes(cfg.probabilities, prob_ids, prob_scores))
        log(f"wrote {cfg.probabilities}: probabilities of {len(prob_ids)} records")
    return {
        "submission": cfg.out,
        "probabilities": cfg.probabilities,
        "rows": len(out_ids),
        "records": len(ids),
        "not_in_id_list": len(extra),
        "empty_rows": empty_rows,
        "tta": list(transforms),
        "models": list(cfg.model_dirs),
        "thresholds": thresholds_source,
        "seconds": seconds,
    }


def _apply(scores: np.ndarray, thresholds: np.ndarray, empty: str) -> np.ndarray:
    from model import thresholds as thr

    return thr.apply_thresholds(scores, thresholds, at_least_one=empty == "top1")


def build_parser() -> argparse.ArgumentParser:
    """The job's flags."""
    d = PredictConfig(data_dir="", model_dirs=("x",), out="")
    p = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Score the unlabeled (test) shards of a preprocessed set with one or more trained models, "
            "average over test-time augmentation and models, apply the per-class thresholds and write the "
            "competition's submission file (Id,Predicted)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data_dir", required=True, help="preprocessing output holding test-* shards (or gs://)")
    p.add_argument(
        "--model_dir", nargs="+", required=True, metavar="DIR", help="training run dir(s); several = ensemble"
    )
    p.add_argument("--out", required=True, help="submission CSV to write (Id,Predicted)")
    p.add_argument(
        "--ids_csv",
        default=None,
        help="CSV with an Id column (sample_submission.csv): the submission's rows, in its order "
        "(default: every record, sorted by Id)",
    )
    p.add_argument(
        "--tta",
        type=int,
        choices=TTA_CHOICES,
        default=d.tta,
        help="transforms averaged: 1 none, 2 + left-right flip, 4 flips, 8 flips and rotations",
    )
    p.add_argument(
        "--thresholds",
        default=None,
        help=f"a {THRESHOLDS_FILE} to apply instead of the model dirs' (which must otherwise agree)",
    )
    p.add_argument(
        "--empty",
        choices=EMPTY_RULES,
        default=d.empty,
        help="a row where no class passes: top1 = the class with the largest score - threshold, none = empty",
    )
    p.add_argument(
        "--probabilities", default=None, help="also write the averaged probabilities (.npz or .csv)"
    )
    p.add_argument("--batch_size", type=int, default=d.batch_size, help="records per batch")
    return p


@cli.command(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m model.predict`; returns the exit status (2 on bad input)."""
    args = build_parser().parse_args(argv)
    try:
        cfg = PredictConfig(
            data_dir=args.data_dir.rstrip("/"),
            model_dirs=tuple(d.rstrip("/") for d in args.model_dir),
            out=args.out,
            ids_csv=args.ids_csv,
            tta=args.tta,
            thresholds=args.thresholds,
            empty=args.empty,
            probabilities=args.probabilities,
            batch_size=args.batch_size,
        )
        run(cfg)
    except PredictError as e:
        return cli.bad_input(PROG, e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
