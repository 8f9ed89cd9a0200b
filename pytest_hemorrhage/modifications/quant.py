"""Quantization: fake-quantized weights and the real kernels of bitsandbytes and hqq.

Weight-only formats that a float matmul can run exactly (``rtn``, ``fp8``, ``dtype``) are
parametrizations: the weight is rounded on every use and the original stays untouched.
Library formats (``bnb_int8``, ``bnb_4bit``, ``hqq``) and ``w8a8`` swap each target layer for a
module holding only the quantized weight and running the library's own kernels; the swap is
undone by putting the original module back.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import HemorrhageError
from .registry import Modification, Patch, Target, register_modification
from .validate import check_choice, check_int, check_number

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..harness import Context

__all__ = [
    "BNB_BLOCKSIZES",
    "FP8_FORMATS",
    "HQQ_BITS",
    "RTN",
    "BnbFourBit",
    "BnbInt8",
    "ComputeIn",
    "Dtype",
    "Fp8",
    "Hqq",
    "W8A8",
    "W8A8Linear",
    "bias_copy",
    "by_token_chunks",
    "chunk_rows",
    "fp8_quantize",
    "int8_matmul",
    "int8_per_row",
    "quant_grid",
    "rtn_quantize",
    "smooth_groups",
    "smooth_scales",
]

BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes 0.45-0.50
HQQ_BITS = (1, 2, 3, 4, 5, 6, 8)  # hqq.core.quantize.Quantizer.SUPPORTED_BITS, integers
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

    dtype: str = "float16"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self, "dtype", _DTYPES)


@register_modification("quant.dtype", Dtype)
def apply_dtype(config: Dtype, model: nn.Module, patch: Patch, context: object) -> None:
    low = getattr(torch, config.dtype)
    for target in config.targets(model):
        patch.parametrize(target, lambda w: w.to(low).to(w.dtype))


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
    when serving).
    """
    flat = x.reshape(-1, x.shape[-1])
    if len(flat) <= rows:  # e.g. one token per call when generating
        return fn(x).to(dtype)
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


# --- W8A8 with SmoothQuant --------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class W8A8(Modification):
    """int8 weights (per output channel) times int8 activations (per token, computed on the fly).

    With ``smooth`` (SmoothQuant), activation outliers are migrated into the weights before
    both are quantized: per input channel j, ``s_j = max|X_j|**alpha / max|W_j|**(1-alpha)``
    from calibration data, the weight becomes ``W diag(s)`` and the input ``X diag(1/s)``.
    This is the seed paper's "dynamic quantization scaling" mitigation.

    Args:
        smooth: migrate activation outliers into the weights first.
        alpha: migration strength, 0-1: the share of the quantization difficulty moved from
            the activations to the weights (0.5, SmoothQuant's default, balances the two).
    """

    smooth: bool = True
    alpha: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self, "smooth", (True, False))
        check_number(self, "alpha", 0.0, 1.0)


