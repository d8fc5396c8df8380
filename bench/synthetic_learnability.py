"""Learnability of the synthetic dataset: a small CNN against an intensity-statistics baseline.

    python bench/synthetic_learnability.py [--num_samples 3000] [--image_size 128] [--train_minutes 5]

Generates a dataset with `pipelines.synthetic` (or reads one given with --data_dir), loads the PNGs with PIL,
splits it 70/15/15 into train/validation/test, and reports held-out macro F1 of
  * the project's own `small` model (`model.model.build_model`: uint8 in, StainNormalization by the training
    split's per-stain mean/std, 4 conv blocks, average pooling), trained as the demo trains it (Adam, batch
    32, the 8 flips/rotations, binary cross-entropy, the demo's learning rate and plateau schedule) for a
    fixed time budget on CPU,
  * a baseline that sees only per-stain intensity statistics (mean, std, percentiles of each channel) through
    one-vs-rest logistic regression,
each at a 0.5 threshold and with per-class thresholds tuned on the validation split. The generator is meant to
make the CNN land between 0.70 and 0.95 and keep the baseline at or below 0.40. It also prints generation
speed at 512 px (samples/s on one core, medians over repeats) next to the same renderer with Pillow's PNG
encoder. Images come straight from the PNGs (not through the project's TFRecord pipeline).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import schemas  # noqa: E402
from pipelines import synthetic  # noqa: E402


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Settings of the benchmark (see --help)."""

    num_samples: int = 3000
    image_size: int = 128
    seed: int = 0
    class_balance: str = "tempered"
    data_dir: str | None = None
    workers: int = os.cpu_count() or 1
    train_minutes: float = 5.0
    max_epochs: int = 30
    batch_size: int = 32
    learning_rate: float = 3e-3
    lr_patience: int = 3
    lr_factor: float = 0.3
    speed_samples: int = 16
    speed_repeats: int = 3
    skip_cnn: bool = False


# ----------------------------------------------------------------------------------------------------
# Data


