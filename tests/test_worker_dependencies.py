"""What Dataflow workers need: the preprocessing job runs without the `synthetic` extra's scipy.

setup.py's install_requires is what a worker installs (`--setup_file`); scipy is only in the `synthetic`
extra. These tests run in subprocesses whose interpreter (and every process it starts: the DirectRunner's
workers) cannot import scipy: a `sitecustomize` on PYTHONPATH puts a blocking finder first on sys.meta_path.
"""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys

import pytest

import pipelines
from tests import fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKED = "scipy"
SITECUSTOMIZE = f'''
import sys


class _Blocked:
    """Refuses {BLOCKED!r} and its submodules, as if it were not installed."""

    def find_spec(self, name, path=None, target=None):
        if name == {BLOCKED!r} or name.startswith({BLOCKED!r} + "."):
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
        return None


sys.meta_path.insert(0, _Blocked())
'''


@pytest.fixture(scope="module")
def blocked_env(tmp_path_factory):
    """Environment of a subprocess in which `import scipy` fails, in it and in the processes it starts."""
    site = tmp_path_factory.mktemp("no_scipy")
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}", "TF_CPP_MIN_LOG_LEVEL": "2"}


def _python(env, *args, timeout=300):
    return subprocess.run(
        [sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def _job_modules() -> list[str]:
    """Every module of `pipelines` (the Beam jobs and their transforms) except the synthetic generator."""
    names = [
        m.name
        for m in pkgutil.walk_packages(pipelines.__path__, "pipelines.")
        if not m.name.startswith("pipelines.synthetic")
    ]
    assert "pipelines.preprocess" in names and "pipelines.transforms.samples" in names
    return ["schemas", *names]


def test_the_block_works(blocked_env):
    out = _python(blocked_env, "-c", f"import {BLOCKED}")
    assert out.returncode != 0 and "blocked by the test" in out.stderr
    gen = _python(blocked_env, "-m", "pipelines.synthetic", "--help")
    assert gen.returncode != 0 and "synthetic` extra" in gen.stderr  # the generator says what to install


def test_job_modules_import_without_scipy(blocked_env):
    code = (
        "import importlib, sys\n"
        f"for name in {_job_modules()!r}:\n"
        "    importlib.import_module(name)\n"
        f"assert {BLOCKED!r} not in sys.modules\n"
        "print('ok')\n"
    )
    out = _python(blocked_env, "-c", code)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_preprocessing_job_runs_without_scipy(blocked_env, tmp_path):
    """The whole job on a tiny dataset (in one process: the imports above cover the modules workers load)."""
    csv_path, image_dir, labels = fixtures.make_dataset(str(tmp_path / "in"), num_samples=12, size=16)
    out = str(tmp_path / "out")
    args = ["--labels_csv", csv_path, "--input_dir", image_dir, "--output_dir", out, "--num_folds", "3"]
    args += ["--direct_num_workers", "1"]
    result = _python(blocked_env, "-m", "pipelines.preprocess", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    import schemas

    written = schemas.read_manifest(out)[schemas.MANIFEST_WRITTEN]
    assert sum(written.values()) == len(labels)
