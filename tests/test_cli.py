"""The command family (schemas/cli.py): every job installed as an `hpa-*` command with `--help`, and the
same exit statuses everywhere: 2 and one line for bad usage or bad input, 1 and a traceback for a failure.

The installed scripts run as subprocesses, in parallel (most import Beam or Keras); the error paths run
in-process through each module's `main`.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import os
import re
import subprocess
import sys

import pytest

from schemas import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
DIST = "hpa-protein-localization"


def _setup_commands() -> dict[str, str]:
    """{command: "module:main"} from setup.py's COMMANDS list, read without running setup.py."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "COMMANDS" for t in node.targets):
            lines = ast.literal_eval(node.value)
            return dict(tuple(part.strip() for part in line.split("=")) for line in lines)
    raise AssertionError("setup.py defines no COMMANDS list")


COMMANDS = _setup_commands()


def _modules_with(pattern: str) -> set[str]:
    """The modules of both packages whose source matches `pattern` (a multi-line regular expression)."""
    found = set()
    for package in ("pipelines", "model"):
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                path = os.path.join(folder, name)
                if name.endswith(".py") and re.search(pattern, open(path).read(), re.M):
                    found.add(os.path.relpath(path, ROOT)[: -len(".py")].replace(os.sep, "."))
    return found


def _main_of(target: str):
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def test_every_command_module_is_registered_and_installed():
    registered = {name: _main_of(target) for name, target in COMMANDS.items()}
    # every module run with `python -m` (its `main`, wherever it is defined) is a registered command
    runnable = {_main_of(f"{m}:main") for m in _modules_with(r"^if __name__ == .__main__.:")}
    assert runnable == set(registered.values()), "a runnable module is not in setup.py's COMMANDS (or v.v.)"
    for name, main in registered.items():
        assert getattr(main, "prog", None) == name, f"{COMMANDS[name]} is not @cli.command({name!r})"
        assert os.access(os.path.join(BIN, name), os.X_OK), f"{name} is not in {BIN}"
    installed = {
        ep.name: ep.value
        for ep in importlib.metadata.entry_points(group="console_scripts")
        if ep.dist is not None and ep.dist.name == DIST
    }
    assert installed == COMMANDS, "the installed commands differ from setup.py's COMMANDS: run `make setup`"


def test_help_of_every_installed_command_and_the_wrappers(tmp_path):
    """`hpa-x --help` for every command; the run_*.sh wrappers run the modules, from the caller's folder."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHON=sys.executable)
    (tmp_path / "labels.csv").write_text("Id,Target\n")  # found only if relative to the caller's folder
    runs = {name: ([os.path.join(BIN, name), "--help"], 0, f"usage: {name} ") for name in COMMANDS}
    runs["run_train.sh"] = ([os.path.join(ROOT, "run_train.sh"), "--help"], 0, "usage: hpa-train ")
    wrapper = [os.path.join(ROOT, "run_preprocess.sh"), "--labels_csv", "labels.csv", "--input_dir", "."]
    runs["run_preprocess.sh"] = (wrapper + ["--output_dir", "o"], 2, "labels.csv has a header but no rows")
    procs = {
        name: subprocess.Popen(
            cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, (cmd, _, _) in runs.items()
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        _, status, expected = runs[name]
        assert proc.returncode == status, f"{name}: exit {proc.returncode}\n{err[-2000:]}"
        ok = out.startswith(expected) if status == 0 else expected in err
        assert ok, f"{name}:\n{(out if status == 0 else err)[-600:]}"


def _one_error_line(err: str, prog: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err[-2000:]
    return lines[0]


def test_installed_command_exit_statuses(tmp_path):
    """Through the installed script itself: bad input -> 2 and one line; bad usage -> argparse's 2."""
    score = os.path.join(BIN, "hpa-score")
    missing = str(tmp_path / "missing.csv")
    argv = [score, "--submission", missing, "--answers", missing]
    proc = subprocess.run(argv, capture_output=True, text=True)
    assert proc.returncode == 2 and missing in _one_error_line(proc.stderr, "hpa-score")
    proc = subprocess.run([score, "--submission", missing], capture_output=True, text=True)
    assert proc.returncode == 2 and "hpa-score: error: the following arguments are required" in proc.stderr