def load_dataset(root: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Reads `root/train.csv` and `root/train/*.png` into (ids, uint8 [N, H, W, 4], multi-hot [N, C])."""
    with open(os.path.join(root, synthetic.TRAIN_CSV), newline="") as f:
        rows = list(csv.DictReader(f))
    ids = [r[schemas.CSV_ID] for r in rows]
    y = np.stack([schemas.labels_to_multi_hot(map(int, r[schemas.CSV_TARGET].split())) for r in rows])
    first = np.asarray(
        Image.open(os.path.join(root, synthetic.TRAIN_DIR, f"{ids[0]}_{schemas.STAINS[0]}.png"))
    )
    x = np.empty((len(ids), *first.shape, schemas.NUM_STAINS), dtype=np.uint8)
    for i, sid in enumerate(ids):
        for k, stain in enumerate(schemas.STAINS):
            x[i, :, :, k] = np.asarray(
                Image.open(os.path.join(root, synthetic.TRAIN_DIR, f"{sid}_{stain}.png"))
            )
    return ids, x, y


def split_indices(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random 70/15/15 train/validation/test split."""
    order = np.random.default_rng(seed).permutation(n)
    a, b = int(0.7 * n), int(0.85 * n)
    return order[:a], order[a:b], order[b:]


# ----------------------------------------------------------------------------------------------------
# Metrics


def f1_per_class(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Per-class F1 (0 where a class has neither positives nor predictions)."""
    tp = (y_true * y_pred).sum(0)
    denom = y_true.sum(0) + y_pred.sum(0)
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def tune_thresholds(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per-class threshold maximising validation F1 over a grid (0.5 for a class without positives)."""
    grid = np.linspace(0.02, 0.95, 48)
    out = np.full(y_true.shape[1], 0.5)
    for c in range(y_true.shape[1]):
        if y_true[:, c].sum() == 0:
            continue
        f1s = [f1_per_class(y_true[:, c : c + 1], (scores[:, c : c + 1] >= t).astype(int))[0] for t in grid]
        out[c] = grid[int(np.argmax(f1s))]
    return out


def evaluate(y_val, s_val, y_test, s_test) -> dict:
    """Macro F1 on the test split at 0.5 and at thresholds tuned on the validation split."""
    th = tune_thresholds(y_val, s_val)
    per_class = f1_per_class(y_test, (s_test >= th).astype(int))
    return {
        "f1_at_0.5": float(f1_per_class(y_test, (s_test >= 0.5).astype(int)).mean()),
        "f1_tuned": float(per_class.mean()),
        "per_class_tuned": per_class,
    }


# ----------------------------------------------------------------------------------------------------
# Models


def intensity_features(x: np.ndarray) -> np.ndarray:
    """Per-channel mean, std and percentiles (1, 5, 25, 50, 75, 95, 99) -> [N, 9 * channels]."""
    flat = x.reshape(x.shape[0], -1, x.shape[-1]).astype(np.float32)
    pct = np.percentile(flat, [1, 5, 25, 50, 75, 95, 99], axis=1)  # [7, N, C]
    feats = [flat.mean(1), flat.std(1), *pct]
    return np.concatenate(feats, axis=1)


def run_baseline(x, y, tr, va, te) -> tuple[dict, float]:
    """Intensity statistics -> standardised -> one-vs-rest logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    start = time.perf_counter()
    f = intensity_features(x)
    clf = make_pipeline(StandardScaler(), OneVsRestClassifier(LogisticRegression(max_iter=2000)))
    clf.fit(f[tr], y[tr])
    res = evaluate(y[va], clf.predict_proba(f[va]), y[te], clf.predict_proba(f[te]))
    return res, time.perf_counter() - start


def stain_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-stain mean and std in 0..255 units (what the preprocessing job's manifest gives the model)."""
    flat = x.reshape(-1, x.shape[-1])
    mean = [float(flat[:, k].mean(dtype=np.float64)) for k in range(flat.shape[1])]
    std = [max(float(flat[:, k].std(dtype=np.float64)), 1e-3) for k in range(flat.shape[1])]
    return mean, std


def run_cnn(x, y, tr, va, te, cfg: BenchConfig) -> tuple[dict, float, int]:
    """Trains the project's `small` model as the demo does, for a fixed time budget.

    `model.model.build_model` with the small backbone (uint8 in, `StainNormalization` by the training split's
    per-stain mean/std, 4 conv blocks, global average pooling, dropout, sigmoid), Adam, binary cross-entropy,
    batch 32, the 8 flips/right-angle rotations, ReduceLROnPlateau like `model.train`. Training stops when the
    next epoch would overrun the budget (or at max_epochs); the weights of the best validation loss are kept.
    """
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(os.cpu_count() or 1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras

    from model.config import WEIGHTS_NONE, ModelConfig
    from model.data import NUM_DIHEDRAL, dihedral
    from model.model import build_model

    keras.utils.set_random_seed(cfg.seed)

    def augment(img, lab):
        return dihedral(img, tf.random.uniform([], 0, NUM_DIHEDRAL, dtype=tf.int32)), lab

    train_ds = (
        tf.data.Dataset.from_tensor_slices((x[tr], y[tr].astype(np.float32)))
        .shuffle(len(tr), seed=cfg.seed)
        .map(augment, num_parallel_calls=tf.data.AUTOTUNE)
        .batch(cfg.batch_size)
        .prefetch(2)
    )
    mean, std = stain_stats(x[tr])
    model = build_model(ModelConfig(backbone="small", weights=WEIGHTS_NONE), mean, std)
    model.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate), loss="binary_crossentropy")
    xv, yv = x[va], y[va].astype(np.float32)
    start = time.perf_counter()
    best, best_weights, epochs, stale = np.inf, None, 0, 0
    for epoch in range(cfg.max_epochs):
        t0 = time.perf_counter()
        hist = model.fit(train_ds, validation_data=(xv, yv), epochs=1, verbose=0)
        val_loss = float(hist.history["val_loss"][0])
        epochs += 1
        per_epoch = time.perf_counter() - t0
        print(
            f"  epoch {epoch + 1}: loss {hist.history['loss'][0]:.4f} val_loss {val_loss:.4f} "
            f"lr {float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)):.0e} ({per_epoch:.0f} s)",
            flush=True,
        )
        if val_loss < best:
            best, best_weights, stale = val_loss, model.get_weights(), 0
        else:  # model.train's ReduceLROnPlateau, across the one-epoch fits
            stale += 1
            if stale >= cfg.lr_patience:
                lr = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
                model.optimizer.learning_rate = max(lr * cfg.lr_factor, 1e-7)
                stale = 0
        if time.perf_counter() - start + per_epoch > cfg.train_minutes * 60:
            break
    train_s = time.perf_counter() - start
    model.set_weights(best_weights)
    s_val = model.predict(xv, batch_size=128, verbose=0)
    s_test = model.predict(x[te], batch_size=128, verbose=0)
    return evaluate(y[va], s_val, y[te], s_test), train_s, epochs


# ----------------------------------------------------------------------------------------------------
# Generation speed


def _pil_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def generation_speed(cfg: BenchConfig) -> dict[str, float]:
    """Samples/s on one core at 512 px: render only, + this PNG encoder, + Pillow's encoder (medians).

    The process is pinned to one core while it measures (where the OS allows), then unpinned.
    """
    pinned = hasattr(os, "sched_setaffinity")
    if pinned:
        cores = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {min(cores)})
    try:
        return _generation_speed(cfg)
    finally:
        if pinned:
            os.sched_setaffinity(0, cores)


