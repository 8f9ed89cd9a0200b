"""torchao: PyTorch-native quantization through torchao's own ``quantize_`` and tensor subclasses.

Each target layer is copied into a fresh ``nn.Linear`` (from its (out, in) weight, so GPT-2's
Conv1D and a weight parametrized by an earlier stage come out right), torchao quantizes the
copy, and the copy's quantized weight is swapped in; the baseline's module is never handed to
torchao and undo puts it back. torchao is an optional extra: ``pytest-hemorrhage[torchao]``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ...errors import HemorrhageError
from ..handler import Context
from ..registry import Modification, Patch, Target, register_modification
from ..validate import check_choice, check_int
from .kernels import bias_copy, by_token_chunks, chunk_rows

__all__ = ["CPU_CONFIGS", "CUDA_CONFIGS", "Torchao", "TorchaoLinear", "torchao_config"]

# Configs torchao runs on CPU (torchao 0.18, torch 2.13), by torchao's own function-style names.
CPU_CONFIGS = (
    "intx_weight_only",
    "int8_weight_only",
    "int8_dynamic_activation_int8_weight",
    "float8_weight_only",
    "int8_dynamic_activation_intx_weight",
)
# Configs whose kernels torchao has on CUDA only, and why (said when a CPU run asks for one).
CUDA_CONFIGS = {
    "int4_weight_only": "its int4 weights are packed for the tinygemm CUDA kernel",
    "float8_dynamic_activation_float8_weight": "it needs float8 matmuls (CUDA compute "
    "capability 8.9+)",
}
_GROUPED = (
    "int8_weight_only",
    "intx_weight_only",
    "int8_dynamic_activation_intx_weight",
    "int4_weight_only",
)
_INTX = ("intx_weight_only", "int8_dynamic_activation_intx_weight")


@dataclass(frozen=True, kw_only=True)
class Torchao(Modification):
    """A torchao quantization config applied with ``torchao.quantization.quantize_``.

    Args:
        config: torchao's config, by its function-style name. On CPU: ``intx_weight_only``
            (the default: ``bits``-bit weights, float activations; at 8 bits it is int8
            weight-only on torchao's intx tensor), ``int8_weight_only`` (int8 weights),
            ``int8_dynamic_activation_int8_weight`` (int8 weights, per-token int8 activations),
            ``float8_weight_only`` (float8 e4m3 weights), ``int8_dynamic_activation_intx_weight``
            (``bits``-bit weights, per-token int8 activations). CUDA only:
            ``int4_weight_only``, ``float8_dynamic_activation_float8_weight``.
        bits: weight bits, 1-8, of the ``intx`` configs; None means 8. The default config
            takes any width, so that sweeps and strategies over ``bits`` run as for the
            other quantizers; the other configs' width is in their name (8; 4 for
            ``int4_weight_only``) and they accept only that.
        group_size: input channels sharing a weight scale, for ``int8_weight_only``,
            the ``intx`` configs and ``int4_weight_only``; 0 means one scale per output row.
            None means torchao's default (per row; 32 for
            ``int8_dynamic_activation_intx_weight``, 128 for ``int4_weight_only``).
    """

    config: str = "intx_weight_only"
    bits: int | None = None
    group_size: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self, "config", (*CPU_CONFIGS, *CUDA_CONFIGS))
        if self.bits is not None:
            check_int(self, "bits", 1, 8)
            width = 4 if self.config == "int4_weight_only" else 8
            if self.config not in _INTX and self.bits != width:
                raise HemorrhageError(
                    f"{self.name}: bits={self.bits} does not fit config={self.config!r}, which "
                    f"is {width}-bit; for other widths use config='intx_weight_only' or "
                    "'int8_dynamic_activation_intx_weight'"
                )
        if self.group_size is not None:
            check_int(self, "group_size", 0)
            if self.config not in _GROUPED:
                raise HemorrhageError(
                    f"{self.name}: group_size={self.group_size} does not apply to "
                    f"{self.config} (one scale per output row); leave it unset, or use one of "
                    f"{', '.join(_GROUPED)}"
                )


def _torchao(config: Torchao) -> ModuleType:
    """torchao.quantization, imported without torchao's notes about its optional CUDA/C++
    extensions and torch's deprecation note on torchao's enums (nothing this module uses)."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        import torchao.quantization
    except ImportError:
        raise HemorrhageError(
            f"{config.name}: torchao is not installed; install the extra: "
            "pip install 'pytest-hemorrhage[torchao]'"
        ) from None
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
    return torchao.quantization


