"""The three Beam jobs on Beam's portable runner give the DirectRunner's outputs (docs/dataflow.md).

The test starts, on 127.0.0.1 with free ports, Beam's Python job service
(`apache_beam.runners.portability.local_job_service_main`) and an external SDK worker pool
(`apache_beam.runners.worker.worker_pool_main`): the jobs go through the pipeline proto and run in separate
worker processes, as on Dataflow Runner v2, Flink or Spark. The worker pool does not install what the
launcher stages (a Dataflow worker's boot program does), so the test does that step itself: it builds this
project's sdist with the same setup.py (`python setup.py sdist`, what Beam's stager runs for --setup_file),
installs it (without dependencies: those come from the virtual environment, as from a worker container)
into a folder of its own, and starts the pool with that folder first on PYTHONPATH. A probe job checks that
the workers import the installed copy, not this checkout.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import schemas
from tests import fixtures

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def _install_sdist(dest: str) -> str:
    """Builds this project's sdist (as Beam's stager does for --setup_file) and installs it into dest/site."""
    dist = os.path.join(dest, "dist")
    subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "--dist-dir", dist],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    (sdist,) = glob.glob(os.path.join(dist, "*.tar.gz"))
    site = os.path.join(dest, "site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            site,
            sdist,
        ],
        check=True,
        capture_output=True,
    )
    return site


@pytest.fixture(scope="module")
def portable(tmp_path_factory):
    """Job service + worker pool on loopback; yields the Beam flags of a job that runs on them."""
    root = str(tmp_path_factory.mktemp("portable"))
    site = _install_sdist(root)
    bin_dir = os.path.dirname(sys.executable)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",  # the pool starts workers as `python`
        "PYTHONPATH": site,
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    job_port, pool_port = _free_port(), _free_port()
    procs = []
    try:
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "apache_beam.runners.portability.local_job_service_main",
                    "--port",
                    str(job_port),
                ],
                cwd=root,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=open(os.path.join(root, "job_service.log"), "wb"),
            )
        )
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "apache_beam.runners.worker.worker_pool_main",
                    "--service_port",
                    str(pool_port),
                ],
                cwd=root,  # not this checkout: the workers must find the project where it was installed
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=open(os.path.join(root, "worker_pool.log"), "wb"),
            )
        )
        _wait_for_port(job_port, procs[0])
        _wait_for_port(pool_port, procs[1])
        yield {
            "site": site,
            "flags": [
                "--runner",
                "PortableRunner",
                "--job_endpoint",
                f"localhost:{job_port}",
                "--environment_type",
                "EXTERNAL",
                "--environment_config",
                f"localhost:{pool_port}",
            ],
        }
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_workers_import_the_installed_sdist_not_the_checkout(portable, tmp_path):
    import apache_beam as beam

    from pipelines import beam_options

    out = str(tmp_path / "where")
    options, local = beam_options.beam_pipeline_options(portable["flags"])
    assert not local  # so the launcher stages setup.py as for Dataflow
    with beam.Pipeline(options=options) as p:
        where = p | beam.Create([0]) | beam.Map(lambda _: __import__("pipelines").__file__)
        _ = where | beam.io.WriteToText(out, num_shards=1)
    (path,) = glob.glob(out + "*")
    with open(path) as f:
        where = f.read().strip()
    assert where.startswith(portable["site"]), where


def _tree(root: str, skip=()) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if rel not in skip:
                with open(os.path.join(dirpath, name), "rb") as f:
                    out[rel] = f.read()
    return out


def _records(data: bytes) -> list:
    """The tf.train.Examples of a TFRecord file's bytes, in file order (compared as protos)."""
    import struct

    from tensorflow.core.example import example_pb2

    out, pos = [], 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        out.append(example_pb2.Example.FromString(data[pos + 12 : pos + 12 + length]))
        pos += 12 + length + 4
    return out


