"""Batch prediction on Beam: model.predict as a pipeline with RunInference, for DirectRunner or Dataflow.

    run_predict.sh --data_dir out/test --model_dir runs/fold0 [runs/fold1 ...] --out submission.csv \\
        [--ids_csv sample_submission.csv] [--tta 8] [--probabilities probs.npz] [Beam options]

The same prediction as `python -m model.predict` (same flags, checks and files; see its docstring), scored
by the exported SavedModel of each model dir (`export/`, its `serve_images` signature) in `RunInference`.
This module only wires (transforms in pipelines/transforms/predictions.py):

    ReadRecords       the test shards (`test-*`) of --data_dir
    DecodeRecords     (Id, image) with the schema's decoder; records of another size -> rejected
    Score[modelK]     one RunInference per model dir, averaged over the --tta transforms
    AverageModels     the ensemble: the mean of the models' scores per Id
    WriteOutputs      all scores at once: thresholds, the submission in --ids_csv order, the probabilities

The launcher checks the inputs first (thresholds, image sizes, the Id list, the exports' signatures) and
stops with a one-line error (exit 2) before any work. Every listed Id (--ids_csv, else every record) ends in
the submission or in `rejected.csv` beside --out (Id, reason, detail, source): listed Ids without a record
get the preprocessing job's reason when its rejected.csv names them, else `no_record`. Records that cannot
be scored at the models' size and repeated Ids stop the job with an error (exit 2), as in model.predict.
The job writes into a work folder next to --out, `.incomplete-{name of --out}/`; the files are moved into
place only when it finished (rejected.csv and the probabilities first, the submission last), so a failed
run leaves no partial output. Local runs print a progress line; Dataflow shows the counters.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import posixpath
import shutil
import sys
import tempfile
import time

import apache_beam as beam
from apache_beam.options.pipeline_options import StandardOptions

import schemas
from model import predict
from model.config import EXPORT_DIR
from model.predict import PredictConfig, PredictError
from pipelines import beam_options, storage
from schemas import cli

PROG = "hpa-batch-predict"
_SAVED_MODEL_PB = "saved_model.pb"
_FOLDER_SOURCE = "input_dir"  # the source name of an image folder's samples (not written anywhere)


@dataclasses.dataclass(frozen=True)
class JobConfig(PredictConfig):
    """Flags of the job (everything else goes to Beam's PipelineOptions): model.predict's, checked by its
    PredictConfig (exactly one of data_dir and input_dir), and:

    Attributes:
      progress_seconds: progress print interval of local runs.
    """

    progress_seconds: float = 10.0

    @property
    def source(self) -> str:
        """The input: --data_dir or --input_dir."""
        return self.data_dir if self.data_dir is not None else self.input_dir

    @property
    def work_dir(self) -> str:
        """Where the job writes before publishing: `.incomplete-{name}/` next to --out."""
        parent, name = posixpath.split(self.out)
        return posixpath.join(parent, f".incomplete-{name}")


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What the launcher resolved before the job: the prediction's fixed inputs."""

    image_size: int
    num_records: int
    wanted: list[str] | None
    thresholds: object  # np.ndarray [NUM_CLASSES]
    thresholds_source: str
    transforms: tuple[int, ...]
    exports: tuple[str, ...]


def _has_images_signature(export_dir: str) -> bool:
    from tensorflow.core.protobuf import saved_model_pb2

    from model import fileio
    from model import model as model_lib

    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString(fileio.read_bytes(posixpath.join(export_dir, _SAVED_MODEL_PB)))
    return any(model_lib.IMAGES_SIGNATURE in g.signature_def for g in saved.meta_graphs)


def rejected_path(out: str) -> str:
    """The rejected Ids' file of the submission --out (`submission.csv` -> `submission.rejected.csv`)."""
    from model import submission

    return submission.rejected_path(out)


def check_inputs(cfg: JobConfig, log=print) -> Inputs:
    """model.predict's checks, before any work.

    Raises:
      PredictError: a bad Id list, model dir, thresholds file, mixed image sizes, a dataset of another
        image size or without test shards, a model dir without an export holding the images signature.
    """
    from model import fileio

    beside_out = posixpath.join(posixpath.dirname(cfg.out), schemas.REJECTED_FILE)
    if _same_file(beside_out, posixpath.join(cfg.source, schemas.REJECTED_FILE)):
        raise PredictError(
            f"--out {cfg.out} lies in {cfg.source}, where its {schemas.REJECTED_FILE} would replace the "
            "preprocessing job's or an input: write the submission elsewhere"
        )
    predict.check_source_folder(cfg.data_dir, cfg.input_dir, PROG)
    wanted = predict.read_id_list(cfg.ids_csv) if cfg.ids_csv else None
    dirs = [predict._inspect_model_dir(d) for d in cfg.model_dirs]  # noqa: SLF001 - model.predict's check
    thresholds, source = predict.resolve_thresholds(cfg.model_dirs, cfg.thresholds)
    sizes = {d.image_size for d in dirs}
    if len(sizes) > 1:
        raise PredictError(
            "the models were trained on different image sizes: "
            + ", ".join(f"{d.path}: {d.image_size}" for d in dirs)
        )
    image_size = sizes.pop()
    if cfg.data_dir is not None:
        num_records = _check_shards(cfg.data_dir, image_size)
    else:
        if not storage.has_files(posixpath.join(cfg.input_dir, "*")):
            raise PredictError(f"--input_dir {cfg.input_dir} holds no files (or does not exist)")
        num_records = len(wanted) if wanted is not None else 0
    exports = []
    for d in cfg.model_dirs:
        export = fileio.join(d, EXPORT_DIR)
        if not fileio.exists(fileio.join(export, _SAVED_MODEL_PB)):
            raise PredictError(f"{d} has no {EXPORT_DIR}/{_SAVED_MODEL_PB}: not a finished training run")
        if not _has_images_signature(export):
            raise PredictError(
                f"{export} has no images signature (exported by an older version of the training job): "
                "predict with hpa-predict, or train again"
            )
        exports.append(export)
    transforms = predict.tta_transforms(cfg.tta)
    predict.warn_if_tta_differs(dirs, cfg, log)
    return Inputs(
        image_size=image_size,
        num_records=num_records,
        wanted=wanted,
        thresholds=thresholds,
        thresholds_source=source,
        transforms=tuple(transforms),
        exports=tuple(exports),
    )


def _check_shards(data_dir: str, image_size: int) -> int:
    """Checks a dataset holds test shards of the models' image size; returns its number of test records."""
    from model import fileio

    num_records = predict.count_test_records(data_dir, image_size)
    pattern = schemas.shard_pattern(data_dir, schemas.UNLABELED_FOLD)
    if not fileio.glob(pattern):
        raise PredictError(
            f"{data_dir} holds no unlabeled (test) shards ({pattern}): run the preprocessing job on the "
            "test folder with its Id list (e.g. --labels_csv sample_submission.csv)"
        )
    return num_records


def _same_file(a: str, b: str) -> bool:
    def norm(p: str) -> str:
        return posixpath.normpath(p) if "://" in p else os.path.abspath(p)

    return norm(a) == norm(b)


def _id_rows(path: str, source: str, input_dir: str):
    from schemas import labels as labels_lib

    for k, sid in enumerate(predict.read_id_list(path)):
        yield labels_lib.LabelRow(source, input_dir, k + 2, sid, None)


@beam.ptransform_fn
def ReadIdRows(pbegin, ids_csv: str, source: str, input_dir: str):  # noqa: N802
    """The --ids_csv Id list, read by one worker (the launcher has checked it) -> unlabeled LabelRows."""
    return (
        pbegin
        | "Path" >> beam.Create([ids_csv])
        | "Parse" >> beam.FlatMap(_id_rows, source, input_dir)
        | "Spread" >> beam.Reshuffle()
    )


def build_pipeline(p: beam.Pipeline, cfg: JobConfig, inputs: Inputs, work_dir: str, progress_dir=None):
    """Wires the job's transforms into `p`; the outputs land in work_dir."""
    from pipelines.transforms import predictions as pred

    if cfg.data_dir is not None:
        records = p | "ReadRecords" >> pred.ReadRecords(
            schemas.shard_pattern(cfg.data_dir, schemas.UNLABELED_FOLD)
        )
        rejected = p | "NoRejections" >> beam.Create([])  # a record is scored or stops the job
        unlisted = p | "NoUnlisted" >> beam.Create([])
    else:
        rows = None
        if cfg.ids_csv is not None:  # read by a worker: the graph holds the path, not the Ids
            rows = p | "ReadIdList" >> ReadIdRows(cfg.ids_csv, _FOLDER_SOURCE, cfg.input_dir)
        folder = p | "ReadImageFolder" >> pred.ReadImageFolder(
            cfg.input_dir, _FOLDER_SOURCE, inputs.image_size, rows, progress_dir
        )
        records, rejected, unlisted = folder["records"], folder["rejected"], folder["unlisted"]
    decoded = records | "DecodeRecords" >> pred.DecodeRecords(inputs.image_size, progress_dir)
    per_model = [
        decoded.images
        | f"Score[model{k}]"
        >> pred.ScoreWithModel(export, inputs.transforms, cfg.batch_size, k, progress_dir)
        for k, export in enumerate(inputs.exports)
    ]
    averaged = tuple(per_model) | "AverageModels" >> pred.AverageModels()
    return averaged.scores | "WriteOutputs" >> pred.WriteOutputs(
        rejected,
        decoded.unscorable,
        averaged.repeated,
        unlisted,
        work_dir,
        thresholds=inputs.thresholds,
        source=cfg.source,
        empty=cfg.empty,
        ids_csv=cfg.ids_csv,
        data_dir=cfg.data_dir,
        probabilities_format=posixpath.splitext(cfg.probabilities)[1] if cfg.probabilities else None,
    )


def build_parser() -> argparse.ArgumentParser:
    """The job's flags (model.predict's, with --data_dir | --input_dir); unknown flags go to Beam."""
    d = JobConfig(data_dir="x", input_dir=None, model_dirs=("x",), out="x")
    p = cli.ArgumentParser(
        prog=PROG,
        description=(
            "model.predict as an Apache Beam pipeline: score the test shards of a preprocessed set, or a "
            "folder of stain images, with the exported models (RunInference), average over test-time "
            "augmentation and models, apply the thresholds and write the submission (Id,Predicted) and "
            "rejected.csv beside it. Any Beam option (--runner DataflowRunner --project P --region R "
            "--temp_location gs://...) passes through."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    predict.add_prediction_flags(p, tta=d.tta, empty=d.empty)
    p.add_argument("--batch_size", type=int, default=d.batch_size, help="images per RunInference batch")
    p.add_argument(
        "--progress_seconds", type=float, default=d.progress_seconds, help="progress interval (local)"
    )
    return p


def parse_args(argv: list[str] | None) -> tuple[JobConfig, list[str]]:
    """Job flags -> JobConfig (PredictError on bad values); unknown flags are returned for Beam."""
    parser = build_parser()
    args, beam_args = parser.parse_known_args(argv)
    beam_options.reject_unknown_beam_flags(parser, beam_args)
    beam_options.check_remote(
        parser,
        beam_args,
        inputs=[args.data_dir, args.input_dir, *args.model_dir, args.ids_csv, args.thresholds],
        outputs=[args.out, args.probabilities],
    )
    cfg = JobConfig(
        **predict.prediction_flags(args), batch_size=args.batch_size, progress_seconds=args.progress_seconds
    )
    return cfg, beam_args


def _publish(cfg: JobConfig, work: str) -> dict:
    """Reads the job's report; moves its files into place (the submission last) or raises its error."""
    import json

    from pipelines.transforms import predictions as pred

    report_path = posixpath.join(work, pred.REPORT_FILE)
    if not storage.exists(report_path):
        raise RuntimeError(f"the job left no {pred.REPORT_FILE} in {work}: it did not finish")
    report = json.loads(storage.read_bytes(report_path).decode("utf-8"))
    if "error" in report:
        raise PredictError(report["error"])
    _replace(posixpath.join(work, schemas.REJECTED_FILE), rejected_path(cfg.out))
    if cfg.probabilities:
        name = pred.PROBABILITIES_NAME + posixpath.splitext(cfg.probabilities)[1]
        _replace(posixpath.join(work, name), cfg.probabilities)
    _replace(posixpath.join(work, pred.SUBMISSION_NAME), cfg.out)  # last
    return report


def _replace(src: str, dst: str) -> None:
    parent = posixpath.dirname(dst)
    if parent and "://" not in parent:
        os.makedirs(parent, exist_ok=True)
    if storage.exists(dst):
        storage.delete(dst)
    storage.move_file(src, dst)


def run(argv: list[str] | None = None, log=None) -> dict:
    """Runs the job; returns model.predict's summary (paths, counts).

    Raises:
      PredictError: bad flags or inputs (exit 2 from main).
      RuntimeError: the job failed.
    """
    log = log or _log
    cfg, beam_args = parse_args(argv)
    inputs = check_inputs(cfg, log)
    options, local = beam_options.beam_pipeline_options(beam_args)
    work = cfg.work_dir
    storage.delete(work)  # leftovers of a failed run
    log(
        f"scoring {inputs.num_records or '?'} samples of {cfg.source} ({inputs.image_size} px) with "
        f"{len(inputs.exports)} model(s) x {len(inputs.transforms)} transform(s) {list(inputs.transforms)} "
        f"on {options.view_as(StandardOptions).runner or 'DirectRunner'}"
    )
    start = time.perf_counter()
    stage = tempfile.mkdtemp(prefix="hpa-batch-predict-") if local else None
    try:
        cli.set_stage("the Beam job (a rerun runs it again)")
        p = beam.Pipeline(options=options)
        progress_dir = os.path.join(stage, "progress") if stage else None
        if progress_dir:
            os.makedirs(progress_dir)
        build_pipeline(p, cfg, inputs, work, progress_dir)
        if local:
            from pipelines.progress import Progress
            from pipelines.transforms import predictions as pred

            phases = (pred.DECODE_PHASE, *(pred.score_phase(k) for k in range(len(inputs.exports))))
            if cfg.input_dir is not None:
                phases = (pred.LOAD_PHASE, *phases)
            total = inputs.num_records or _count_local_ids(cfg.input_dir)
            with Progress(progress_dir, total, cfg.progress_seconds, phases, PROG):
                p.run().wait_until_finish()
        else:
            p.run().wait_until_finish()
        report = _publish(cfg, work)
    finally:
        storage.delete(work)
        if stage:
            shutil.rmtree(stage, ignore_errors=True)
    seconds = time.perf_counter() - start
    rule = (
        f"{report['filled_rows']} row(s) without a passing class got their top class"
        if cfg.empty == "top1"
        else f"{report['empty_rows']} empty row(s)"
    )
    if report["not_in_id_list"]:
        log(
            f"warning: {report['not_in_id_list']} record(s) of {cfg.source} are not in {cfg.ids_csv} and "
            f"are left out of the submission, e.g. {report['not_in_id_list_examples']}"
            + (" (their probabilities are in --probabilities)" if cfg.probabilities else "")
        )
    if report.get("unlisted_images"):
        log(
            f"warning: images of {report['unlisted_images']} Id(s) of {cfg.input_dir} are not in "
            f"{cfg.ids_csv} and were not scored, e.g. {report['unlisted_examples']}"
        )
    listed = f"{report['rows']} of {report['listed']} listed Ids predicted, {report['rejected']} rejected"
    if report["rejected"]:
        listed += f" ({report['rejected_per_reason']}; see {rejected_path(cfg.out)})"
    log(
        f"scored {report['records']} records in {seconds:.1f} s; wrote {cfg.out}: {listed}, "
        f"{report['labels_per_row']:.2f} labels per row (thresholds from {inputs.thresholds_source}; {rule})"
        + (f"; probabilities in {cfg.probabilities}" if cfg.probabilities else "")
    )
    return {
        "submission": cfg.out,
        "probabilities": cfg.probabilities,
        "rows": report["rows"],
        "records": report["records"],
        "rejected": report["rejected"],
        "rejected_file": rejected_path(cfg.out),
        "not_in_id_list": report["not_in_id_list"],
        "empty_rows": report["empty_rows"],
        "tta": list(inputs.transforms),
        "models": list(cfg.model_dirs),
        "thresholds": inputs.thresholds_source,
        "seconds": seconds,
    }


def _count_local_ids(input_dir: str | None) -> int:
    """The number of sample Ids with a stain file in a local folder (0 for none or a remote one)."""
    if input_dir is None or "://" in input_dir or not os.path.isdir(input_dir):
        return 0
    from pipelines.transforms.files import stain_of

    return len({parsed[0] for parsed in map(stain_of, os.listdir(input_dir)) if parsed})


def _log(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


@cli.command(PROG)
def main(argv: list[str] | None = None) -> int:
    """Command-line entry: exit 2 with one line for bad flags or input, 1 with the traceback for a failure."""
    return cli.run_or_bad_input(PROG, PredictError, lambda: run(argv))


if __name__ == "__main__":
    # Run through the package's module, not __main__, so that pickled classes resolve on Beam's workers.
    from pipelines import batch_predict

    sys.exit(batch_predict.main())
