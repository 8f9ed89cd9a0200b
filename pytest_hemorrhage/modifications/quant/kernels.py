"""The real kernels of bitsandbytes (``quant.bnb_int8``, ``quant.bnb_4bit``) and hqq
(``quant.hqq``).

Each target layer is swapped for a module holding only the quantized weight and running the
library's own kernels; the swap is undone by putting the original module back. The helpers that
feed a kernel (a dtype it computes in, inputs split by token chunks) serve ``quant.torchao`` too.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import nn

from ...errors import HemorrhageError
from ..registry import Modification, Patch, Target, register_modification
from ..validate import check_choice, check_int, check_number

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "BNB_BLOCKSIZES",
    "HQQ_BITS",
    "BnbFourBit",
    "BnbInt8",
    "ComputeIn",
    "Hqq",
    "bias_copy",
    "by_token_chunks",
    "chunk_rows",
]

BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes 0.45-0.50
HQQ_BITS = (1, 2, 3, 4, 5, 6, 8)  # hqq.core.quantize.Quantizer.SUPPORTED_BITS, integers


# --- bitsandbytes -----------------------------------------------------------------------------


def _bitsandbytes() -> ModuleType:
    """bitsandbytes, imported without its warning about an optional CPU kernel package.

    The warning concerns the AVX512-BF16 fused 4-bit kernel, which this module does not use.
    """
    cpu_ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_ops.level
    cpu_ops.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    finally:
        cpu_ops.setLevel(level)
    return bitsandbytes


class ComputeIn(nn.Module):
    """Runs ``layer`` on inputs cast to ``dtype``, ``rows`` tokens at a time, and returns the
    caller's dtype.

    LLM.int8() is defined on float16 activations (bitsandbytes casts to it and warns on every
    call otherwise); this keeps a float32 or bfloat16 model's other layers in their own dtype.
    """

    def __init__(self, layer: nn.Module, dtype: torch.dtype, rows: int) -> None:
        super().__init__()
        self.layer, self.dtype, self.rows = layer, dtype, rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return by_token_chunks(lambda h: self.layer(h.to(self.dtype)), x, self.rows, x.dtype)


def by_token_chunks(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, rows: int, dtype: torch.dtype
) -> torch.Tensor:
    """``fn`` applied to at most ``rows`` tokens of ``x`` at a time, gathered in ``dtype``.

    Integer kernels make several activation-sized temporaries (the int8 input, int32 products,
    rescaled copies): chunking bounds them by ``rows`` instead of the batch. Each token is
    computed as in one call, except LLM.int8's outlier columns, chosen per call (as per batch
    when serving). ``fn`` always sees (tokens, features): kernels written for 2-D or 3-D
    inputs get DeepSeek's multi-head latent attention inputs, 4-D, flattened.
    """
    flat = x.reshape(-1, x.shape[-1])
    if len(flat) <= rows:  # e.g. one token per call when generating
        return fn(flat).to(dtype).reshape(*x.shape[:-1], -1)
    out = None
    for i in range(0, len(flat), rows):
        y = fn(flat[i : i + rows])
        if out is None:
            out = torch.empty(len(flat), y.shape[-1], dtype=dtype, device=y.device)
        out[i : i + rows] = y
    return out.reshape(*x.shape[:-1], -1)


def chunk_rows(model: nn.Module, targets: list[Target]) -> int:
    """Tokens per kernel call: one activation-sized temporary of the widest target stays
    under 1/128 of the model's bytes, or 1024 tokens, whichever is more.

    Below ~1024 tokens the per-call overhead outweighs the memory saved (bundled model, LLM.int8
    on CPU: 64-token calls ran 1.9x slower than 1024-token calls; the peak was the same, the
    forward pass's own activations).
    """
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    widest = max((max(t.weight.shape) for t in targets), default=1)
    return max(1024, model_bytes // (128 * 4 * widest))


def bias_copy(target: Target, dtype: torch.dtype | None = None) -> nn.Parameter | None:
    """A private copy of the target's bias (kernels cast their bias in place)."""
    bias = getattr(target.module, "bias", None)
    if bias is None:
        return None
    return nn.Parameter(bias.detach().to(dtype or bias.dtype, copy=True), requires_grad=False)


@dataclass(frozen=True, kw_only=True)
class BnbInt8(Modification):
    """LLM.int8(): bitsandbytes ``Linear8bitLt`` with int8 weights (one scale per output row).

    Activations are quantized per token at run time; input columns holding a value of at least
    ``threshold`` are multiplied in float16 instead (the mixed-precision decomposition).

    Args:
        threshold: outlier threshold on activation magnitudes; 0 disables the decomposition
            (every column in int8). Default 6.0, as in the paper and transformers.
    """

    threshold: float = 6.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self, "threshold", 0.0, float("inf"))


