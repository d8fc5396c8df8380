"""Beam jobs that turn image folders into training shards, and their pure-numpy cores."""

from schemas import console

console.quiet_imports()  # a command silences TensorFlow's and Beam's start-up lines before they load

from schemas import cli as _cli  # noqa: E402 - after the console is quiet

_cli.handle_startup_interrupts()  # a command interrupted while its modules load: one line, exit 130 / 143
