"""Modifications: named, reversible changes to a model (quantization, pruning, ...)."""

from __future__ import annotations

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
