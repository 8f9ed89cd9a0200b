"""The public names: declared, importable, and cheap to import."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

PUBLIC_MODULES = ["pytest_hemorrhage", "pytest_hemorrhage.modifications",
                  "pytest_hemorrhage.strategies", "pytest_hemorrhage.explore.fit",
                  "pytest_hemorrhage.metrics", "pytest_hemorrhage.budget",
                  "pytest_hemorrhage.errors"]


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_every_name_in_all_exists(name):
    module = importlib.import_module(name)
    assert module.__all__, name
    for attr in module.__all__:
        assert getattr(module, attr) is not None, f"{name}.{attr}"


def test_importing_the_package_and_the_plugin_does_not_import_torch():
    code = ("import sys, pytest_hemorrhage, pytest_hemorrhage.plugin; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr
