"""Benchmark of the preprocessing job against a plain multiprocessing loop doing the same work.

    python bench/preprocess.py [--num_samples 2000] [--repeats 3] [--workers N] [--duplicates group|off]
        [--cache as-is|warm|cold] [--data_dir DIR]

Uses distinct files of distinct fields made from the real competition samples
(bench._common.build_distinct_dataset: no hard links, so the page cache cannot serve many samples from one
file), labels drawn from the real label file. Then, alternating, in the same run:
  - the Beam job (`pipelines.preprocess.run`, DirectRunner, multi-processing on all cores);
  - a plain `multiprocessing.Pool` loop doing the same work with the same functions: an inspection pass
    (read the four files, full decode and validation, pixel statistics, the perceptual hash unless
    `--duplicates off`, checksums), the fold assignment and shard plan, then a write pass (read the files
    again, record serialisation, TFRecord framing).
Both are timed on the full set and on 12 samples (their fixed cost: process start-up, imports, and for the
job tf.Transform's analysis and publishing); the table gives both raw and minus-fixed-cost rates, so they
are compared on the same terms. Before each run the share of the input in the page cache is measured
(`fincore` on a sample of the files) and printed; `--cache cold` evicts the input first, `warm` reads it.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script too

import numpy as np  # noqa: E402

import schemas  # noqa: E402
from bench._common import (  # noqa: E402
    build_distinct_dataset,
    cached_share,
    evict,
    median,
    print_table,
    timed,
    warm,
)
from pipelines import near_duplicates, preprocess, tfrecord  # noqa: E402
from pipelines.transforms.folds import compute_folds  # noqa: E402
from pipelines.transforms.images import checksums, inspect_candidate  # noqa: E402
from pipelines.transforms.samples import Candidate  # noqa: E402
from pipelines.transforms.shards import plan_fold_shards  # noqa: E402
from schemas import labels as labels_lib  # noqa: E402
from schemas import stains

FACTS_PIL_CEILING_PER_CORE = 155.0  # samples/s, real PNGs, PIL x4, one core of this machine (FACTS.md)


def _read_all(c) -> dict[str, bytes]:
    data = {}
    for stain, path in zip(schemas.STAINS, c.paths):
        with open(path, "rb") as f:
            data[stain] = f.read()
    return data


def _inspect(args):
    """The inspection pass of one sample (the job's function): (candidate, hash bytes) or None."""
    c, hashing = args
    try:
        return inspect_candidate(
            c, _read_all(c), None, False, near_duplicates.hash_stains if hashing else None
        )
    except stains.Rejected:
        return None


def _write_shard(args) -> int:
    shard, out_dir = args
    written = 0
    with open(os.path.join(out_dir, shard.name), "wb") as out:
        for c in shard.samples:
            data = _read_all(c)
            if checksums(data) != c.checksums:
                continue
            sample = schemas.Sample(
                c.id,
                data,
                c.height,
                c.width,
                schemas.labels_to_multi_hot(c.labels),
                shard.fold,
                c.source,
            )
            tfrecord.write_record(out, schemas.to_example(sample).SerializeToString())
            written += 1
    return written


def plain_loop(
    csv_path: str,
    image_dir: str,
    out_dir: str,
    workers: int,
    num_folds: int,
    shard_mb: float,
    duplicates: str,
) -> int:
    """The same work as the job, as a plain multiprocessing loop (no Beam). Returns samples written."""
    with open(csv_path) as f:
        rows = labels_lib.parse_label_table(f.read(), "train", image_dir, csv_path)
    cands = []
    for row in rows:
        checked = labels_lib.check_row(row)
        paths = tuple(os.path.join(image_dir, f"{row.id}_{s}.png") for s in schemas.STAINS)
        cands.append(
            Candidate("train", row.id, checked.labels, True, paths, sum(os.path.getsize(p) for p in paths))
        )
    hashing = duplicates != "off"
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        inspected = [r for r in pool.imap(_inspect, [(c, hashing) for c in cands], chunksize=16) if r]
    cands = [c for c, _ in inspected]
    groups = None
    if hashing:
        hashes = np.frombuffer(b"".join(h for _, h in inspected), np.uint64).reshape(len(cands), -1)
        labels = near_duplicates.duplicate_groups(hashes)
        groups = {c.id: int(g) for c, g in zip(cands, labels)}
    fold_of = compute_folds(cands, num_folds, seed=0, order=2, groups=groups)
    shards = []
    for k in range(num_folds):
        shards += plan_fold_shards(k, [c for c in cands if fold_of[c.id] == k], shard_mb * 1e6, None)
    os.makedirs(out_dir, exist_ok=True)
    # Fresh worker processes (spawn), as the job's: both pay their imports (TensorFlow for the records).
    # chunksize 1, largest first: the same load balance a runner would aim for
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return sum(pool.imap_unordered(_write_shard, [(s, out_dir) for s in shards], chunksize=1))


def beam_job(
    csv_path: str,
    image_dir: str,
    out_dir: str,
    workers: int,
    num_folds: int,
    shard_mb: float,
    duplicates: str,
) -> None:
    preprocess.run(
        [
            "--labels_csv",
            csv_path,
            "--input_dir",
            image_dir,
            "--output_dir",
            out_dir,
            "--num_folds",
            str(num_folds),
            "--shard_mb",
            str(shard_mb),
            "--overwrite",
            "--direct_num_workers",
            str(workers),
            "--direct_running_mode",
            "multi_processing",
            "--duplicates",
            duplicates,
            "--progress_seconds",
            "600",
        ]
    )


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(path) for n in names)


