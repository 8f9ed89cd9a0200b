"""The public names: declared, importable, and cheap to import."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

PUBLIC_MODULES = [
    "pytest_hemorrhage",
    "pytest_hemorrhage.modifications",
    "pytest_hemorrhage.strategies",
    "pytest_hemorrhage.explore.fit",
    "pytest_hemorrhage.metrics",
    "pytest_hemorrhage.budget",
    "pytest_hemorrhage.errors",
]


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_every_name_in_all_exists(name):
    module = importlib.import_module(name)
    assert module.__all__, name
    for attr in module.__all__:
        assert getattr(module, attr) is not None, f"{name}.{attr}"


def test_importing_the_package_and_the_plugin_does_not_import_torch():
    code = (
        "import sys, pytest_hemorrhage, pytest_hemorrhage.plugin; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr


PACKAGE = Path(importlib.import_module("pytest_hemorrhage").__file__).parent


def _imported_private_names(path: Path) -> list[str]:
    """``from X import _name`` and ``X._name`` uses of another pytest_hemorrhage module."""
    found = []
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (
            node.level or "pytest_hemorrhage" in (node.module or "")
        ):
            found += [
                f"{path.name}: from {node.module} import {a.name}"
                for a in node.names
                if a.name.startswith("_") and not a.name.startswith("__")
            ]
    return found


def test_every_module_declares_all_and_no_module_imports_anothers_private_names():
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 30
    missing = [str(m.relative_to(PACKAGE)) for m in modules if "__all__" not in m.read_text()]
    assert missing == []
    assert [line for m in modules for line in _imported_private_names(m)] == []


def test_the_private_names_check_catches_one(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from .metrics import _max_se\n")
    assert _imported_private_names(bad) == ["bad.py: from metrics import _max_se"]
