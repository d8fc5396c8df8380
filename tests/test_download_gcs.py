"""The download job writing to gs:// (a local GCS emulator) from the loopback image server."""

from __future__ import annotations

import pytest
from apache_beam.io.filesystems import FileSystems

import schemas
from pipelines import download
from tests import fixtures
from tests.image_server import ImageServer, cut, status

pytest.importorskip("gcp_storage_emulator.server")
from tests.test_preprocess_gcs import gcs  # noqa: E402, F401 (the emulator fixture)


def _read(path: str) -> bytes:
    with FileSystems.open(path) as f:
        return f.read()


def test_download_to_gcs_and_rerun(gcs, tmp_path):  # noqa: F811
    ids = ["60_A1_1", "60_A1_2"]
    with ImageServer() as server:
        bodies = {sid: server.add_sample(sid, seed=i) for i, sid in enumerate(ids)}
        server.routes[server.path(ids[1], "blue")] = [status(404)]
        server.routes[server.path(ids[0], "green")] = [cut(bodies[ids[0]]["green"])]
        local_csv = str(tmp_path / "l.csv")
        fixtures.write_labels_csv(local_csv, [(sid, "0") for sid in ids])
        with open(local_csv, "rb") as f, FileSystems.create(f"{gcs}/hpav18.csv") as g:
            g.write(f.read())
        out = f"{gcs}/hpav18"
        argv = ["--labels_csv", f"{gcs}/hpav18.csv", "--output_dir", out, "--base_url", server.base_url]
        argv += ["--direct_num_workers", "1", "--retries", "1", "--backoff", "0.01", "--timeout", "2"]
        first = download.run(argv)
        assert first["by_status"] == {download.DOWNLOADED: 6, download.NOT_FOUND: 1, download.FAILED: 1}
        server.routes[server.path(ids[0], "green")] = [("ok", bodies[ids[0]]["green"], "image/jpeg")]
        server.log.clear()
        second = download.run(argv)
        assert sorted(server.log) == sorted([server.path(ids[0], "green"), server.path(ids[1], "blue")])
    assert second["by_status"] == {download.DOWNLOADED: 1, download.PRESENT: 6, download.NOT_FOUND: 1}
    for sid in ids:
        for stain in schemas.STAINS:
            path = f"{out}/{sid}_{stain}.jpg"
            if (sid, stain) == (ids[1], "blue"):
                assert not FileSystems.exists(path)
            else:
                assert _read(path) == bodies[sid][stain]
    assert len(download.read_report(out)) == 8
    assert FileSystems.match([f"{out}/{download.PARTIAL_DIR}/*"])[0].metadata_list == []
