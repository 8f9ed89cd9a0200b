"""``quant.gguf``: llama.cpp's GGUF weight formats, bit-exact.

Each target weight is quantized once, when the modification is applied, into GGUF blocks: the
exact bytes llama.cpp's reference quantizers write for it (``quantize.py``, ported from ggml),
with the type llama.cpp's per-tensor rules give it (``plan.py``). Only those uint8 blocks are
held; a parametrization dequantizes them on every use with ``gguf.quants.dequantize``'s own
arithmetic, ported to torch (``dequantize.py``: bit for bit, tested per type), so the model
computes with exactly the values a GGUF reader gets, at torch's speed and on the weight's device;
each quantized layer's inputs are rounded as llama.cpp's CPU kernels round them
(``runtime.py``), so the measure is that of the file as llama.cpp runs it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ...handler import Context
from ...registry import Patch, register_modification
from .config import BITS_PER_WEIGHT, BLOCK_TYPES, GGUF_TYPES, MIXTURES, Gguf, fallback_type
from .dequantize import Dequantized, dequantize_torch
from .plan import TensorPlan, fallback_summary, plan, tensors
from .quantize import dequantize, quantize
from .runtime import round_activations

__all__ = [
    "BITS_PER_WEIGHT",
    "BLOCK_TYPES",
    "GGUF_TYPES",
    "MIXTURES",
    "Gguf",
    "TensorPlan",
    "dequantize",
    "dequantize_torch",
    "fallback_summary",
    "fallback_type",
    "plan",
    "quantize",
]


@register_modification("quant.gguf", Gguf)
def apply_gguf(config: Gguf, model: nn.Module, patch: Patch, context: Context | None) -> None:
    plans = plan(config, model)
    by_name = {p.name: p for p in plans}
    groups = tensors(config, model)
    packed = [quantize(t.weight, by_name[t.name].type) for t, _ in groups]  # all before any change
    rounded: set[int] = set()  # modules whose input is rounded (an experts module: once)
    for (target, sharing), blocks_ in zip(groups, packed, strict=True):
        qtype = by_name[target.name].type
        fn = Dequantized(blocks_, qtype)
        for t in sharing:
            patch.parametrize(t, fn)
            if not config.activations or isinstance(t.module, nn.Embedding):
                continue
            # an experts module's input is what its up/gate projections read; its down
            # projections read an activation inside its forward, left in float here
            if id(t.module) in rounded or (t.expert is not None and "down" in t.param):
                continue
            rounded.add(id(t.module))
            patch.on_undo(t.module.register_forward_pre_hook(_rounding(qtype)).remove)
    fallen = [p for p in plans if p.fell_back]
    if fallen:  # the harness puts these in Result.details; the reports show them once
        patch.details.setdefault("fallbacks", {})[config.name] = {
            "summary": fallback_summary(plans),
            "tensors": {p.name: [p.asked, p.type] for p in fallen},
        }


def _rounding(qtype: str):
    """A forward pre-hook: the layer reads its input as llama.cpp's kernels quantize it."""

    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (round_activations(args[0], qtype), *args[1:])

    return hook
