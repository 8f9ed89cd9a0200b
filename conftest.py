"""Repository-wide test setup: pytester for plugin tests, CUDA tests skipped without a GPU.

Nothing here changes the process (threads, RNG): ``pytest examples`` runs as a user's would.
"""

from __future__ import annotations

import pytest
import torch

pytest_plugins = ["pytester"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not any(item.get_closest_marker("cuda") for item in items):
        return
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if item.get_closest_marker("cuda"):
                item.add_marker(skip)
