"""The download job (pipelines.download) against an image server on 127.0.0.1 that the tests start."""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import urllib3
from PIL import Image

import schemas
from pipelines import download
from schemas import labels, stains
from tests import fixtures
from tests.image_server import HTML, ImageServer, atlas_jpeg, cut, ok, slow, status

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Short timeouts and waits so that retries cost milliseconds; one DoFn worker in-process.
FAST = ["--timeout", "0.6", "--connect_timeout", "1", "--retries", "2", "--backoff", "0.01"]
FAST += ["--progress_seconds", "0.5", "--direct_num_workers", "1"]


def write_labels(path: str, ids: list[str]) -> str:
    fixtures.write_labels_csv(path, [(sid, str(sum(map(ord, sid)) % schemas.NUM_CLASSES)) for sid in ids])
    return path


def report(out: str) -> dict[tuple[str, str], tuple[str, str, int]]:
    rows = download.read_report(out)
    return {(i, s): (st, d, b) for i, s, st, d, b in rows}


def stain_files(out: str) -> dict[str, bytes]:
    return {
        name: open(os.path.join(out, name), "rb").read()
        for name in sorted(os.listdir(out))
        if download.stain_file(name)
    }


def _run(*argv) -> dict:
    return download.run([*argv, *FAST])


# --------------------------------------------------------------------------------------------------------
# Pure parts


def test_stain_url_and_ids():
    assert download.stain_url("http://h/images/", "10580_1610_C1_1", "blue") == (
        "http://h/images/10580/1610_C1_1_blue.jpg"
    )
    for bad in ("../x_1", "a/b_1", "noatlasid", "_x", ""):
        with pytest.raises(labels.RowRejected):
            download.stain_url("http://h", bad, "red")


def test_stain_file_names_match_what_preprocessing_reads():
    assert download.stain_file("d/10_A1_1_red.jpg") == ("10_A1_1", "red", ".jpg")
    assert download.stain_file("d/10_A1_1_yellow.PNG") == ("10_A1_1", "yellow", ".png")
    for other in ("d/download_report.csv", "d/10_A1_1_red.jpg.3f2a", "d/x_purple.png", "d/_red.png"):
        assert download.stain_file(other) is None


