"""What one cache per dataset saves: decodes and disk of a K-fold run, memory of N processes on one host.

    .venv/bin/python -m bench.cache_share --data_dir OUT [--folds 5] [--processes 2,3] [--work_dir W]
    .venv/bin/python -m bench.cache_share [--samples 300]   # builds real-PNG shards first (bench._common)

K-fold: for each of the K validation folds, what its `hpa-train --val_fold k --cache DIR` run asks of the
cache: the training folds' pipeline and the validation fold's. Today's cache (bench/_old_cache.py, format
1, one tf.data snapshot per fold set) is filled for each run's two fold sets; the new cache
(`model.data.open_cache`, in a fresh state per run, as a new process) is filled once. Printed: records
decoded and bytes on disk (du) after all K runs, both.

Memory: P processes (P from --processes) each read one full epoch of the training pipeline from one
`--cache DIR`, then stay alive while their memory is read from /proc/<pid>/smaps_rollup (Rss, Pss,
Private); beside P processes with `--cache memory` (one copy each). "Total" = the processes' private
memory + the cache file's pages in the page cache (fincore) for DIR; the processes' private memory for
memory. A process's own footprint (TensorFlow, Python) is in both; `no cache` shows it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script too

import schemas  # noqa: E402
from bench._common import REAL_SMOKE, build_real_shards  # noqa: E402

_CHILD = """
import json, os, sys, time
from model import data as data_lib
from model.config import DataConfig
data_dir, cache, ready = sys.argv[1:4]
manifest = __import__("schemas").read_manifest(data_dir)
folds = data_lib.labelled_folds(manifest)
n = data_lib.fold_sizes(manifest, folds)
if cache != "none":
    cfg = DataConfig(batch_size=32, cache=cache, seed=0)
    ds = data_lib.make_dataset(data_dir, folds, cfg, training=True, steps_per_epoch=n // 32)
    for _ in ds.take(n // 32):
        pass
with open(ready, "w") as f:
    f.write("ready")
time.sleep(600)
"""


def _smaps(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


def _du(path: str) -> int:
    return int(subprocess.run(["du", "-sb", path], capture_output=True, text=True).stdout.split()[0])


def _fincore(paths: list[str]) -> int:
    try:
        out = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--output", "RES", *paths], capture_output=True, text=True
        ).stdout
        return sum(int(x) for x in out.split())
    except (OSError, ValueError):
        return -1


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def kfold(data_dir: str, work: str) -> None:
    """Decodes and disk of K runs, one per validation fold: today's cache beside the new one."""
    from bench import _old_cache
    from model import data as data_lib
    from model.config import DataConfig

    manifest = schemas.read_manifest(data_dir)
    folds = data_lib.labelled_folds(manifest)
    size = data_lib.image_size_of(data_dir, manifest)
    total = data_lib.fold_sizes(manifest, folds)
    old_dir, new_dir = os.path.join(work, "kfold-old"), os.path.join(work, "kfold-new")
    for d in (old_dir, new_dir):
        shutil.rmtree(d, ignore_errors=True)
    decoded = {"today": 0, "new": 0}
    t = time.perf_counter()
    for k in folds:  # format 1: keyed per fold set; the K runs share none (each has its own two sets)
        for fold_set in ([f for f in folds if f != k], [k]):
            name = "folds" + "_".join(map(str, fold_set))
            _old_cache.fill(data_lib.list_shards(data_dir, fold_set), size, os.path.join(old_dir, name))
            decoded["today"] += data_lib.fold_sizes(manifest, fold_set)
    old_seconds = time.perf_counter() - t
    original_source = data_lib._cache_source

    def counting_source(*args):
        for batch in original_source(*args):
            decoded["new"] += len(batch[0])
            yield batch

    data_lib._cache_source = counting_source
    t = time.perf_counter()
    try:
        cfg = DataConfig(batch_size=32, cache=new_dir, seed=0)
        for k in folds:
            data_lib._STORES.clear()  # a new process per fold, as hpa-folds runs them
            train = [f for f in folds if f != k]
            data_lib.make_dataset(data_dir, train, cfg, training=True, steps_per_epoch=1)
            data_lib.make_eval_dataset(data_dir, [k], cfg, cached=True)
    finally:
        data_lib._cache_source = original_source
    new_seconds = time.perf_counter() - t
    old_bytes, new_bytes = _du(old_dir), _du(new_dir)
    print(f"K-fold: {len(folds)} runs (validation fold 0..{len(folds) - 1}), {total} samples of {size}px")
    print("| cache | records decoded | x dataset | on disk | x dataset | fill time |")
    print("| --- | --- | --- | --- | --- | --- |")
    one = data_lib.fold_sizes(manifest, folds) * size * size * schemas.NUM_STAINS
    print(
        f"| today's (format 1, per fold set) | {decoded['today']} | {decoded['today'] / total:.1f}x | "
        f"{_mib(old_bytes)} | {old_bytes / one:.2f}x | {old_seconds:.0f} s |"
    )
    print(
        f"| new (one per dataset) | {decoded['new']} | {decoded['new'] / total:.1f}x | {_mib(new_bytes)} | "
        f"{new_bytes / one:.2f}x | {new_seconds:.0f} s |"
    )
    print()


def memory(data_dir: str, work: str, counts: list[int]) -> None:
    """Memory of P processes reading one DIR cache, beside P processes with --cache memory each."""
    from model import data as data_lib
    from model.config import DataConfig

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cache_dir = os.path.join(work, "share")
    data_lib.open_cache(data_dir, DataConfig(cache=cache_dir), None)  # filled before the processes start
    (key,) = [n for n in os.listdir(cache_dir) if "." not in n]
    images = os.path.join(cache_dir, key, "images.npy")
    env = dict(os.environ, PYTHONPATH=root, TF_CPP_MIN_LOG_LEVEL="3")
    print(
        f"memory: cache file {_mib(os.path.getsize(images))}; "
        f"/proc/loadavg {open('/proc/loadavg').read().strip()}"
    )
    print("| cache | processes | Rss each | Pss each | private each | cache pages in page cache | total |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for cache in ("none", cache_dir, "memory"):
        for p in counts if cache != "none" else [1]:
            ready = [os.path.join(work, f"ready-{p}-{i}") for i in range(p)]
            for r in ready:
                if os.path.exists(r):
                    os.remove(r)
            procs = [
                subprocess.Popen(
                    [sys.executable, "-c", _CHILD, data_dir, cache, ready[i]],
                    cwd=root,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for i in range(p)
            ]
            try:
                while not all(os.path.exists(r) for r in ready):
                    if any(x.poll() is not None for x in procs):
                        raise RuntimeError(f"a reader ended early (cache {cache})")
                    time.sleep(0.5)
                stats = [_smaps(x.pid) for x in procs]
                paged = _fincore([images]) if cache == cache_dir else 0
            finally:
                for x in procs:
                    x.kill()
                    x.wait()
            private = [s.get("Private_Clean", 0) + s.get("Private_Dirty", 0) for s in stats]
            label = "DIR" if cache == cache_dir else cache
            print(
                f"| {label} | {p} | {', '.join(_mib(s['Rss']) for s in stats)} | "
                f"{', '.join(_mib(s['Pss']) for s in stats)} | {', '.join(_mib(v) for v in private)} | "
                f"{_mib(paged)} | {_mib(sum(private) + paged)} |"
            )


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=None, help="a preprocessing output (default: build one)")
    p.add_argument("--source", default=REAL_SMOKE)
    p.add_argument("--samples", type=int, default=300)
    p.add_argument("--work_dir", default=None)
    p.add_argument("--processes", default="2,3", help="comma-separated process counts")
    p.add_argument("--skip_kfold", action="store_true")
    p.add_argument("--skip_memory", action="store_true")
    args = p.parse_args(argv)
    work = args.work_dir or tempfile.mkdtemp(prefix="bench-cache-share-")
    data_dir = args.data_dir or build_real_shards(work, args.samples, smoke_dir=args.source)
    print(f"/proc/loadavg {open('/proc/loadavg').read().strip()}")
    if not args.skip_kfold:
        kfold(data_dir, work)
    if not args.skip_memory:
        memory(data_dir, work, [int(x) for x in args.processes.split(",")])
    print(json.dumps({"work_dir": work}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
