"""The conventions every command of the project shares, and the one wrapper that applies them.

Every step is an installed command (setup.py's `COMMANDS`, in .venv/bin after `make setup`) and a module
(`python -m pipelines.preprocess`, what the `run_*.sh` wrappers run from a fresh clone without an install):

- flags are `--snake_case`; a path flag takes a local path or a `gs://` URL unless its help says otherwise;
  `--help` describes every flag.
- exit status 0: done. 2: bad usage (argparse's own message) or bad input (a missing file, a malformed label
  file, a flag the data contradicts...): one line `hpa-x: error: ...` on stderr, no traceback. 1: a failure
  while running (any other exception), reported with its traceback. `HPA_TRACEBACK=1` in the environment
  prints the traceback of bad-input errors too.
- flags may be spelt `--flag-name` too; an unknown flag is one line naming the closest known one
  (`did you mean --epochs?`), and every usage error is that line plus `see hpa-x --help` (`ArgumentParser`).
- run as a command (`argv=None`), the libraries' start-up and deprecation lines are silenced
  (schemas/console.py); `-v`/`--verbose` or HPA_LOG=debug brings them back.
- interrupted by SIGINT (Ctrl-C) or SIGTERM: one line `hpa-x: interrupted during STAGE; rerun the same command
  to resume` on stderr, no traceback (`HPA_TRACEBACK=1` shows it), exit status 130 or 143 (128 + the
  signal). A command names what it is doing with `set_stage` (a text, or a function called at the
  interrupt). Child processes started with `child_env()` leave that line to their parent.
- every command lets TensorFlow take GPU memory as it needs it (TF_FORCE_GPU_ALLOW_GROWTH=true unless the
  environment sets it), so several processes can share one GPU (batch prediction's workers, one process per
  GPU); TensorFlow reads it when it first sets up a GPU, in this process and in the workers it starts.

A command's module follows this pattern:

    PROG = "hpa-x"

    def build_parser() -> argparse.ArgumentParser:
        return cli.ArgumentParser(prog=PROG, description=...)

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

import argparse
import atexit
import contextlib
import difflib
import functools
import logging
import os
import re
import signal
import sys
import threading
import time
import traceback
from typing import Callable, Iterable, Sequence, Union

from schemas import console, locks

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
GPU_GROWTH_ENV = "TF_FORCE_GPU_ALLOW_GROWTH"  # TensorFlow's own switch; "false" takes the whole GPU again
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
    if _traceback_wanted():
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
_own_process: list[bool] = []  # non-empty: `main` runs as the process' command (not called from Python)


def _traceback_wanted() -> bool:
    return os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


def _quiet_thread_error(args) -> None:
    """threading.excepthook once the command is interrupted: a library's background thread that fails
    because its worker processes were stopped (Beam's `Worker subprocess exited with return code -15`)
    prints nothing; the command's one line says what happened."""


def _keep_stopping_children() -> None:
    """Stops the command's child processes now and every half second until it exits: a library may start
    one more while it winds down (Beam starts SDK workers per stage), and its cleanup waits for them."""
    stop_children()
    if _own_process and not any(t.name == "hpa-stop-children" for t in threading.enumerate()):

        def loop():
            while True:
                time.sleep(0.5)
                stop_children()

        threading.Thread(target=loop, name="hpa-stop-children", daemon=True).start()


def _on_signal(signum: int) -> None:
    _received.append(signum)
    if not _traceback_wanted():  # what libraries report of the interrupt is noise beside the one line
        threading.excepthook = _quiet_thread_error
        logging.disable(logging.CRITICAL)  # Beam logs the KeyboardInterrupt inside a DoFn with a traceback
    _keep_stopping_children()


def _raise_terminated(signum, frame):
    _on_signal(signum)
    raise Terminated()


def _raise_interrupt(signum, frame):
    _on_signal(signum)
    raise KeyboardInterrupt()


def _ending_interrupt(prog: str, signum, frame):  # pragma: no cover - runs in a command's own process
    """A signal after `main` returned, while Python joins threads and runs its exit handlers: one line and
    130 / 143, not Python's default death by SIGINT (status -2)."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    print(f"{prog}: interrupted while exiting, after its work ended", file=sys.stderr, flush=True)
    os._exit(EXIT_INTERRUPTED[signum])


def _ignore_signals_at_exit() -> None:  # pragma: no cover - runs in a command's own process
    """The last moments of a command's process: Python then puts its handlers back to the system's default
    (a SIGINT killed the process, status -2, while TensorFlow's libraries unloaded); the work is done and
    the process ends in a moment with its own status, so SIGINT and SIGTERM are ignored (SIGKILL is not)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def _startup_interrupt(signum, frame):  # pragma: no cover - runs in a command's own process
    name = os.path.basename(sys.argv[0]) if os.path.basename(sys.argv[0]).startswith("hpa-") else "hpa"
    if not os.environ.get(CHILD_ENV):  # a fold's training process leaves the line to the fold driver
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
            os.environ.setdefault(GPU_GROWTH_ENV, "true")
            if argv is None:  # run as a command, not called from Python
                quiet_unless_verbose()
                _own_process[:] = [True]
            main_thread = threading.current_thread() is threading.main_thread()
            previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
            previous_int = signal.getsignal(signal.SIGINT) if main_thread else None
            if previous_int in (signal.default_int_handler, _startup_interrupt):
                signal.signal(signal.SIGINT, _raise_interrupt)
            if previous is _startup_interrupt:
                previous = signal.SIG_DFL
            set_stage(None)
            _received.clear()
            thread_hook = threading.excepthook
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
                if main_thread and argv is None and not _traceback_wanted():  # a command's own process
                    for signum in (signal.SIGINT, signal.SIGTERM):
                        if signal.getsignal(signum) in (_raise_interrupt, _raise_terminated):
                            signal.signal(signum, functools.partial(_ending_interrupt, prog))
                    atexit.register(_ignore_signals_at_exit)  # runs first of the exit handlers
                elif main_thread:
                    threading.excepthook = thread_hook
                    logging.disable(logging.NOTSET)
                    signal.signal(signal.SIGTERM, previous)
                    if previous_int in (signal.default_int_handler, _startup_interrupt):
                        signal.signal(signal.SIGINT, signal.default_int_handler)

        entry.prog = prog  # type: ignore[attr-defined]
        return entry

    return decorate


def quiet_unless_verbose(argv: Sequence[str] | None = None) -> None:
    """Silences the libraries' console chatter unless -v/--verbose or HPA_LOG=debug asks for it.

    The packages `model` and `pipelines` already did this before their imports when run as a command; this
    call covers a `main` reached another way (and is a no-op after the first).
    """
    console.set_verbosity(not console.verbose_requested(argv))


# ---------------------------------------------------------------------------------------------------------
# Flags: one parser class for every command.

_LONG_FLAG = re.compile(r"--[A-Za-z0-9][A-Za-z0-9_-]*")


def normalise_flags(argv: Iterable[str]) -> list[str]:
    """argv with `--flag-name` (and `--flag-name=value`) spelt `--flag_name`, up to a `--` terminator.

    Every flag of the project and every Beam pipeline option is snake_case, so the dashes never mean
    anything else; values are left alone.
    """
    out, rest = [], False
    for arg in argv:
        if not rest and arg == "--":
            rest = True
        elif not rest:
            name, eq, value = arg.partition("=")
            if _LONG_FLAG.fullmatch(name):
                arg = "--" + name[2:].replace("-", "_") + eq + value
        out.append(arg)
    return out


def closest_flag(flag: str, known: Iterable[str]) -> str | None:
    """The known flag most like `flag` (a misspelling, a dropped or swapped letter), or None."""
    name = flag.split("=", 1)[0]
    matches = difflib.get_close_matches(name, sorted(set(known)), n=1, cutoff=0.6)
    return matches[0] if matches else None


def unrecognized(args: Sequence[str], known: Iterable[str]) -> str:
    """`unrecognized arguments: --epcohs (did you mean --epochs?), 3`: the extras, flags with a suggestion."""
    known = list(known)
    parts = []
    for arg in args:
        hint = closest_flag(arg, known) if arg.startswith("--") else None
        parts.append(f"{arg} (did you mean {hint}?)" if hint else arg)
    return "unrecognized arguments: " + ", ".join(parts)


class _Verbosity(argparse.Action):
    """-v / -vv / --verbose [N]: how much of the libraries' output to show (0: none, the default)."""

    def __init__(self, option_strings, dest, default=0, help=None):
        super().__init__(option_strings, dest, nargs="?", default=default, help=help, metavar="N")

    def __call__(self, parser, namespace, values, option_string=None):
        level = getattr(namespace, self.dest, 0)
        level = level if isinstance(level, int) else 0
        if values is None:
            level += 1
        elif re.fullmatch(r"v+", values):  # -vv
            level += 1 + len(values)
        elif values.isdigit():
            level = int(values)
        else:
            parser.error(f"{option_string} takes a number or nothing, not {values!r}")
        setattr(namespace, self.dest, level)


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser with the family's conventions.

    - `--flag-name` is read as `--flag_name` (`normalise_flags`), Beam's pass-through options too;
    - an unknown flag is an error that names the closest known one, found before any missing required flag
      is reported (a misspelt `--data_dri` says so, not that `--data_dir` is missing);
    - every usage error is two lines: `prog: error: ...` and `see prog --help` (exit 2);
    - `-v`/`--verbose` is a flag of every command (see schemas/console.py), unless `verbose=False`.
    """

    def __init__(self, *args, verbose: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        if verbose:
            self.add_argument(
                "-v",
                "--verbose",
                action=_Verbosity,
                help="show the libraries' own logging (TensorFlow, absl, Beam), silenced by default; also "
                "HPA_LOG=debug in the environment",
            )

    def long_flags(self) -> list[str]:
        """This parser's `--flags`."""
        return [s for action in self._actions for s in action.option_strings if s.startswith("--")]

    def _is_flag(self, arg: str) -> bool:
        name = arg.split("=", 1)[0]
        flags = self.long_flags()
        if name in flags:
            return True
        return self.allow_abbrev and sum(f.startswith(name) for f in flags) == 1

    def unknown_flags(self, argv: Sequence[str]) -> list[str]:
        """The `--flags` of argv that this parser does not know (up to a `--` terminator)."""
        unknown = []
        for arg in argv:
            if arg == "--":
                break
            if _LONG_FLAG.fullmatch(arg.split("=", 1)[0]) and not self._is_flag(arg):
                unknown.append(arg.split("=", 1)[0])
        return unknown

    def parse_known_args(self, args=None, namespace=None):
        args = normalise_flags(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def parse_args(self, args=None, namespace=None):
        args = normalise_flags(sys.argv[1:] if args is None else args)
        unknown = self.unknown_flags(args)
        if unknown:
            self.error(unrecognized(unknown, self.long_flags()))
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(unrecognized(extras, self.long_flags()))
        return parsed

    def error(self, message: str):
        """One line `prog: error: message` and `see prog --help`, exit status 2 (no usage block)."""
        message = _with_closest_choice(message)
        if self.exit_on_error is False:
            raise argparse.ArgumentError(None, message)
        self.exit(EXIT_BAD_INPUT, f"{error_line(self.prog, message)}\nsee {self.prog} --help\n")


def _with_closest_choice(message: str) -> str:
    """argparse's `invalid choice: 'smal' (choose from ...)` with `: did you mean 'small'?` added."""
    m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)$", message)
    if not m:
        return message
    choices = re.findall(r"'([^']*)'", m.group(2)) or [c.strip() for c in m.group(2).split(",")]
    close = difflib.get_close_matches(m.group(1), choices, n=1, cutoff=0.5)
    return f"{message}: did you mean '{close[0]}'?" if close else message
