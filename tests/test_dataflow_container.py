"""The Dataflow worker container (docker/Dockerfile) is pinned to the lock: versions equal constraints.txt.

Building and running the image needs Docker and a registry, which this machine does not have: this checks
what can be checked without them (docs/dataflow.md).
"""

from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name: str) -> str:
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def _lock() -> dict[str, str]:
    pins = {}
    for line in _read("constraints.txt").splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[re.sub(r"[-_.]+", "-", name.lower())] = version.strip()
    return pins


def test_every_version_in_the_dockerfile_is_the_locked_one():
    dockerfile = _read("docker/Dockerfile")
    lock = _lock()
    (python, beam), *_ = re.findall(r"^FROM apache/beam_python(\d+\.\d+)_sdk:(\S+)$", dockerfile, re.M)
    assert python == "3.11"  # setup.py refuses any other Python
    assert beam == lock["apache-beam"]
    pins = re.findall(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^\s\\]+)", dockerfile)
    assert len(pins) >= 4
    for name, version in pins:
        assert lock[re.sub(r"[-_.]+", "-", name.lower())] == version, name


def test_every_pip_install_is_constrained_and_the_project_is_copied_whole():
    dockerfile = _read("docker/Dockerfile")
    installs = re.findall(r"pip install[^\n]*", dockerfile)
    assert installs and all("-c constraints.txt" in i for i in installs)
    import setuptools

    top = {
        p.split(".")[0] for p in setuptools.find_packages(ROOT, include=["schemas*", "pipelines*", "model*"])
    }
    copied = set(re.findall(r"^COPY (\w+) ", dockerfile, re.M))
    assert top == {"schemas", "pipelines", "model"} and top <= copied, copied
