"""Writing a synthetic dataset in the competition's file format, and its command line.

`generate(GeneratorConfig(...))` draws the label sets (`labels`), renders every sample (`render`) across
processes and writes `train/{Id}_{stain}.png`, `train.csv` and, with test samples, `test/`,
`sample_submission.csv` and the hidden answers `test_labels.csv`; `main(argv)` is `python -m
pipelines.synthetic`. Output bytes depend only on the configuration, never on the number of processes.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import io
import json
import multiprocessing
import os
import sys
import time
import uuid
from typing import Sequence

import numpy as np

import schemas
from pipelines.synthetic.labels import BALANCES, TEMPERED_POWER, draw_label_sets, read_label_sets
from pipelines.synthetic.png import encode_png
from pipelines.synthetic.render import MIN_IMAGE_SIZE, RenderConfig, render_stains, sample_seed
from schemas import atomic, cli

PROGRESS_SECONDS = 10.0
PROG = "hpa-synthetic"
TRAIN_DIR = "train"
TEST_DIR = "test"
TRAIN_CSV = "train.csv"
TEST_LABELS_CSV = "test_labels.csv"
SUBMISSION_CSV = "sample_submission.csv"
CONFIG_JSON = "synthetic_config.json"


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    """What `generate` writes.

    Attributes:
      output_dir: dataset root (gets train/, train.csv and, with test samples, test/, sample_submission.csv,
        test_labels.csv).
      num_samples: labeled (train) samples.
      image_size: side of the square images in pixels.
      seed: master seed; every output byte follows from it and the other fields.
      class_balance: `hpa` (competition frequencies), `tempered` (flattened, default) or `uniform`.
      labels_csv: optional real label file (`Id,Target`) to draw whole label sets from.
      test_samples: unlabeled samples written to test/ (answers in test_labels.csv).
      workers: processes (does not change the output).
      overwrite: replace an existing dataset in output_dir.
      render: difficulty knobs.
    """

    output_dir: str
    num_samples: int = 2000
    image_size: int = 512
    seed: int = 0
    class_balance: str = "tempered"
    labels_csv: str | None = None
    test_samples: int = 0
    workers: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)
    overwrite: bool = False
    render: RenderConfig = RenderConfig()

    def validate(self) -> None:
        """Raises ValueError with a clear message on a bad setting."""
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {self.num_samples}")
        if self.test_samples < 0:
            raise ValueError(f"test_samples must be 0 or more, got {self.test_samples}")
        if self.image_size < MIN_IMAGE_SIZE:
            raise ValueError(
                f"image_size must be at least {MIN_IMAGE_SIZE} px to hold cells with visible patterns, "
                f"got {self.image_size}"
            )
        if self.class_balance not in BALANCES:
            raise ValueError(
                f"unknown class_balance {self.class_balance!r}; choose one of {', '.join(BALANCES)}"
            )
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        if not self.output_dir:
            raise ValueError("output_dir must be given")


def sample_id(seed: int, index: int, test: bool = False) -> str:
    """A competition-style Id (UUID text) determined by the seed, split and index."""
    rng = np.random.default_rng(sample_seed(seed, index, test).spawn(1)[0])
    return str(uuid.UUID(bytes=rng.bytes(16), version=1))


def _write_one(task) -> int:
    seed, index, test, sid, labels, image_size, image_dir, render = task
    stains = render_stains(sample_seed(seed, index, test), labels, image_size, render)
    for stain in schemas.STAINS:  # renamed into place: a kill leaves no half-written image
        atomic.write_bytes(
            os.path.join(image_dir, f"{sid}_{stain}.png"), encode_png(stains[stain]), sync=False
        )
    return index


def _prepare_output(cfg: GeneratorConfig) -> None:
    targets = [TRAIN_DIR, TEST_DIR, TRAIN_CSV, TEST_LABELS_CSV, SUBMISSION_CSV, CONFIG_JSON]
    existing = [t for t in targets if os.path.exists(os.path.join(cfg.output_dir, t))]
    config_path = os.path.join(cfg.output_dir, CONFIG_JSON)
    previous = None
    if os.path.exists(config_path):
        with open(config_path) as f:
            previous = json.load(f)
    # config.json is written last: without it the folder holds an interrupted run, which the same command
    # (or any other) finishes; a complete dataset of the same settings is written again (the same bytes).
    if existing and previous is not None and previous != _resolved(cfg) and not cfg.overwrite:
        raise FileExistsError(
            f"{cfg.output_dir!r} already holds a dataset ({', '.join(existing)}); "
            "pick a new directory or pass --overwrite"
        )
    for t in existing:
        path = os.path.join(cfg.output_dir, t)
        if os.path.isdir(path):
            for name in os.listdir(path):
                if name.endswith(".png"):
                    os.remove(os.path.join(path, name))
        else:
            os.remove(path)
    for name in (TRAIN_DIR, TEST_DIR):  # what a killed run was writing
        atomic.remove_temporaries(os.path.join(cfg.output_dir, name))
    os.makedirs(os.path.join(cfg.output_dir, TRAIN_DIR), exist_ok=True)
    if cfg.test_samples:
        os.makedirs(os.path.join(cfg.output_dir, TEST_DIR), exist_ok=True)


def _write_csv(path: str, header: tuple[str, str], rows) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    atomic.write_bytes(path, buf.getvalue().encode("utf-8"))


def _resolved(cfg: GeneratorConfig) -> dict:
    """config.json's content: what decides the bytes (not where or how the run went)."""
    resolved = json.loads(json.dumps(dataclasses.asdict(cfg)))
    for key in ("output_dir", "workers", "overwrite"):
        resolved.pop(key)
    return resolved