def _int8_layer(target: Target, threshold: float, rows: int) -> nn.Module:
    bnb = _bitsandbytes()
    weight = target.weight.detach()
    out_features, in_features = weight.shape
    bias = bias_copy(target, torch.float16)
    layer = bnb.nn.Linear8bitLt(
        in_features,
        out_features,
        bias=bias is not None,
        has_fp16_weights=False,
        threshold=threshold,
        device="meta",
    )
    with torch.no_grad():
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
    layer.weight = bnb.nn.Int8Params(
        cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb
    )
    layer.bias = bias
    return ComputeIn(layer.eval(), torch.float16, rows)


@register_modification("quant.bnb_int8", BnbInt8)
def apply_bnb_int8(config: BnbInt8, model: nn.Module, patch: Patch, context: object) -> None:
    targets = config.targets(model)
    rows = chunk_rows(model, targets)
    for target in targets:
        patch.swap_module(target.name, _int8_layer(target, config.threshold, rows))


@dataclass(frozen=True, kw_only=True)
class BnbFourBit(Modification):
    """QLoRA 4-bit weights: bitsandbytes ``Linear4bit`` (NF4 or FP4, one absmax per block).

    Computation stays in the model's dtype: the weight is dequantized by bitsandbytes and
    multiplied in that dtype. On CPU the AVX512-BF16 fused kernel is not used, so results do
    not depend on the CPU model and no bfloat16 rounding of activations is added.

    Args:
        quant_type: ``"nf4"`` (normal float, for normally distributed weights) or ``"fp4"``.
        blocksize: consecutive weights (row-major, (out, in)) sharing one absmax:
            32, 64, 128, 256, 512, 1024, 2048 or 4096.
        double_quant: quantize the absmax values too (8-bit, blocks of 256), as QLoRA's
            "double quantization" (``bnb_4bit_use_double_quant``).
    """

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self, "quant_type", ("nf4", "fp4"))
        check_int(self, "blocksize", BNB_BLOCKSIZES[0], BNB_BLOCKSIZES[-1])
        check_choice(self, "blocksize", BNB_BLOCKSIZES)
        check_choice(self, "double_quant", (True, False))


def _four_bit_layer(target: Target, config: BnbFourBit) -> nn.Module:
    bnb = _bitsandbytes()
    weight = target.weight.detach()
    out_features, in_features = weight.shape
    bias = bias_copy(target, weight.dtype)
    layer = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=bias is not None,
        compute_dtype=weight.dtype,
        compress_statistics=config.double_quant,
        quant_type=config.quant_type,
        device="meta",
    )
    with torch.no_grad():
        packed, state = bnb.functional.quantize_4bit(
            weight.contiguous(),
            blocksize=config.blocksize,
            compress_statistics=config.double_quant,
            quant_type=config.quant_type,
        )
    layer.weight = bnb.nn.Params4bit(
        packed,
        requires_grad=False,
        quant_state=state,
        blocksize=config.blocksize,
        compress_statistics=config.double_quant,
        quant_type=config.quant_type,
        module=layer,
        bnb_quantized=True,
    )
    layer.quant_state = state
    layer.bias = bias
    layer.support_avx512bf16_for_cpu = False  # keep bitsandbytes' dequantize + matmul path
    return layer.eval()


