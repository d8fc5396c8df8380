"""Training progress that reads well in a terminal and in a log file.

On a terminal Keras draws its progress bar. Anywhere else (a pipe, a log file, `hpa-folds`' per-fold logs)
the bar's carriage returns and backspaces would fill the file with redraws, so `EpochLines` prints one plain
line per epoch with the same figures, and on a long epoch a line at most every `interval` seconds.
"""

from __future__ import annotations

import sys
import time

import keras


def fit_verbosity(stream=None) -> int:
    """Keras' `verbose` for `fit`: its bar on a terminal, nothing elsewhere (`EpochLines` says it)."""
    stream = sys.stdout if stream is None else stream
    return 1 if _isatty(stream) else 0


def progress_callbacks(stream=None, interval: float = 30.0) -> list:
    """The callbacks that report progress when Keras' bar is off (none on a terminal)."""
    stream = sys.stdout if stream is None else stream
    return [] if fit_verbosity(stream) else [EpochLines(stream, interval)]


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def format_logs(logs: dict | None) -> str:
    """`loss 0.1586  auc 0.7912  ...  val_loss 0.1631`: training figures first, then validation ones."""
    logs = logs or {}
    names = sorted(logs, key=lambda k: (k.startswith("val_"), k == "learning_rate", k))
    return "  ".join(f"{k} {float(logs[k]):.4g}" for k in names if _is_number(logs[k]))


def _is_number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


class EpochLines(keras.callbacks.Callback):
    """One line per epoch (`Epoch 3/40: 62 steps in 9 s (141 ms/step); loss ...`), and mid-epoch lines on
    epochs longer than `interval` seconds."""

    def __init__(self, stream=None, interval: float = 30.0):
        super().__init__()
        self._stream = stream
        self._interval = interval
        self._epochs = self._steps = None
        self._start = self._last = 0.0
        self._epoch = 0

    def on_train_begin(self, logs=None):
        self._epochs = self.params.get("epochs")
        self._steps = self.params.get("steps")

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._start = self._last = time.monotonic()

    def on_train_batch_end(self, batch, logs=None):
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._last = now
            of = f"/{self._steps}" if self._steps else ""
            self._print(f"step {batch + 1}{of}, {now - self._start:.0f} s; {format_logs(logs)}")

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.monotonic() - self._start
        steps = self._steps or 0
        per_step = f" ({1000 * seconds / steps:.0f} ms/step)" if steps else ""
        self._print(f"{steps} steps in {seconds:.0f} s{per_step}; {format_logs(logs)}")

    def _print(self, text: str) -> None:
        of = f"/{self._epochs}" if self._epochs else ""
        print(f"Epoch {self._epoch + 1}{of}: {text}", file=self._stream or sys.stdout, flush=True)
