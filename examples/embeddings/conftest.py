"""This suite measures an encoder: skipped unless --hemorrhage-model names one, so that
``pytest examples --hemorrhage-model=hemorrhage-tiny`` runs the other suites untouched."""

from pathlib import Path

import pytest

from pytest_hemorrhage.loading import MINILM_NAME

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    spec = config.getoption("--hemorrhage-model") or ""
    if spec == MINILM_NAME or (Path(spec) / "modules.json").is_file():
        return
    skip = pytest.mark.skip(reason=f"an encoder suite: run with --hemorrhage-model={MINILM_NAME}")
    for item in items:
        if item.path.parent == HERE:
            item.add_marker(skip)
