"""Publishing a finished job: checks on the job's own summary, then shards and manifest moved into place.

The job writes everything under `{output_dir}/.incomplete/`: `job.json` (the launcher's configuration, first),
the shards, `transform_output/`, `rejected.csv`, `duplicates.csv` and `summary.json` (last, written by the
pipeline once every shard is closed). `.incomplete/` is complete when `summary.json`, `transform_output/`
and every shard the summary names exist; only a complete one that passes `check_summary` is published, by
the launcher right after the job, or later by `--publish_only` if the launcher died in between.
"""

from __future__ import annotations

import json
import posixpath

import schemas
from pipelines import storage
from pipelines.transforms.summary import SUMMARY_FILE

INCOMPLETE_DIR = ".incomplete"
JOB_FILE = "job.json"


class PublishError(RuntimeError):
    """`.incomplete/` cannot be published (missing parts, a broken invariant, another configuration)."""


def work_dir(output_dir: str) -> str:
    return posixpath.join(output_dir, INCOMPLETE_DIR)


def exists_dataset(output_dir: str) -> bool:
    """True when output_dir already holds a published dataset (a manifest or shards)."""
    return storage.exists(posixpath.join(output_dir, schemas.MANIFEST_FILE)) or storage.has_files(
        posixpath.join(output_dir, schemas.TFRECORD_DIR, "*")
    )


def write_job(work: str, job: dict) -> None:
    storage.write_bytes(posixpath.join(work, JOB_FILE), json.dumps(job, indent=1, sort_keys=True).encode())


def read_job(work: str) -> dict | None:
    path = posixpath.join(work, JOB_FILE)
    if not storage.exists(path):
        return None
    return json.loads(storage.read_bytes(path).decode("utf-8"))


def missing_parts(work: str) -> list[str]:
    """What a complete `.incomplete/` lacks (empty when complete)."""
    summary_path = posixpath.join(work, SUMMARY_FILE)
    if not storage.exists(summary_path):
        return [f"{SUMMARY_FILE} (the job did not finish)"]
    summary = read_summary(work)
    missing = []
    if not storage.list_files(posixpath.join(work, schemas.TRANSFORM_DIR)):
        missing.append(f"{schemas.TRANSFORM_DIR}/")
    if not storage.exists(posixpath.join(work, schemas.REJECTED_FILE)):
        missing.append(schemas.REJECTED_FILE)
    present = {posixpath.basename(p) for p in storage.list_files(posixpath.join(work, schemas.TFRECORD_DIR))}
    lost = [s for s in summary.get("shards", []) if s not in present]
    if lost:
        missing.append(f"{len(lost)} shard(s), e.g. {lost[0]}")
    return missing


def read_summary(work: str) -> dict:
    return json.loads(storage.read_bytes(posixpath.join(work, SUMMARY_FILE)).decode("utf-8"))


def check_summary(summary: dict, input_rows: int, work: str) -> tuple[int, int]:
    """The job's own end checks. Returns the (height, width) shared by every record.

    Raises:
      ValueError: the samples differ in size, or nothing could be written.
      PublishError: written + rejected != input rows.
    """
    if summary.get("size_error"):
        raise ValueError(f"{summary['size_error']}; nothing was written (see {work})")
    rows = summary.get("input_rows", input_rows)
    if summary["written"] + summary["rejected"] != input_rows or rows != input_rows:
        raise PublishError(
            f"invariant broken: {summary['written']} written + {summary['rejected']} rejected "
            f"!= {input_rows} input rows (the job counted {rows}); output left in {work}"
        )
    if summary["written"] == 0:
        raise ValueError(
            f"no sample could be written (all {input_rows} rejected: see {work}/{schemas.REJECTED_FILE})"
        )
    if len(summary["image_sizes"]) > 1:
        raise ValueError(
            f"the written samples differ in size ({summary['image_sizes']}); pass --image_size to resize "
            f"them to one size. Output left in {work}"
        )
    (size,) = summary["image_sizes"]
    height, width = (int(v) for v in size.split("x"))
    return height, width


def move_into_place(out: str, work: str, extra_files: tuple[str, ...] = ()) -> list[str]:
    """Moves the finished dataset from work/ into out/ (replacing an old one). Returns the shard names."""
    names = (schemas.MANIFEST_FILE, schemas.TFRECORD_DIR, schemas.TRANSFORM_DIR, schemas.REJECTED_FILE)
    for name in (*names, *extra_files):
        storage.delete(posixpath.join(out, name))
    storage.move_tree(posixpath.join(work, schemas.TFRECORD_DIR), posixpath.join(out, schemas.TFRECORD_DIR))
    storage.move_tree(posixpath.join(work, schemas.TRANSFORM_DIR), posixpath.join(out, schemas.TRANSFORM_DIR))
    for name in (schemas.REJECTED_FILE, *extra_files):
        src = posixpath.join(work, name)
        if storage.exists(src):
            storage.move_file(src, posixpath.join(out, name))
    return sorted(
        posixpath.basename(f) for f in storage.list_files(posixpath.join(out, schemas.TFRECORD_DIR))
    )


def write_manifest(out: str, manifest: dict) -> None:
    """manifest.json, written last: its presence marks a published dataset."""
    storage.write_bytes(
        posixpath.join(out, schemas.MANIFEST_FILE), json.dumps(manifest, indent=1).encode("utf-8")
    )
