"""The cost of recomputing BatchNorm statistics for the averaged weights (`--ema_bn_batches`), by the epoch.

    python -m bench.ema_batchnorm [--work_dir /tmp/hpa-ema-bn] [--per_fold 1200] [--image_size 32]
        [--batch_size 16] [--epochs 3]

Writes a dataset of generated stains (3 folds of --per_fold records, PNG in TFRecords, `tests.test_data`),
then trains `hpa-train --ema` on it (small backbone, --cache memory) twice, in one process: with the default
recompute (about 2,048 samples) and with `--ema_bn_batches 0` (the baseline). Prints, per epoch after the
first (which traces), the epoch's wall time (training, validation, checkpoint, backup) of both runs and the
recompute's own seconds, their medians and ratios, with /proc/loadavg before and after. The dataset is read
once per run into the in-memory cache (its files were just written: in the page cache).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(argv: list[str]) -> tuple[list[float], list[float]]:
    """(epoch seconds, recompute seconds) of one training run."""
    import keras

    from model import batchnorm, train
    from model import callbacks as callbacks_lib

    epochs: list[float] = []
    recomputes: list[float] = []

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):  # the last callback: after checkpoint and backup
            epochs.append(time.perf_counter() - self.start)

    make, call = callbacks_lib.make_callbacks, batchnorm.Recompute.__call__

    def timed_call(self, batches, say=None):
        start = time.perf_counter()
        try:
            return call(self, batches, say)
        finally:
            recomputes.append(time.perf_counter() - start)

    callbacks_lib.make_callbacks = lambda *a, **k: [*make(*a, **k), EpochTimer()]
    batchnorm.Recompute.__call__ = timed_call
    try:
        train.run(argv)
    finally:
        callbacks_lib.make_callbacks, batchnorm.Recompute.__call__ = make, call
    return epochs, recomputes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", default="/tmp/hpa-ema-bn")
    p.add_argument("--per_fold", type=int, default=1200, help="records per fold (3 folds; 2 train)")
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args(argv)
    if args.epochs < 2:
        p.error("--epochs must be >= 2 (the first epoch traces and is not counted)")
    from tests.test_data import write_dataset

    data_dir = os.path.join(args.work_dir, "data")
    if not os.path.exists(os.path.join(data_dir, "manifest.json")):
        print(f"writing 3 x {args.per_fold} records of {args.image_size} px into {data_dir} ...", flush=True)
        write_dataset(data_dir, per_fold=(args.per_fold,) * 3, size=args.image_size, shards_per_fold=4)
    flags = ["--data_dir", data_dir, "--backbone", "small", "--weights", "none", "--cache", "memory"]
    flags += ["--epochs", str(args.epochs), "--batch_size", str(args.batch_size), "--ema", "--seed", "0"]
    flags += ["--verbose", "0", "--overwrite"]
    print(f"loadavg before: {open('/proc/loadavg').read().strip()}", flush=True)
    arms = {}
    for name, extra in (("off", ["--ema_bn_batches", "0"]), ("recompute", [])):
        model_dir = os.path.join(args.work_dir, name)
        arms[name] = _run([*flags, "--model_dir", model_dir, *extra])
    print(f"loadavg after:  {open('/proc/loadavg').read().strip()}")
    (off, _), (on, costs) = arms["off"], arms["recompute"]
    steps = 2 * args.per_fold // args.batch_size
    print(
        f"\n--ema, small backbone, {args.image_size} px, batch {args.batch_size}, {steps} steps per epoch, "
        f"{2 * args.per_fold} training samples, CPU; epochs 2..{args.epochs} (the first traces):"
    )
    print(f"{'epoch':>5} {'epoch s (bn off)':>17} {'epoch s (recompute)':>20} {'recompute s':>12}")
    for e in range(1, args.epochs):
        print(f"{e + 1:>5} {off[e]:>17.1f} {on[e]:>20.1f} {costs[e]:>12.2f}")
    m_off, m_on, m_cost = (statistics.median(v[1:]) for v in (off, on, costs))
    print(f"median {m_off:>16.1f} {m_on:>20.1f} {m_cost:>12.2f}")
    print(
        f"recompute / epoch (bn off): {m_cost / m_off:.3f};  epoch with / without: {m_on / m_off:.3f};  "
        f"first recompute (traces): {costs[0]:.2f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
