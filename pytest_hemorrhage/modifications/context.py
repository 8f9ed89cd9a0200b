"""Context extension: RoPE scaling (``context.rope_scaling``), as teams apply it before release.

Linear position interpolation, dynamic NTK and YaRN change the rotary position embedding at
every position, so they cost something inside the original context too; this measures that
cost. Each rotary embedding module of the model (a module holding ``inv_freq``) is swapped for a
new one built by the same class from a copy of the config with ``rope_parameters`` asking for
the scaling (transformers' own ``ROPE_INIT_FUNCTIONS`` compute the frequencies and the
attention factor), and swapped back on undo: no weight changes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..errors import HemorrhageError, first_line
from .handler import Context
from .registry import Modification, Patch, register_modification
from .validate import check_choice, check_int, check_number

__all__ = ["RopeScaling"]

ROPE_TYPES = ("linear", "dynamic", "yarn")


@dataclass(frozen=True, kw_only=True)
class RopeScaling(Modification):
    """Scale the rotary position embedding to extend the context.

    Args:
        type: ``linear`` (position interpolation), ``dynamic`` (NTK-aware, grows with the
            sequence past the original length) or ``yarn``.
        factor: how many times the original context the model is stretched to, > 1.
        original_max_position_embeddings: the context the model was trained with (default:
            the config's ``max_position_embeddings``).
    """

    changes: ClassVar[str] = "the rotary position embedding"
    per_expert: ClassVar[bool | None] = None
    type: str = "linear"
    factor: float = 2.0
    original_max_position_embeddings: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self, "type", ROPE_TYPES)
        check_number(self, "factor", 1.0, 1024.0)
        if self.original_max_position_embeddings is not None:
            check_int(self, "original_max_position_embeddings", 1)


def _rotary_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """transformers' rotary embedding modules: a ``rope_type`` and ``inv_freq`` buffers (one
    per layer type in models with sliding and full attention layers)."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if hasattr(m, "rope_type")
        and any(b.endswith("inv_freq") for b, _ in m.named_buffers(recurse=False))
    ]


def scaled_config(config: RopeScaling, model_config: object) -> object:
    """A copy of ``model_config`` whose ``rope_parameters`` ask for ``config``'s scaling. Where
    they are given per layer type (Gemma 3), the sliding-window layers keep theirs: they never
    attend past their window, so only full attention is extended (as Gemma 3 itself does)."""
    scaled = copy.deepcopy(model_config)
    original = config.original_max_position_embeddings or scaled.max_position_embeddings
    scaling = {
        "rope_type": config.type,
        "factor": float(config.factor),
        "original_max_position_embeddings": original,
    }
    rope = dict(getattr(scaled, "rope_parameters", None) or {})
    if rope and all(isinstance(v, dict) for v in rope.values()):
        rope = {k: v if k == "sliding_attention" else {**v, **scaling} for k, v in rope.items()}
    else:
        rope.update(scaling)
    scaled.rope_parameters = rope
    if getattr(scaled, "head_dim", 0) is None:  # YaRN reads it without a fallback
        scaled.head_dim = scaled.hidden_size // scaled.num_attention_heads
    if config.type == "dynamic":  # dynamic NTK reads the original length from here
        scaled.max_position_embeddings = original
    return scaled


@register_modification("context.rope_scaling", RopeScaling)
def apply_rope_scaling(
    config: RopeScaling, model: nn.Module, patch: Patch, context: Context
) -> None:
    rotary = _rotary_modules(model)
    model_config = getattr(model, "config", None)
    if not rotary or model_config is None or not hasattr(model_config, "rope_parameters"):
        raise HemorrhageError(
            f"{config.name}: {type(model).__name__} has no rotary position embedding "
            "(learned or absolute positions, or an encoder); context extension by RoPE "
            "scaling does not apply to it"
        )
    scaled = scaled_config(config, model_config)
    replacements = []
    for name, module in rotary:  # all built before any swap: a failure changes nothing
        weight = next(module.buffers())
        try:
            new = type(module)(config=scaled)
        except Exception as exc:  # a rotary class with its own signature or parameters
            raise HemorrhageError(
                f"{config.name}: cannot rebuild {name!r} ({type(module).__name__}) with "
                f"rope_type={config.type!r} ({type(exc).__name__}: {first_line(exc)})"
            ) from None
        replacements.append((name, new.to(weight.device)))
    for name, new in replacements:
        patch.swap_module(name, new)