def int8_per_row(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization of each row (last dim): integers (as float) and scales."""
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-5) / 127
    return (x / scale).round_().clamp_(-127, 127), scale


def smooth_scales(act_max: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors ``max|X_j|**alpha / max|W_j|**(1-alpha)``.

    Args:
        act_max: (in,) largest input magnitude per channel over the calibration tokens.
        weight: (out, in) weight.
        alpha: migration strength.
    """
    w_max = weight.detach().abs().amax(0).float().clamp_min(1e-5)
    a_max = act_max.to(w_max.device).float()
    return (a_max.pow(alpha) / w_max.pow(1 - alpha)).clamp_min(1e-5)


def smooth_groups(targets: list[Target], stats: dict[str, Any]) -> list[list[Target]]:
    """``targets`` grouped by the input they read (q/k/v, gate/up): one smoothing factor per
    group, as SmoothQuant folds ``1/s`` into the one operation that feeds them all.

    Layers that read the same tensor saw identical calibration maxima; that is the test, so no
    architecture's layer names are assumed.
    """
    groups: list[list[Target]] = []
    for target in targets:
        act_max = stats[target.name].abs_max
        same = (g for g in groups if torch.equal(stats[g[0].name].abs_max, act_max))
        group = next(same, None)
        if group is None:
            groups.append([target])
        else:
            group.append(target)
    return groups


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` for int8 ``a`` (m, k) and ``b`` (n, k) on torch's int8 GEMM, in int32.

    Every product and sum is an integer: the result is the exact dot product while it fits int32
    (k * 127**2 < 2**31, i.e. k < 133,000 for operands in [-127, 127]). ``torch._int_mm`` takes
    any shape on CPU; its CUDA kernel wants m > 16 and k, n multiples of 8, so there the
    operands are zero-padded (zeros add nothing to a dot product) and the result cut back.
    """
    m, k = a.shape
    n = b.shape[0]
    if a.device.type != "cuda":
        return torch._int_mm(a, b.t())
    pad_m, pad_k, pad_n = max(0, 17 - m), -k % 8, -n % 8
    if pad_m or pad_k:
        a = nn.functional.pad(a, (0, pad_k, 0, pad_m))
    if pad_k or pad_n:
        b = nn.functional.pad(b, (0, pad_k, 0, pad_n))
    return torch._int_mm(a, b.t())[:m, :n]


class W8A8Linear(nn.Module):
    """A linear layer computed as int8 x int8 on an int8 GEMM (``int8_matmul``), then rescaled.

    Holds the int8 weight and its per-row scales only (computed once, from ``W diag(s)``).
    The integer products are accumulated exactly in int32 at any layer width; the
    accumulator is then converted to float32 and multiplied by the token's and the output
    row's scales. Tokens go through ``rows`` at a time (see ``by_token_chunks``); each is
    quantized on its own, so chunking changes no result.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        smooth: torch.Tensor | None = None,
        rows: int = 4096,
    ) -> None:
        super().__init__()
        w = weight.detach().float()
        if smooth is not None:
            w = w * smooth
        qweight, scale = int8_per_row(w)
        self.register_buffer("qweight", qweight.to(torch.int8))
        self.register_buffer("weight_scale", scale.reshape(-1))
        self.register_buffer("smooth", smooth)
        self.bias = bias
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def product(h: torch.Tensor) -> torch.Tensor:
            h = h.reshape(-1, h.shape[-1]).float()
            if self.smooth is not None:
                h = h / self.smooth
            q, x_scale = int8_per_row(h)
            acc = int8_matmul(q.to(torch.int8), self.qweight)
            out = acc.float().mul_(x_scale).mul_(self.weight_scale)
            return out if self.bias is None else out.add_(self.bias.float())

        shape = x.shape[:-1]
        return by_token_chunks(product, x, self.rows, x.dtype).reshape(*shape, -1)


@register_modification("quant.w8a8", W8A8)
def apply_w8a8(config: W8A8, model: nn.Module, patch: Patch, context: Context) -> None:
    targets = config.targets(model)
    stats: dict[str, Any] = {}
    if config.smooth:
        from .calibration import input_stats

        stats = input_stats(model, context)
        missing = [t.name for t in targets if t.name not in stats]
        if missing:
            raise HemorrhageError(
                f"{config.name}: no calibration activations reached {missing[0]}; exclude it "
                "or use smooth=False"
            )
    rows = chunk_rows(model, targets)
    for group in smooth_groups(targets, stats) if config.smooth else [[t] for t in targets]:
        smooth = None
        if config.smooth:  # the group's largest weight per input channel (its stacked rows)
            weights = torch.cat([t.weight.detach() for t in group])
            smooth = smooth_scales(stats[group[0].name].abs_max, weights, config.alpha)
        for target in group:
            bias = getattr(target.module, "bias", None)
            layer = W8A8Linear(target.weight.detach(), bias, smooth, rows)
            patch.swap_module(target.name, layer)
