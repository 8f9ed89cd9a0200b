"""Shared fixtures: the bundled model loaded once, and a harness over a few windows."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny():
    """The bundled model (LoadedModel), loaded once for the whole test run."""
    from pytest_hemorrhage.loading import load_model

    return load_model("hemorrhage-tiny", device="cpu")


@pytest.fixture(scope="session")
def harness(tiny):
    """A Harness over 16 windows of 128 tokens of the bundled held-out corpus."""
    from pytest_hemorrhage.harness import Harness
    from pytest_hemorrhage.settings import Settings

    return Harness(tiny, Settings.defaults(model="hemorrhage-tiny", tokens=2048))


@pytest.fixture(scope="session", autouse=True)
def _import_model_code_before_pytester(tiny):
    """pytester's in-process runs drop the modules they imported; torch then refuses to register
    its operator libraries a second time. Loading the model once up front keeps them loaded."""
