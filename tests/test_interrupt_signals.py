"""Ctrl-C as a terminal sends it (SIGINT to the whole process group) ends the Beam jobs with one line.

A terminal's Ctrl-C reaches every process of its foreground group: the command and the SDK worker processes
of a local multi-process Beam run. Each job is started in its own session (its own group, as a shell's
foreground job is), signalled with `os.killpg` at an instant chosen by what it is doing (its workers up,
its start-up), and must end with exit status 130, its one `interrupted` line last on stderr, no traceback,
and no process of it left (docs/interrupts.md, "Signals").
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from schemas import cli
from tests import fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CEILING = 600.0  # generous: the shared machine's load changes run times several-fold


def _default_signals() -> None:  # pragma: no cover - runs in the child between fork and exec
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a background shell would leave SIGINT ignored


def _workers_up(pid: int) -> bool:
    """A Beam SDK worker process runs below `pid`."""
    for child in cli._descendants(pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                if b"sdk_worker_main" in f.read():
                    return True
        except OSError:
            pass
    return False


def ctrl_c_when(argv: list[str], ready) -> tuple[int, str, bool]:
    """Runs the installed command `argv` in its own group, SIGINTs the group once `ready(pid)` holds.

    Returns (exit status, stderr, whether the signal was sent before the command ended). Waits until every
    process it started has ended (at most CEILING s: a condition, not a timing).
    """
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop(cli.TRACEBACK_ENV, None)
    proc = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), argv[0]), *argv[1:]],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=_default_signals,
    )
    sent, below = False, []
    try:
        deadline = time.time() + CEILING
        while time.time() < deadline and proc.poll() is None:
            if ready(proc.pid):
                below = cli._descendants(proc.pid)
                os.killpg(proc.pid, signal.SIGINT)
                sent = True
                break
            time.sleep(0.05)
        _, err = proc.communicate(timeout=CEILING)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    deadline = time.time() + CEILING
    while time.time() < deadline and any(_running(p) for p in below):
        time.sleep(0.1)
    assert not any(_running(p) for p in below), "a process of the job outlived it"
    return proc.returncode, err.decode(errors="replace"), sent


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _assert_one_line(prog: str, status: int, err: str) -> None:
    lines = err.strip().splitlines()
    assert status == 130, err[-3000:]
    assert "Traceback" not in err and "Exception" not in err, err[-3000:]
    assert lines[-1].startswith(f"{prog}: interrupted") and "rerun the same command" in lines[-1], err
    assert sum("interrupted" in line for line in lines) == 1, err


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("signals"))
    labels_csv, input_dir, _ = fixtures.make_dataset(root, num_samples=8, size=16)
    return labels_csv, input_dir


@pytest.mark.slow
@pytest.mark.parametrize("instant", ["start-up", "workers running"])
def test_ctrl_c_of_preprocess_ends_with_one_line_and_130(images, tmp_path, instant):
    labels_csv, input_dir = images
    argv = ["hpa-preprocess", "--labels_csv", labels_csv, "--input_dir", input_dir]
    argv += ["--output_dir", str(tmp_path / "out"), "--num_folds", "2", "--num_shards", "2"]
    argv += ["--direct_num_workers", "2", "--progress_seconds", "60"]
    started = time.time()
    ready = (lambda pid: time.time() - started > 1.0) if instant == "start-up" else _workers_up
    status, err, sent = ctrl_c_when(argv, ready)
    assert sent, err[-3000:]
    _assert_one_line("hpa-preprocess", status, err)


@pytest.mark.slow
def test_ctrl_c_of_download_with_worker_processes_ends_with_one_line_and_130(tmp_path):
    from tests.image_server import ImageServer

    ids = [f"60_A{i}_1" for i in range(6)]
    labels_csv = str(tmp_path / "ids.csv")
    fixtures.write_labels_csv(labels_csv, [(i, "0") for i in ids])
    with ImageServer(latency=0.5) as server:
        for k, i in enumerate(ids):
            server.add_sample(i, seed=k)
        argv = ["hpa-download", "--labels_csv", labels_csv, "--output_dir", str(tmp_path / "out")]
        argv += ["--base_url", server.base_url, "--direct_num_workers", "2", "--progress_seconds", "60"]
        status, err, sent = ctrl_c_when(argv, _workers_up)
    assert sent, err[-3000:]
    _assert_one_line("hpa-download", status, err)


_COMMAND = """
import atexit, logging, os, signal, sys, threading, time
from schemas import cli

mode = sys.argv[1]
go = threading.Event()