def _generation_speed(cfg: BenchConfig) -> dict[str, float]:
    labels = synthetic.draw_label_sets(cfg.speed_samples, cfg.class_balance, np.random.default_rng(cfg.seed))
    label_lists = [schemas.multi_hot_to_labels(r) for r in labels]
    results: dict[str, list[float]] = {
        "render only": [],
        "render + encode_png": [],
        "render + Pillow PNG": [],
    }
    for rep in range(cfg.speed_repeats):
        for name, enc in (
            ("render only", None),
            ("render + encode_png", synthetic.encode_png),
            ("render + Pillow PNG", _pil_png),
        ):
            start = time.perf_counter()
            for i, labs in enumerate(label_lists):
                stains = synthetic.render_stains(synthetic.sample_seed(cfg.seed + 1000 + rep, i), labs, 512)
                if enc is not None:
                    for stain in schemas.STAINS:
                        enc(stains[stain])
            results[name].append(len(label_lists) / (time.perf_counter() - start))
    return {k: float(np.median(v)) for k, v in results.items()}


# ----------------------------------------------------------------------------------------------------
# Entry point


def run(cfg: BenchConfig) -> dict:
    """Runs the whole benchmark and prints its tables; returns the figures."""
    speed = {}
    if cfg.speed_repeats > 0:
        print(
            f"generation speed at 512 px, one process, medians of {cfg.speed_repeats} x "
            f"{cfg.speed_samples} samples:"
        )
        speed = generation_speed(cfg)
        print("| variant | samples/s per core |\n| --- | --- |")
        for k, v in speed.items():
            print(f"| {k} | {v:.1f} |")
        print(f"(load average now: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)", flush=True)

    with tempfile.TemporaryDirectory(prefix="synthetic_bench_") as tmp:
        root = cfg.data_dir or tmp
        if not (cfg.data_dir and os.path.exists(os.path.join(root, synthetic.TRAIN_CSV))):
            gen = synthetic.GeneratorConfig(
                output_dir=root,
                num_samples=cfg.num_samples,
                image_size=cfg.image_size,
                seed=cfg.seed,
                class_balance=cfg.class_balance,
                workers=cfg.workers,
            )
            summary = synthetic.generate(gen, log=None)
            print(
                f"generated {cfg.num_samples} samples at {cfg.image_size} px in {summary['seconds']:.1f} s "
                f"({summary['samples_per_second']:.0f} samples/s with {summary['workers']} processes)",
                flush=True,
            )
        _, x, y = load_dataset(root)
    tr, va, te = split_indices(len(y), cfg.seed)
    print(
        f"split {len(tr)}/{len(va)}/{len(te)}; test positives per class: min {int(y[te].sum(0).min())}, "
        f"median {int(np.median(y[te].sum(0)))}",
        flush=True,
    )
    base, base_s = run_baseline(x, y, tr, va, te)
    print(f"baseline done in {base_s:.0f} s", flush=True)
    rows = [("intensity statistics + logistic regression", base, f"{base_s:.0f} s", "-")]
    if not cfg.skip_cnn:
        cnn, cnn_s, epochs = run_cnn(x, y, tr, va, te, cfg)
        rows.append(("project small CNN (flips/rot90, BCE)", cnn, f"{cnn_s:.0f} s", str(epochs)))
    print(
        f"\nheld-out macro F1 on {len(te)} test samples ({cfg.image_size} px, balance {cfg.class_balance}):"
    )
    print("| model | macro F1 @0.5 | macro F1, tuned thresholds | train time | epochs |")
    print("| --- | --- | --- | --- | --- |")
    for name, res, t, ep in rows:
        print(f"| {name} | {res['f1_at_0.5']:.3f} | {res['f1_tuned']:.3f} | {t} | {ep} |")
    print("\nper-class F1 (tuned thresholds):")
    print("| class | test positives | " + " | ".join(r[0].split(" (")[0] for r in rows) + " |")
    print("| --- | --- |" + " --- |" * len(rows))
    for c, name in enumerate(schemas.CLASS_NAMES):
        vals = " | ".join(f"{r[1]['per_class_tuned'][c]:.2f}" for r in rows)
        print(f"| {c} {name} | {int(y[te][:, c].sum())} | {vals} |")
    print("\nper-class F1 summary (tuned thresholds):")
    print("| model | min | median | max | classes >= 0.5 | classes >= 0.8 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, res, _, _ in rows:
        f = res["per_class_tuned"]
        n = len(f)
        print(
            f"| {name} | {f.min():.2f} | {np.median(f):.2f} | {f.max():.2f} "
            f"| {int((f >= 0.5).sum())}/{n} | {int((f >= 0.8).sum())}/{n} |"
        )
    return {"speed": speed, "results": {r[0]: r[1] for r in rows}}


def main(argv=None) -> int:
    """Command-line entry point."""
    d = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument(
        "--num_samples", type=int, default=d.num_samples, help="samples to generate (default %(default)s)"
    )
    p.add_argument(
        "--image_size", type=int, default=d.image_size, help="image side in px (default %(default)s)"
    )
    p.add_argument("--seed", type=int, default=d.seed, help="generator and split seed (default %(default)s)")
    p.add_argument(
        "--class_balance", choices=synthetic.BALANCES, default=d.class_balance, help="label balance"
    )
    p.add_argument("--data_dir", default=None, help="reuse/keep the dataset here instead of a temp dir")
    p.add_argument("--workers", type=int, default=d.workers, help="generator processes (default: all cores)")
    p.add_argument(
        "--train_minutes", type=float, default=d.train_minutes, help="CNN time budget (default %(default)s)"
    )
    p.add_argument("--max_epochs", type=int, default=d.max_epochs, help="CNN epoch cap (default %(default)s)")
    p.add_argument(
        "--learning_rate", type=float, default=d.learning_rate, help="Adam LR (default %(default)s)"
    )
    p.add_argument(
        "--lr_patience", type=int, default=d.lr_patience, help="epochs without progress before the LR falls"
    )
    p.add_argument("--lr_factor", type=float, default=d.lr_factor, help="LR factor on a plateau")
    p.add_argument("--speed_samples", type=int, default=d.speed_samples, help="samples per speed repeat")
    p.add_argument(
        "--speed_repeats", type=int, default=d.speed_repeats, help="speed repeats (median; 0: no speed table)"
    )
    p.add_argument("--skip_cnn", action="store_true", help="only the baseline (quick difficulty check)")
    a = p.parse_args(argv)
    if a.num_samples < 20:
        p.error("--num_samples must be at least 20 to split into train/validation/test")
    cfg = BenchConfig(
        **{f.name: getattr(a, f.name) for f in dataclasses.fields(BenchConfig) if hasattr(a, f.name)}
    )
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
