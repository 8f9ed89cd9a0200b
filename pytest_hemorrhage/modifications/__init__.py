"""Modifications: named, reversible changes to a model (quantization, pruning, ...).

The registry (``registry.py``) and the handler contract (``handler.py``); one package or module per
family as users name them (``quant/``, ``prune/``, ``lowrank``, ``noise``, ``expand``,
``decode``); the machinery several families share: calibration inputs (``calibration.py``), the
OBS Hessian walk (``hessian.py``), compact cached state (``state.py``). Importing the package
registers every built-in modification. A new family: a module here, imported below.
"""

from __future__ import annotations

# the built-in families, each registering its modifications on import
from . import context, decode, expand, lowrank, noise, prune, quant  # noqa: F401  (registered on import)
from .registry import (
    Modification,
    Patch,
    Target,
    apply,
    get,
    make,
    names,
    register_modification,
)

__all__ = [
    "Modification",
    "Patch",
    "Target",
    "apply",
    "get",
    "make",
    "names",
    "register_modification",
]
