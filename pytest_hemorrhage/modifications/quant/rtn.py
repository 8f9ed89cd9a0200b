"""Weight-only rounding a float matmul runs exactly: round to nearest on an integer grid
(``quant.rtn``), fp8 round trips (``quant.fp8``) and casts to a half-precision dtype
(``quant.dtype``).

Each is a parametrization: the weight is rounded on every use and the original stays untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..registry import Modification, Patch, register_modification
from ..validate import check_choice, check_int

__all__ = ["FP8_FORMATS", "RTN", "Dtype", "Fp8", "fp8_quantize", "quant_grid", "rtn_quantize"]

FP8_FORMATS = {"e4m3": "float8_e4m3fn", "e5m2": "float8_e5m2"}
_DTYPES = ("float16", "bfloat16")


# --- round to nearest ------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RTN(Modification):
    """Round-to-nearest weight quantization with one scale per group of input channels.

    Args:
        bits: bits per weight, 1-8.
        group_size: input channels sharing a scale; 0 means one scale per output row.
        symmetric: absmax scaling around zero; otherwise min/max with a zero point.
    """

    per_expert: ClassVar[bool | None] = True  # each expert of a fused expert weight
    bits: int = 8
    group_size: int = 128
    symmetric: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "bits", 1, 8)
        check_int(self, "group_size", 0)
        check_choice(self, "symmetric", (True, False))


def quant_grid(
    group: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """The round-to-nearest grid of each row of ``group`` (..., columns): scale and zero point
    (...,) and the integer range [lo, hi]; a weight becomes ``(clamp(round(w / s) + z, lo, hi)
    - z) * s``. Symmetric: absmax / (2^(bits-1) - 1), no zero point; otherwise min/max over
    2^bits - 1 levels with a rounded zero point. ``quant.rtn``, ``quant.awq`` and GPTQ's grids.
    """
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = group.abs().amax(-1).clamp_min(1e-12) / qmax
        return scale, torch.zeros_like(scale), -qmax - 1, qmax
    levels = 2**bits - 1
    lo, hi = group.amin(-1), group.amax(-1)
    scale = (hi - lo).clamp_min(1e-12) / levels
    return scale, (-lo / scale).round(), 0, levels


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """Fake-quantize ``w`` (out, in): quantize each group of ``group_size`` inputs, dequantize."""
    out_features, in_features = w.shape
    size = group_size or in_features
    pad = -in_features % size
    g = nn.functional.pad(w.float(), (0, pad)).reshape(out_features, -1, size)
    if symmetric and bits == 1:  # binary: sign times the mean magnitude (one level each side)
        scale = g.abs().mean(-1, keepdim=True)
        q = torch.where(g >= 0, scale, -scale)
    else:
        scale, zero, lo, hi = quant_grid(g, bits, symmetric)
        scale, zero = scale[..., None], zero[..., None]
        # One fresh tensor, then in place: this runs on every forward of a parametrized layer
        q = g.div(scale).round_().add_(zero).clamp_(lo, hi).sub_(zero).mul_(scale)
    return q.reshape(out_features, -1)[:, :in_features].to(w.dtype)


@register_modification("quant.rtn", RTN)
def apply_rtn(config: RTN, model: nn.Module, patch: Patch, context: object) -> None:
    for target in config.targets(model):
        patch.parametrize(
            target, lambda w: rtn_quantize(w, config.bits, config.group_size, config.symmetric)
        )


# --- float formats (parametrized round trips) -------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Fp8(Modification):
    """FP8 weights with one float32 scale per output row (amax maps to the format's largest value).

    Args:
        format: ``"e4m3"`` (torch.float8_e4m3fn: more precision) or ``"e5m2"`` (more range).
    """

    per_expert: ClassVar[bool | None] = True  # each expert of a fused expert weight
    format: str = "e4m3"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self, "format", tuple(FP8_FORMATS))


def fp8_quantize(w: torch.Tensor, format: str) -> torch.Tensor:
    """Round-trip ``w`` (out, in) through FP8 ``format`` with a per-output-row scale."""
    fp8 = getattr(torch, FP8_FORMATS[format])
    wf = w.float()
    scale = wf.abs().amax(-1, keepdim=True).clamp_min(1e-12) / torch.finfo(fp8).max
    return ((wf / scale).to(fp8).float() * scale).to(w.dtype)


@register_modification("quant.fp8", Fp8)
def apply_fp8(config: Fp8, model: nn.Module, patch: Patch, context: object) -> None:
    for target in config.targets(model):
        patch.parametrize(target, lambda w: fp8_quantize(w, config.format))


@dataclass(frozen=True, kw_only=True)
class Dtype(Modification):
    """Weights rounded to a lower-precision float dtype (computation stays in the model's dtype).

    Args:
        dtype: ``"float16"`` or ``"bfloat16"``.
    """

    per_expert: ClassVar[bool | None] = True  # each expert of a fused expert weight
    dtype: str = "float16"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self, "dtype", _DTYPES)


@register_modification("quant.dtype", Dtype)
def apply_dtype(config: Dtype, model: nn.Module, patch: Patch, context: object) -> None:
    low = getattr(torch, config.dtype)
    for target in config.targets(model):
        patch.parametrize(target, lambda w: w.to(low).to(w.dtype))
