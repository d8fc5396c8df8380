"""Keras training package: config, input pipeline, model, losses, thresholds, training and prediction."""

from schemas import console

console.quiet_imports()  # a command silences TensorFlow's start-up lines before anything imports it

from schemas import cli as _cli  # noqa: E402 - after the console is quiet

_cli.handle_startup_interrupts()  # a command interrupted while its modules load: one line, exit 130 / 143
