"""Learning-rate schedules of the training job, built from `keras.optimizers.schedules`.

Every rate is `cfg.scaled_learning_rate()` (the given rate, scaled with the batch under --lr_scaling linear).
Schedules count optimizer steps (`optimizer.iterations`), so they need the run's steps per epoch; a restarted
run restores `iterations` from its backup and continues where the schedule was.

- `plateau`: a constant rate in the optimizer (a variable that ReduceLROnPlateau lowers); a warm-up is then
  applied step by step by `model.callbacks.LinearWarmup` from `warmup_schedule`, and ReduceLROnPlateau
  watches only the epochs after it.
- `cosine`: `CosineDecay`, with its own linear warm-up (`warmup_target`, `warmup_steps`), down to min_lr.
- `step`: `PiecewiseConstantDecay` (the rate times lr_factor at each of lr_steps), after a warm-up if any
  (`WarmupThen` joins the two Keras schedules: Keras has no generic warm-up wrapper).
"""

from __future__ import annotations

import keras

from model.config import LR_COSINE, LR_PLATEAU, LR_STEP, WARMUP_START_FACTOR, TrainConfig


@keras.saving.register_keras_serializable(package="hpa")
class WarmupThen(keras.optimizers.schedules.LearningRateSchedule):
    """`warmup(step)` for the first `warmup_steps` steps, then `after(step)` (steps counted from 0)."""

    def __init__(self, warmup, after, warmup_steps: int):
        super().__init__()
        self.warmup = warmup
        self.after = after
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step):
        ops = keras.ops
        step = ops.cast(step, "float32")
        return ops.where(ops.less(step, float(self.warmup_steps)), self.warmup(step), self.after(step))

    def get_config(self) -> dict:
        serialize = keras.optimizers.schedules.serialize
        return {
            "warmup": serialize(self.warmup),
            "after": serialize(self.after),
            "warmup_steps": self.warmup_steps,
        }

    @classmethod
    def from_config(cls, config: dict) -> WarmupThen:
        deserialize = keras.optimizers.schedules.deserialize
        config = dict(config)
        return cls(deserialize(config.pop("warmup")), deserialize(config.pop("after")), **config)


def warmup_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of the warm-up."""
    return cfg.warmup_epochs * steps_per_epoch


def warmup_schedule(cfg: TrainConfig, steps_per_epoch: int):
    """The linear warm-up from WARMUP_START_FACTOR x learning_rate to learning_rate, constant after it.

    A `PolynomialDecay` of power 1 from the small rate "up" to the target; None without a warm-up.
    """
    steps = warmup_steps(cfg, steps_per_epoch)
    if steps == 0:
        return None
    return keras.optimizers.schedules.PolynomialDecay(
        initial_learning_rate=cfg.scaled_learning_rate() * WARMUP_START_FACTOR,
        decay_steps=steps,
        end_learning_rate=cfg.scaled_learning_rate(),
        power=1.0,
    )


def learning_rate(cfg: TrainConfig, steps_per_epoch: int | None):
    """The optimizer's `learning_rate`: a float for `plateau`, else a Keras schedule of the optimizer step.

    Raises:
      ValueError: a schedule without steps_per_epoch.
    """
    if cfg.lr_schedule == LR_PLATEAU:
        return cfg.scaled_learning_rate()
    if steps_per_epoch is None or steps_per_epoch < 1:
        raise ValueError(f"lr_schedule {cfg.lr_schedule} needs steps_per_epoch, got {steps_per_epoch}")
    warm = warmup_steps(cfg, steps_per_epoch)
    if cfg.lr_schedule == LR_COSINE:
        decay_steps = (cfg.epochs - cfg.warmup_epochs) * steps_per_epoch
        alpha = cfg.min_lr / cfg.scaled_learning_rate()
        if warm == 0:
            return keras.optimizers.schedules.CosineDecay(
                cfg.scaled_learning_rate(), decay_steps, alpha=alpha
            )
        return keras.optimizers.schedules.CosineDecay(
            cfg.scaled_learning_rate() * WARMUP_START_FACTOR,
            decay_steps,
            alpha=alpha,
            warmup_target=cfg.scaled_learning_rate(),
            warmup_steps=warm,
        )
    if cfg.lr_schedule == LR_STEP:
        after = keras.optimizers.schedules.PiecewiseConstantDecay(
            # Keras keeps a value up to and including its boundary: the new one from step e * steps.
            boundaries=[e * steps_per_epoch - 1 for e in cfg.lr_steps],
            values=[cfg.scaled_learning_rate() * cfg.lr_factor**i for i in range(len(cfg.lr_steps) + 1)],
        )
        if warm == 0:
            return after
        return WarmupThen(warmup_schedule(cfg, steps_per_epoch), after, warm)
    raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r}")


def describe(cfg: TrainConfig) -> str:
    """One line for the job's log: the schedule, the warm-up and the weight averaging."""
    if cfg.lr_schedule == LR_PLATEAU:
        text = f"plateau (x{cfg.lr_factor} after {cfg.lr_patience} epochs without progress)"
    elif cfg.lr_schedule == LR_COSINE:
        text = f"cosine to {cfg.min_lr:g}"
    else:
        text = f"step (x{cfg.lr_factor} at epochs {', '.join(map(str, cfg.lr_steps))})"
    rate = cfg.scaled_learning_rate()
    scaled = f" (= {cfg.learning_rate:g} x batch {cfg.data.batch_size} / {cfg.reference_batch})"
    text = f"lr {rate:g}{scaled if cfg.lr_scaling == 'linear' else ''}, {text}"
    if cfg.warmup_epochs:
        text += f", linear warm-up over {cfg.warmup_epochs} epoch(s)"
    if cfg.ema and cfg.ema_epochs is not None:
        text += f"; weights averaged (EMA over ~{cfg.ema_epochs:g} epoch(s))"
    elif cfg.ema:
        text += f"; weights averaged (EMA, momentum {cfg.ema_momentum})"
    return text
