"""``quant.w8a8``: int8 weights and int8 activations, with SmoothQuant's migration of activation
outliers into the weights, on torch's int8 matmul."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..handler import Context
from ..registry import Modification, Patch, Target, register_modification
from ..validate import check_choice, check_number
from .kernels import by_token_chunks, chunk_rows

__all__ = [
    "W8A8",
    "W8A8Linear",
    "int8_matmul",
    "int8_per_row",
    "smooth_groups",
    "smooth_scales",
]


# --- W8A8 with SmoothQuant --------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class W8A8(Modification):
    """int8 weights (per output channel) times int8 activations (per token, computed on the fly).

    With ``smooth`` (SmoothQuant), activation outliers are migrated into the weights before
    both are quantized: per input channel j, ``s_j = max|X_j|**alpha / max|W_j|**(1-alpha)``
    from calibration data, the weight becomes ``W diag(s)`` and the input ``X diag(1/s)``.
    This is the seed paper's "dynamic quantization scaling" mitigation.

    The layers run on torch's int8 GEMM (``W8A8Linear``), on CPU and CUDA: what is measured is
    the kernel, not a float simulation of it. Audited against torch's other int8 paths on the
    bundled and the widened model (``benchmarks/bench_w8a8_kernel.py``, the figures in the
    catalogue's "How each method is checked"): torchao's Int8DynamicActivationInt8Weight, fed
    the same smoothed weights and inputs, agrees in kl_mean well within the 5% quant.gguf
    meets against llama.cpp. It differs in rounding only: its scale is ``max / 127.5`` where
    this one's is ``max / 127`` (its integers reach -128, some move by one), it multiplies by
    ``1 / scale`` where this divides, and it floors the scale at float32's eps where this floors
    the maximum at 1e-5; both round half to even, use no zero point, sum exactly in int32 and
    rescale int32 -> float32, times the token's scale, times the row's, plus the bias.
    fbgemm's dynamic quantized Linear is another scheme (one asymmetric 7-bit scale per input
    tensor) and damages far more. The float32 simulation this replaced equals it up to 1040
    input features (sums below 2**24) and rounds past that (``benchmarks/bench_w8a8.py``).

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
        from ..calibration import calibrated_inputs

        stats = calibrated_inputs(model, context, targets, config.name, "use smooth=False")
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