def _bad_input_cases(tmp_path) -> dict[str, tuple[list[str], str]]:
    """{command: (argv, a part of the error line)}: one bad input each, found before any real work."""
    missing = str(tmp_path / "missing.csv")
    no_id = tmp_path / "no_id.csv"
    no_id.write_text("Name,Target\nx,1\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    out = str(tmp_path / "out")
    return {
        "hpa-synthetic": (["--output_dir", out, "--labels_csv", missing], "missing.csv"),
        "hpa-download": (["--labels_csv", str(no_id), "--output_dir", out], "no `Id` column"),
        "hpa-preprocess": (
            ["--labels_csv", missing, "--input_dir", str(empty), "--output_dir", out],
            "missing.csv",
        ),
        "hpa-train": (["--data_dir", str(empty), "--model_dir", out, "--backbone", "small"], "manifest"),
        "hpa-folds": (["--data_dir", str(empty), "--out", out], "manifest"),
        "hpa-evaluate": (["--model_dir", str(empty)], "not found"),
        "hpa-predict": (["--data_dir", str(empty), "--model_dir", str(empty), "--out", out], str(empty)),
        "hpa-batch-predict": (
            ["--data_dir", str(empty), "--model_dir", str(empty), "--out", str(tmp_path / "out" / "s.csv")],
            str(empty),
        ),
        "hpa-score": (["--submission", str(no_id), "--answers", str(no_id)], "missing column"),
        "hpa-inspect": (["--data_dir", str(empty), "--model_dir", str(empty), "--out", out], str(empty)),
        "hpa-doctor": (["--presets", "no-such-preset"], "unknown preset 'no-such-preset'"),
    }


def _main(name: str):
    module = COMMANDS[name].split(":")[0]
    return importlib.import_module(module), _main_of(COMMANDS[name])


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_bad_input_is_one_line_and_exit_2(name, tmp_path, capsys):
    argv, part = _bad_input_cases(tmp_path)[name]
    _, main = _main(name)
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert part in _one_error_line(captured.err, name)
    assert "Traceback" not in captured.out + captured.err
    assert not os.path.exists(tmp_path / "out")


# The function each command's main calls to do its work: made to fail like a bug would.
WORK = {
    "hpa-synthetic": "generate",
    "hpa-download": "run",
    "hpa-preprocess": "run",
    "hpa-train": "run",
    "hpa-folds": "run",
    "hpa-evaluate": "run",
    "hpa-predict": "run",
    "hpa-batch-predict": "run",
    "hpa-score": "score_files",
    "hpa-inspect": "run",
    "hpa-doctor": "run",
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_failure_while_running_is_exit_1_with_its_traceback(name, tmp_path, monkeypatch, capsys):
    argv, _ = _bad_input_cases(tmp_path)[name]
    module, main = _main(name)
    assert set(WORK) == set(COMMANDS)

    def broken(*args, **kwargs):
        raise KeyError("a bug, not bad input")

    monkeypatch.setattr(module, WORK[name], broken)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "KeyError: 'a bug, not bad input'" in err


def test_the_wrapper_reports_bad_input_in_one_line_and_failures_with_a_traceback(monkeypatch, capsys):
    class JobError(ValueError):
        pass

    def main_raising(error):
        @cli.command("hpa-x")
        def main(argv=None) -> int:
            try:
                if error is not None:
                    raise error
            except JobError as e:
                return cli.bad_input("hpa-x", e)
            return 0

        return main

    assert main_raising(None)([]) == 0
    assert main_raising(JobError("bad\n  flag"))([]) == 2
    assert capsys.readouterr().err == "hpa-x: error: bad flag\n"
    assert main_raising(FileNotFoundError(2, "No such file or directory", "x.csv"))([]) == 2
    assert capsys.readouterr().err == "hpa-x: error: [Errno 2] No such file or directory: 'x.csv'\n"
    assert main_raising(ValueError("a ValueError main does not catch"))([]) == 1  # a bug: its traceback
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.endswith("ValueError: a ValueError main does not catch\n")
    monkeypatch.setenv(cli.TRACEBACK_ENV, "1")
    assert main_raising(JobError("bad flag"))([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.endswith("hpa-x: error: bad flag\n")
    with pytest.raises(SystemExit):  # argparse's own exits (help, usage) pass through
        main_raising(SystemExit(2))([])


def test_a_missing_gs_path_from_tensorflow_is_bad_input(capsys):
    tf = pytest.importorskip("tensorflow")

    @cli.command("hpa-x")
    def main(argv=None) -> int:
        raise tf.errors.NotFoundError(None, None, "gs://bucket/x: not found")

    assert main([]) == 2 and capsys.readouterr().err == "hpa-x: error: gs://bucket/x: not found\n"


@pytest.mark.parametrize("module", ["pipelines.preprocess", "pipelines.download"])
def test_a_misspelt_flag_of_a_beam_job_is_bad_usage_not_dropped(module, capsys):
    job = importlib.import_module(module)
    base = ["--labels_csv", "gs://b/l.csv", "--output_dir", "gs://b/o"]  # remote paths: the preflight's rule
    base += ["--input_dir", "gs://b/i"] if module == "pipelines.preprocess" else []
    beam = ["--runner", "DataflowRunner", "--project", "p", "--region", "r", "--temp_location", "gs://b/t"]
    beam += ["--direct_num_workers", "1", "--experiments=a", "--save_main_session", "--sdk_container_image=c"]
    _, beam_args = job.parse_args(base + beam)  # Beam's own options pass through
    assert beam_args == beam
    with pytest.raises(SystemExit) as e:
        job.parse_args(base + beam + ["--image_sise", "512", "--overwirte"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --image_sise (did you mean --image_size?), --overwirte (did you " in err
