"""Layer expansion: duplicate transformer blocks, as depth up-scaling does (SOLAR).

A copy shares every weight with its original (no memory), but it cannot be the same module
object: transformers' attention layers index the KV cache by ``self_attn.layer_idx``, so a
block that runs twice writes its keys twice into one cache slot and ``generate`` (and any
``use_cache=True`` forward) computes wrong logits. A copy is therefore a shallow clone of the
block and of every submodule on the way to an attribute ``layer_idx``; everything else
(linear layers, norms, parameters, buffers) is the original object. Every block's
``layer_idx`` is then set to its new position (reversibly), ``config.num_hidden_layers`` and
``config.layer_types`` grow to match, so the KV cache has one slot per block. Because the
linear layers are shared, a later stage of a composition that modifies them modifies the
original and its copies alike.
"""

from __future__ import annotations

import copy
import fnmatch
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..errors import HemorrhageError
from .handler import Context
from .registry import Modification, Patch, blocks, register_modification, replace_blocks

__all__ = ["LayerExpansion"]


@dataclass(frozen=True, kw_only=True)
class LayerExpansion(Modification):
    """Duplicate transformer blocks; each copy runs right after its original.

    Args:
        positions: indices of the blocks to duplicate (negative ones count from the end);
            an index given twice gets two copies. E.g. ``positions=(2, 3)`` turns blocks
            ``0 1 2 3 4`` into ``0 1 2 2' 3 3' 4``.
        include: glob patterns of block names (e.g. ``"model.layers.*"``): only blocks in
            ``positions`` that match are duplicated.
        exclude: glob patterns of block names never duplicated, e.g. ``("model.layers.0",)``.
    """

    changes: ClassVar[str] = "the block list (adds copies)"  # no weight of the model changes
    positions: tuple[int, ...] = (-1,)

    def __post_init__(self) -> None:
        super().__post_init__()
        value = self.positions
        if isinstance(value, int) and not isinstance(value, bool):
            value = (value,)
        if (
            not isinstance(value, (tuple, list))
            or not value
            or not all(isinstance(p, int) and not isinstance(p, bool) for p in value)
        ):
            raise HemorrhageError(
                f"{self.name}: positions={self.positions!r} must be block indices, e.g. "
                "positions=(2, 3) to duplicate blocks 2 and 3 (negative indices count from the end)"
            )
        object.__setattr__(self, "positions", tuple(value))


def _has_layer_idx(module: nn.Module) -> bool:
    return any(isinstance(getattr(m, "layer_idx", None), int) for m in module.modules())


def _clone(module: nn.Module, layer_idx: int) -> nn.Module:
    """A new module object sharing ``module``'s parameters, buffers and hooks, with submodules
    cloned only where a ``layer_idx`` lies below; ``layer_idx`` attributes are set on the way."""
    clone = object.__new__(type(module))
    # own containers (so registering on the clone leaves the original alone), shared contents
    clone.__dict__ = {
        k: copy.copy(v) if isinstance(v, (dict, set)) else v for k, v in module.__dict__.items()
    }
    for name, child in module._modules.items():
        if child is not None and _has_layer_idx(child):
            clone._modules[name] = _clone(child, layer_idx)
    if isinstance(getattr(module, "layer_idx", None), int):
        clone.__dict__["layer_idx"] = layer_idx
    return clone


def _index(block: nn.Module, fallback: int) -> int:
    return next(
        (m.layer_idx for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)),
        fallback,
    )


@register_modification("expand.layers", LayerExpansion)
def apply_expand(config: LayerExpansion, model: nn.Module, patch: Patch, context: Context) -> None:
    prefix, layers = blocks(model)
    n = len(layers)
    wrong = [p for p in config.positions if not -n <= p < n]
    if wrong:
        raise HemorrhageError(
            f"{config.name}: positions {wrong} out of range for {n} blocks "
            f"({prefix}); use indices in [{-n}, {n - 1}]"
        )
    copies = Counter(p % n for p in config.positions)
    for i in list(copies):
        name = f"{prefix}.{i}"
        if (
            config.include and not any(fnmatch.fnmatchcase(name, p) for p in config.include)
        ) or any(fnmatch.fnmatchcase(name, p) for p in config.exclude):
            del copies[i]
    if not copies:
        raise HemorrhageError(
            f"{config.name}: include={config.include!r} exclude={config.exclude!r} leave none of "
            f"positions={config.positions!r} to duplicate; block names look like {prefix}.0"
        )
    expanded: list[nn.Module] = []
    sources: list[int] = []  # the layer index each block had before, by new position
    for i, block in enumerate(layers):
        for copy_number in range(1 + copies[i]):
            expanded.append(block if copy_number == 0 else _clone(block, len(expanded)))
            sources.append(_index(block, i))
    replace_blocks(patch, prefix, expanded, sources)
