"""Publishing a finished job: checks on the job's own summary, then shards and manifest moved into place.

The job writes everything under `{output_dir}/.incomplete/`: `job.json` (the launcher's configuration, first),
the shards, `transform_output/`, `rejected.csv`, `duplicates.csv` and `summary.json` (last, written by the
pipeline once every shard is closed). `.incomplete/` is complete when `summary.json`, `transform_output/`
and every shard the summary names exist; only a complete one that passes `check_summary` is published, by
the launcher right after the job, or later by `--publish_only` if the launcher died in between.

Publishing survives a kill at any instant (docs/interrupts.md). It is a journal, `.incomplete/publish.json`,
written before anything moves; it holds the new manifest and the phase:
1. `aside`: the old dataset's files (its manifest first) move to `{output_dir}/.previous/`;
2. `in`: the new files move from `.incomplete/` into place, then `manifest.json` is written (last);
3. `.previous/` and `.incomplete/` (with the journal) are deleted.
Every step can be done again, so a rerun that finds the journal finishes the same publication
(`finish_publication`): at any instant the old dataset is whole (in place or in `.previous/`) or the new one
is (in `.incomplete/` or in place), and `manifest.json` stands only beside a whole dataset. On gs://, where a
move is a copy then a delete, the same holds object by object.
"""

from __future__ import annotations

import json
import os
import posixpath

import schemas
from pipelines import storage
from pipelines.transforms.summary import SUMMARY_FILE

INCOMPLETE_DIR = ".incomplete"
PREVIOUS_DIR = ".previous"
JOB_FILE = "job.json"
JOURNAL_FILE = "publish.json"
PHASE_ASIDE, PHASE_IN = "aside", "in"
# The files of tf.Transform's output that are written last (its SavedModel, and the metadata's schema).
TRANSFORM_PARTS = ("transform_fn/saved_model.pb", "transformed_metadata/schema.pbtxt")


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
    transform = posixpath.join(work, schemas.TRANSFORM_DIR)
    # tf.Transform writes its output in its own branch of the pipeline, which may end after summary.json:
    # a kill in between leaves a transform_fn without its SavedModel (found by bench/chaos.py).
    for part in TRANSFORM_PARTS:
        if not storage.exists(posixpath.join(transform, part)):
            missing.append(f"{schemas.TRANSFORM_DIR}/{part}")
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


def dataset_parts(extra_files: tuple[str, ...] = ()) -> tuple[str, ...]:
    """What a published dataset consists of, manifest first (it moves aside first, comes back last)."""
    return (
        schemas.MANIFEST_FILE,
        schemas.TFRECORD_DIR,
        schemas.TRANSFORM_DIR,
        schemas.REJECTED_FILE,
        *extra_files,
    )


def shard_names(work: str) -> list[str]:
    """The shard files the finished job left in work/ (the manifest's `shards`)."""
    return sorted(
        posixpath.basename(f) for f in storage.list_files(posixpath.join(work, schemas.TFRECORD_DIR))
    )


def read_journal(work: str) -> dict | None:
    """The journal of a publication that began (None when none did)."""
    path = posixpath.join(work, JOURNAL_FILE)
    if not storage.exists(path):
        return None
    return json.loads(storage.read_bytes(path).decode("utf-8"))


def publish(out: str, work: str, manifest: dict, extra_files: tuple[str, ...] = ()) -> None:
    """Publishes the finished job in work/ as out/'s dataset, replacing an old one (see module docstring)."""
    journal = {"phase": PHASE_ASIDE, "parts": list(dataset_parts(extra_files)), "manifest": manifest}
    storage.write_bytes(posixpath.join(work, JOURNAL_FILE), json.dumps(journal, indent=1).encode("utf-8"))
    finish_publication(out, work)


def _after(step: str) -> None:
    """Called after each step of a publication (tests inject a kill here)."""


def finish_publication(out: str, work: str) -> dict:
    """Does (again) every step of the publication journalled in work/; returns the manifest published."""
    journal = read_journal(work)
    if journal is None:
        raise PublishError(f"{work} holds no publication to finish")
    previous = posixpath.join(out, PREVIOUS_DIR)
    if journal["phase"] == PHASE_ASIDE:
        for name in journal["parts"]:
            _move(posixpath.join(out, name), posixpath.join(previous, name))
            _after(f"aside:{name}")
        journal["phase"] = PHASE_IN
        storage.write_bytes(posixpath.join(work, JOURNAL_FILE), json.dumps(journal, indent=1).encode("utf-8"))
        _after("phase:in")
    for name in journal["parts"]:
        if name != schemas.MANIFEST_FILE:
            _move(posixpath.join(work, name), posixpath.join(out, name))
            _after(f"in:{name}")
    write_manifest(out, journal["manifest"])
    _after("manifest")
    storage.delete(previous)
    _after("previous deleted")
    storage.delete(work)  # the journal with it: the publication is over
    return journal["manifest"]


def _move(src: str, dst: str) -> None:
    """Moves a file, or every file under a folder, to dst (what is already there is kept or replaced)."""
    if storage.list_files(src):
        storage.move_tree(src, dst)
        storage.delete(src)
    elif storage.exists(src):
        if "://" not in dst:
            os.makedirs(posixpath.dirname(dst), exist_ok=True)
        storage.move_file(src, dst)


def write_manifest(out: str, manifest: dict) -> None:
    """manifest.json, written last: its presence marks a published dataset."""
    storage.write_bytes(
        posixpath.join(out, schemas.MANIFEST_FILE), json.dumps(manifest, indent=1).encode("utf-8")
    )
