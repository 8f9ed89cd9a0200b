"""Hook specifications that other plugins and conftest.py files can implement."""

from __future__ import annotations

from typing import Any

__all__ = ["pytest_hemorrhage_modifications"]


def pytest_hemorrhage_modifications(register: Any) -> None:
    """Register your own modifications before the first one is applied.

    Args:
        register: :func:`pytest_hemorrhage.modifications.register_modification`; call
            ``register("my.name", MyConfig)(handler)`` for each one.
    """
