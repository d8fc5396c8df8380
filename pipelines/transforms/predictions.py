"""Batch prediction's transforms: records -> images -> per-model scores (RunInference) -> one ensemble score.

    ReadRecords       serialized records of the test shards (Beam's TFRecord reader), or
    ReadImageFolder   the records the preprocessing job would write for a folder of stain files (its
                      ListImages, CheckRows, MatchFiles and `stains.validate_stains`; rejections -> rejected)
    DecodeRecords     (Id, uint8 image [H, W, NUM_STAINS]) with the schema's own decoder; a record that cannot
                      be decoded at the models' size -> `unscorable` (Id, reason)
    ScoreWithModel    RunInference with one model dir's export (in pipelines/transforms/inference.py)
    AverageModels     (Id, mean over the models of their scores); Ids scored more than once -> `repeated`
    WriteOutputs      every score at once -> the submission, rejected.csv, the probabilities (work folder)

The numbers are model.predict's: the same decoder, the same dihedral transforms averaged in float64 in the
same order, then the mean over the models in the order given.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import apache_beam as beam
import numpy as np

import schemas
from pipelines.progress import ProgressFile
from pipelines.transforms.inference import COUNTERS, ScoreWithModel, score_phase  # noqa: F401 - pred.<name>

DECODE_PHASE = "decode"
UNDECODABLE = "undecodable"
OTHER_SIZE = "other_image_size"
UNSCORABLE = "unscorable"


@beam.ptransform_fn
def ReadRecords(pbegin, pattern: str):  # noqa: N802
    """The serialized records of the shards matching `pattern` (local or gs://)."""
    return pbegin | "Read" >> beam.io.ReadFromTFRecord(pattern)


class _DecodeFn(beam.DoFn):
    """Serialized record -> (Id, uint8 image); records of another size or undecodable ones -> unscorable."""

    def __init__(self, image_size: int, progress_dir: str | None):
        self._size = image_size
        self._progress_dir = progress_dir

    def setup(self):
        import tensorflow as tf

        def decode(serialized):
            features = schemas.parse_example(serialized)
            return features[schemas.ID_KEY], schemas.decode_stains(features)

        self._tf = tf
        self._decode = tf.function(decode, input_signature=[tf.TensorSpec([], tf.string)])
        self._progress = ProgressFile(self._progress_dir, DECODE_PHASE)

    def process(self, serialized: bytes):
        try:
            sid, image = self._decode(self._tf.constant(serialized))
        except self._tf.errors.InvalidArgumentError as e:
            beam.metrics.Metrics.counter(COUNTERS, f"rejected_{UNDECODABLE}").inc()
            self._progress.add(rejected=1)
            detail = e.message.splitlines()[0] if e.message else type(e).__name__
            yield beam.pvalue.TaggedOutput(UNSCORABLE, ("?", f"{UNDECODABLE}: {detail}"))
            return
        sid = sid.numpy().decode("utf-8")
        image = image.numpy()
        if image.shape != (self._size, self._size, schemas.NUM_STAINS):
            beam.metrics.Metrics.counter(COUNTERS, f"rejected_{OTHER_SIZE}").inc()
            self._progress.add(rejected=1)
            h, w = image.shape[:2]
            yield beam.pvalue.TaggedOutput(
                UNSCORABLE, (sid, f"{OTHER_SIZE}: {h}x{w}, the models take {self._size}x{self._size}")
            )
            return
        self._progress.add(done=1)
        yield sid, image

    def finish_bundle(self):
        self._progress.flush()


@beam.ptransform_fn
def DecodeRecords(records, image_size: int, progress_dir: str | None = None):  # noqa: N802
    """Serialized records -> (Id, uint8 image [S, S, NUM_STAINS]); side output `unscorable`: (Id, reason)."""
    return records | "Decode" >> beam.ParDo(_DecodeFn(image_size, progress_dir)).with_outputs(
        UNSCORABLE, main="images"
    )


# --- an image folder (--input_dir): the preprocessing job's own transforms and rules -----------------------

LOAD_PHASE = "load"


def _row_of_file(key, input_dir: str):
    from schemas import labels as labels_lib

    source, sample_id = key
    return labels_lib.LabelRow(source, input_dir, 0, sample_id, None)


def _file_key(item):
    return item[0]


@beam.ptransform_fn
def ListedRows(files, input_dir: str):  # noqa: N802
    """The folder's files ((source, Id), file) -> one unlabeled LabelRow per Id found (no Id list given)."""
    return (
        files
        | "Ids" >> beam.Map(_file_key)
        | "Distinct" >> beam.Distinct()
        | "Rows" >> beam.Map(_row_of_file, input_dir)
    )


def _id_reason_detail(row: tuple[str, str, str, str]) -> tuple[str, str, str]:
    sample_id, reason, detail, _ = row  # schemas.REJECTED_COLUMNS order
    return sample_id, reason, detail


class _LoadSampleFn(beam.DoFn):
    """Candidate -> the serialized record the preprocessing job would write for it at the models' size.

    Reads the four stain files and applies `stains.validate_stains` (checks, 8-bit conversion, box-filter
    resize), so the scored pixels are those of `run_preprocess.sh --image_size S` then the shard path.
    Rejections (Id, reason, detail, source) carry the preprocessing job's reason codes.
    """

    def __init__(self, image_size: int, progress_dir: str | None):
        self._size = image_size
        self._progress_dir = progress_dir

    def setup(self):
        self._progress = ProgressFile(self._progress_dir, LOAD_PHASE)

    def process(self, c):
        from pipelines.transforms.images import read_stains
        from pipelines.transforms.samples import rejection
        from schemas import stains as stains_lib

        try:
            valid = stains_lib.validate_stains(read_stains(c), self._size)
        except stains_lib.Rejected as e:
            beam.metrics.Metrics.counter(COUNTERS, f"rejected_{e.reason}").inc()
            self._progress.add(rejected=1)
            yield beam.pvalue.TaggedOutput("rejected", rejection(c.source, c.id, e.reason, e.detail))
            return
        except OSError as e:  # listed but unreadable (deleted, permissions)
            self._progress.add(rejected=1)
            reason = stains_lib.MISSING_STAIN
            yield beam.pvalue.TaggedOutput("rejected", rejection(c.source, c.id, reason, str(e)))
            return
        sample = schemas.Sample(
            id=c.id,
            images=valid.images,
            height=valid.height,
            width=valid.width,
            labels=np.zeros(schemas.NUM_CLASSES, np.int64),
            fold=schemas.UNLABELED_FOLD,
            source=c.source,
        )
        self._progress.add(done=1)
        yield schemas.to_example(sample).SerializeToString()

    def finish_bundle(self):
        self._progress.flush()


@beam.ptransform_fn
def ReadImageFolder(  # noqa: N802
    pbegin, input_dir: str, source: str, image_size: int, rows=None, progress_dir: str | None = None
):
    """A folder of `{Id}_{stain}.{ext}` files -> serialized records at `image_size`, as the preprocessing
    job writes them (its ListImages, CheckRows and MatchFiles, then `stains.validate_stains`).

    Args:
      rows: a PCollection of LabelRows of the Ids to predict (from --ids_csv, read by a worker); None: every
        Id with a file in the folder.

    Returns:
      {"records": serialized records, "rejected": (Id, reason, detail), "unlisted": (source, Id) of images
      whose Id is not listed}.
    """
    from pipelines.transforms.files import ListImages, MatchFiles
    from pipelines.transforms.rows import CheckRows

    files = pbegin | "ListImages" >> ListImages(input_dir, source)
    if rows is None:
        all_rows = files | "ListedRows" >> ListedRows(input_dir)
    else:
        all_rows = rows
    checked = all_rows | "CheckRows" >> CheckRows()
    matched = (checked.valid, all_rows, files) | "MatchFiles" >> MatchFiles()
    loaded = matched.candidates | "LoadSamples" >> beam.ParDo(
        _LoadSampleFn(image_size, progress_dir)
    ).with_outputs("rejected", main="records")
    rejected = (
        (checked.rejected, matched.rejected, loaded.rejected)
        | "AllRejected" >> beam.Flatten()
        | "IdReasonDetail" >> beam.Map(_id_reason_detail)
    )
    return {"records": loaded.records, "rejected": rejected, "unlisted": matched.unlisted}


def _average(item, num_models: int):
    sid, grouped = item
    per_model = [list(grouped[i]) for i in range(num_models)]
    if any(len(s) != 1 for s in per_model):
        beam.metrics.Metrics.counter(COUNTERS, "repeated_ids").inc()
        yield beam.pvalue.TaggedOutput("repeated", sid)
        return
    yield sid, np.mean([s[0] for s in per_model], axis=0)


@beam.ptransform_fn
def AverageModels(per_model):  # noqa: N802
    """[(Id, scores) per model] -> (Id, the models' mean); side output `repeated`: Ids scored twice."""
    return (
        dict(enumerate(per_model))
        | "JoinById" >> beam.CoGroupByKey()
        | "Average" >> beam.FlatMap(_average, len(per_model)).with_outputs("repeated", main="scores")
    )


# --- the job's outputs -----------------------------------------------------------------------------------

SUBMISSION_NAME = "submission.csv"
PROBABILITIES_NAME = "probabilities"
REPORT_FILE = "report.json"


@dataclasses.dataclass(frozen=True)
class Outputs:
    """The job's files (bytes) and a summary of them."""

    submission: bytes
    rejected: bytes
    probabilities: bytes | None
    summary: dict


def assemble_outputs(
    ids: Sequence[str],
    scores: np.ndarray,
    *,
    thresholds: np.ndarray,
    source: str,
    empty: str = "top1",
    wanted: Sequence[str] | None = None,
    rejected: Sequence[tuple[str, str, str]] = (),
    unscorable: Sequence[tuple[str, str]] = (),
    repeated: Sequence[str] = (),
    absent_reasons: dict[str, tuple[str, str]] | None = None,
    probabilities_format: str | None = None,
) -> Outputs:
    """The submission, rejected.csv and probabilities by model.predict's rules (model/prediction_outputs.py),
    from all the scores.

    Every listed Id (`wanted`, or every scored Id) ends in the submission or in rejected.csv.

    Args:
      ids, scores: the ensemble's scores, one row per scored sample, in any order.
      thresholds, empty: model.predict's rule for turning scores into labels.
      source: the input (--data_dir or --input_dir), named in rejected.csv.
      wanted: the Id list (--ids_csv) whose order the submission follows; None: every Id, sorted.
      rejected: (Id, reason, detail) of samples the job rejected (they go to rejected.csv).
      unscorable: (Id, reason) of records that cannot be scored: an error, as in model.predict.
      repeated: Ids that more than one record holds: an error.
      absent_reasons: Id -> (reason, detail) for listed Ids without a sample (the preprocessing job's
        reasons); others get model.prediction_outputs.NO_RECORD.
      probabilities_format: `.npz` or `.csv`, or None for no probabilities.

    Raises:
      PredictError: records that cannot be scored, repeated Ids, nothing to predict.
    """
    from model import predict, submission
    from model import prediction_outputs as outputs

    if unscorable:
        examples = "; ".join(f"{sid}: {why}" for sid, why in sorted(unscorable)[:3])
        raise predict.PredictError(
            f"{len(unscorable)} record(s) could not be scored at the models' image size (mixed image sizes "
            f"in the shards?), e.g. {examples}"
        )
    if repeated:
        raise predict.PredictError(f"the records repeat Ids, e.g. {sorted(set(repeated))[:5]}")
    order = np.argsort(np.asarray([str(i) for i in ids], dtype=str), kind="stable")
    ids = np.asarray([str(i) for i in ids], dtype=str)[order]
    scores = np.asarray(scores, dtype=np.float64).reshape(len(order), schemas.NUM_CLASSES)[order]
    accounting = outputs.account(
        outputs.listed_ids(wanted, ids, rejected),
        ids,
        rejected,
        absent_detail=f"no record in {source}",
        absent_reasons=absent_reasons,
    )
    rows = accounting.rejected
    if not accounting.predicted:
        raise predict.PredictError(
            f"none of the {len(accounting.listed)} listed Id(s) could be predicted ({accounting.reasons()}), "
            "e.g. " + "; ".join(f"{sid}: {reason}, {detail}" for sid, reason, detail in rows[:3])
        )
    labelled = outputs.label(accounting, ids, scores, thresholds, empty)
    probabilities = None
    if probabilities_format is not None:
        probabilities = labelled.probabilities_bytes(PROBABILITIES_NAME + probabilities_format)
    summary = {
        "listed": len(accounting.listed),
        "rows": len(labelled.ids),
        "records": len(ids),
        "rejected": len(rows),
        "rejected_per_reason": accounting.reasons(),
        "not_in_id_list": len(accounting.extra),
        "not_in_id_list_examples": accounting.extra[:3],
        "labels_per_row": labelled.labels_per_row,
        "empty_rows": labelled.empty_rows,
        "filled_rows": labelled.filled_rows,
    }
    return Outputs(
        submission=labelled.submission_bytes(),
        rejected=submission.rejected_csv(rows, source),
        probabilities=probabilities,
        summary=summary,
    )


class _WriteOutputsFn(beam.DoFn):
    """Reads the Id list and the preprocessing job's rejected.csv here (not in the pipeline's graph: a
    million Ids would bloat it), then writes the outputs or the error."""

    def __init__(self, work_dir: str, options: dict, ids_csv: str | None, data_dir: str | None):
        self._work_dir = work_dir
        self._options = options
        self._ids_csv = ids_csv
        self._data_dir = data_dir

    def process(self, scored, rejected, unscorable, repeated, unlisted):
        import json
        import posixpath

        from model.predict import PredictError, read_id_list
        from model.submission import preprocessing_reasons
        from pipelines import storage

        ids = [sid for sid, _ in scored]
        scores = np.array([s for _, s in scored]).reshape(len(ids), schemas.NUM_CLASSES)
        try:
            out = assemble_outputs(
                ids,
                scores,
                rejected=rejected,
                unscorable=unscorable,
                repeated=repeated,
                wanted=read_id_list(self._ids_csv) if self._ids_csv else None,
                absent_reasons=preprocessing_reasons(self._data_dir) if self._data_dir else {},
                **self._options,
            )
        except PredictError as e:
            summary = {"error": str(e)}
        else:
            unlisted_ids = sorted(sid for _, sid in unlisted)
            summary = {
                **out.summary,
                "unlisted_images": len(unlisted_ids),
                "unlisted_examples": unlisted_ids[:3],
            }
            storage.write_bytes(posixpath.join(self._work_dir, SUBMISSION_NAME), out.submission)
            storage.write_bytes(posixpath.join(self._work_dir, schemas.REJECTED_FILE), out.rejected)
            if out.probabilities is not None:
                name = PROBABILITIES_NAME + self._options["probabilities_format"]
                storage.write_bytes(posixpath.join(self._work_dir, name), out.probabilities)
        # Written last: its presence says the job finished.
        report = json.dumps(summary, indent=1).encode("utf-8")
        storage.write_bytes(posixpath.join(self._work_dir, REPORT_FILE), report)
        yield summary


@beam.ptransform_fn
def WriteOutputs(  # noqa: N802
    scores,
    rejected,
    unscorable,
    repeated,
    unlisted,
    work_dir: str,
    *,
    thresholds: np.ndarray,
    source: str,
    empty: str,
    ids_csv: str | None,
    data_dir: str | None,
    probabilities_format: str | None,
):
    """All (Id, scores) at once -> the submission, rejected.csv (+ probabilities) and REPORT_FILE in work_dir.

    `ids_csv`: the Id list (the submission's rows and order; None: every Id); `data_dir`: the shards'
    dataset, whose rejected.csv gives the reasons of listed Ids without a record (None for a folder).
    `rejected`: (Id, reason, detail) of samples the job rejected; `unscorable`: (Id, reason) of records
    that cannot be scored and `repeated`: Ids held by several records, both errors; `unlisted`: (source,
    Id) of images in a folder whose Id is not listed (counted). An error writes only REPORT_FILE, with the
    message; the launcher publishes nothing then.
    """
    options = {
        "thresholds": np.asarray(thresholds, dtype=np.float64),
        "source": source,
        "empty": empty,
        "probabilities_format": probabilities_format,
    }
    return (
        scores
        | "CollectScores" >> beam.combiners.ToList()
        | "Write"
        >> beam.ParDo(
            _WriteOutputsFn(work_dir, options, ids_csv, data_dir),
            rejected=beam.pvalue.AsList(rejected),
            unscorable=beam.pvalue.AsList(unscorable),
            repeated=beam.pvalue.AsList(repeated),
            unlisted=beam.pvalue.AsList(unlisted),
        )
    )