def generate(cfg: GeneratorConfig, log=print) -> dict:
    """Renders and writes a whole dataset.

    Args:
      cfg: what to write.
      log: progress printer (None for silence).

    Returns:
      A summary: counts, per-class positives, seconds, samples per second.

    Raises:
      ValueError, FileNotFoundError, FileExistsError: bad configuration or labels file, occupied output.
    """
    cfg.validate()
    log = log or (lambda *a, **k: None)
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(2,)))
    total = cfg.num_samples + cfg.test_samples
    if cfg.labels_csv:
        pool = read_label_sets(cfg.labels_csv)
        labels = pool[rng.integers(0, len(pool), total)]
    else:
        labels = draw_label_sets(total, cfg.class_balance, rng)
    _prepare_output(cfg)

    tasks, train_rows, test_rows = [], [], []
    for i in range(total):
        test = i >= cfg.num_samples
        index = i - cfg.num_samples if test else i
        sid = sample_id(cfg.seed, index, test)
        labs = schemas.multi_hot_to_labels(labels[i])
        (test_rows if test else train_rows).append((sid, " ".join(map(str, labs))))
        image_dir = os.path.join(cfg.output_dir, TEST_DIR if test else TRAIN_DIR)
        tasks.append((cfg.seed, index, test, sid, labs, cfg.image_size, image_dir, cfg.render))

    start = last = time.perf_counter()
    done = 0

    def progress():  # a line every PROGRESS_SECONDS while rendering; the summary line says the end
        nonlocal last
        now = time.perf_counter()
        if now - last >= PROGRESS_SECONDS and done < total:
            last = now
            el = now - start
            log(
                f"rendered {done}/{total} samples ({100 * done / total:.0f}%, {done / max(el, 1e-9):.1f} "
                f"samples/s, {el:.0f} s)",
                flush=True,
            )

    workers = min(cfg.workers, total)
    if workers == 1:
        for t in tasks:
            _write_one(t)
            done += 1
            progress()
    else:
        ctx = multiprocessing.get_context("spawn")  # safe even when the caller has threads (TF, Beam)
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as ex:
            for _ in ex.map(_write_one, tasks, chunksize=max(1, min(16, total // (workers * 8)))):
                done += 1
                progress()
    seconds = time.perf_counter() - start

    _write_csv(os.path.join(cfg.output_dir, TRAIN_CSV), (schemas.CSV_ID, schemas.CSV_TARGET), train_rows)
    if cfg.test_samples:
        _write_csv(
            os.path.join(cfg.output_dir, TEST_LABELS_CSV), (schemas.CSV_ID, schemas.CSV_TARGET), test_rows
        )
        _write_csv(
            os.path.join(cfg.output_dir, SUBMISSION_CSV),
            (schemas.CSV_ID, schemas.CSV_PREDICTED),
            [(sid, "0") for sid, _ in test_rows],
        )
    text = json.dumps(_resolved(cfg), indent=2)  # last: marks a complete dataset
    atomic.write_bytes(os.path.join(cfg.output_dir, CONFIG_JSON), text.encode("utf-8"))
    summary = {
        "train_samples": cfg.num_samples,
        "test_samples": cfg.test_samples,
        "positives_per_class": labels[: cfg.num_samples].sum(axis=0).tolist(),
        "seconds": seconds,
        "samples_per_second": total / max(seconds, 1e-9),
        "workers": workers,
    }
    log(
        f"wrote {cfg.num_samples} train + {cfg.test_samples} test samples of {cfg.image_size} px to "
        f"{cfg.output_dir} in {seconds:.1f} s with {workers} process(es)"
    )
    return summary


# ----------------------------------------------------------------------------------------------------
# Entry point


def _parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog=PROG,
        description="Synthetic HPA-like dataset in the competition's own file format: fields of cells "
        "whose green protein stain shows one spatial pattern per label, written as "
        "{Id}_{red,green,blue,yellow}.png plus train.csv like the competition's data.",
    )
    d = GeneratorConfig(output_dir="")  # the defaults live in the dataclass
    p.add_argument(
        "--output_dir", required=True, help="dataset root to write (train/, train.csv, ...): a local folder"
    )
    p.add_argument(
        "--num_samples",
        type=int,
        default=d.num_samples,
        help=f"labeled samples in train/ (default {d.num_samples})",
    )
    p.add_argument(
        "--image_size", type=int, default=d.image_size, help=f"image side in pixels (default {d.image_size})"
    )
    p.add_argument(
        "--seed", type=int, default=d.seed, help=f"master seed: same seed, same bytes (default {d.seed})"
    )
    p.add_argument(
        "--class_balance",
        choices=BALANCES,
        default=d.class_balance,
        help="class frequencies: hpa (the competition's), tempered (count**%g, the default) or uniform"
        % TEMPERED_POWER,
    )
    p.add_argument(
        "--labels_csv", default=None, help="draw whole label sets from this local Id,Target file instead"
    )
    p.add_argument(
        "--test_samples",
        type=int,
        default=d.test_samples,
        help="unlabeled samples in test/ (answers in test_labels.csv)",
    )
    p.add_argument("--workers", type=int, default=d.workers, help="processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in output_dir")
    return p


@cli.command(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    for flag, path in (("--output_dir", args.output_dir), ("--labels_csv", args.labels_csv)):
        if path and "://" in path:
            parser.error(f"{flag} {path}: the generator reads and writes local files only (copy with gsutil)")
    cfg = GeneratorConfig(
        output_dir=args.output_dir,
        num_samples=args.num_samples,
        image_size=args.image_size,
        seed=args.seed,
        class_balance=args.class_balance,
        labels_csv=args.labels_csv,
        test_samples=args.test_samples,
        workers=args.workers,
        overwrite=args.overwrite,
    )
    try:
        generate(cfg)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        return cli.bad_input(PROG, e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
