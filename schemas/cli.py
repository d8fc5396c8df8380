"""The conventions every command of the project shares, and the one wrapper that applies them.

Every step is an installed command (setup.py's `COMMANDS`, in .venv/bin after `make setup`) and a module
(`python -m pipelines.preprocess`, what the `run_*.sh` wrappers run from a fresh clone without an install):

- flags are `--snake_case`; a path flag takes a local path or a `gs://` URL unless its help says otherwise;
  `--help` describes every flag.
- exit status 0: done. 2: bad usage (argparse's own message) or bad input (a missing file, a malformed label
  file, a flag the data contradicts...): one line `hpa-x: error: ...` on stderr, no traceback. 1: a failure
  while running (any other exception), reported with its traceback. `HPA_TRACEBACK=1` in the environment
  prints the traceback of bad-input errors too.
- run as a command (`argv=None`), TensorFlow's C++ logging is cut to errors unless TF_CPP_MIN_LOG_LEVEL is
  set.
- every command lets TensorFlow take GPU memory as it needs it (TF_FORCE_GPU_ALLOW_GROWTH=true unless the
  environment sets it), so several processes can share one GPU (batch prediction's workers, one process per
  GPU); TensorFlow reads it when it first sets up a GPU, in this process and in the workers it starts.

A command's module follows this pattern:

    PROG = "hpa-x"

    def build_parser() -> argparse.ArgumentParser:
        return argparse.ArgumentParser(prog=PROG, description=...)

    @cli.command(PROG)
    def main(argv: Sequence[str] | None = None) -> int:
        args = build_parser().parse_args(argv)
        return cli.run_or_bad_input(PROG, XError, lambda: run(config_from(args)))  # XError: the module's own

    if __name__ == "__main__":
        sys.exit(main())

`command` makes BAD_INPUT (a missing path...) exit 2 as well, and any other exception exit 1 with its
traceback. Registering the command is one line in setup.py's `COMMANDS`: `"hpa-x = package.module:main"`
(tests/test_cli.py checks that every runnable module of both packages is registered and answers `--help`).

A Beam job's own options (an unknown flag is bad usage, local and remote runners) are in
`pipelines/beam_options.py`.

This module imports nothing outside the standard library, so every package can use it: it sits in `schemas/`
below both jobs, beside the record and input-file contracts.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from typing import Callable, Sequence

Main = Callable[[Sequence[str] | None], int]

# Bad input whatever the command: a user path that does not exist, an output that exists without --overwrite.
BAD_INPUT: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
)
TRACEBACK_ENV = "HPA_TRACEBACK"
GPU_GROWTH_ENV = "TF_FORCE_GPU_ALLOW_GROWTH"  # TensorFlow's own switch; "false" takes the whole GPU again
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _bad_input_types() -> tuple[type[BaseException], ...]:
    """BAD_INPUT, plus TensorFlow's NotFoundError (a missing gs:// path) when TensorFlow is loaded."""
    tf = sys.modules.get("tensorflow")
    not_found = getattr(getattr(tf, "errors", None), "NotFoundError", None)
    return BAD_INPUT + ((not_found,) if isinstance(not_found, type) else ())


def error_line(prog: str, error: BaseException) -> str:
    """`prog: error: message` on one line (runs of whitespace in the message, newlines too, become spaces)."""
    message = " ".join(str(error).split()) or type(error).__name__
    return f"{prog}: error: {message}"


def bad_input(prog: str, error: BaseException) -> int:
    """Reports `error` as bad input: its one error line on stderr (after its traceback with HPA_TRACEBACK=1).

    Call it from an `except` clause (the traceback printed is the exception being handled).

    Returns:
      EXIT_BAD_INPUT, for `main` to return.
    """
    if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        traceback.print_exc()
    print(error_line(prog, error), file=sys.stderr, flush=True)
    return EXIT_BAD_INPUT


def run_or_bad_input(
    prog: str, errors: type[BaseException] | tuple[type[BaseException], ...], run: Callable[[], object]
) -> int:
    """Calls `run()`; an exception of `errors` (the command's own bad-input errors) goes to `bad_input`.

    Returns:
      EXIT_OK, or EXIT_BAD_INPUT after one of `errors`; any other exception propagates (to `command`).
    """
    try:
        run()
    except errors as e:
        return bad_input(prog, e)
    return EXIT_OK


def command(prog: str) -> Callable[[Main], Main]:
    """Decorates a command's `main(argv) -> int` with the family's exit statuses and error reporting.

    Args:
      prog: the installed command's name (`hpa-x`), the prefix of its error line.

    Returns:
      A decorator; the decorated `main` returns main's own status, 2 for BAD_INPUT (and TensorFlow's
      NotFoundError) and 1 for any other exception; argparse's SystemExit (help, bad usage) passes through.
    """

    def decorate(main: Main) -> Main:
        @functools.wraps(main)
        def entry(argv: Sequence[str] | None = None) -> int:
            os.environ.setdefault(GPU_GROWTH_ENV, "true")
            if argv is None:  # run as a command, not called from Python
                os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            try:
                return main(argv)
            except _bad_input_types() as e:
                return bad_input(prog, e)
            except Exception:
                traceback.print_exc()
                sys.stderr.flush()
                return EXIT_FAILED

        entry.prog = prog  # type: ignore[attr-defined]
        return entry

    return decorate