@register_modification("quant.bnb_4bit", BnbFourBit)
def apply_bnb_4bit(config: BnbFourBit, model: nn.Module, patch: Patch, context: object) -> None:
    for target in config.targets(model):
        patch.swap_module(target.name, _four_bit_layer(target, config))


# --- hqq --------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Hqq(Modification):
    """Half-Quadratic Quantization (hqq ``HQQLinear``): calibration-free, zero points optimized.

    Min/max scaling per group of ``group_size`` weights, then hqq's proximal solver refines
    the zero points. Scales and zero points are kept in the model's dtype.

    Args:
        bits: 1, 2, 3, 4, 5, 6 or 8 (hqq has no 7-bit format; 5 and 6 are stored unpacked).
        group_size: weights sharing a scale and zero point, a multiple of 8; 0 means one group
            per output row (axis 1) or per input column (axis 0).
        axis: 1 (hqq's default): a group is ``group_size`` consecutive weights of a row of the
            (out, in) weight. 0: hqq reshapes the flattened weight to (group_size, -1), so a
            group is ``group_size`` weights spaced ``numel / group_size`` apart.
    """

    bits: int = 4
    group_size: int = 64
    axis: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if type(self.bits) is not int or self.bits not in HQQ_BITS:
            raise HemorrhageError(
                f"{self.name}: bits={self.bits!r} is not a width hqq supports; use one of "
                f"{', '.join(map(str, HQQ_BITS))} (for 7 bits use quant.rtn bits=7)"
            )
        check_int(self, "group_size", 0)
        if self.group_size % 8:
            raise HemorrhageError(
                f"{self.name}: group_size={self.group_size} is not a multiple of 8, which hqq "
                f"requires; use e.g. group_size={max(8, self.group_size // 8 * 8)}, or 0 for one "
                "group per row"
            )
        check_choice(self, "axis", (0, 1))


_HQQ_PACKING = {1: 8, 2: 4, 4: 2}  # rows packed into one byte; 3 bits pads itself, 5-8 unpacked


def _hqq_group(target: Target, config: Hqq) -> int:
    """The group size hqq will use for ``target``, after checking hqq can pack it."""
    out_features, in_features = target.weight.shape
    numel = out_features * in_features
    group = config.group_size or (in_features if config.axis == 1 else out_features)
    rows = numel // group if config.axis == 1 else group  # rows of hqq's packed tensor
    pack = _HQQ_PACKING.get(config.bits, 1)
    if numel % group:
        why = f"its {numel} weights are not a multiple of group_size={group}"
    elif rows % pack:
        why = f"hqq packs {pack} rows of {config.bits}-bit codes per byte and has {rows} rows"
    else:
        return group
    raise HemorrhageError(
        f"{config.name}: layer {target.name} ({out_features}x{in_features}): {why}; choose a "
        f"group_size dividing {in_features}, or exclude this layer"
    )


def _hqq() -> ModuleType:
    """hqq.core.quantize, imported without the DeprecationWarnings torch raises while hqq's
    ``@torch.compile`` decorators load the compiler (nothing this module calls)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import hqq.core.quantize
    return hqq.core.quantize


def _hqq_layer(target: Target, config: Hqq, group: int) -> nn.Module:
    hqq = _hqq()
    weight = target.weight.detach()
    quant_config = hqq.BaseQuantizeConfig(nbits=config.bits, group_size=group, axis=config.axis)
    # hqq rebinds the weight of the layer it is given and then deletes it: give it a copy
    return hqq.HQQLinear.from_weights(
        weight.clone(memory_format=torch.contiguous_format),
        bias_copy(target),
        quant_config,
        compute_dtype=weight.dtype,
        device=str(weight.device),
    )


@register_modification("quant.hqq", Hqq)
def apply_hqq(config: Hqq, model: nn.Module, patch: Patch, context: object) -> None:
    targets = config.targets(model)
    groups = [_hqq_group(t, config) for t in targets]  # every check before the first swap
    for target, group in zip(targets, groups, strict=True):
        patch.swap_module(target.name, _hqq_layer(target, config, group))
