"""The augmentation layer's CPU cost with the pixel moved as a float32 word (what a GPU host uses: TF's GPU
ReverseV2 for int32 keeps its data in host memory) and as an int32 word (what a CPU uses), side by side.

    python -m bench.augment_words [--image_size 256 --batch_size 16 --repeats 7]

Prints samples/s (median of the repeats, the two variants interleaved) and their ratio, with /proc/loadavg.
The batch is generated in memory (no files, so no page cache is involved).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import tensorflow as tf

from model import augment


def _timed(fn, batch, calls: int) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        fn(batch).numpy()
    return (time.perf_counter() - t) / calls


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--calls", type=int, default=5, help="layer calls per timing")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    shape = (args.batch_size, args.image_size, args.image_size, 4)
    batch = tf.constant(rng.integers(0, 256, shape, dtype=np.uint8))
    shipped = augment.word_dtype
    variants = {"float32 word (GPU hosts)": tf.float32, "int32 word (CPU hosts)": tf.int32}
    fns = {}
    for name, word in variants.items():
        layer = augment.StainAugmentation(crop_size=args.image_size // 2, intensity_jitter=0.1, seed=0)
        augment.word_dtype = lambda word=word: word
        fns[name] = tf.function(lambda x, layer=layer: layer(x, training=True))
        fns[name](batch).numpy()  # traced with this word
    augment.word_dtype = shipped
    times: dict[str, list[float]] = {name: [] for name in fns}
    print(f"loadavg before: {open('/proc/loadavg').read().strip()}")
    for _ in range(args.repeats):
        for name, fn in fns.items():
            times[name].append(_timed(fn, batch, args.calls))
    print(f"loadavg after:  {open('/proc/loadavg').read().strip()}")
    rates = {name: args.batch_size / statistics.median(v) for name, v in times.items()}
    print(
        f"augmentation layer (dihedral + crop + jitter), batch {args.batch_size} x {args.image_size}px, CPU:"
    )
    for name, rate in rates.items():
        print(f"  {name:<24} {rate:9.1f} samples/s")
    a, b = rates.values()
    print(f"  ratio float32 / int32: {a / b:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
