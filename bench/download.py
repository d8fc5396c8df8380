"""Benchmark of the download job's bounded concurrency against a loopback server with a fixed latency.

    python bench/download.py [--files 160] [--latency 0.05] [--concurrency 1 4 16] [--image_px 64]

The server (tests/image_server.py on 127.0.0.1, in its own process) waits `--latency` seconds before
answering each request, like a distant image server. For each concurrency the whole job runs (DirectRunner,
one in-process worker) on a fresh output folder; the figure is requests/s seen by the server (requests /
time from the first request's start to the last response's end), so Beam's start-up is left out; the job's
wall time is printed too. Concurrency 1 is the baseline, measured in the same run. The ceiling is
concurrency / latency.

With `--image_px 2048` the served JPEGs have the size of the HPAv18 originals (a real competition stain,
upscaled), so decoding each body in full (the job's check) shows in the rate.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import shutil
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import schemas  # noqa: E402
from bench._common import REAL_SMOKE, median, print_table  # noqa: E402
from pipelines import download  # noqa: E402
from tests import fixtures  # noqa: E402
from tests.image_server import ImageServer, atlas_jpeg  # noqa: E402


def _real_jpeg(stain: str, index: int, size: int) -> bytes:
    """A real competition stain (../shared/data/hpa-real-smoke) resized and colour-coded as the atlas does."""
    folder = os.path.join(REAL_SMOKE, "train")
    names = sorted(n for n in os.listdir(folder) if n.endswith(f"_{stain}.png"))
    gray = Image.open(os.path.join(folder, names[index % len(names)])).convert("L")
    gray = np.asarray(gray.resize((size, size), Image.Resampling.BILINEAR))
    rgb = np.zeros((size, size, 3), dtype=np.uint8)
    for c in {"red": (0,), "green": (1,), "blue": (2,), "yellow": (0, 1)}[stain]:
        rgb[..., c] = gray
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _serve(ids: list[str], image_px: int, latency: float, conn) -> None:
    """The server process: routes every stain of every Id to one body per stain, then answers `conn`:
    "times" -> the (start, end) of the requests since the last call; "stop" -> ends."""
    with ImageServer(latency=latency) as server:
        bodies = {}
        for k, stain in enumerate(schemas.STAINS):
            bodies[stain] = (
                atlas_jpeg(k, stain, image_px) if image_px <= 256 else _real_jpeg(stain, k, image_px)
            )
        for sid in ids:
            for stain in schemas.STAINS:
                server.routes[server.path(sid, stain)] = [("ok", bodies[stain], "image/jpeg")]
        conn.send((server.base_url, sum(map(len, bodies.values()))))
        while conn.recv() == "times":
            conn.send(list(server.times))
            server.times.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=160, help="stain files per run (a multiple of 4)")
    parser.add_argument("--latency", type=float, default=0.05, help="server delay per request, seconds")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image_px", type=int, default=64, help="side of the served JPEGs")
    args = parser.parse_args()

    ids = [f"{1000 + i // 8}_B{i}_1" for i in range(args.files // schemas.NUM_STAINS)]
    load = os.getloadavg()
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {os.cpu_count()} cores")
    root = tempfile.mkdtemp(prefix="bench-download-")
    rows = []
    try:
        csv_path = os.path.join(root, "ids.csv")
        fixtures.write_labels_csv(csv_path, [(sid, "0") for sid in ids])
        # The server runs in its own process, so that it does not share the job's interpreter lock.
        conn, child = multiprocessing.Pipe()
        proc = multiprocessing.Process(
            target=_serve, args=(ids, args.image_px, args.latency, child), daemon=True
        )
        proc.start()
        base_url, sample_bytes = conn.recv()
        print(
            f"{len(ids) * 4} stain files per run, {sample_bytes / 4 / 1e3:.1f} kB per file "
            f"({args.image_px} px JPEG), server latency {args.latency * 1e3:.0f} ms (own process); served "
            "from memory, written to a fresh folder under /tmp each run"
        )
        results = {}
        try:
            for c in args.concurrency:
                rates, walls = [], []
                for r in range(args.repeats):
                    out = os.path.join(root, f"out-{c}-{r}")
                    conn.send("times")
                    conn.recv()
                    t0 = time.perf_counter()
                    summary = download.run(
                        ["--labels_csv", csv_path, "--output_dir", out, "--base_url", base_url]
                        + ["--concurrency", str(c), "--direct_num_workers", "1", "--progress_seconds", "60"]
                    )
                    walls.append(time.perf_counter() - t0)
                    assert summary["by_status"] == {download.DOWNLOADED: len(ids) * 4}, summary
                    conn.send("times")
                    times = conn.recv()
                    span = max(e for _, e in times) - min(s for s, _ in times)
                    rates.append(len(times) / span)
                    shutil.rmtree(out)
                results[c] = (median(rates), median(walls), rates)
        finally:
            conn.send("stop")
            proc.join()
        base = results[args.concurrency[0]][0]
        for c, (rate, wall, rates) in results.items():
            rows.append(
                [
                    c,
                    f"{rate:.1f}",
                    f"{rate / base:.2f}x",
                    f"{c / args.latency:.0f}",
                    f"{wall:.2f}",
                    " ".join(f"{x:.1f}" for x in rates),
                ]
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print_table(
        [
            "concurrency",
            "requests/s (median)",
            f"vs c={args.concurrency[0]}",
            "ceiling",
            "job wall s",
            "runs",
        ],
        rows,
    )
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
