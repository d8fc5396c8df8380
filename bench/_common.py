"""Shared helpers of the benchmarks: real-PNG datasets of any size, timing, table printing."""

from __future__ import annotations

import csv
import os
import random
import statistics
import subprocess
import sys
import time

# Benchmarks run as scripts (`python bench/x.py`) or modules (`python -m bench.x`) from the repo root.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402

import schemas  # noqa: E402

SHARED_DATA = os.path.join(_ROOT, "..", "shared", "data")
REAL_SMOKE = os.path.join(SHARED_DATA, "hpa-real-smoke")
REAL_LABELS = os.path.join(SHARED_DATA, "hpa-labels", "train.csv")


def read_label_rows(path: str) -> list[tuple[str, str]]:
    """(Id, Target) rows of a competition label file."""
    with open(path, newline="") as f:
        return [(r[schemas.CSV_ID], r[schemas.CSV_TARGET]) for r in csv.DictReader(f)]


def read_label_matrix(paths: str | list[str]) -> np.ndarray:
    """Reads one or more `Id,Target` label files into an (n, NUM_CLASSES) int8 multi-hot matrix."""
    rows = []
    for path in [paths] if isinstance(paths, str) else paths:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = {schemas.CSV_ID, schemas.CSV_TARGET} - set(reader.fieldnames or [])
            if missing:
                sys.exit(f"{path}: missing column(s) {sorted(missing)}")
            for rec in reader:
                rows.append(schemas.labels_to_multi_hot(int(t) for t in rec[schemas.CSV_TARGET].split()))
    if not rows:
        sys.exit(f"no labelled rows in {paths}")
    return np.stack(rows).astype(np.int8)


