"""Modifications: named, reversible changes to a model (quantization, pruning, ...).

The registry, and one module per family; importing the package registers every built-in
modification (each family module registers its own on import). A new family: a module here,
imported below.
"""

from __future__ import annotations

# the built-in families, each registering its modifications on import
from . import (  # noqa: F401  (registered on import)
    awq,
    decode,
    expand,
    gguf,
    kvcache,
    lowrank,
    noise,
    obs,
    prune,
    quant,
    slicegpt,
    structure,
    torchao,
)
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