def background():  # a library's thread that fails once the command is interrupted (Beam's run_worker)
    go.wait()
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:  # as Beam logs it, from a DoFn interrupted in the main thread
        logging.getLogger("apache_beam.runners.common").exception("KeyboardInterrupt [while running 'Fetch']")
    raise RuntimeError("Worker subprocess exited with return code -15")

@cli.command("hpa-x")
def main(argv=None):
    if mode == "thread":
        threading.Thread(target=background).start()
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(60)
        finally:
            go.set()
            time.sleep(0.5)
    if mode == "join":  # a thread that Python joins after main returned
        threading.Thread(target=joined).start()
    if mode == "atexit":  # an exit handler of a library, registered before the command ran
        atexit.register(exiting)
    return 0

def joined():
    while threading.main_thread().is_alive():  # until the main thread is done (Python joins this one)
        time.sleep(0.01)
    print("ready", flush=True)
    time.sleep(60)

def exiting():
    print("ready", flush=True)
    time.sleep(2)

sys.exit(main())
"""


@pytest.mark.parametrize("mode", ["thread", "join", "atexit"])
def test_an_interrupt_while_a_command_ends_is_one_line_or_nothing_never_a_traceback(mode):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop(cli.TRACEBACK_ENV, None)
    proc = subprocess.Popen(
        [sys.executable, "-c", _COMMAND, mode],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=_default_signals,
    )
    try:
        if mode != "thread":
            assert proc.stdout.readline() == b"ready\n"  # main returned: Python joins, or runs exit handlers
            proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=CEILING)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = err.decode()
    assert "Traceback" not in err, err
    if mode == "thread":  # the failing thread says nothing; the command's one line does
        assert proc.returncode == 130 and err == "hpa-x: interrupted; rerun the same command to resume\n"
    elif mode == "join":
        assert proc.returncode == 130 and err == "hpa-x: interrupted while exiting, after its work ended\n"
    else:  # the last moments of the process: the signal is ignored, the command's status stands
        assert proc.returncode == 0 and err == ""


@pytest.mark.slow
def test_ctrl_c_of_batch_predict_with_worker_processes_ends_with_one_line_and_130(tmp_path):
    import numpy as np

    import schemas
    from model import model as model_lib
    from model.config import EXPORT_DIR
    from tests.test_predict import _ids, write_model_dir, write_test_set

    data_dir, model_dir = str(tmp_path / "data"), str(tmp_path / "model")
    write_test_set(data_dir, _ids(8), size=16)
    model = write_model_dir(model_dir, seed=0, size=16, thresholds=np.full(schemas.NUM_CLASSES, 0.5))
    model_lib.export_serving(model, os.path.join(model_dir, EXPORT_DIR), 16)
    argv = ["hpa-batch-predict", "--data_dir", data_dir, "--model_dir", model_dir]
    argv += ["--out", str(tmp_path / "submission.csv"), "--direct_num_workers", "2"]
    argv += ["--progress_seconds", "60"]
    status, err, sent = ctrl_c_when(argv, _workers_up)
    assert sent, err[-3000:]
    _assert_one_line("hpa-batch-predict", status, err)
    assert not os.path.exists(tmp_path / "submission.csv")


def test_the_start_up_handler_is_in_place_before_numpy_loads():
    """A Ctrl-C while numpy loaded (1.3 s into a command on a loaded machine) printed numpy's ImportError."""
    code = """
import signal, sys
sys.argv[0] = "/usr/bin/hpa-x"
seen = []

class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "numpy":
            seen.append(getattr(signal.getsignal(signal.SIGINT), "__name__", "?"))

sys.meta_path.insert(0, Spy())
import schemas
print(seen[0])
"""
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop(cli.TRACEBACK_ENV, None)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.stdout.strip() == "_startup_interrupt", done.stdout + done.stderr


@pytest.mark.parametrize("child", [False, True])
def test_an_interrupt_during_start_up_is_one_line_and_a_fold_childs_is_silent(child):
    """The fold driver's training process got the terminal's SIGINT while it loaded: its line, beside the
    driver's own, made two (campaign, `folds`)."""
    code = "import os, signal, sys; sys.argv[0] = '/usr/bin/hpa-x'; import schemas; os.kill(os.getpid(), 2)"
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop(cli.TRACEBACK_ENV, None)
    env.pop(cli.CHILD_ENV, None)
    if child:
        env[cli.CHILD_ENV] = "1"
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        preexec_fn=_default_signals,
    )
    assert done.returncode == 130
    assert done.stderr == ("" if child else "hpa-x: interrupted during start-up; rerun the same command\n")
