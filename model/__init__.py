"""Keras training package: config, input pipeline, model, losses, thresholds, training and prediction."""

from schemas import cli as _cli

_cli.handle_startup_interrupts()  # a command interrupted while its modules load: one line, exit 130 / 143
