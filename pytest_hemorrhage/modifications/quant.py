"""Weight quantization."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .registry import Modification, Patch, register_modification
from .validate import check_choice, check_int

__all__ = ["RTN", "rtn_quantize"]


@dataclass(frozen=True, kw_only=True)
class RTN(Modification):
    """Round-to-nearest weight quantization with one scale per group of input channels.

    Args:
        bits: bits per weight, 1-8.
        group_size: input channels sharing a scale; 0 means one scale per output row.
        symmetric: absmax scaling around zero; otherwise min/max with a zero point.
    """

    bits: int = 8
    group_size: int = 128
    symmetric: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "bits", 1, 8)
        check_int(self, "group_size", 0)
        check_choice(self, "symmetric", (True, False))


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """Fake-quantize ``w`` (out, in): quantize each group of ``group_size`` inputs, dequantize."""
    out_features, in_features = w.shape
    size = group_size or in_features
    pad = -in_features % size
    g = nn.functional.pad(w.float(), (0, pad)).reshape(out_features, -1, size)
    if symmetric and bits == 1:  # binary: sign times the mean magnitude (one level each side)
        scale = g.abs().mean(-1, keepdim=True)
        q = torch.where(g >= 0, scale, -scale)
    elif symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = g.abs().amax(-1, keepdim=True).clamp_min(1e-12) / qmax
        q = (g / scale).round().clamp(-qmax - 1, qmax) * scale
    else:
        levels = 2**bits - 1
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        scale = (hi - lo).clamp_min(1e-12) / levels
        zero = (-lo / scale).round()
        q = ((g / scale).round() + zero).clamp(0, levels).sub(zero) * scale
    return q.reshape(out_features, -1)[:, :in_features].to(w.dtype)


@register_modification("quant.rtn", RTN)
def apply_rtn(config: RTN, model: nn.Module, patch: Patch, context: object) -> None:
    for target in config.targets(model):
        patch.parametrize(
            target, lambda w: rtn_quantize(w, config.bits, config.group_size, config.symmetric)
        )
