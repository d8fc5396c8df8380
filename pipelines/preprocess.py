"""The preprocessing job: stain images + label files -> fold-tagged, sharded TFRecords (Apache Beam).

    python -m pipelines.preprocess --labels_csv train.csv --input_dir train/ --output_dir out/ [Beam options]

This module only wires; the transforms live in pipelines/transforms/ by stage. The graph:

    ReadLabels[src]   label rows, read by a worker (only the file's path is in the graph; the launcher has
                      checked the file, so a malformed one fails before work)       (transforms.rows)
    CountRows         the job's own count of input rows (for the end invariant)
    CheckRows         hostile Ids, malformed Targets -> rejected                       (transforms.rows)
    DropDuplicateIds  repeated or conflicting Ids -> rejected                          (transforms.rows)
    ListImages[src]   the input folder's stain files (local paths and gs:// alike)     (transforms.files)
    MatchFiles        rows joined with their four stain files; missing stains -> rejected
    CheckSizes        sizes from the image headers; mixed sizes without --image_size stop the job here,
                      before anything is decoded or written                            (transforms.images)
    InspectSamples    per sample: read, decode, validate, pixel statistics, perceptual hash, output bytes
    FindDuplicates    near-duplicate groups over all hashes at once, + --group_id_pattern, --groups_csv,
                      -> duplicates.csv and a side input of the fold assignment        (transforms.duplicates)
    AssignFolds       iterative stratification over all labels and groups at once      (transforms.folds)
    PlanShards        per fold, samples sorted by Id, cut into shards of about --shard_mb of output bytes
    WriteShards       per shard: records written (stored streams are read again, not decoded again)
    StainStatistics   per-stain pixel mean and std with tf.Transform analyzers         (transforms.stats)
    Summarise         summary.json (counts, written last) and rejected.csv             (transforms.summary)

Everything is written under `{output_dir}/.incomplete/` and published (pipelines.publish) only after the
job succeeded and `written + rejected == input rows` holds; manifest.json is written last. If the launcher
dies between the job and publishing, `--publish_only` (the same command plus that flag) finishes it.
Shards are byte-identical for the same inputs and seed, whatever the order of the label file's rows.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import shutil
import sys
import tempfile
import time
from importlib import metadata

import apache_beam as beam

import schemas
from pipelines import beam_options, publish, storage
from pipelines.near_duplicates import HPAV18_WELL_PATTERN
from pipelines.progress import Progress
from pipelines.transforms import duplicates as dup
from pipelines.transforms.duplicates import FindDuplicates
from pipelines.transforms.files import ListImages, MatchFiles
from pipelines.transforms.folds import AssignFolds
from pipelines.transforms.images import INSPECT_PHASE, CheckSizes, InspectSamples
from pipelines.transforms.rows import CheckRows, DropDuplicateIds, ReadLabelRows
from pipelines.transforms.shards import WRITE_PHASE, PlanShards, WriteShards
from pipelines.transforms.stats import StainStatistics, read_stain_stats
from pipelines.transforms.summary import SUMMARY_FILE, Summarise
from schemas import cli, locks, paths
from schemas import labels as labels_lib

INCOMPLETE_DIR = publish.INCOMPLETE_DIR
PROG = "hpa-preprocess"
_PROGRESS_DIR = "progress"


@dataclasses.dataclass(frozen=True)
class JobConfig:
    """Flags of the job (everything else goes to Beam's PipelineOptions)."""

    labels_csv: tuple[str, ...]
    input_dir: tuple[str, ...]
    output_dir: str
    sources: tuple[str, ...] = ()
    num_folds: int = 5
    seed: int = 0
    fold_order: int = 2
    groups_csv: str | None = None
    duplicates: str = dup.GROUP
    max_hash_distance: int | None = None
    group_id_pattern: str | None = None
    max_group_size: int | None = None
    image_size: int | None = None
    shard_mb: float = 150.0
    num_shards: int | None = None
    strict_modes: bool = False
    overwrite: bool = False
    publish_only: bool = False
    progress_seconds: float = 10.0

    def job_identity(self) -> dict:
        """What decides the output (a finished `.incomplete/` is published only for the same identity)."""
        skip = {"output_dir", "overwrite", "publish_only", "progress_seconds"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


def build_pipeline(p: beam.Pipeline, cfg: JobConfig, work_dir: str, stats_dir: str, progress_dir):
    """Wires the job's transforms into `p`. Outputs land in work_dir, tf.Transform's in stats_dir.

    The label files and the groups file are read by the workers: the graph holds their paths, not their
    rows, so its size does not depend on theirs (bench/graph_size.py).
    """
    hash_fn = None
    if cfg.duplicates != dup.OFF:
        from pipelines.near_duplicates import hash_stains

        hash_fn = hash_stains
    file_parts, all_rows = [], []
    for source, input_dir, csv_path in zip(cfg.sources, cfg.input_dir, cfg.labels_csv):
        all_rows.append(p | f"ReadLabels[{source}]" >> ReadLabelRows(csv_path, source, input_dir))
        file_parts.append(p | f"ListImages[{source}]" >> ListImages(input_dir, source))
    rows = all_rows | "AllRows" >> beam.Flatten()
    row_count = rows | "CountRows" >> beam.combiners.Count.Globally()
    checked = rows | "CheckRows" >> CheckRows()
    unique = checked.valid | "DropDuplicateIds" >> DropDuplicateIds()
    files = file_parts | "AllFiles" >> beam.Flatten()
    matched = (unique.unique, rows, files) | "MatchFiles" >> MatchFiles()
    size_check = matched.candidates | "CheckSizes" >> CheckSizes(cfg.image_size)
    inspected = matched.candidates | "InspectSamples" >> InspectSamples(
        size_check, cfg.image_size, cfg.strict_modes, hash_fn, progress_dir
    )
    found = inspected.hashes | "FindDuplicates" >> FindDuplicates(
        posixpath.join(work_dir, schemas.DUPLICATES_FILE),
        cfg.duplicates,
        cfg.max_hash_distance,
        cfg.group_id_pattern,
        cfg.groups_csv,
        cfg.num_folds,
        cfg.max_group_size,
    )
    fold_of = inspected.samples | "AssignFolds" >> AssignFolds(
        cfg.num_folds, cfg.seed, cfg.fold_order, group_side=found.fold_groups
    )
    shards = inspected.samples | "PlanShards" >> PlanShards(fold_of, cfg.shard_mb * 1e6, cfg.num_shards)
    written = shards | "WriteShards" >> WriteShards(
        posixpath.join(work_dir, schemas.TFRECORD_DIR), cfg.image_size, cfg.strict_modes, progress_dir
    )
    _ = written.stats | "StainStatistics" >> StainStatistics(
        posixpath.join(stats_dir, schemas.TRANSFORM_DIR), posixpath.join(stats_dir, "tft_tmp")
    )
    rejected_parts = [
        checked.rejected,
        unique.rejected,
        matched.rejected,
        inspected.rejected,
        written.rejected,
    ]
    rejected = rejected_parts | "AllRejected" >> beam.Flatten()
    _ = p | "Summarise" >> Summarise(
        written.written,
        rejected,
        matched.unlisted,
        size_check,
        found.counts,
        written.files,
        row_count,
        posixpath.join(work_dir, SUMMARY_FILE),
        posixpath.join(work_dir, schemas.REJECTED_FILE),
        cfg.num_folds,
    )


def parse_args(argv: list[str] | None) -> tuple[JobConfig, list[str]]:
    """Job flags -> JobConfig; unknown flags are returned for Beam's PipelineOptions."""
    parser = cli.ArgumentParser(
        prog=PROG,
        description="Merge the four stain images of every sample into fold-tagged, sharded TFRecords. "
        "Any Beam option (--runner DataflowRunner --project P --region R --temp_location gs://...) passes "
        "through.",
    )
    parser.add_argument(
        "--labels_csv",
        action="append",
        required=True,
        help="Id,Target label file (or Id,Predicted for an unlabeled set); repeat with "
        "--input_dir to combine sets",
    )
    parser.add_argument(
        "--input_dir",
        action="append",
        required=True,
        help="folder of {Id}_{red,green,blue,yellow}.{png,jpg,tif} files; one per --labels_csv",
    )
    parser.add_argument(
        "--source",
        action="append",
        default=None,
        help="name of each set in the records (default: the label file's name)",
    )
    parser.add_argument("--output_dir", required=True, help="where tfrecords/, manifest.json etc. go")
    parser.add_argument("--num_folds", type=int, default=5, help="cross-validation folds (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fold assignment (default 0)")
    parser.add_argument(
        "--fold_order",
        type=int,
        default=2,
        choices=(1, 2),
        help="stratify on labels (1) or label pairs too (2, default)",
    )
    parser.add_argument(
        "--duplicates",
        choices=dup.MODES,
        default=dup.GROUP,
        help="near-duplicate images (perceptual hashes): keep each group in one fold (group, default), only "
        "list them in duplicates.csv and the manifest (report), or do not look (off)",
    )
    parser.add_argument(
        "--max_hash_distance",
        type=int,
        default=None,
        help="Hamming distance under which two samples' hashes make them near-duplicates "
        "(default: pipelines.near_duplicates.DEFAULT_MAX_DISTANCE)",
    )
    parser.add_argument(
        "--group_id_pattern",
        default=None,
        help="regular expression: Ids whose match (its capture groups, if any) is equal share a group, e.g. "
        f"HPAv18 wells (plates like 1610 or si35): '{HPAV18_WELL_PATTERN}'",
    )
    parser.add_argument(
        "--groups_csv",
        default=None,
        help="Id,Group file: samples of one group land in one fold (merged with the groups found)",
    )
    parser.add_argument(
        "--max_group_size",
        type=int,
        default=None,
        help="largest group (labeled samples that must share a fold) allowed; default: labeled samples / "
        "(2 x --num_folds). A larger group stops the job, naming its size and members",
    )
    parser.add_argument(
        "--image_size",
        type=int,
        default=None,
        help="resize every stain to N x N (re-encoded as PNG); default: keep source bytes",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--shard_mb", type=float, default=150.0, help="target shard size in MB (default 150)")
    size.add_argument("--num_shards", type=int, default=None, help="exact number of shards per fold")
    parser.add_argument(
        "--strict_modes",
        action="store_true",
        help="reject stains that are not 8-bit grayscale instead of converting them",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in --output_dir")
    parser.add_argument(
        "--publish_only",
        action="store_true",
        help="do not run the job: publish the finished output a previous run of the same command left in "
        "OUTPUT_DIR/.incomplete/ (when the launcher died after the job); a partial one is refused",
    )
    parser.add_argument("--progress_seconds", type=float, default=10.0, help="progress print interval")
    args, beam_args = parser.parse_known_args(argv)
    beam_options.reject_unknown_beam_flags(parser, beam_args)
    if len(args.labels_csv) != len(args.input_dir):
        parser.error("give one --input_dir per --labels_csv")
    sources = args.source or []
    if sources and len(sources) != len(args.labels_csv):
        parser.error("give one --source per --labels_csv, or none")
    if not sources:
        stems = [
            posixpath.splitext(posixpath.basename(p.rstrip("/")))[0] or "labels" for p in args.labels_csv
        ]
        sources = [s if stems.count(s) == 1 else f"{s}{i}" for i, s in enumerate(stems)]
    if len(set(sources)) != len(sources):
        parser.error(f"source names must differ: {sources}")
    if args.num_folds < 2:
        parser.error("--num_folds must be at least 2")
    if args.image_size is not None and args.image_size < 8:
        parser.error("--image_size must be at least 8")
    if args.num_shards is not None and args.num_shards < 1:
        parser.error("--num_shards must be at least 1")
    if args.shard_mb <= 0:
        parser.error("--shard_mb must be positive")
    if args.max_group_size is not None and args.max_group_size < 1:
        parser.error("--max_group_size must be at least 1")
    if args.max_hash_distance is not None and args.max_hash_distance < 0:
        parser.error("--max_hash_distance must be at least 0")
    if args.group_id_pattern is not None:
        import re

        try:
            re.compile(args.group_id_pattern)
        except re.error as e:
            parser.error(f"--group_id_pattern {args.group_id_pattern!r} is not a regular expression: {e}")
    beam_options.check_remote(
        parser,
        beam_args,
        inputs=[*args.labels_csv, *args.input_dir, args.groups_csv],
        outputs=[args.output_dir],
    )
    cfg = JobConfig(
        labels_csv=tuple(args.labels_csv),
        input_dir=tuple(d.rstrip("/") for d in args.input_dir),
        output_dir=args.output_dir.rstrip("/"),
        sources=tuple(sources),
        num_folds=args.num_folds,
        seed=args.seed,
        fold_order=args.fold_order,
        groups_csv=args.groups_csv,
        duplicates=args.duplicates,
        max_hash_distance=args.max_hash_distance,
        group_id_pattern=args.group_id_pattern,
        max_group_size=args.max_group_size,
        image_size=args.image_size,
        shard_mb=args.shard_mb,
        num_shards=args.num_shards,
        strict_modes=args.strict_modes,
        overwrite=args.overwrite,
        publish_only=args.publish_only,
        progress_seconds=args.progress_seconds,
    )
    return cfg, beam_args


def _read_text(path: str, what: str) -> str:
    try:
        return storage.read_text(path, what)
    except storage.ReadError as e:
        raise labels_lib.LabelFileError(str(e)) from None


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for pkg in ("apache-beam", "tensorflow", "tensorflow-transform", "numpy", "pillow", "scikit-multilearn"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _read_inputs(cfg: JobConfig) -> list[tuple[str, int]]:
    """Checks every label file, the groups file and every input folder before any work: [(source, rows)].

    The files are read here only to check them and count their rows; the workers read them again.
    """
    counts = []
    for csv_path, input_dir, source in zip(cfg.labels_csv, cfg.input_dir, cfg.sources):
        counts.append((source, labels_lib.count_label_rows(_read_text(csv_path, "label file"), csv_path)))
        if not storage.has_files(posixpath.join(input_dir, "*")):
            raise FileNotFoundError(f"input folder {input_dir} holds no files (or does not exist)")
    if cfg.groups_csv:
        labels_lib.parse_groups_table(_read_text(cfg.groups_csv, "groups file"), cfg.groups_csv)
    return counts


def _finish(cfg: JobConfig, beam_args, row_counts, t0: float, local_transform: str | None = None) -> dict:
    """Checks the finished `.incomplete/` and publishes it. Returns the manifest.

    `local_transform`: a local copy of the transform output to read the statistics from (TensorFlow reads
    it; a local run writing to an object store has one in its staging folder).
    """
    cli.set_stage("publishing (a rerun finishes it)")
    out, work = cfg.output_dir, publish.work_dir(cfg.output_dir)
    input_rows = sum(n for _, n in row_counts)
    missing = publish.missing_parts(work)
    if missing:
        raise publish.PublishError(
            f"{work} is not a finished job's output (missing: {'; '.join(missing)}); nothing published. "
            "Run the job again without --publish_only"
        )
    summary = publish.read_summary(work)
    _check_groups(summary, work)
    height, width = publish.check_summary(summary, input_rows, work)
    stain_stats = read_stain_stats(local_transform or posixpath.join(work, schemas.TRANSFORM_DIR))
    shards = publish.shard_names(work)
    folds = cfg.num_folds
    manifest = {
        schemas.MANIFEST_SCHEMA_VERSION: schemas.SCHEMA_VERSION,
        schemas.MANIFEST_IMAGE_SIZE: [height, width],
        schemas.MANIFEST_NUM_FOLDS: cfg.num_folds,
        schemas.MANIFEST_WRITTEN: summary["written_per_fold"],
        schemas.MANIFEST_STAIN_STATS: stain_stats,
        "stains": list(schemas.STAINS),
        "class_names": list(schemas.CLASS_NAMES),
        "input_rows": input_rows,
        "input_rows_per_source": dict(row_counts),
        "written": summary["written"],
        "rejected": summary["rejected"],
        "rejected_per_reason": summary["rejected_per_reason"],
        "unlisted_images": summary["unlisted_images"],
        "unlisted_examples": summary["unlisted_examples"],
        "converted_stains": summary["conversions"],
        "duplicates": summary["duplicates"],
        "fold_sizes": [summary["written_per_fold"].get(schemas.written_key(k), 0) for k in range(folds)],
        schemas.MANIFEST_CLASS_COUNTS: summary["class_counts_per_fold"],
        "fold_quality": summary["fold_quality"],
        "shards": shards,
        "arguments": dataclasses.asdict(cfg),
        "beam_args": beam_args,
        "package_versions": _versions(),
        "wall_time_s": round(time.time() - t0, 2),
    }
    publish.publish(out, work, manifest, (schemas.DUPLICATES_FILE,))  # manifest.json last: marks completion
    d = summary["duplicates"] or {}
    _log(
        f"done in {manifest['wall_time_s']:.1f} s ({input_rows / max(manifest['wall_time_s'], 1e-9):.1f} "
        f"samples/s): {summary['written']} written {summary['written_per_fold']}, {summary['rejected']} "
        f"rejected {summary['rejected_per_reason']}, {sum(summary['unlisted_images'].values())} unlisted "
        f"image sets; {d.get('groups', 0)} near-duplicate groups ({d.get('samples_in_groups', 0)} samples, "
        f"{d.get('groups_across_sources', 0)} across sources); stain mean "
        f"{[round(v, 2) for v in stain_stats['mean']]} std {[round(v, 2) for v in stain_stats['std']]} "
        f"-> {out}"
    )
    return manifest


def run(argv: list[str] | None = None):
    """Runs the job (or, with --publish_only, publishes a finished one).

    Returns the PipelineResult (None when it only published); raises on bad input or a broken invariant.
    """
    cfg, beam_args = parse_args(argv)
    try:
        return _run(cfg, beam_args)
    finally:
        locks.release(cfg.output_dir)  # a killed run leaves it, for the next one to take over


def _run(cfg: JobConfig, beam_args: list[str]):
    t0 = time.time()
    out = cfg.output_dir
    work = publish.work_dir(out)
    if publish.read_journal(work) is not None:  # a publication was interrupted: finish it first
        locks.acquire(out, PROG)
        _log(f"finishing the publication of the dataset in {work} (interrupted)")
        cli.set_stage("publishing (a rerun finishes it)")
        manifest = publish.finish_publication(out, work)
        if _identity_of(manifest.get("arguments", {})) == _identity(cfg):
            _log(f"done: {out} holds this command's dataset")
            return None
    if publish.exists_dataset(out) and _published_identity(out) == _identity(cfg) and not cfg.overwrite:
        _log(f"{out} already holds this command's dataset: nothing to do (--overwrite to make it again)")
        return None
    if publish.exists_dataset(out) and not cfg.overwrite:
        raise FileExistsError(
            f"{out} already holds a dataset (manifest.json or tfrecords/); pass --overwrite"
        )
    row_counts = _read_inputs(cfg)
    locks.acquire(out, PROG)  # before anything is written: a second process on out stops here
    input_rows = sum(n for _, n in row_counts)
    previous = publish.read_job(work)
    if cfg.publish_only:
        if previous is None:
            raise publish.PublishError(
                f"{work} holds no job's output to publish; run the job without --publish_only"
            )
        if previous != _identity(cfg):
            raise publish.PublishError(
                f"{work} was made by another command (differences: {_diff(previous, _identity(cfg))}); "
                "run the job again"
            )
        _log(f"publishing the finished job in {work}")
        _finish(cfg, beam_args, row_counts, t0)
        return None
    if previous == _identity(cfg) and not publish.missing_parts(work):
        _log(f"{work} holds this command's finished job: publishing it instead of running again")
        _finish(cfg, beam_args, row_counts, t0)
        return None

    storage.delete(work)  # leftovers of a failed run, or of another command
    publish.write_job(work, _identity(cfg))
    options, local = beam_options.beam_pipeline_options(beam_args, local_workers=os.cpu_count() or 1)
    # tf.Transform's output is written by TensorFlow's own file system: in place for local output folders
    # and remote workers; staged locally and uploaded for a local run writing to an object store.
    stage = tempfile.mkdtemp(prefix="hpa-preprocess-") if local else None
    staged_stats = local and "://" in out
    stats_dir = stage if staged_stats else work
    _log(
        f"{input_rows} label rows from {len(row_counts)} set(s) -> {out} "
        f"({cfg.num_folds} folds, seed {cfg.seed}, image size {cfg.image_size or 'as is'}, "
        f"duplicates {cfg.duplicates})"
    )
    try:
        cli.set_stage("the Beam job (a rerun runs it again)")
        p = beam.Pipeline(options=options)
        progress_dir = os.path.join(stage, _PROGRESS_DIR) if local else None
        if progress_dir:
            os.makedirs(progress_dir)
        build_pipeline(p, cfg, work, stats_dir, progress_dir)
        if local:
            phases = (INSPECT_PHASE, WRITE_PHASE)
            with Progress(progress_dir, input_rows, cfg.progress_seconds, phases, PROG):
                result = p.run()
                result.wait_until_finish()
        else:
            result = p.run()
            result.wait_until_finish()
        if staged_stats:
            storage.upload_tree(
                posixpath.join(stage, schemas.TRANSFORM_DIR), posixpath.join(work, schemas.TRANSFORM_DIR)
            )
        summary = publish.read_summary(work)
        _check_groups(summary, work)  # errors that stopped the job before anything else
        publish.check_summary(summary, input_rows, work)
        local_transform = posixpath.join(stage, schemas.TRANSFORM_DIR) if staged_stats else None
        _finish(cfg, beam_args, row_counts, t0, local_transform)
    finally:
        if stage:
            shutil.rmtree(stage, ignore_errors=True)
    return result


def _check_groups(summary: dict, work: str) -> None:
    """Raises ValueError (one line) when the job stopped at a group too large for the folds."""
    error = (summary.get("duplicates") or {}).get("group_error")
    if error:
        raise ValueError(f"{error}; nothing was written (duplicates.csv in {work})")


def _identity(cfg: JobConfig) -> dict:
    """What decides the output, as stored (tuples become lists), local paths resolved (docs/interrupts.md)."""
    import json

    identity = json.loads(json.dumps(cfg.job_identity()))
    for key in ("labels_csv", "input_dir", "groups_csv"):
        value = identity.get(key)
        if isinstance(value, list):
            identity[key] = [paths.normalise(v) for v in value]
        elif isinstance(value, str):
            identity[key] = paths.normalise(value)
    return identity


def _identity_of(arguments: dict) -> dict:
    """The identity of the command that made a manifest (its `arguments`)."""
    known = {f.name for f in dataclasses.fields(JobConfig)}
    try:
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in arguments.items() if k in known}
        return _identity(JobConfig(**values))
    except TypeError:
        return {}


def _published_identity(out: str) -> dict:
    import json

    try:
        manifest = json.loads(storage.read_bytes(posixpath.join(out, schemas.MANIFEST_FILE)).decode("utf-8"))
    except Exception:  # no manifest, or not one of ours: not this command's dataset
        return {}
    return _identity_of(manifest.get("arguments", {}))


def _diff(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} then, {b.get(k)!r} now" for k in keys)


def _log(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


@cli.command(PROG)
def main(argv: list[str] | None = None) -> int:
    """Command-line entry: one-line errors instead of tracebacks (exit 2: bad input; 1: the job failed)."""
    bad = (labels_lib.LabelFileError, FileExistsError, FileNotFoundError, ValueError)
    return cli.run_or_bad_input(PROG, bad, lambda: run(argv))


if __name__ == "__main__":
    # Run through the package's module, not __main__, so that pickled classes resolve on Beam's workers.
    from pipelines import preprocess

    sys.exit(preprocess.main())