def torchao_config(config: Torchao) -> tuple[Any, torch.dtype | None]:
    """torchao's config object for ``config``, and the dtype its kernels need (None: any).

    ``set_inductor_config=False``: torchao would otherwise change torch._inductor's global
    settings, which this process does not compile with.
    """
    q = _torchao(config)
    from torchao.quantization.granularity import PerAxis, PerGroup, PerRow

    group = config.group_size
    if config.config == "int8_weight_only":
        granularity = PerGroup(group) if group else PerRow()
        return q.Int8WeightOnlyConfig(granularity=granularity, set_inductor_config=False), None
    if config.config == "int8_dynamic_activation_int8_weight":
        return q.Int8DynamicActivationInt8WeightConfig(set_inductor_config=False), None
    if config.config == "float8_weight_only":
        return q.Float8WeightOnlyConfig(set_inductor_config=False), None
    if config.config in _INTX:
        dtype = getattr(torch, f"int{config.bits or 8}")
        if config.config == "intx_weight_only":
            granularity = PerGroup(group) if group else PerAxis(0)
            return q.IntxWeightOnlyConfig(weight_dtype=dtype, granularity=granularity), None
        granularity = PerAxis(0) if group == 0 else PerGroup(32 if group is None else group)
        return q.Int8DynamicActivationIntxWeightConfig(
            weight_dtype=dtype, weight_granularity=granularity
        ), None
    if config.config == "int4_weight_only":
        return q.Int4WeightOnlyConfig(
            group_size=group or 128,
            int4_packing_format="tile_packed_to_4d",
            set_inductor_config=False,
        ), torch.bfloat16  # tinygemm computes in bfloat16
    return q.Float8DynamicActivationFloat8WeightConfig(set_inductor_config=False), None


class TorchaoLinear(nn.Module):
    """A linear layer whose weight is a torchao tensor subclass (torchao's kernels run it
    through ``F.linear``), taking tokens ``rows`` at a time.

    Not an ``nn.Linear``, so a later stage does not take it for a float layer to modify.
    ``dtype``, when set, is the dtype the kernels need: inputs are cast to it and the output
    back to the caller's.
    """

    def __init__(self, linear: nn.Linear, dtype: torch.dtype | None, rows: int) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype, self.rows = dtype, rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def product(h: torch.Tensor) -> torch.Tensor:
            h = h if self.dtype is None else h.to(self.dtype)
            return nn.functional.linear(h, self.weight, self.bias)

        return by_token_chunks(product, x, self.rows, x.dtype)


def _quantized(target: Target, ao_config: Any, dtype: torch.dtype | None, rows: int) -> nn.Module:
    """A fresh nn.Linear holding a copy of ``target``'s weight and bias, quantized by torchao."""
    weight = target.weight.detach()
    out_features, in_features = weight.shape
    bias = bias_copy(target, dtype)
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.to(dtype or weight.dtype, copy=True), requires_grad=False)
    linear.bias = bias
    _torchao_quantize(linear, ao_config)
    return TorchaoLinear(linear.eval(), dtype, rows)


def _torchao_quantize(linear: nn.Linear, ao_config: Any) -> None:
    from torchao.quantization import quantize_

    with torch.no_grad():
        quantize_(linear, ao_config)
    if type(linear.weight) in (torch.Tensor, nn.Parameter):
        raise HemorrhageError(  # torchao skips a layer it cannot quantize, with a log line only
            f"quant.torchao: torchao left a {tuple(linear.weight.shape)} layer unquantized with "
            f"{type(ao_config).__name__}; choose a group_size dividing {linear.in_features}, "
            "or exclude this layer"
        )


def _check(config: Torchao, targets: list[Target]) -> None:
    """Every refusal before the first swap: CUDA-only configs off CUDA, indivisible groups."""
    device = targets[0].weight.device
    if config.config in CUDA_CONFIGS and device.type != "cuda":
        raise HemorrhageError(
            f"{config.name}: config={config.config!r} needs CUDA ({CUDA_CONFIGS[config.config]})"
            f" and this model is on {device.type}; on CPU use one of {', '.join(CPU_CONFIGS)}"
        )
    group = config.group_size
    if config.config == "int8_dynamic_activation_intx_weight" and group is None:
        group = 32
    if config.config == "int4_weight_only" and not group:
        group = 128
    for target in targets:
        out_features, in_features = target.weight.shape
        if group and in_features % group:
            raise HemorrhageError(
                f"{config.name}: layer {target.name} ({out_features}x{in_features}): "
                f"group_size={group} does not divide its {in_features} inputs; choose a "
                f"group_size dividing {in_features}, or exclude this layer"
            )


@register_modification("quant.torchao", Torchao)
def apply_torchao(config: Torchao, model: nn.Module, patch: Patch, context: Context) -> None:
    targets = config.targets(model)
    _check(config, targets)
    ao_config, dtype = torchao_config(config)
    rows = chunk_rows(model, targets)
    for target in targets:
        patch.swap_module(target.name, _quantized(target, ao_config, dtype, rows))
