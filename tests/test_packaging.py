"""``pip install -e '.[dev]'`` gives everything the test suite imports, within the pins of constraints.txt."""

from __future__ import annotations

import ast
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(req: str) -> str:
    return Requirement(req).name.lower().replace("_", "-")


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def _imported_modules() -> set[str]:
    """Top-level names of every module the tests import (at any depth), plus what they run with ``-m``."""
    names = {"mkdocs"}                                  # test_docs runs `python -m mkdocs build`
    for path in ROOT.joinpath("tests").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "importorskip"
                  and node.args and isinstance(node.args[0], ast.Constant)):
                names.add(node.args[0].value.split(".")[0])
    local = {p.stem for p in ROOT.joinpath("tests").rglob("*.py")} | {"sdegen", "tests"}   # sibling test modules
    return {n for n in names if n not in sys.stdlib_module_names and n not in local}


def test_dev_extra_contains_the_docs_extra():
    extras = PROJECT["optional-dependencies"]
    assert {_name(r) for r in extras["docs"]} <= {_name(r) for r in extras["dev"]}


def test_every_module_the_tests_import_is_a_declared_dependency():
    declared = {_name(r) for r in PROJECT["dependencies"] + PROJECT["optional-dependencies"]["dev"]}
    dists = packages_distributions()
    missing = {}
    for module in sorted(_imported_modules()):
        owners = {d.lower().replace("_", "-") for d in dists.get(module, [])}
        if not owners & declared:
            missing[module] = sorted(owners) or "not installed"
    assert not missing, f"imported by tests but not in [project.dependencies] or the dev extra: {missing}"


def test_every_requirement_admits_its_pin():
    pins = _pins()
    reqs = PROJECT["dependencies"] + [r for extra in PROJECT["optional-dependencies"].values() for r in extra]
    for req in reqs:
        r = Requirement(req)
        pin = pins.get(_name(req))
        assert pin is not None, f"{req} has no pin in constraints.txt"
        assert r.specifier.contains(pin, prereleases=True), f"{req} excludes its pin {pin} in constraints.txt"
    assert "torchvision" not in pins and all(_name(r) != "torchvision" for r in reqs)
