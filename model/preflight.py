"""The training job's preflight: one training step at the configured batch before any data is read.

On a GPU a batch that does not fit fails with TensorFlow's ResourceExhaustedError after the data pipeline
has started (minutes in, on a big dataset), as a long traceback. `check_batch_fits` runs one step of a
throwaway copy of the model on blank uint8 images first; on out-of-memory it halves the per-replica batch
until a step fits and raises a ConfigError that names that batch. The run's own model is not touched.
"""

from __future__ import annotations

from typing import Callable

from model.config import ConfigError


def _is_oom(error: BaseException) -> bool:
    import tensorflow as tf

    return isinstance(error, tf.errors.ResourceExhaustedError) or "out of memory" in str(error).lower()


def largest_fitting_batch(step: Callable[[int], None], batch: int, replicas: int) -> int | None:
    """The configured batch if `step(batch)` runs, else the first of the halved batches that does.

    Batches stay multiples of `replicas` (per-replica batch x replicas); None when one sample per replica
    does not fit either. Errors other than out-of-memory propagate.
    """
    per_replica = batch // replicas
    while True:
        try:
            step(per_replica * replicas)
            return per_replica * replicas
        except Exception as e:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
            if not _is_oom(e):
                raise
            if per_replica == 1:
                return None
            per_replica //= 2


def check_batch_fits(step: Callable[[int], None], batch: int, replicas: int, where: str) -> None:
    """Raises a ConfigError naming a batch that fits when one step at `batch` runs out of memory.

    Args:
      step: runs one training step on `n` samples (global batch).
      batch: the configured global batch.
      replicas: replicas in sync.
      where: the devices, for the message.
    """
    fits = largest_fitting_batch(step, batch, replicas)
    if fits == batch:
        return
    per = batch // replicas
    if fits is None:
        raise ConfigError(
            f"one training step does not fit in the memory of {where} even at 1 sample per replica "
            f"(--batch_size {batch} = {per} per replica failed first); use a smaller --image_size or "
            f"--crop_size, or --precision mixed_bfloat16 / mixed_float16"
        )
    raise ConfigError(
        f"--batch_size {batch} ({per} per replica) runs out of memory on {where} in a preflight step on "
        f"blank images; --batch_size {fits} ({fits // replicas} per replica) fits: pass it, with "
        f"--lr_scaling linear to scale the learning rate with it"
    )


def model_step(make_model, image_size: int, num_classes: int, strategy) -> Callable[[int], None]:
    """A `step(n)` for `check_batch_fits`: one `train_on_batch` of a fresh model (`make_model()`, built in the
    strategy's scope) on n blank uint8 images; the model is built on the first call and reused."""
    import numpy as np

    holder: dict = {}

    def step(n: int) -> None:
        if "model" not in holder:
            with strategy.scope():
                holder["model"] = make_model()
        images = np.zeros((n, image_size, image_size, 4), np.uint8)
        labels = np.zeros((n, num_classes), np.float32)
        holder["model"].train_on_batch(images, labels)

    return step
