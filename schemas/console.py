"""What the commands print: quiet libraries by default, everything with -v, and progress lines.

TensorFlow 2.21's C++ start-up lines (oneDNN, "Could not find cuda drivers", `failed call to cuInit`, CPU
features) are written by absl before its logging is initialised, straight to file descriptor 2:
TF_CPP_MIN_LOG_LEVEL no longer reaches them, and neither does anything in Python. So a command, before it
imports TensorFlow or Beam (`quiet_imports`, called first thing by the `model` and `pipelines` packages),
routes file descriptor 2 through a filter thread that drops the lines matching `NOISE` and passes every
other line on; Python's own `sys.stderr` keeps writing to the terminal directly. The Python-side chatter
(absl, Beam, tf.Transform, TensorFlow's loggers; deprecation warnings) is cut to errors by logging levels
and warning filters, in child processes too (through PYTHONWARNINGS and the inherited filter).

`-v`/`--verbose` on the command line, or HPA_LOG=debug in the environment, leaves all of it as the libraries
print it. A real problem still shows: an error that is not on the list, an exception, and the project's own
messages (a large backbone without a GPU...).

This module imports only the standard library.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import threading
import warnings
from typing import Sequence

LOG_ENV = "HPA_LOG"
VERBOSE_VALUES = ("debug", "verbose", "1")

# Lines of TensorFlow (C++ and Python), absl, CUDA stubs, oneDNN, Beam and tf.Transform that say nothing a
# user of this project acts on. Info and warning lines of TensorFlow's C++ logging go (what
# TF_CPP_MIN_LOG_LEVEL=2 meant before absl took over); of its error lines only the known harmless ones.
NOISE_PATTERNS: tuple[str, ...] = (
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    r"^[IW]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [\w.\-/]+:\d+\] ",  # absl C++ info / warning lines
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IW] ",  # the older TensorFlow C++ format
    r"^E\d{4} [^\]]*\] failed call to cuInit: .*\(303\)",  # no CUDA driver: a CPU machine
    r"^E\d{4} [^\]]*\] oneDNN supports DT_\w+ only on platforms with AVX-512",
    r"^E\d{4} [^\]]*\] Unable to register cu(DNN|FFT|BLAS) factory",
    r"^To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags",
    r"^WARNING:(root|absl|tensorflow|apache_beam)[\w.]*:",  # Python logging of child processes
    r"^(WARNING|INFO):root:Resource module is not available",
    r"^\S+\.py:\d+: \w*(Deprecation|Future|User)Warning: ",  # a child's warning line...
)
NOISE = re.compile("|".join(f"(?:{p})" for p in NOISE_PATTERNS))
# ...and the source line that Python prints under a warning
_WARNING_SOURCE = re.compile(r"^\s{2,}\S")

# Loggers of the libraries, set to errors; the project prints its own messages.
LIBRARY_LOGGERS = ("absl", "tensorflow", "keras", "apache_beam", "tensorflow_transform", "tfx_bsl", "h5py")
# Modules whose warnings (deprecations, "instance dicts"...) are not the user's business.
LIBRARY_MODULES = (
    r"(tensorflow|keras|tf_keras|apache_beam|tensorflow_transform|tfx_bsl|google|absl|h5py|"
    r"jax|numpy|pyarrow|proto|grpc|hdfs|matplotlib|sklearn|ml_dtypes|pkg_resources|setuptools)(\.|$)"
)

_state: dict = {"filter": None, "quiet": None}


def verbose_requested(argv: Sequence[str] | None = None, environ=os.environ) -> bool:
    """Whether the user asked for the libraries' output: -v, -vv, --verbose [N>0], or HPA_LOG=debug."""
    if environ.get(LOG_ENV, "").strip().lower() in VERBOSE_VALUES:
        return True
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if re.fullmatch(r"-v+", arg):
            return True
        if arg == "--verbose":
            value = argv[i + 1] if i + 1 < len(argv) else ""
            return not re.fullmatch(r"0+", value)
        if arg.startswith("--verbose="):
            return not re.fullmatch(r"0+", arg.split("=", 1)[1])
    return False


def running_as_command(argv0: str | None = None) -> bool:
    """True while an `hpa-*` script or `python -m <module>` starts (not when a test imports a module)."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    return os.path.basename(argv0).startswith("hpa-") or argv0 == "-m"


def quiet_imports() -> None:
    """Called by the packages' `__init__`: a command run without -v silences the libraries before they load.

    Does nothing when the package is imported by other code (tests, notebooks), or when already done.
    """
    if _state["quiet"] is None and running_as_command():
        set_verbosity(not verbose_requested())


def set_verbosity(quiet: bool) -> None:
    """Silences the libraries (`quiet`) or leaves them as they are and tells child processes the same.

    Idempotent; the first call decides (a command's packages and its wrapper may both call it).
    """
    if _state["quiet"] is not None:
        return
    _state["quiet"] = quiet
    if not quiet:
        os.environ[LOG_ENV] = "debug"  # hpa-folds' training processes, Beam workers
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore::FutureWarning")
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # Beam, tfx_bsl and others log through the root logger ("WARNING:root:Resource module is not available").
    logging.getLogger().setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=LIBRARY_MODULES)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    _state["filter"] = StderrFilter.install()


def is_quiet() -> bool:
    """Whether this process silenced the libraries."""
    return bool(_state["quiet"])


class StderrFilter:
    """File descriptor 2 through a pipe: a thread passes every line on to the real stderr but `NOISE`.

    Python's `sys.stderr` is moved to a copy of the real descriptor, so the project's own messages never wait
    for the thread. At exit the real descriptor is put back and what is left in the pipe is passed on.
    """

    def __init__(self, real_fd: int, read_fd: int):
        self.real_fd, self._read_fd = real_fd, read_fd
        self._skip_source = False
        self._thread = threading.Thread(target=self._pump, name="stderr-filter", daemon=True)
        self._thread.start()

    @classmethod
    def install(cls) -> StderrFilter | None:
        try:
            sys.stderr.flush()
            real = os.dup(2)
            read_fd, write_fd = os.pipe()
            os.dup2(write_fd, 2)
            os.close(write_fd)
        except (OSError, ValueError):  # no descriptor 2 (embedded interpreters)
            return None
        os.set_inheritable(real, False)
        sys.stderr = open(real, "w", buffering=1, encoding=sys.stderr.encoding, closefd=False)  # noqa: SIM115
        sys.__stderr__ = sys.stderr
        self = cls(real, read_fd)
        atexit.register(self.close)
        return self

    def _keep(self, line: bytes) -> bool:
        text = line.decode("utf-8", "replace")
        if self._skip_source and _WARNING_SOURCE.match(text):
            self._skip_source = False
            return False
        self._skip_source = False
        if NOISE.search(text):
            self._skip_source = "Warning: " in text
            return False
        return True

    def _pump(self) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(self._read_fd, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            out = b"".join(line + b"\n" for line in lines if self._keep(line))
            if out:
                _write_all(self.real_fd, out)
        if pending and self._keep(pending):
            _write_all(self.real_fd, pending)

    def close(self, timeout: float = 2.0) -> None:
        """Puts the real stderr back on descriptor 2 and passes on what the pipe still holds."""
        try:
            os.dup2(self.real_fd, 2)  # closes this process's write end of the pipe
        except OSError:
            return
        self._thread.join(timeout)  # children that outlive us keep the pipe open: do not wait for them


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            data = data[os.write(fd, data) :]
        except OSError:
            return
