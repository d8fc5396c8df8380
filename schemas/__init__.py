"""The record format of the project: feature keys, class names, encode/decode, dataset layout."""

from schemas import cli as _cli  # the standard library only: before numpy below

# A command interrupted while its modules load (numpy's import alone takes a second on a loaded machine): one
# line, exit 130 / 143 (`model` and `pipelines` call it too; every command imports this package first).
_cli.handle_startup_interrupts()

from schemas.record import *  # noqa: E402, F403
from schemas.record import __all__  # noqa: E402, F401
