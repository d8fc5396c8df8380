"""What the commands print (schemas/console.py, schemas/cli.py's parser, schemas/folders.py): no library
start-up noise unless -v, one-line usage errors that name the fix, hints with the right flag and command.

The newcomer's mistakes run through the installed scripts, in parallel; only two of them load TensorFlow
(one quiet, one with -v), which is where the start-up lines come from.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from schemas import cli, console, folders
from tests import fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)

# Lines seen on this CPU machine with TF 2.21 / Beam 2.77 / tf.Transform 1.21 (issue 20), each to be dropped.
NOISE_LINES = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796534252.837271   19859 port.cc:153] oneDNN custom operations are on. You may see",
    "I0000 00:00:1796534252.838452   19859 cudart_stub.cc:31] Could not find cuda drivers on your machine, "
    "GPU will not be used.",
    "E0000 00:00:1796534281.666575   19859 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: "
    "Failed call to cuInit: UNKNOWN ERROR (303)",
    "I0000 00:00:1796534173.100335   18567 cpu_feature_guard.cc:227] This TensorFlow binary is optimized",
    "To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow "
    "with the appropriate compiler flags.",
    "E0000 00:00:1796534411.624252   24818 util.cc:131] oneDNN supports DT_INT32 only on platforms with "
    "AVX-512. Falling back to the default Eigen-based implementation if present.",
    "WARNING:absl:You are passing instance dicts and DatasetMetadata to TFT which will not provide optimal",
    "WARNING:apache_beam.runners.portability.local_job_service:Worker: severity: WARN timestamp { "
    "message: \"Discarding unparseable args: ['--pipeline_type_check']\"",
    "WARNING:root:Resource module is not available for current platform, memory usage cannot be fetched.",
    "/x/site-packages/tensorflow/python/x.py:12: DeprecationWarning: `np.bool8` is a deprecated alias",
]
REAL_LINES = [
    "hpa-train: error: /d/manifest.json not found",
    "E0000 00:00:1796534281.666575   19859 cuda_driver.cc:1] failed to allocate 2G: OUT_OF_MEMORY",
    "Traceback (most recent call last):",
    "ERROR:apache_beam.runners.worker:a failed bundle",
]


def test_the_noise_patterns_drop_the_known_lines_and_keep_real_problems():
    for line in NOISE_LINES:
        assert console.NOISE.search(line), line
    for line in REAL_LINES:
        assert not console.NOISE.search(line), line


@pytest.mark.parametrize(
    "argv, env, verbose",
    [
        ([], {}, False),
        (["-v"], {}, True),
        (["-vv"], {}, True),
        (["--verbose"], {}, True),
        (["--verbose", "2"], {}, True),
        (["--verbose", "0"], {}, False),
        (["--verbose=0"], {}, False),
        (["--data_dir", "x"], {"HPA_LOG": "debug"}, True),
        (["--", "-v"], {}, False),
    ],
)
def test_verbosity_is_read_from_the_command_line_before_any_import(argv, env, verbose):
    assert console.verbose_requested(argv, env) is verbose


_FILTER_SCRIPT = textwrap.dedent(
    """
    import os, subprocess, sys
    sys.argv[0] = "-m"  # as while `python -m model.x` imports its package
    import model  # noqa: F401  (model/__init__.py silences before anything else loads)
    for line in sys.argv[1:]:
        os.write(2, (line + "\\n").encode())  # as C++ code writes: straight to descriptor 2
    subprocess.run([sys.executable, "-c", "import os; os.write(2, b'child line\\\\n')"])  # inherits fd 2
    print("python line", file=sys.stderr)
    os.write(2, b"no newline at the end")
    """
)


@pytest.mark.parametrize("verbose", [False, True])
def test_descriptor_2_is_filtered_in_a_command_and_everything_shows_with_hpa_log_debug(verbose):
    env = dict(os.environ, PYTHONPATH=ROOT, HPA_LOG="debug" if verbose else "")
    argv = [sys.executable, "-c", _FILTER_SCRIPT, *NOISE_LINES, *REAL_LINES]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    for line in REAL_LINES + ["child line", "python line", "no newline at the end"]:
        assert line in lines, proc.stderr
    shown = [line for line in NOISE_LINES if line in lines]
    assert shown == (NOISE_LINES if verbose else []), proc.stderr


def test_flags_with_dashes_are_read_as_the_snake_case_flags():
    assert cli.normalise_flags(["--data-dir", "a-b", "--image-size=64", "-v", "--", "--keep-me"]) == [
        "--data_dir",
        "a-b",
        "--image_size=64",
        "-v",
        "--",
        "--keep-me",
    ]
    p = cli.ArgumentParser(prog="hpa-x")
    p.add_argument("--data_dir", required=True)
    p.add_argument("--epochs", type=int, default=1)
    args = p.parse_args(["--data-dir", "d", "--epochs=3", "-vv"])
    assert (args.data_dir, args.epochs, args.verbose) == ("d", 3, 2)
    assert p.parse_args(["--data_dir", "d", "--verbose", "0"]).verbose == 0


def _image_folder(path, ids=("a", "b")) -> str:
    for k, sid in enumerate(ids):
        fixtures.write_sample_images(str(path), sid, seed=k, size=8)
    return str(path)


def _three_folders(tmp_path) -> tuple[str, str, str]:
    """An image folder, a (stand-in) preprocessing output and a dataset root (train.csv beside train/)."""
    images = _image_folder(tmp_path / "images")
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text("{}")
    raw = tmp_path / "raw"
    _image_folder(raw / "train")
    (raw / "train.csv").write_text("Id,Target\n")
    return images, str(shards), str(raw)


def test_folders_are_told_apart(tmp_path):
    images, shards, raw = _three_folders(tmp_path)
    assert [folders.kind_of(str(p)) for p in (images, shards, raw, tmp_path / "missing", "gs://b/x")] == [
        folders.IMAGES,
        folders.SHARDS,
        folders.RAW,
        folders.OTHER,
        folders.OTHER,
    ]
    assert "--input_dir" in folders.hint_for_data_dir(images, "hpa-predict")
    assert "hpa-preprocess" in folders.hint_for_data_dir(images, "hpa-train")
    assert "--data_dir" in folders.hint_for_input_dir(shards)


def _mistakes(tmp_path) -> dict[str, tuple[list[str], str]]:
    """{name: (command line, what its error must say)}: a newcomer's slips, each found before real work."""
    empty = tmp_path / "empty"
    empty.mkdir()
    images, shards, raw = _three_folders(tmp_path)
    out = str(tmp_path / "out")
    model = ["--model_dir", str(empty), "--out", out + ".csv"]
    return {
        "misspelt flag": (["hpa-train", "--epcohs", "1"], "did you mean --epochs?"),
        "misspelt flag with required ones missing": (
            ["hpa-train", "--data_dri", "x", "--model_dir", "y"],
            "did you mean --data_dir?",
        ),
        "misspelt choice": (
            ["hpa-train", "--data_dir", "x", "--model_dir", "y", "--backbone", "resnet"],
            "did you mean 'resnet50'?",
        ),
        "misspelt Beam option": (
            [
                "hpa-preprocess",
                "--labels_csv",
                "l",
                "--input_dir",
                "i",
                "--output_dir",
                "o",
                "--temp_locaton",
                "t",
            ],
            "did you mean --temp_location?",
        ),
        "misspelt flag of the fold driver": (
            ["hpa-folds", "--data_dir", shards, "--out", out, "--epcohs", "2"],
            "did you mean --epochs?",
        ),
        "missing flag": (["hpa-score", "--submission", "s.csv"], "required: --answers"),
        "image folder as --data_dir of hpa-predict": (
            ["hpa-predict", "--data_dir", images, *model],
            f"--input_dir {images}",
        ),
        "image folder as --data_dir of hpa-batch-predict": (
            ["hpa-batch-predict", "--data-dir", images, *model],
            f"--input_dir {images}",
        ),
        "shards as --input_dir of hpa-predict": (
            ["hpa-predict", "--input_dir", shards, *model],
            f"--data_dir {shards}",
        ),
        "dataset root as --input_dir": (
            ["hpa-predict", "--input_dir", raw, *model],
            f"--input_dir {os.path.join(raw, 'train')}",
        ),
        # loads TensorFlow (the devices come first): quiet, with dashes read as underscores
        "dataset root as --data_dir of hpa-train": (
            ["hpa-train", "--data-dir", raw, "--model-dir", out, "--backbone", "small"],
            "hpa-preprocess --labels_csv",
        ),
    }