def build_real_dataset(
    root: str, num_samples: int, smoke_dir: str = REAL_SMOKE, labels_csv: str = REAL_LABELS, seed: int = 0
) -> tuple[str, str, int]:
    """Replicates the real four-stain samples of `smoke_dir` under new Ids into `root/train/`.

    Stain files are hard-linked when possible (copied otherwise), so every sample has real competition PNG
    bytes. Labels are drawn from the real label file (whole rows), so folds look like the real ones.

    Returns:
      (labels_csv path, image folder, total bytes of the stain files).
    """
    src_dir = os.path.join(smoke_dir, "train")
    if not os.path.isdir(src_dir):
        sys.exit(f"{src_dir} not found: these benchmarks need the real sample images (../shared/data)")
    base_ids = sorted({name.rsplit("_", 1)[0] for name in os.listdir(src_dir) if name.endswith(".png")})
    rng = np.random.default_rng(seed)
    targets = [t for _, t in read_label_rows(labels_csv)] if os.path.exists(labels_csv) else ["0"]
    image_dir = os.path.join(root, "train")
    os.makedirs(image_dir, exist_ok=True)
    rows, total = [], 0
    for i in range(num_samples):
        base = base_ids[i % len(base_ids)]
        sid = f"{base[:8]}-r{i:06d}"
        for stain in schemas.STAINS:
            src = os.path.join(src_dir, f"{base}_{stain}.png")
            dst = os.path.join(image_dir, f"{sid}_{stain}.png")
            if not os.path.exists(dst):
                try:
                    os.link(src, dst)
                except OSError:
                    with open(src, "rb") as f_in, open(dst, "wb") as f_out:
                        f_out.write(f_in.read())
            total += os.path.getsize(dst)
        rows.append((sid, targets[int(rng.integers(len(targets)))]))
    csv_path = os.path.join(root, "train.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([schemas.CSV_ID, schemas.CSV_TARGET])
        w.writerows(rows)
    return csv_path, image_dir, total


def build_real_shards(
    work_dir: str, num_samples: int, smoke_dir: str = REAL_SMOKE, image_size: int | None = None
) -> str:
    """Runs the preprocessing job on `num_samples` replicated real samples (`build_real_dataset`).

    Args:
      work_dir: where the images and the job's output go.
      num_samples: samples to replicate from `smoke_dir`.
      smoke_dir: folder of real samples (train/, train.csv).
      image_size: the job's --image_size (resize), None keeps the images' size.

    Returns:
      The preprocessing output directory (`work_dir/out`).
    """
    from pipelines import preprocess

    labels_csv, image_dir, _ = build_real_dataset(work_dir, num_samples, smoke_dir=smoke_dir)
    data_dir = os.path.join(work_dir, "out")
    print(f"building {num_samples} samples with the preprocessing job into {data_dir} ...", flush=True)
    argv = ["--labels_csv", labels_csv, "--input_dir", image_dir, "--output_dir", data_dir]
    seconds, _ = timed(preprocess.run, argv + (["--image_size", str(image_size)] if image_size else []))
    print(f"preprocessing took {seconds:.0f} s", flush=True)
    return data_dir


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    """(seconds, result) of one call."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def median(values) -> float:
    return float(statistics.median(values))


def print_table(headers: list[str], rows: list[list], title: str | None = None) -> None:
    """Prints a Markdown table (pasteable into notes)."""
    if title:
        print(f"\n{title}")
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    print("| " + " | ".join("-" * w for w in widths) + " |")
    for r in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


def _distinct_sample(task) -> int:
    """Writes sample `index` of a distinct-fields dataset (see build_distinct_dataset); returns its bytes."""
    from pipelines.synthetic import encode_png

    index, image_dir, sid, bases = task
    rng = np.random.default_rng([20261129, index])
    b, c = rng.choice(len(bases), size=2, replace=False)
    k, flip = int(rng.integers(4)), bool(rng.integers(2))
    shift_b = tuple(int(v) for v in rng.integers(0, 512, 2))
    shift_c = tuple(int(v) for v in rng.integers(0, 512, 2))
    alpha = float(rng.uniform(0.3, 0.8))
    total = 0
    for stain in schemas.STAINS:
        field = np.rot90(bases[b][stain], k)
        field = np.roll(field[:, ::-1] if flip else field, shift_b, axis=(0, 1))
        other = np.roll(bases[c][stain], shift_c, axis=(0, 1))
        mixed = np.maximum(field, (other * alpha).astype(np.uint8))
        data = encode_png(np.ascontiguousarray(mixed))
        path = os.path.join(image_dir, f"{sid}_{stain}.png")
        with open(path + ".tmp", "wb") as f:
            f.write(data)
        os.replace(path + ".tmp", path)
        total += len(data)
    return total


def distinct_id(index: int) -> str:
    return f"dx{index:06d}"


def build_distinct_dataset(
    root: str, num_samples: int, workers: int = 2, smoke_dir: str = REAL_SMOKE, labels_csv: str = REAL_LABELS
) -> tuple[str, str]:
    """A dataset of `num_samples` distinct fields made from the real four-stain samples of `smoke_dir`.

    Sample i is one real field, rotated/flipped and rolled by a random offset, mixed (pixel maximum) with
    another real field rolled elsewhere at 30-80 % intensity: distinct images, so near-duplicate grouping
    sees distinct samples, written as separate files (fast PNG encoder of pipelines.synthetic). Samples
    already on disk are kept, so the set can grow. Labels: whole rows of the real label file.

    Returns:
      (labels_csv path, image folder).
    """
    import multiprocessing

    from PIL import Image

    src_dir = os.path.join(smoke_dir, "train")
    if not os.path.isdir(src_dir):
        sys.exit(f"{src_dir} not found: these benchmarks need the real sample images (../shared/data)")
    base_ids = sorted({name.rsplit("_", 1)[0] for name in os.listdir(src_dir) if name.endswith(".png")})
    bases = [
        {
            s: np.asarray(Image.open(os.path.join(src_dir, f"{b}_{s}.png")).convert("L"))
            for s in schemas.STAINS
        }
        for b in base_ids
    ]
    image_dir = os.path.join(root, "train")
    os.makedirs(image_dir, exist_ok=True)
    have = set(os.listdir(image_dir))
    todo = [
        (i, image_dir, distinct_id(i), bases)
        for i in range(num_samples)
        if not all(f"{distinct_id(i)}_{s}.png" in have for s in schemas.STAINS)
    ]
    if todo:
        print(f"writing {len(todo)} distinct samples into {image_dir} ...", flush=True)
        t0 = time.perf_counter()
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for n, _ in enumerate(pool.imap(_distinct_sample, todo, chunksize=8), 1):
                if n % 1000 == 0:
                    rate = n / (time.perf_counter() - t0)
                    print(f"  {n}/{len(todo)} ({rate:.1f} samples/s)", flush=True)
    rng = np.random.default_rng(0)
    targets = [t for _, t in read_label_rows(labels_csv)] if os.path.exists(labels_csv) else ["0"]
    rows = [(distinct_id(i), targets[int(rng.integers(len(targets)))]) for i in range(num_samples)]
    csv_path = os.path.join(root, "train.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([schemas.CSV_ID, schemas.CSV_TARGET])
        w.writerows(rows)
    return csv_path, image_dir


def evict(paths: list[str]) -> None:
    """Drops these files' pages from the page cache (posix_fadvise DONTNEED; nothing else).

    Dirty pages (a file written moments ago) are not dropped by DONTNEED, so each file is synced first.
    """
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(paths: list[str]) -> None:
    """Reads the files once so that they are in the page cache."""
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 20):
                pass


def cached_share(paths: list[str], sample: int = 400) -> float | None:
    """Share of the bytes of a random sample of the files that is in the page cache (fincore), or None."""
    chosen = random.Random(0).sample(paths, min(sample, len(paths)))
    try:
        out = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--output", "RES,SIZE", *chosen],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    res = size = 0
    for line in out.splitlines():
        r, s = line.split()[:2]
        res, size = res + int(r), size + int(s)
    return min(1.0, res / size) if size else None  # pages are rounded up: RES can exceed SIZE
