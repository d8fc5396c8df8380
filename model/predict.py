"""The prediction job: unlabeled shards or an image folder -> TTA ensemble probabilities -> a submission file.

    python -m model.predict --data_dir out/test | --input_dir test_images/ \\
        --model_dir runs/fold0 [runs/fold1 ...] \\
        --ids_csv sample_submission.csv --out submission.csv [--tta 8] [--probabilities probs.npz]

Reads the test shards (`test-*`, fold -1) that the preprocessing job wrote for an unlabeled set (run on the
test folder with `sample_submission.csv`), or, with --input_dir, the `{Id}_{stain}.{png,jpg,tif}` files of
a folder straight away by the preprocessing job's rules, resized to the models' size (`model.image_folder`;
no Beam run), scores every sample with the model of each --model_dir under
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

Thresholds for an ensemble (`--ensemble_thresholds`, several model dirs): the thresholds were tuned on single
models' out-of-fold scores, but the job applies them to the average of the models, whose scores are less
spread out. `rate` keeps each class's decision rate: per class, the
share of (model, sample) pairs whose single-model score passes the tuned threshold on the samples being
predicted, and the ensemble's threshold keeps that share of the averaged scores
(`model.thresholds.ensemble_thresholds`; no labels are used). It needs at least MIN_RATE_SAMPLES records
(with fewer the tuned values are applied, with a warning). `as_tuned` (the default here and in the fold
driver; the Beam batch prediction has no rate matching) applies the tuned values to the average unchanged.

When no class passes its threshold, `--empty top1` (default; every sample of the competition has at least
one label) predicts the class with the largest score - threshold margin, `--empty none` leaves the row empty.

Bad input stops the job with a one-line error: a model dir without thresholds, models of different image
sizes, a dataset of another schema version, records of another image size than the models were trained on,
repeated Ids, a folder without stain images. Every listed Id is either in the submission or in `rejected.csv`
beside --out (Id, reason, detail, source): Ids of --ids_csv without a record (quoting the preprocessing job's
`rejected.csv` when it says why), and with --input_dir the Ids whose images are missing, unreadable or of
mixed sizes, with the preprocessing job's reason codes. Records whose Id is not in --ids_csv are reported
and kept in the probabilities file, never silently dropped. Paths go through `model.fileio`, so gs:// works
for every input and output.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import posixpath
import sys
import time
from typing import Callable, Iterable, Sequence

import numpy as np

import schemas
from model import fileio
from model import prediction_outputs as outputs
from model import submission as submission_lib
from model.config import (
    CONFIG_FILE,
    MODEL_FILE,
    THRESHOLDS_FILE,
    TTA_CHOICES,
)
from model.config import tta_transforms as _tta_transforms
from model.prediction_outputs import EMPTY_RULES, NO_RECORD  # noqa: F401 - predict.NO_RECORD
from model.submission import (
    PROB_CLASS_NAMES,
    PROB_IDS,
    PROB_SCORES,
    PredictError,
    format_submission,
    order_by_ids,
    preprocessing_reasons,
    read_id_list,
    rejected_csv,
    submission_rows,
)
from schemas import cli

__all__ = [
    "EMPTY_RULES",
    "ENSEMBLE_RULES",
    "add_ensemble_flag",
    "add_prediction_flags",
    "PROB_CLASS_NAMES",
    "PROB_IDS",
    "PROB_SCORES",
    "TTA_CHOICES",
    "PredictConfig",
    "PredictError",
    "common_image_size",
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
ENSEMBLE_RULES = ("rate", "as_tuned")
# Fewer records than this give too coarse a decision rate per class for `--ensemble_thresholds rate`.
MIN_RATE_SAMPLES = 50


@dataclasses.dataclass(frozen=True)
class PredictConfig:
    """One prediction run.

    Attributes:
      data_dir: the preprocessing job's output for the unlabeled set (local or gs://).
      input_dir: instead of data_dir, a folder of `{Id}_{stain}.{png,jpg,tif}` files (local or gs://).
      model_dirs: training output dirs; their models are averaged.
      out: the submission CSV to write.
      ids_csv: the Id list whose order the submission follows (e.g. sample_submission.csv); None: every
        record, sorted by Id.
      tta: transforms averaged per model, one of TTA_CHOICES.
      thresholds: a thresholds.json overriding the model dirs' files.
      empty: what a row gets when no class passes: `top1` or `none`.
      probabilities: where to write the averaged probabilities (.npz or .csv), or None.
      batch_size: records per batch.
      ensemble_thresholds: with several models, `rate` (thresholds matched to the average: each class keeps
        the single models' decision rate) or `as_tuned` (see the module's docstring).
    """

    data_dir: str | None = None
    model_dirs: tuple[str, ...] = ()
    out: str = ""
    input_dir: str | None = None
    ids_csv: str | None = None
    tta: int = 8
    thresholds: str | None = None
    empty: str = "top1"
    probabilities: str | None = None
    batch_size: int = 32
    ensemble_thresholds: str = "as_tuned"

    def __post_init__(self) -> None:
        if (self.data_dir is None) == (self.input_dir is None):
            raise PredictError(
                "give either --data_dir (preprocessed shards) or --input_dir (an image folder)"
            )
        if not self.out:
            raise PredictError("give --out, the submission CSV to write")
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
        if self.ensemble_thresholds not in ENSEMBLE_RULES:
            raise PredictError(
                f"ensemble_thresholds must be one of {ENSEMBLE_RULES}, got {self.ensemble_thresholds!r}"
            )
        if self.probabilities is not None and not self.probabilities.endswith((".npz", ".csv")):
            raise PredictError(f"--probabilities must end in .npz or .csv, got {self.probabilities!r}")


# --- pure helpers ----------------------------------------------------------------------------------------


def tta_transforms(n: int) -> tuple[int, ...]:
    """The `model.data.dihedral` indices averaged for `--tta n` (n in TTA_CHOICES); 0 (identity) first."""
    try:
        return _tta_transforms(n)
    except ValueError as e:
        raise PredictError(str(e)) from None


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
                f"{model_dir} has no {name}: not the model dir of a finished training run (hpa-train)"
            )
    config_path = fileio.join(model_dir, CONFIG_FILE)
    try:
        cfg = config_from_dict(json.loads(fileio.read_text(config_path)))
    except (ValueError, ConfigError) as e:
        raise PredictError(f"{config_path} is not a training config: {e}") from None
    if cfg.data.image_size is None:
        raise PredictError(f"{config_path} does not record the image size the model was trained on")
    return _ModelDir(model_dir, int(cfg.data.image_size), int(cfg.val_tta))


def common_image_size(dirs: Sequence[_ModelDir]) -> int:
    """The image size every model dir was trained on. Raises PredictError when they differ."""
    sizes = {d.image_size for d in dirs}
    if len(sizes) > 1:
        raise PredictError(
            "the models were trained on different image sizes: "
            + ", ".join(f"{d.path}: {d.image_size}" for d in dirs)
        )
    return sizes.pop()


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
                f"`hpa-evaluate --model_dir {' '.join(model_dirs)}`, or give --thresholds PATH"
            )
        files.append(path)
    values = [load(p) for p in files]
    for path, v in zip(files[1:], values[1:]):
        if not np.array_equal(v, values[0]):
            raise PredictError(
                f"{files[0]} and {path} hold different thresholds (tuned separately per fold?): thresholds "
                "for an ensemble must be tuned on the folds' pooled predictions, "
                f"`hpa-evaluate --model_dir {' '.join(model_dirs)} --out DIR`, "
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
    members: list | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Scores a dataset of (images, labels, ids) batches with every model under every transform.

    Each batch is decoded once; the probabilities are averaged over the transforms, then over the models.
    `members`, if a list, receives each model's own (TTA-averaged) scores: one [K, N, NUM_CLASSES] array.

    Returns:
      (ids as str [N], float64 scores [N, NUM_CLASSES]) in dataset order.
    """
    import tensorflow as tf

    from model.model import tta_average

    ids: list[str] = []
    chunks, member_chunks = [], []
    start = last = time.perf_counter()
    try:
        for images, _, batch_ids in dataset:
            per_model = [tta_average(m.predict_on_batch, images, transforms) for m in models]
            chunks.append(np.mean(per_model, axis=0))
            if members is not None:
                member_chunks.append(np.stack(per_model).astype(np.float64))
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
    if members is not None:
        shape = (len(models), 0, schemas.NUM_CLASSES)
        members.append(np.concatenate(member_chunks, axis=1) if member_chunks else np.zeros(shape))
    if not chunks:
        return np.array([], dtype=str), np.zeros((0, schemas.NUM_CLASSES))
    return np.array(ids, dtype=str), np.concatenate(chunks)


def _log(msg: str) -> None:
    print(msg, flush=True)


def count_test_records(data_dir: str, image_size: int) -> int:
    """The number of test records the manifest of `data_dir` counts, once its image size is the models'.

    Raises:
      PredictError: no readable manifest, or images of another size.
    """
    try:
        manifest = schemas.read_manifest(data_dir, command=PROG)
    except (FileNotFoundError, ValueError) as e:
        raise PredictError(str(e)) from None
    height, width = (int(v) for v in manifest[schemas.MANIFEST_IMAGE_SIZE])
    if (height, width) != (image_size, image_size):
        raise PredictError(
            f"{data_dir} holds {height}x{width} images but the models were trained on "
            f"{image_size}x{image_size}: preprocess the set with --image_size {image_size}"
        )
    written = manifest.get(schemas.MANIFEST_WRITTEN, {})
    return int(written.get(schemas.written_key(schemas.UNLABELED_FOLD), 0))


def warn_if_tta_differs(dirs: Sequence, cfg: PredictConfig, log: Callable[[str], None]) -> None:
    """Warns when the model dirs' thresholds were tuned on predictions of another TTA than --tta."""
    tuned_tta = sorted({d.val_tta for d in dirs})
    if cfg.thresholds is None and tuned_tta != [cfg.tta]:
        log(
            f"warning: the thresholds were tuned on validation predictions with TTA {tuned_tta} but this run "
            f"averages {cfg.tta} transform(s); averaging shrinks scores, so the thresholds may fit less well "
            f"(train with --val_tta {cfg.tta}, or predict with --tta {tuned_tta[0]})"
        )


def _shard_input(cfg: PredictConfig, image_size: int):
    """The test shards of --data_dir: (dataset, number of records)."""
    from model import data as data_lib
    from model.config import ConfigError, DataConfig

    num_records = count_test_records(cfg.data_dir, image_size)
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
    return dataset, num_records


def _folder_input(cfg: PredictConfig, wanted, image_size: int, rejected: list, log) -> tuple:
    """The samples of --input_dir: (dataset, number of samples to read, the Ids listed in order)."""
    from model import image_folder

    try:
        files = image_folder.list_stain_files(cfg.input_dir)
        plan = image_folder.plan_folder(files, cfg.input_dir, wanted)
    except image_folder.FolderError as e:
        raise PredictError(str(e)) from None
    rejected.extend(plan.rejected)
    if plan.unlisted:
        log(
            f"warning: {len(plan.unlisted)} Id(s) with images in {cfg.input_dir} are not in {cfg.ids_csv} "
            f"and are not predicted, e.g. {list(plan.unlisted[:3])}"
        )
    listed = list(wanted) if wanted is not None else sorted(files)
    dataset = image_folder.make_dataset(plan.samples, image_size, cfg.batch_size, rejected)
    return dataset, len(plan.samples), listed


def _same_path(a: str, b: str) -> bool:
    def norm(p: str) -> str:
        return posixpath.normpath(p) if fileio.is_remote(p) else os.path.abspath(p)

    return norm(a) == norm(b)


def check_source_folder(data_dir: str | None, input_dir: str | None, command: str) -> None:
    """Stops at once when --data_dir is an image folder or --input_dir a preprocessing output (local paths).

    Raises:
      PredictError: the folder is of the other flag's kind; the message names that flag.
    """
    from schemas import folders

    if data_dir is not None and folders.kind_of(data_dir) == folders.IMAGES:
        raise PredictError(f"--data_dir {folders.hint_for_data_dir(data_dir, command)}")
    if input_dir is not None and folders.kind_of(input_dir) in (folders.SHARDS, folders.RAW, folders.MODEL):
        raise PredictError(f"--input_dir {folders.hint_for_input_dir(input_dir)}")


def run(cfg: PredictConfig, log: Callable[[str], None] = _log) -> dict:
    """Runs the prediction job; returns a summary (paths, counts, predicted labels per row).

    Raises:
      PredictError: bad inputs (the message says what to do).
    """
    check_source_folder(cfg.data_dir, cfg.input_dir, PROG)
    wanted = read_id_list(cfg.ids_csv) if cfg.ids_csv else None
    dirs = [_inspect_model_dir(d) for d in cfg.model_dirs]
    thresholds, thresholds_source = resolve_thresholds(cfg.model_dirs, cfg.thresholds)
    image_size = common_image_size(dirs)
    rejected_path = submission_lib.rejected_path(cfg.out)
    source = cfg.input_dir or cfg.data_dir
    rejected: list[tuple[str, str, str]] = []
    if cfg.input_dir is not None:
        dataset, num_records, listed = _folder_input(cfg, wanted, image_size, rejected, log)
    else:
        beside_out = fileio.join(fileio.dirname(cfg.out) or ".", schemas.REJECTED_FILE)
        if _same_path(beside_out, fileio.join(cfg.data_dir, schemas.REJECTED_FILE)):
            raise PredictError(
                f"--out {cfg.out} lies in --data_dir, beside the preprocessing job's outputs: write the "
                "submission outside the dataset"
            )
        dataset, num_records = _shard_input(cfg, image_size)
        listed = wanted
    transforms = tta_transforms(cfg.tta)
    warn_if_tta_differs(dirs, cfg, log)
    ids, scores, seconds = np.array([], dtype=str), np.zeros((0, schemas.NUM_CLASSES)), 0.0
    if num_records or cfg.input_dir is None:
        log(f"loading {len(dirs)} model(s): {', '.join(cfg.model_dirs)}")
        models = [load_model_dir(d) for d in cfg.model_dirs]
        log(
            f"scoring {num_records or '?'} samples of {source} ({image_size} px) with "
            f"{len(models)} model(s) x {len(transforms)} transform(s) {list(transforms)}"
        )
        start = time.perf_counter()
        members: list | None = [] if len(models) > 1 and cfg.ensemble_thresholds == "rate" else None
        ids, scores = predict_scores(models, dataset, transforms, num_records or None, log, members=members)
        seconds = time.perf_counter() - start
        log(f"scored {len(ids)} samples in {seconds:.1f} s")
        if members is not None:
            scores = members[0].mean(axis=0)  # the same float64 average the matched thresholds are cut on
            thresholds = _ensemble_thresholds(thresholds, members[0], log)
    if len(ids) == 0 and cfg.input_dir is None:
        raise PredictError(f"the test shards of {cfg.data_dir} hold no records")

    if listed is None:
        listed = outputs.listed_ids(None, ids, rejected)
    shards_listed = cfg.input_dir is None and wanted is not None
    accounting = outputs.account(
        listed,
        ids,
        rejected,
        absent_detail=f"no record in the test shards of {cfg.data_dir}" if cfg.input_dir is None else None,
        absent_reasons=preprocessing_reasons(cfg.data_dir) if shards_listed else None,
    )
    rejected = accounting.rejected
    fileio.write_bytes(rejected_path, rejected_csv(rejected, source))
    if not accounting.predicted:
        raise PredictError(f"none of the {len(listed)} listed Id(s) could be predicted: see {rejected_path}")
    extra = accounting.extra
    if extra:
        log(
            f"warning: {len(extra)} record(s) of {cfg.data_dir} are not in {cfg.ids_csv} and are left "
            f"out of the submission, e.g. {extra[:3]}"
            + (" (their probabilities are in --probabilities)" if cfg.probabilities else "")
        )
    labelled = outputs.label(accounting, ids, scores, thresholds, cfg.empty)
    fileio.write_bytes(cfg.out, labelled.submission_bytes())
    reasons = ", ".join(f"{k} {v}" for k, v in accounting.reasons().items())
    log(
        f"wrote {cfg.out}: {len(labelled.ids)} of {len(listed)} listed Ids predicted, "
        f"{len(rejected)} rejected"
        + (f" ({reasons}; see {rejected_path})" if rejected else "")
        + f", {labelled.labels_per_row:.2f} labels per row (thresholds from {thresholds_source}; "
        + (
            f"{labelled.filled_rows} row(s) without a passing class got their top class)"
            if cfg.empty == "top1"
            else f"{labelled.empty_rows} empty row(s))"
        )
    )
    if cfg.probabilities:
        fileio.write_bytes(cfg.probabilities, labelled.probabilities_bytes(cfg.probabilities))
        log(f"wrote {cfg.probabilities}: probabilities of {len(labelled.prob_ids)} records")
    return {
        "submission": cfg.out,
        "probabilities": cfg.probabilities,
        "rows": len(labelled.ids),
        "records": len(ids),
        "rejected": len(rejected),
        "rejected_file": rejected_path,
        "not_in_id_list": len(extra),
        "empty_rows": labelled.empty_rows,
        "tta": list(transforms),
        "models": list(cfg.model_dirs),
        "thresholds": thresholds_source,
        "ensemble_thresholds": cfg.ensemble_thresholds if len(cfg.model_dirs) > 1 else None,
        "seconds": seconds,
    }


def _ensemble_thresholds(tuned: np.ndarray, members: np.ndarray, log: Callable[[str], None]) -> np.ndarray:
    """The tuned thresholds matched to the models' average (--ensemble_thresholds rate) if records suffice."""
    from model import thresholds as thr

    k, n = members.shape[:2]
    if n < MIN_RATE_SAMPLES:
        log(
            f"warning: {n} record(s) are too few to match the thresholds to the ensemble's average (needs "
            f"{MIN_RATE_SAMPLES}); the tuned values are applied as they are"
        )
        return tuned
    matched = thr.ensemble_thresholds(tuned, members)
    log(
        f"thresholds matched to the average of {k} models: each class keeps the single models' decision "
        f"rate on these {n} records (--ensemble_thresholds rate); mean threshold {tuned.mean():.3f} -> "
        f"{matched.mean():.3f}"
    )
    return matched


def add_prediction_flags(p: argparse.ArgumentParser, *, tta: int, empty: str) -> None:
    """The flags this job shares with the Beam batch prediction (pipelines/batch_predict.py)."""
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data_dir", help="preprocessing output holding test-* shards (or gs://)")
    source.add_argument(
        "--input_dir",
        help="or a folder of {Id}_{red,green,blue,yellow}.{png,jpg,jpeg,tif,tiff} files (or gs://), read and "
        "resized to the models' size by the preprocessing job's rules",
    )
    p.add_argument(
        "--model_dir", nargs="+", required=True, metavar="DIR", help="training run dir(s); several = ensemble"
    )
    p.add_argument("--out", required=True, help="submission CSV to write (Id,Predicted)")
    p.add_argument(
        "--ids_csv",
        default=None,
        help="CSV with an Id column (sample_submission.csv): the submission's rows, in its order "
        "(default: every record, or every Id with a stain file, sorted by Id)",
    )
    p.add_argument(
        "--tta",
        type=int,
        choices=TTA_CHOICES,
        default=tta,
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
        default=empty,
        help="a row where no class passes: top1 = the class with the largest score - threshold, none = empty",
    )
    p.add_argument(
        "--probabilities", default=None, help="also write the averaged probabilities (.npz or .csv)"
    )


def prediction_flags(args: argparse.Namespace) -> dict:
    """The values of `add_prediction_flags`' flags as config fields (PredictConfig, JobConfig)."""
    return dict(
        data_dir=args.data_dir and args.data_dir.rstrip("/"),
        input_dir=args.input_dir and args.input_dir.rstrip("/"),
        model_dirs=tuple(d.rstrip("/") for d in args.model_dir),
        out=args.out,
        ids_csv=args.ids_csv,
        tta=args.tta,
        thresholds=args.thresholds,
        empty=args.empty,
        probabilities=args.probabilities,
    )


def build_parser() -> argparse.ArgumentParser:
    """The job's flags."""
    d = PredictConfig(data_dir="", model_dirs=("x",), out="x")
    p = cli.ArgumentParser(
        prog=PROG,
        description=(
            "Score the unlabeled (test) shards of a preprocessed set, or a folder of stain images, with one "
            "or more trained models, average over test-time augmentation and models, apply the per-class "
            "thresholds and write the competition's submission file (Id,Predicted) and rejected.csv beside "
            "it (listed Ids that could not be predicted, with the reason)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_prediction_flags(p, tta=d.tta, empty=d.empty)
    p.add_argument("--batch_size", type=int, default=d.batch_size, help="records per batch")
    add_ensemble_flag(p, d.ensemble_thresholds)
    return p


def add_ensemble_flag(p: argparse.ArgumentParser, default: str) -> None:
    """--ensemble_thresholds, of this job and of the fold driver (model/cv.py)."""
    p.add_argument(
        "--ensemble_thresholds",
        choices=ENSEMBLE_RULES,
        default=default,
        help="several models: rate = match the thresholds to the models' average (each class keeps the "
        "single models' decision rate on the predicted records), as_tuned = apply them unchanged",
    )


@cli.command(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m model.predict`; returns the exit status (2 on bad input)."""
    args = build_parser().parse_args(argv)
    return cli.run_or_bad_input(
        PROG,
        PredictError,
        lambda: run(
            PredictConfig(
                **prediction_flags(args),
                batch_size=args.batch_size,
                ensemble_thresholds=args.ensemble_thresholds,
            )
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
