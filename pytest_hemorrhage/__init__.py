"""pytest-hemorrhage: gate a modified language model against declared degradation budgets.

Importing the package is cheap: torch and transformers load only when a name that needs them
is first used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "Hemorrhage",
    "HemorrhageError",
    "Modification",
    "Patch",
    "Result",
    "__version__",
    "register_modification",
]

_HOMES = {
    "Budget": "budget",
    "Hemorrhage": "fixture",
    "HemorrhageError": "errors",
    "Modification": "modifications",
    "Patch": "modifications",
    "Result": "metrics",
    "register_modification": "modifications",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module 'pytest_hemorrhage' has no attribute {name!r}")
