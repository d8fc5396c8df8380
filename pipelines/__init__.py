"""Beam jobs that turn image folders into training shards, and their pure-numpy cores."""

from schemas import cli as _cli

_cli.handle_startup_interrupts()  # a command interrupted while its modules load: one line, exit 130 / 143
