"""Benchmark of the gallery job (model.inspect): its time for N records against scoring them alone.

Writes N labeled records (one fold, random stains of --image_size px, 1-3 random labels each) and a model dir
with the `small` backbone (untrained: the time does not depend on the weights; thresholds at the 70th
percentile of each class's scores, so every row of a sheet has tiles), then times, in the same run, medians
of --repeats: (a) `model.predict.predict_scores` over the fold, the baseline (what any evaluation costs), and
(b) the whole `model.inspect.run` (scoring, selecting, Grad-CAM of every tile, drawing 28 sheets and
index.html), with its parts. Prints the load average; the records sit in the page cache after the first
pass (written just before).

Usage:
  python bench/inspect_gallery.py [--num_records 300] [--image_size 96] [--per_class 6] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def _write_data(root: str, n: int, size: int, seed: int = 0) -> None:
    import json

    import tensorflow as tf

    import schemas
    from tests.fixtures import png_bytes

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, schemas.TFRECORD_DIR), exist_ok=True)
    writers = [
        tf.io.TFRecordWriter(os.path.join(root, schemas.TFRECORD_DIR, schemas.shard_name(0, s, 4)))
        for s in range(4)
    ]
    for i in range(n):
        image = rng.integers(0, 256, (size, size, schemas.NUM_STAINS), dtype=np.uint8)
        labels = np.zeros(schemas.NUM_CLASSES, np.int64)
        labels[rng.choice(schemas.NUM_CLASSES, int(rng.integers(1, 4)), replace=False)] = 1
        sample = schemas.Sample(
            id=f"b{i:05d}",
            images={s: png_bytes(np.ascontiguousarray(image[..., k])) for k, s in enumerate(schemas.STAINS)},
            height=size,
            width=size,
            labels=labels,
            fold=0,
            source="bench",
        )
        writers[i % 4].write(schemas.to_example(sample).SerializeToString())
    for w in writers:
        w.close()
    manifest = {
        schemas.MANIFEST_SCHEMA_VERSION: schemas.SCHEMA_VERSION,
        schemas.MANIFEST_IMAGE_SIZE: [size, size],
        schemas.MANIFEST_NUM_FOLDS: 5,
        schemas.MANIFEST_WRITTEN: {schemas.written_key(0): n},
        schemas.MANIFEST_STAIN_STATS: {"mean": [128.0] * 4, "std": [74.0] * 4},
    }
    with open(os.path.join(root, schemas.MANIFEST_FILE), "w") as f:
        json.dump(manifest, f)


def _write_model_dir(path: str, data_dir: str, size: int, batch_size: int) -> None:
    from model import data as data_lib
    from model import predict
    from model.config import THRESHOLDS_FILE, DataConfig, ModelConfig
    from model.model import build_model
    from tests import fixtures

    mcfg = ModelConfig(backbone="small", weights="none")
    model = build_model(mcfg, [128.0] * 4, [74.0] * 4)
    fixtures.write_model_dir(path, model, mcfg, size, data_dir=data_dir)
    ds = data_lib.make_eval_dataset(
        data_dir, [0], DataConfig(image_size=size, batch_size=batch_size), with_ids=True
    )
    _, scores = predict.predict_scores([model], ds, (0,), log=None)
    thresholds = np.percentile(scores, 70, axis=0)
    fixtures.save_thresholds(os.path.join(path, THRESHOLDS_FILE), thresholds, num_samples=len(scores))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num_records", type=int, default=300)
    p.add_argument("--image_size", type=int, default=96)
    p.add_argument("--per_class", type=int, default=6)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    from model import data as data_lib
    from model import inspect as insp
    from model import predict
    from model.config import DataConfig

    root = tempfile.mkdtemp(prefix="bench-inspect-")
    data_dir, model_dir = os.path.join(root, "data"), os.path.join(root, "run")
    _write_data(data_dir, args.num_records, args.image_size)
    _write_model_dir(model_dir, data_dir, args.image_size, args.batch_size)
    model = predict.load_model_dir(model_dir)
    dcfg = DataConfig(image_size=args.image_size, batch_size=args.batch_size)
    print(f"load before: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    base, full, parts = [], [], []
    for r in range(args.repeats):
        t = time.perf_counter()
        ds = data_lib.make_eval_dataset(data_dir, [0], dcfg, with_ids=True)
        predict.predict_scores([model], ds, (0,), log=None)
        base.append(time.perf_counter() - t)
        cfg = insp.InspectConfig(
            model_dirs=(model_dir,),
            data_dir=data_dir,
            out=os.path.join(root, f"gallery{r}"),
            per_class=args.per_class,
            batch_size=args.batch_size,
        )
        s = insp.run(cfg, log=lambda m: None)
        full.append(s["seconds"])
        parts.append((s["score_seconds"], s["cam_seconds"], s["draw_seconds"], s["tiles"]))
    med = statistics.median
    print(f"load after:  {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    print(
        f"{args.num_records} records of {args.image_size} px, small backbone, CPU, "
        f"per_class {args.per_class}, "
        f"medians of {args.repeats} (records in the page cache)"
    )
    print(f"  scoring only (predict_scores, baseline): {med(base):.2f} s")
    print(
        f"  gallery (model.inspect.run):             {med(full):.2f} s = "
        f"{med(full) / med(base):.1f}x the baseline; "
        f"parts: load + score {med(p[0] for p in parts):.2f} s, Grad-CAM of {parts[0][3]} tiles "
        f"{med(p[1] for p in parts):.2f} s, drawing {med(p[2] for p in parts):.2f} s"
    )
    print(f"  sheets of the last run: {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
