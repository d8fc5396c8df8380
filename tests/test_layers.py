"""The project's packages import one way: `schemas` (the record, input-file and command contracts) below
both jobs; `model` (TensorFlow) never imports `pipelines` (Beam); of `pipelines`, only the Beam prediction job
builds on `model`.

Every import statement of every module is read from the source (no module is run), including imports made
inside functions, so a lazy import cannot slip a wrong direction past the check.
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("schemas", "pipelines", "model")
# The only modules of `pipelines` that may import `model`: Beam batch prediction runs the trained models.
BUILDS_ON_MODEL = {
    "pipelines.batch_predict",
    "pipelines.transforms.predictions",
    "pipelines.transforms.inference",
}
# Which package may import which (a package may always import itself).
ALLOWED = {
    "schemas": set(),
    "model": {"schemas"},
    "pipelines": {"schemas"},
}


def _modules() -> dict[str, str]:
    """{dotted module name: path} of every module of the three packages."""
    found = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    rel = os.path.relpath(path, ROOT)[: -len(".py")].replace(os.sep, ".")
                    found[rel.removesuffix(".__init__")] = path
    return found


def _imported_packages(path: str, module: str) -> set[tuple[str, int]]:
    """The project packages `path` imports, with the line of each import."""
    tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    seen = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's own package
                base = (
                    module.split(".")[: -node.level]
                    if not path.endswith("__init__.py")
                    else (module.split(".")[: len(module.split(".")) - node.level + 1])
                )
                names = [".".join(base + ([node.module] if node.module else []))]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in PACKAGES:
                seen.add((top, node.lineno))
    return seen


MODULES = _modules()


def test_the_three_packages_are_found():
    assert {
        "schemas.record",
        "schemas.cli",
        "schemas.labels",
        "schemas.stains",
        "model.train",
        "pipelines.preprocess",
    } <= set(MODULES)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_one_way(module):
    own = module.split(".")[0]
    allowed = ALLOWED[own] | {own} | ({"model"} if module in BUILDS_ON_MODEL else set())
    imported = _imported_packages(MODULES[module], module)
    wrong = sorted((pkg, line) for pkg, line in imported if pkg not in allowed)
    named = ", ".join(f"{pkg} (line {line})" for pkg, line in wrong)
    assert not wrong, f"{module} imports {named}"


def test_the_check_sees_lazy_imports(tmp_path):
    # A function-level import of `pipelines` in a model module must be seen (the check cannot pass vacuously).
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from pipelines import storage\n    import model.fileio\n")
    assert _imported_packages(str(path), "model.m") == {("pipelines", 2), ("model", 3)}