def test_a_newcomers_mistakes_are_exit_2_in_at_most_3_lines_that_name_the_fix(tmp_path):
    env = dict(os.environ)
    for name in ("HPA_LOG", "TF_CPP_MIN_LOG_LEVEL", "PYTHONWARNINGS"):
        env.pop(name, None)
    cases = _mistakes(tmp_path)
    procs = {
        name: subprocess.Popen(
            [os.path.join(BIN, argv[0]), *argv[1:]],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, (argv, _) in cases.items()
    }
    # The same TensorFlow-loading mistake with -v: the libraries' start-up lines are back.
    argv = cases["dataset root as --data_dir of hpa-train"][0]
    loud = subprocess.Popen(
        [os.path.join(BIN, argv[0]), *argv[1:], "-v"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        lines = out.strip().splitlines()
        assert proc.returncode == 2, f"{name}: exit {proc.returncode}\n{out[-2000:]}"
        assert 1 <= len(lines) <= 3, f"{name}:\n{out}"
        assert cases[name][1] in out, f"{name}:\n{out}"
        assert "Traceback" not in out, f"{name}:\n{out}"
    out, _ = loud.communicate(timeout=300)
    assert loud.returncode == 2
    assert any(console.NOISE.search(line) for line in out.decode().splitlines()), out.decode()[-2000:]


def test_the_beam_jobs_read_dashed_flags_and_pass_dashed_beam_options_on():
    from pipelines import preprocess

    argv = ["--labels-csv", "l.csv", "--input-dir", "i", "--output-dir", "o", "--image-size", "64"]
    cfg, beam_args = preprocess.parse_args(argv + ["--direct-num-workers", "1"])
    assert cfg.image_size == 64 and beam_args == ["--direct_num_workers", "1"]


def test_keras_progress_is_a_line_per_epoch_off_a_terminal(capsys):
    keras = pytest.importorskip("keras")
    from model import progress

    class FakeTTY:
        def isatty(self):
            return True

    assert progress.fit_verbosity(FakeTTY()) == 1 and progress.progress_callbacks(FakeTTY()) == []
    assert progress.fit_verbosity(sys.stdout) == 0  # captured by pytest: not a terminal
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(loss="mse")
    x = np.zeros((8, 3), "float32")
    model.fit(
        x, x[:, :1], epochs=2, batch_size=4, verbose=0, callbacks=progress.progress_callbacks(interval=0)
    )
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["Epoch 1/2"] * 3 + ["Epoch 2/2"] * 3, lines
    assert lines[2].startswith("Epoch 1/2: 2 steps in ") and "loss " in lines[2]
    assert not any("\r" in line or "\b" in line for line in lines)
