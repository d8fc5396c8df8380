"""Benchmark of the preprocessing job against a plain multiprocessing loop doing the same work.

    python bench/preprocess.py [--num_samples 2000] [--repeats 3] [--workers N]

Builds a dataset of real competition PNG bytes (../shared/data/hpa-real-smoke replicated under new Ids,
labels drawn from the real label file), then, alternating, in the same run:
  - the Beam job (`pipelines.preprocess.run`, DirectRunner, multi-processing on all cores);
  - a plain `multiprocessing.Pool` loop over the same shard plan doing the same per-sample work: read the
    four files, full decode and validation (`pipelines.stains.validate_stains`), pixel statistics, record
    serialisation and TFRecord writing (the same functions the job calls).
Prints samples/s (median of the repeats), the ratio, per-core rate against FACTS.md's PIL decode ceiling
(155 samples/s on one core), bytes written / bytes read, and the Beam job's fixed cost (a 12-sample run),
which shows where the time goes at small scale.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script too

import schemas  # noqa: E402
from bench._common import build_real_dataset, median, print_table, timed  # noqa: E402
from pipelines import labels as labels_lib  # noqa: E402
from pipelines import (  # noqa: E402
    preprocess,  # noqa: E402
    stains,
    tfrecord,
)
from pipelines.transforms.folds import compute_folds  # noqa: E402
from pipelines.transforms.samples import Candidate  # noqa: E402
from pipelines.transforms.shards import plan_fold_shards  # noqa: E402

FACTS_PIL_CEILING_PER_CORE = 155.0  # samples/s, real PNGs, PIL x4, one core of this machine (FACTS.md)


def _write_shard(args) -> int:
    shard, out_dir = args
    written = 0
    with open(os.path.join(out_dir, shard.name), "wb") as out:
        for c in shard.samples:
            data = {}
            for stain, path in zip(schemas.STAINS, c.paths):
                with open(path, "rb") as f:
                    data[stain] = f.read()
            try:
                valid = stains.validate_stains(data)
            except stains.Rejected:
                continue
            sample = schemas.Sample(
                c.id,
                valid.images,
                valid.height,
                valid.width,
                schemas.labels_to_multi_hot(c.labels),
                shard.fold,
                c.source,
            )
            tfrecord.write_record(out, schemas.to_example(sample).SerializeToString())
            written += 1
    return written


def plain_loop(
    csv_path: str, image_dir: str, out_dir: str, workers: int, num_folds: int, shard_mb: float
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
    fold_of = compute_folds(cands, num_folds, seed=0, order=2, groups=None)
    shards = []
    for k in range(num_folds):
        shards += plan_fold_shards(k, [c for c in cands if fold_of[c.id] == k], shard_mb * 1e6, None)
    os.makedirs(out_dir, exist_ok=True)
    # chunksize 1, largest first: the same load balance a runner would aim for
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return sum(pool.imap_unordered(_write_shard, [(s, out_dir) for s in shards], chunksize=1))


def beam_job(
    csv_path: str, image_dir: str, out_dir: str, workers: int, num_folds: int, shard_mb: float
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
        ]
    )


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(path) for n in names)


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
    parser.add_argument("--work_dir", default=None, help="scratch folder (default: a temp dir, removed)")
    args = parser.parse_args(argv)

    root = args.work_dir or tempfile.mkdtemp(prefix="bench-preprocess-")
    try:
        csv_path, image_dir, bytes_in = build_real_dataset(os.path.join(root, "data"), args.num_samples)
        small_csv, small_dir, _ = build_real_dataset(os.path.join(root, "small"), 12)
        n = args.num_samples
        print(
            f"dataset: {n} samples of real PNG bytes, {bytes_in / 1e6:.0f} MB; {args.workers} workers; "
            f"{args.repeats} repeats",
            flush=True,
        )
        beam_times, loop_times, fixed_times = [], [], []
        for r in range(args.repeats):
            loop_out = os.path.join(root, "loop")
            shutil.rmtree(loop_out, ignore_errors=True)
            t, written = timed(
                plain_loop, csv_path, image_dir, loop_out, args.workers, args.num_folds, args.shard_mb
            )
            assert written == n, f"plain loop wrote {written} of {n}"
            loop_times.append(t)
            t, _ = timed(
                beam_job,
                csv_path,
                image_dir,
                os.path.join(root, "beam"),
                args.workers,
                args.num_folds,
                args.shard_mb,
            )
            beam_times.append(t)
            t, _ = timed(
                beam_job,
                small_csv,
                small_dir,
                os.path.join(root, "beam_small"),
                args.workers,
                2,
                args.shard_mb,
            )
            fixed_times.append(t)
            print(
                f"repeat {r + 1}: plain loop {loop_times[-1]:.1f} s, Beam job {beam_times[-1]:.1f} s, "
                f"Beam job on 12 samples {fixed_times[-1]:.1f} s",
                flush=True,
            )
        bytes_out = _dir_bytes(os.path.join(root, "beam", schemas.TFRECORD_DIR))
        loop_rate, beam_rate = n / median(loop_times), n / median(beam_times)
        fixed = median(fixed_times)
        marginal = n / max(median(beam_times) - fixed, 1e-9)
        rows = [
            [
                "plain multiprocessing loop",
                f"{median(loop_times):.1f}",
                f"{loop_rate:.1f}",
                f"{loop_rate / args.workers:.1f}",
                f"{loop_rate / args.workers / FACTS_PIL_CEILING_PER_CORE:.2f}",
                "1.00",
            ],
            [
                "Beam job (DirectRunner)",
                f"{median(beam_times):.1f}",
                f"{beam_rate:.1f}",
                f"{beam_rate / args.workers:.1f}",
                f"{beam_rate / args.workers / FACTS_PIL_CEILING_PER_CORE:.2f}",
                f"{beam_rate / loop_rate:.2f}",
            ],
            [
                "Beam job minus its fixed cost",
                f"{median(beam_times) - fixed:.1f}",
                f"{marginal:.1f}",
                f"{marginal / args.workers:.1f}",
                f"{marginal / args.workers / FACTS_PIL_CEILING_PER_CORE:.2f}",
                f"{marginal / loop_rate:.2f}",
            ],
        ]
        print_table(
            ["pipeline", "median s", "samples/s", "per core", "of decode ceiling", "vs loop"],
            rows,
            title=f"Preprocessing {n} real samples, {args.workers} cores (medians of {args.repeats})",
        )
        print(
            f"\nBeam job fixed cost (12-sample run, median): {fixed:.1f} s "
            "(worker start-up, TF import, tf.Transform analysis, publishing)"
        )
        print(
            f"bytes written / bytes read: {bytes_out / bytes_in:.3f} ({bytes_out / 1e6:.0f} MB / "
            f"{bytes_in / 1e6:.0f} MB; target <= 1.05)"
        )
        print(f"decode ceiling (FACTS.md): {FACTS_PIL_CEILING_PER_CORE:.0f} samples/s per core with PIL")
    finally:
        if not args.work_dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