def test_preprocessing_job_writes_the_direct_runners_shards(portable, tmp_path):
    from pipelines import preprocess

    csv_path, image_dir, _ = fixtures.make_dataset(str(tmp_path), num_samples=12, size=16)
    outs = {}
    for name, flags in (("direct", ["--direct_num_workers", "1"]), ("portable", portable["flags"])):
        outs[name] = str(tmp_path / name)
        preprocess.run(
            [
                "--labels_csv",
                csv_path,
                "--input_dir",
                image_dir,
                "--output_dir",
                outs[name],
                "--num_folds",
                "3",
                *flags,
            ]
        )
    manifests = {}
    for name, out in outs.items():
        with open(os.path.join(out, schemas.MANIFEST_FILE)) as f:
            manifests[name] = json.load(f)
    for key in (
        "written_per_fold",
        "fold_sizes",
        "rejected_per_reason",
        "duplicates",
        "class_counts_per_fold",
    ):
        assert manifests["portable"][key] == manifests["direct"][key], key
    for stat in ("mean", "std"):  # float32 sums whose order depends on the bundles
        want = manifests["direct"]["stain_stats"][stat]
        assert manifests["portable"]["stain_stats"][stat] == pytest.approx(want, rel=1e-5), stat
    trees = {name: _tree(out, {schemas.MANIFEST_FILE}) for name, out in outs.items()}
    assert sorted(trees["portable"]) == sorted(trees["direct"])
    for name, data in trees["direct"].items():
        if name.endswith(".tfrecord"):  # the same records in the same order (a proto map's byte order may
            assert _records(trees["portable"][name]) == _records(data), name  # differ between processes)
        elif not name.startswith(schemas.TRANSFORM_DIR):  # TensorFlow's SavedModel holds ids and times
            assert trees["portable"][name] == data, name


def test_download_job_writes_the_direct_runners_files_and_report(portable, tmp_path):
    from pipelines import download
    from tests.image_server import ImageServer, status

    ids = ["10580_1610_C1_1", "10580_1610_C1_2", "63683_si35_H1_11"]
    labels = str(tmp_path / "labels.csv")
    fixtures.write_labels_csv(labels, [(sid, "0") for sid in ids])
    outs = {}
    with ImageServer() as server:
        for k, sid in enumerate(ids):
            server.add_sample(sid, seed=k, **({"blue": [status(404)]} if k == 2 else {}))
        for name, flags in (("direct", ["--direct_num_workers", "1"]), ("portable", portable["flags"])):
            outs[name] = str(tmp_path / name)
            download.run(
                [
                    "--labels_csv",
                    labels,
                    "--output_dir",
                    outs[name],
                    "--base_url",
                    server.base_url,
                    "--image_size",
                    "16",
                    "--retries",
                    "0",
                    *flags,
                ]
            )
    assert _tree(outs["portable"]) == _tree(outs["direct"])
    assert len(download.read_report(outs["portable"])) == len(ids) * schemas.NUM_STAINS


def test_batch_prediction_with_an_id_list_gives_the_direct_runners_submission(portable, tmp_path):
    from pipelines import batch_predict
    from tests.test_batch_predict import _model_dir, _write_folder
    from tests.test_predict import _ids

    size = 16
    thresholds = np.full(schemas.NUM_CLASSES, 0.5)
    model_dir = _model_dir(str(tmp_path / "model"), 0, thresholds, size=size)
    ids = _ids(5)
    folder = tmp_path / "images"
    _write_folder(
        folder,
        {
            sid: np.stack([fixtures.stain_array(10 * k + s, size) for s in range(4)], -1)
            for k, sid in enumerate(ids)
        },
    )
    ids_csv = str(tmp_path / "ids.csv")
    fixtures.write_labels_csv(
        ids_csv, [(i, "") for i in [*ids[::-1], "absent"]], header=(schemas.CSV_ID, schemas.CSV_PREDICTED)
    )
    outs = {}
    for name, flags in (("direct", ["--direct_num_workers", "1"]), ("portable", portable["flags"])):
        out = tmp_path / name
        outs[name] = out
        batch_predict.run(
            [
                "--input_dir",
                str(folder),
                "--model_dir",
                model_dir,
                "--out",
                str(out / "submission.csv"),
                "--ids_csv",
                ids_csv,
                "--tta",
                "1",
                "--probabilities",
                str(out / "p.csv"),
                *flags,
            ],
            log=lambda msg: None,
        )
    assert _tree(str(outs["portable"])) == _tree(str(outs["direct"]))
    with open(outs["portable"] / "submission.csv") as f:
        assert [line.split(",")[0] for line in f.read().splitlines()[1:]] == ids[::-1]