def _row(name: str, seconds: float, n: int, workers: int, base_rate: float) -> list[str]:
    rate = n / max(seconds, 1e-9)
    per_core = rate / workers
    return [
        name,
        f"{seconds:.1f}",
        f"{rate:.1f}",
        f"{per_core:.1f}",
        f"{per_core / FACTS_PIL_CEILING_PER_CORE:.2f}",
        f"{rate / base_rate:.2f}",
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num_samples", type=int, default=2000, help="samples to build (>= 1000)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (median reported)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes (default: all cores)")
    parser.add_argument("--num_folds", type=int, default=5)
    parser.add_argument(
        "--shard_mb",
        type=float,
        default=50.0,
        help="shard size; smaller than the job's default so every worker gets shards",
    )
    parser.add_argument("--duplicates", choices=("group", "off"), default="group", help="hashing and groups")
    parser.add_argument("--cache", choices=("as-is", "warm", "cold"), default="as-is", help="page cache")
    parser.add_argument("--data_dir", default=None, help="where the distinct-fields set is (or is made)")
    parser.add_argument("--work_dir", default=None, help="scratch folder (default: a temp dir, removed)")
    args = parser.parse_args(argv)

    root = args.work_dir or tempfile.mkdtemp(prefix="bench-preprocess-")
    try:
        data_dir = args.data_dir or os.path.join(root, "data")
        csv_path, image_dir = build_distinct_dataset(data_dir, args.num_samples, workers=args.workers)
        small_csv, small_dir = build_distinct_dataset(os.path.join(root, "small"), 12, workers=args.workers)
        paths = [os.path.join(image_dir, f) for f in os.listdir(image_dir)]
        bytes_in = sum(os.path.getsize(p) for p in paths)
        n = args.num_samples
        print(
            f"dataset: {n} samples of distinct fields in distinct PNG files, {bytes_in / 1e6:.0f} MB; "
            f"{args.workers} workers; {args.repeats} repeats; --duplicates {args.duplicates}; "
            f"cache {args.cache}; load average {os.getloadavg()}",
            flush=True,
        )
        times = {k: [] for k in ("loop", "beam", "loop12", "beam12")}
        cached = []

        def prepare():
            if args.cache == "cold":
                evict(paths)
            elif args.cache == "warm":
                warm(paths)
            cached.append(cached_share(paths))

        for r in range(args.repeats):
            common = (args.workers, args.num_folds, args.shard_mb, args.duplicates)
            for key, fn, csv_p, img, out in (
                ("loop", plain_loop, csv_path, image_dir, "loop"),
                ("beam", beam_job, csv_path, image_dir, "beam"),
                ("loop12", plain_loop, small_csv, small_dir, "loop12"),
                ("beam12", beam_job, small_csv, small_dir, "beam12"),
            ):
                out_dir = os.path.join(root, out)
                shutil.rmtree(out_dir, ignore_errors=True)
                if key in ("loop", "beam"):
                    prepare()
                t, _ = timed(fn, csv_p, img, out_dir, *common)
                times[key].append(t)
            print(
                f"repeat {r + 1}: plain loop {times['loop'][-1]:.1f} s, Beam job {times['beam'][-1]:.1f} s; "
                f"on 12 samples: loop {times['loop12'][-1]:.1f} s, job {times['beam12'][-1]:.1f} s; "
                f"load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
        bytes_out = _dir_bytes(os.path.join(root, "beam", schemas.TFRECORD_DIR))
        med = {k: median(v) for k, v in times.items()}
        loop_rate = n / med["loop"]
        loop_net = n / max(med["loop"] - med["loop12"], 1e-9)
        rows = [
            _row("plain multiprocessing loop", med["loop"], n, args.workers, loop_rate),
            _row("Beam job (DirectRunner)", med["beam"], n, args.workers, loop_rate),
            _row("plain loop minus its fixed cost", med["loop"] - med["loop12"], n, args.workers, loop_net),
            _row("Beam job minus its fixed cost", med["beam"] - med["beam12"], n, args.workers, loop_net),
        ]
        print_table(
            ["pipeline", "median s", "samples/s", "per core", "of decode ceiling", "vs loop"],
            rows,
            title=f"Preprocessing {n} distinct samples, {args.workers} cores (medians of {args.repeats})",
        )
        print(
            f"\nfixed cost (12-sample run, median): plain loop {med['loop12']:.1f} s, Beam job "
            f"{med['beam12']:.1f} s (start-up, imports; the job also tf.Transform's analysis and publishing)"
        )
        shown = ", ".join("unknown" if c is None else f"{100 * c:.0f} %" for c in cached)
        print(f"input in the page cache before each timed run: {shown}")
        print(
            f"bytes written / bytes read: {bytes_out / bytes_in:.3f} ({bytes_out / 1e6:.0f} MB / "
            f"{bytes_in / 1e6:.0f} MB; target <= 1.05)"
        )
        print(f"decode ceiling (FACTS.md): {FACTS_PIL_CEILING_PER_CORE:.0f} samples/s per core with PIL")
        print(f"load average at the end: {os.getloadavg()}")
    finally:
        if not args.work_dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
