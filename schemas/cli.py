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
- interrupted by SIGINT (Ctrl-C) or SIGTERM: one line `hpa-x: interrupted during STAGE; rerun the same command
  to resume` on stderr, no traceback (`HPA_TRACEBACK=1` shows it), exit status 130 or 143 (128 + the
  signal). A command names what it is doing with `set_stage` (a text, or a function called at the
  interrupt). Child processes started with `child_env()` leave that line to their parent.

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
import signal
import sys
import threading
import traceback
from typing import Callable, Sequence, Union

from schemas import locks

Main = Callable[[Sequence[str] | None], int]

# Bad input whatever the command: a user path that does not exist, an output that exists without --overwrite.
BAD_INPUT: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
)
TRACEBACK_ENV = "HPA_TRACEBACK"
CHILD_ENV = "HPA_CHILD_OF"  # set for a child process whose parent reports interrupts (the fold driver's)
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_INTERRUPTED = {signal.SIGINT: 128 + signal.SIGINT, signal.SIGTERM: 128 + signal.SIGTERM}  # 130, 143

Stage = Union[str, Callable[[], str], None]
_stage: list[Stage] = [None]


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as Ctrl-C's KeyboardInterrupt is, so the same cleanup runs (`finally`, children)."""

    signum = signal.SIGTERM


def set_stage(stage: Stage) -> None:
    """What the command is doing now, for its interrupt line (`epoch 4 of 30`); a function is called then."""
    _stage[0] = stage


def stage_text() -> str:
    """The current stage's text (empty when none was set or it cannot be told)."""
    stage = _stage[0]
    try:
        return (stage() if callable(stage) else stage) or ""
    except Exception:  # the line must come out whatever the state
        return ""


def child_env(env: dict | None = None) -> dict:
    """The environment for a child command whose interrupts this process reports (one line, not two)."""
    return {**(os.environ if env is None else env), CHILD_ENV: str(os.getpid())}


def interrupted(prog: str, error: KeyboardInterrupt) -> int:
    """Reports an interrupt in one line (after its traceback with HPA_TRACEBACK=1); returns 130 or 143."""
    signum = getattr(error, "signum", signal.SIGINT)
    if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        traceback.print_exc()
    if not os.environ.get(CHILD_ENV):
        stage = stage_text()
        where = f" during {stage}" if stage else ""
        print(f"{prog}: interrupted{where}; rerun the same command to resume", file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED[signum]


def _descendants(pid: int) -> list[int]:
    """The process ids below `pid` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop_children() -> None:
    """SIGTERMs every process this one started (Beam's SDK workers, a fold's training), so that the
    cleanup that waits for them ends: children stop with their parent."""
    for pid in _descendants(os.getpid()):
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass


_received: list[int] = []  # the signals this command's handlers got (a library may wrap their exception)


def _raise_terminated(signum, frame):
    _received.append(signum)
    stop_children()
    raise Terminated()


def _raise_interrupt(signum, frame):
    _received.append(signum)
    stop_children()
    raise KeyboardInterrupt()


def _startup_interrupt(signum, frame):  # pragma: no cover - runs in a command's own process
    name = os.path.basename(sys.argv[0]) if os.path.basename(sys.argv[0]).startswith("hpa-") else "hpa"
    print(f"{name}: interrupted during start-up; rerun the same command", file=sys.stderr, flush=True)
    os._exit(EXIT_INTERRUPTED[signum])


def handle_startup_interrupts() -> None:
    """In a command's own process, SIGINT / SIGTERM while its modules load end it with one line too.

    Called by the `model` and `pipelines` packages when they are imported; acts only when the process runs
    an `hpa-*` command or `python -m` (not when a library user or pytest imports them). `command` puts the
    usual handling in place once `main` runs.
    """
    launcher = os.path.basename(sys.argv[0]) if sys.argv else ""
    if not (launcher.startswith("hpa-") or launcher == "-m") or os.environ.get(TRACEBACK_ENV, "") not in (
        "",
        "0",
    ):
        return
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) in (signal.default_int_handler, signal.SIG_DFL):
                signal.signal(signum, _startup_interrupt)


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
      NotFoundError), 130 / 143 for SIGINT / SIGTERM (one line, see the module docstring) and 1 for any
      other exception; argparse's SystemExit (help, bad usage) passes through.
    """

    def decorate(main: Main) -> Main:
        @functools.wraps(main)
        def entry(argv: Sequence[str] | None = None) -> int:
            if argv is None:  # run as a command, not called from Python
                os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            main_thread = threading.current_thread() is threading.main_thread()
            previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
            previous_int = signal.getsignal(signal.SIGINT) if main_thread else None
            if previous_int in (signal.default_int_handler, _startup_interrupt):
                signal.signal(signal.SIGINT, _raise_interrupt)
            if previous is _startup_interrupt:
                previous = signal.SIG_DFL
            set_stage(None)
            _received.clear()
            try:
                return main(argv)
            except KeyboardInterrupt as e:
                return interrupted(prog, e)
            except _bad_input_types() as e:
                return bad_input(prog, e)
            except Exception as e:
                if _received:  # TensorFlow turned the interrupt into its own error (inside a tf.data step)
                    error = Terminated() if _received[-1] == signal.SIGTERM else KeyboardInterrupt()
                    error.__cause__ = e
                    return interrupted(prog, error)
                traceback.print_exc()
                sys.stderr.flush()
                return EXIT_FAILED
            finally:
                locks.release_all()
                if main_thread:
                    signal.signal(signal.SIGTERM, previous)
                    if previous_int in (signal.default_int_handler, _startup_interrupt):
                        signal.signal(signal.SIGINT, signal.default_int_handler)

        entry.prog = prog  # type: ignore[attr-defined]
        return entry

    return decorate
