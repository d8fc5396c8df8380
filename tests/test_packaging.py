"""The pinned installs: constraints.txt (CPU, `make setup`) and constraints-gpu.txt (`make setup-gpu`).

The GPU lock must pin every package both installs share at the same version as constraints.txt, and
`pip install -c constraints-gpu.txt '.[gpu]'` must resolve to the CUDA wheels it pins. The resolution test
asks the package registry (as `make setup` does) but downloads no wheel: `--dry-run --report` reads only
metadata.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_LOCK = os.path.join(ROOT, "constraints.txt")
GPU_LOCK = os.path.join(ROOT, "constraints-gpu.txt")
# pip freeze (which writes constraints.txt) leaves out the packaging tools; the resolution report keeps them.
PACKAGING_TOOLS = {"pip", "setuptools", "wheel"}
CUDNN = "nvidia-cudnn-cu12"


def _normalize(name: str) -> str:
    """PEP 503 name: lower case, runs of `-_.` as one `-`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: str) -> dict[str, str]:
    """{normalized name: version} of a constraints file of `name==version` lines."""
    pins: dict[str, str] = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            name, sep, version = line.partition("==")
            assert sep and version, f"{path}:{number}: not an exact pin: {line!r}"
            assert _normalize(name) not in pins, f"{path}:{number}: {name} pinned twice"
            pins[_normalize(name)] = version.strip()
    return pins


def test_gpu_lock_pins_what_the_cpu_lock_pins_plus_the_cuda_wheels():
    cpu, gpu = read_lock(CPU_LOCK), read_lock(GPU_LOCK)
    differing = {name: (cpu[name], gpu[name]) for name in cpu.keys() & gpu.keys() if cpu[name] != gpu[name]}
    assert not differing, f"the locks disagree (constraints.txt, constraints-gpu.txt): {differing}"
    assert not cpu.keys() - gpu.keys(), f"missing from the GPU lock: {sorted(cpu.keys() - gpu.keys())}"
    extra = {name for name in gpu.keys() - cpu.keys() if not name.startswith("nvidia-")}
    assert extra <= PACKAGING_TOOLS, f"the GPU lock adds more than the CUDA wheels: {sorted(extra)}"
    for name in ("tensorflow", "keras", "apache-beam", "tensorflow-transform"):
        assert gpu[name] == cpu[name]
    assert CUDNN in gpu


def test_gpu_extra_resolves_with_the_lock():
    """`pip install --dry-run -c constraints-gpu.txt '.[gpu]'` in this environment (the CPU install) resolves.

    Packages already installed here at their pinned versions stay as they are, so pip fetches the metadata
    of the CUDA wheels only. `fast-deps` reads it with HTTP range requests where the index serves no
    separate metadata file: no multi-GB download either way.
    """
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--dry-run",
        "--quiet",
        "--use-feature=fast-deps",
        "--report",
        "-",
        "-c",
        GPU_LOCK,
        ".[gpu]",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    errors = "\n".join(line for line in proc.stderr.splitlines() if "is ignored" not in line)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{errors[-3000:]}"
    report = json.loads(proc.stdout)
    to_install = {
        _normalize(item["metadata"]["name"]): item["metadata"]["version"]
        for item in report["install"]
        if "dir_info" not in item["download_info"]  # the project itself
    }
    pins = read_lock(GPU_LOCK)
    unpinned = {name: v for name, v in to_install.items() if pins.get(name) != v}
    assert not unpinned, f"resolved to versions constraints-gpu.txt does not pin: {unpinned}"
    # The resolution = what pip would install + what is installed here already and satisfied it.
    installed = {_normalize(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    resolved = {**installed, **to_install}
    assert resolved.get(CUDNN) == pins[CUDNN], f"{CUDNN} not in the resolution: {sorted(to_install)}"
    assert resolved["tensorflow"] == pins["tensorflow"]
