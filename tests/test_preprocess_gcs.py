"""The whole preprocessing job with input and output on gs://, against a local GCS emulator."""

from __future__ import annotations

import csv
import io
import json
import os
import socket

import pytest
import tensorflow as tf
from apache_beam.internal.gcp import auth as gcp_auth
from apache_beam.io.filesystems import FileSystems

import schemas
from pipelines import preprocess
from tests import fixtures

emulator = pytest.importorskip("gcp_storage_emulator.server")
BUCKET = "hpa-test"


@pytest.fixture()
def gcs(monkeypatch):
    """A GCS emulator on 127.0.0.1 with one bucket; Beam's GCS client finds it via STORAGE_EMULATOR_HOST."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    # The emulator needs no credentials: skip Beam's search for them (it retries with back-off).
    monkeypatch.setattr(gcp_auth._Credentials, "_get_service_credentials", staticmethod(lambda options: None))
    try:
        yield f"gs://{BUCKET}"
    finally:
        server.stop()


def _upload(local_root: str, gs_root: str) -> None:
    for dirpath, _, names in os.walk(local_root):
        for name in names:
            path = os.path.join(dirpath, name)
            target = f"{gs_root}/{os.path.relpath(path, local_root)}"
            with open(path, "rb") as f, FileSystems.create(target) as g:
                g.write(f.read())


def _read(path: str) -> bytes:
    with FileSystems.open(path) as f:
        return f.read()


def _records(data: bytes):
    """Splits a TFRecord file's bytes into records (TF cannot read the emulator itself)."""
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"gcs-test-{os.getpid()}.tfrecord")
    with open(path, "wb") as f:
        f.write(data)
    try:
        return [schemas.example_to_sample(r.numpy()) for r in tf.data.TFRecordDataset(path)]
    finally:
        os.remove(path)


def test_job_reads_and_writes_gcs(gcs, tmp_path):
    _, _, labels = fixtures.make_dataset(str(tmp_path / "local"), num_samples=9, size=16)
    fixtures.write_sample_images(str(tmp_path / "local" / "train"), "orphan", seed=4)
    _upload(str(tmp_path / "local"), f"{gcs}/in")
    out = f"{gcs}/out"
    preprocess.run(
        [
            "--labels_csv",
            f"{gcs}/in/train.csv",
            "--input_dir",
            f"{gcs}/in/train",
            "--output_dir",
            out,
            "--num_folds",
            "3",
            "--direct_num_workers",
            "1",
        ]
    )
    manifest = json.loads(_read(f"{out}/{schemas.MANIFEST_FILE}"))
    assert manifest["written"] == 9 and manifest["rejected"] == 0
    assert manifest["unlisted_images"] == {"train": 1}
    rejected = list(csv.reader(io.StringIO(_read(f"{out}/{schemas.REJECTED_FILE}").decode())))
    assert len(rejected) == 1  # header only
    seen = {}
    for name in manifest["shards"]:
        for rec in _records(_read(f"{out}/{schemas.TFRECORD_DIR}/{name}")):
            assert name.startswith(schemas.shard_prefix(rec.fold))
            seen[rec.id] = schemas.multi_hot_to_labels(rec.labels)
    assert seen == labels
    transform_files = FileSystems.match([f"{out}/{schemas.TRANSFORM_DIR}/**"])[0].metadata_list
    assert any(m.path.endswith("saved_model.pb") for m in transform_files)
    leftovers = FileSystems.match([f"{out}/{preprocess.INCOMPLETE_DIR}/**"])[0].metadata_list
    assert leftovers == []