def test_prepare_image_keeps_served_bytes_and_refuses_non_images():
    body = atlas_jpeg(1, "green")
    assert download.prepare_image(body, "green", None) == (body, ".jpg")
    for bad in (HTML[1], body[: len(body) // 2], b"", b"\xff\xd8\xff" + b"\0" * 50):
        with pytest.raises(stains.Rejected):
            download.prepare_image(bad, "green", None)


def test_prepare_image_resizes_like_the_preprocessing_job():
    body = atlas_jpeg(2, "yellow", size=32)
    png, ext = download.prepare_image(body, "yellow", 8)
    img = Image.open(io.BytesIO(png))
    assert (ext, img.format, img.mode, img.size) == (".png", "PNG", "L", (8, 8))
    rgb = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(img), stains.resize(rgb.max(axis=2), 8))
    # the preprocessing job's own path: validate_stains on the served JPEG gives the same pixels
    valid = stains.validate_stains({s: body for s in schemas.STAINS}, image_size=8)
    assert valid.images["yellow"] == png


def test_write_is_atomic(tmp_path, monkeypatch):
    """A writer that dies midway (a kill, a full disk) leaves no file under the final name."""
    partial = str(tmp_path / download.PARTIAL_DIR)
    target = str(tmp_path / "1_A_red.jpg")
    download.write_atomic(target, b"whole", partial)
    assert open(target, "rb").read() == b"whole" and not os.listdir(partial)

    real_create = download.FileSystems.create

    class Dying:
        def __init__(self, f):
            self._f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

        def write(self, data):
            self._f.write(data[:3])
            raise OSError("killed")

    monkeypatch.setattr(download.FileSystems, "create", lambda path, **kw: Dying(real_create(path, **kw)))
    target2 = str(tmp_path / "1_A_green.jpg")
    with pytest.raises(OSError):
        download.write_atomic(target2, b"whole", partial)
    assert not os.path.exists(target2) and len(os.listdir(partial)) == 1
    with pytest.raises(OSError):
        download.write_atomic(target, b"other", partial)
    assert open(target, "rb").read() == b"whole"  # an existing file is untouched too


@pytest.mark.parametrize("seed", range(3))
def test_decode_gray8_is_the_channel_maximum(seed):
    rgb = np.random.default_rng(seed).integers(0, 256, size=(24, 20, 3), dtype=np.uint8)
    pixels, fmt, note = stains.decode_gray8("red", fixtures.png_bytes(rgb, "RGB"))
    assert (fmt, note) == ("PNG", "rgb")
    np.testing.assert_array_equal(pixels, rgb.max(axis=2))


def test_check_present():
    jpeg = atlas_jpeg(3, "red")
    png8 = download.prepare_image(jpeg, "red", 8)[0]
    assert download.check_present(jpeg, "red", None) is None
    assert download.check_present(png8, "red", 8) is None
    assert "not a 8x8" in download.check_present(jpeg, "red", 8)
    assert "not a 12x12" in download.check_present(png8, "red", 12)
    assert download.check_present(jpeg[:-40], "red", None)


def test_fetch_backoff_doubles_and_is_capped():
    waits = []
    with ImageServer() as server:
        server.routes["/x"] = [status(503)]
        http = urllib3.PoolManager()
        got = download.fetch(http, server.base_url[: -len("/images")] + "/x", 4, 1.0, 3.0, sleep=waits.append)
    assert got.status == download.FAILED and got.attempts == 5 and server.log.count("/x") == 5
    assert "5 attempts: HTTP 503" in got.detail
    assert len(waits) == 4
    for wait, full in zip(waits, (1.0, 2.0, 3.0, 3.0)):
        assert full / 2 <= wait <= full


def test_summary_counts_incomplete_samples():
    rows = [("a", s, download.DOWNLOADED, "", 10) for s in schemas.STAINS]
    rows += [("b", s, download.PRESENT, "", 5) for s in schemas.STAINS[:3]]
    rows += [("b", "yellow", download.NOT_FOUND, "HTTP 404", 0)]
    summary = download.summarise(rows, 2, 2.0)
    assert summary["by_status"] == {download.DOWNLOADED: 4, download.PRESENT: 3, download.NOT_FOUND: 1}
    assert (summary["bytes_downloaded"], summary["bytes_present"]) == (40, 15)
    assert (summary["complete_samples"], summary["incomplete_samples"]) == (1, 1)
    assert "1 incomplete (e.g. b: the preprocessing job rejects them as missing_stain" in (
        download.summary_line(summary)
    )


def test_bad_label_file_is_one_line_exit_2(tmp_path, capsys):
    path = tmp_path / "labels.csv"
    path.write_text("Name,Target\nx,1\n")
    assert download.main(["--labels_csv", str(path), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no `Id` column" in err[0]


# --------------------------------------------------------------------------------------------------------
# The job against the loopback server: every kind of response in one run


GOOD = ["10_A1_1", "10_A1_2", "11_B2_1"]
EXPECTED = {  # (Id, stain) -> status; every other stain of these Ids is downloaded
    ("12_C3_1", "yellow"): download.NOT_FOUND,
    ("15_F6_1", "blue"): download.FAILED,  # slow on every attempt
    ("16_G7_1", "red"): download.NOT_IMAGE,  # an HTML page with status 200
    ("17_H8_1", "green"): download.NOT_IMAGE,  # a truncated JPEG, served whole
    ("19_J1_1", "blue"): download.HTTP_ERROR,  # 403
    ("20_K2_1", "red"): download.FAILED,  # 503 on every attempt
}
RETRIED = {("13_D4_1", "red"), ("14_E5_1", "green"), ("18_I9_1", "yellow")}  # 500, slow, cut; then good
BAD_IDS = ["../etc_x", "noatlasid"]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("download")
    with ImageServer() as server:
        bodies = {sid: server.add_sample(sid, seed=i) for i, sid in enumerate(GOOD)}
        j = atlas_jpeg(99, "red")
        special = {
            "12_C3_1": {"yellow": [status(404)]},
            "13_D4_1": {"red": [status(500), ok(j)]},
            "14_E5_1": {"green": [slow(1.0, j), ok(j)]},
            "15_F6_1": {"blue": [slow(1.0, j)]},
            "16_G7_1": {"red": [HTML]},
            "17_H8_1": {"green": [ok(j[: len(j) * 2 // 3])]},
            "18_I9_1": {"yellow": [cut(j), ok(j)]},
            "19_J1_1": {"blue": [status(403)]},
            "20_K2_1": {"red": [status(503)]},
        }
        for k, (sid, spec) in enumerate(special.items()):
            bodies[sid] = server.add_sample(sid, seed=10 + k, **spec)
            for stain, responses in spec.items():
                bodies[sid][stain] = responses[-1][1] if responses[-1][0] == "ok" else None
        ids = GOOD + list(special) + BAD_IDS + [GOOD[0]]  # a repeated row
        csv_path = write_labels(str(root / "hpav18.csv"), ids)
        out = str(root / "images")
        t0 = time.monotonic()
        summary = _run("--labels_csv", csv_path, "--output_dir", out, "--base_url", server.base_url)
        seconds = time.monotonic() - t0
        log = list(server.log)
        requests = {(sid, s): server.requests(sid, s) for sid in bodies for s in schemas.STAINS}
    return dict(
        root=root,
        out=out,
        csv=csv_path,
        bodies=bodies,
        summary=summary,
        log=log,
        requests=requests,
        seconds=seconds,
        server_url=server.base_url,
    )


def test_every_stain_requested_has_one_report_row(mixed):
    rows = download.read_report(mixed["out"])
    ids = GOOD + [sid for sid in mixed["bodies"] if sid not in GOOD] + BAD_IDS
    assert [(i, s) for i, s, *_ in rows] == sorted(
        ((i, s) for i in ids for s in schemas.STAINS), key=lambda r: (r[0], schemas.STAINS.index(r[1]))
    )
    assert mixed["summary"]["files"] == len(ids) * schemas.NUM_STAINS == len(rows)


def test_statuses(mixed):
    rep = report(mixed["out"])
    for sid in mixed["bodies"]:
        for stain in schemas.STAINS:
            expected = EXPECTED.get((sid, stain), download.DOWNLOADED)
            assert rep[sid, stain][0] == expected, (sid, stain, rep[sid, stain])
    for sid in BAD_IDS:
        assert {rep[sid, s][0] for s in schemas.STAINS} == {download.BAD_ID}
    assert "after 2 attempts: HTTP 500" in rep["13_D4_1", "red"][1]
    assert "after 2 attempts: timeout" in rep["14_E5_1", "green"][1]
    assert "after 2 attempts: broken response" in rep["18_I9_1", "yellow"][1]
    assert rep["15_F6_1", "blue"][1].startswith("3 attempts: timeout")
    assert rep["20_K2_1", "red"][1] == "3 attempts: HTTP 503; HTTP 503; HTTP 503"
    assert "Content-Type text/html" in rep["16_G7_1", "red"][1]
    assert "cannot be decoded" in rep["17_H8_1", "green"][1]
    assert rep["19_J1_1", "blue"][1] == "HTTP 403"


def test_requests_retried_only_when_a_retry_can_help(mixed):
    req = mixed["requests"]
    assert all(req[k] == 2 for k in RETRIED)
    assert req["20_K2_1", "red"] == 3 and req["15_F6_1", "blue"] == 3  # 1 + --retries 2
    for k in [("12_C3_1", "yellow"), ("16_G7_1", "red"), ("17_H8_1", "green"), ("19_J1_1", "blue")]:
        assert req[k] == 1, k
    assert not [p for p in mixed["log"] if "etc" in p or "noatlas" in p]
    assert sum(req.values()) == len(mixed["log"])  # the repeated row is fetched once


def test_written_files_are_exactly_the_good_bodies(mixed):
    files = stain_files(mixed["out"])
    expected = {
        f"{sid}_{stain}.jpg": body
        for sid, bodies in mixed["bodies"].items()
        for stain, body in bodies.items()
        if EXPECTED.get((sid, stain), download.DOWNLOADED) == download.DOWNLOADED
    }
    assert files == expected
    rep = report(mixed["out"])
    for name, body in files.items():
        sid, stain, _ = download.stain_file(name)
        assert rep[sid, stain][2] == len(body)
    assert not os.listdir(os.path.join(mixed["out"], download.PARTIAL_DIR))


def test_summary(mixed):
    s = mixed["summary"]
    assert s["ids"] == len(mixed["bodies"]) + len(BAD_IDS)
    assert s["complete_samples"] == 6  # GOOD and the three retried Ids
    assert s["incomplete_samples"] == len(EXPECTED) + len(BAD_IDS)
    assert s["by_status"][download.DOWNLOADED] == 4 * len(mixed["bodies"]) - len(EXPECTED)


def test_rerun_fetches_only_what_is_missing(mixed, tmp_path):
    out = str(tmp_path / "images")
    shutil.copytree(mixed["out"], out)
    subset = GOOD + ["12_C3_1"]
    with ImageServer() as server:
        for sid in subset:  # present files must not be asked for again
            server.add_sample(sid, seed=0, **{"yellow": [status(404)]} if sid == "12_C3_1" else {})
        csv_path = write_labels(str(tmp_path / "good.csv"), subset)
        summary = _run("--labels_csv", csv_path, "--output_dir", out, "--base_url", server.base_url)
        assert server.log == [server.path("12_C3_1", "yellow")]
    assert summary["by_status"] == {download.PRESENT: 15, download.NOT_FOUND: 1}
    present = [b for sid in subset for b in mixed["bodies"][sid].values() if b is not None]
    assert summary["bytes_present"] == sum(map(len, present))


def test_preprocessing_job_reads_the_folder(mixed, tmp_path):
    """The contract with the next job: the folder is its --input_dir as it is (one small end-to-end run)."""
    from pipelines import preprocess

    out = str(tmp_path / "dataset")
    preprocess.run(
        ["--labels_csv", mixed["csv"], "--input_dir", mixed["out"], "--output_dir", out, "--num_folds", "2"]
        + ["--direct_num_workers", "1", "--progress_seconds", "1"]
    )
    manifest = schemas.read_manifest(out)
    assert manifest["written"] == mixed["summary"]["complete_samples"]
    assert manifest["image_size"] == [16, 16]
    with open(os.path.join(out, schemas.REJECTED_FILE)) as f:
        rejected = {r[schemas.CSV_ID]: r[schemas.REJECTED_REASON] for r in csv.DictReader(f)}
    incomplete = {sid for sid, _ in EXPECTED} | {BAD_IDS[1]}
    assert {sid for sid, reason in rejected.items() if reason == stains.MISSING_STAIN} == incomplete
    assert rejected[BAD_IDS[0]] == labels.BAD_ID
    assert rejected[BAD_IDS[1]] == stains.MISSING_STAIN  # a valid file name, but no atlas Id: nothing fetched
    assert rejected[GOOD[0]] == labels.DUPLICATE_ID  # the repeated row
    assert len(rejected) + manifest["written"] == manifest["input_rows"]


# --------------------------------------------------------------------------------------------------------
# Resizing, --limit


def test_image_size_writes_gray_pngs(tmp_path):
    ids = ["30_A1_1", "30_A1_2", "31_B1_1"]
    with ImageServer() as server:
        bodies = {sid: server.add_sample(sid, seed=i, size=32) for i, sid in enumerate(ids)}
        csv_path = write_labels(str(tmp_path / "l.csv"), ids)
        out = str(tmp_path / "out")
        summary = _run(
            "--labels_csv", csv_path, "--output_dir", out, "--base_url", server.base_url, "--image_size", "8"
        )
    assert summary["by_status"] == {download.DOWNLOADED: 12}
    files = stain_files(out)
    assert sorted(files) == sorted(f"{sid}_{s}.png" for sid in ids for s in schemas.STAINS)
    for sid in ids:
        for stain in schemas.STAINS:
            png = files[f"{sid}_{stain}.png"]
            assert png == download.prepare_image(bodies[sid][stain], stain, 8)[0]
            img = Image.open(io.BytesIO(png))
            assert (img.mode, img.size) == ("L", (8, 8))


def test_limit(tmp_path):
    ids = ["40_A1_1", "40_A1_2", "41_B1_1", "42_C1_1"]
    with ImageServer() as server:
        for i, sid in enumerate(ids):
            server.add_sample(sid, seed=i)
        csv_path = write_labels(str(tmp_path / "l.csv"), ids)
        out = str(tmp_path / "out")
        summary = _run(
            "--labels_csv", csv_path, "--output_dir", out, "--base_url", server.base_url, "--limit", "2"
        )
        assert sorted(server.log) == sorted(server.path(sid, s) for sid in ids[:2] for s in schemas.STAINS)
    assert summary["ids"] == 2 and summary["by_status"] == {download.DOWNLOADED: 8}
    assert {sid for sid, _ in report(out)} == set(ids[:2])


# --------------------------------------------------------------------------------------------------------
# A kill and a rerun


def _valid_stain_files(out: str, bodies: dict) -> dict[str, bool]:
    """Stain file name -> whether it is byte for byte the served JPEG."""
    result = {}
    for name, data in stain_files(out).items():
        sid, stain, _ = download.stain_file(name)
        result[name] = data == bodies[sid][stain]
    return result


def test_kill_then_rerun_completes_fetching_only_what_is_missing(tmp_path):
    ids = [f"5{i // 3}_W{i}_1" for i in range(12)]
    with ImageServer(latency=0.1) as server:
        bodies = {sid: server.add_sample(sid, seed=i) for i, sid in enumerate(ids)}
        csv_path = write_labels(str(tmp_path / "l.csv"), ids)
        out = str(tmp_path / "out")
        argv = ["--labels_csv", csv_path, "--output_dir", out, "--base_url", server.base_url]
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipelines.download", *argv, *FAST, "--concurrency", "1"],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                if os.path.isdir(out) and len(stain_files(out)) >= 6:
                    break
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait()
        before = _valid_stain_files(out, bodies)
        assert 6 <= len(before) < 4 * len(ids), "the kill did not land midway"
        assert all(before.values()), "a killed run left a stain file that is not the whole body"
        assert not os.path.exists(os.path.join(out, schemas.DOWNLOAD_REPORT_FILE))
        # What an older, non-atomic tool or a disk fault could leave: a truncated stain under its final name,
        # and a leftover in the partial folder.
        missing = sorted(
            f"{sid}_{s}.jpg" for sid in ids for s in schemas.STAINS if f"{sid}_{s}.jpg" not in before
        )
        victim = missing[0]
        with open(os.path.join(out, victim), "wb") as f:
            f.write(bodies[victim.rsplit("_", 1)[0]][victim.rsplit("_", 1)[1][:-4]][:100])
        os.makedirs(os.path.join(out, download.PARTIAL_DIR), exist_ok=True)
        open(os.path.join(out, download.PARTIAL_DIR, "10_A1_1_red.jpg.dead"), "wb").close()

        server.log.clear()
        server.latency = 0.0
        summary = _run(*argv)
        fetched = set(server.log)
    # As a set: on a loaded machine a request may time out and be retried (and so logged twice); what counts
    # is that nothing already present is asked for again, and everything missing is.
    assert fetched == {server.path(*m[:-4].rsplit("_", 1)) for m in missing}
    assert summary["by_status"] == {download.PRESENT: len(before), download.DOWNLOADED: len(missing)}
    assert summary["complete_samples"] == len(ids)
    after = _valid_stain_files(out, bodies)
    assert len(after) == 4 * len(ids) and all(after.values())
    assert "replaces" in report(out)[tuple(victim[:-4].rsplit("_", 1))][1]
    assert not os.listdir(os.path.join(out, download.PARTIAL_DIR))
