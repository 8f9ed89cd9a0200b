"""What llama.cpp's CPU kernels do to the activations of a quantized matmul.

ggml does not multiply a quantized weight by float activations: each row of activations is
first quantized to the weight type's ``vec_dot_type`` and the dot products run on the integer
blocks (``ggml-cpu.c``'s type traits): Q8_0 for Q8_0, Q5_0 and Q4_0 weights; Q8_1 for Q5_1 and
Q4_1 (the same values as Q8_0: it only adds the block sums); Q8_K for the K-quants; F16 for F16.
The integer dot product of two blocks times their scales is exactly the float dot product of the
two dequantized blocks, so rounding the activations here, then multiplying by the dequantized
weight in float, computes what llama.cpp computes, up to float summation order.

Ported from ggml-org/llama.cpp (ggml/src/ggml-quants.c: ``quantize_row_q8_0_ref``,
``quantize_row_q8_K_ref``; MIT).
"""

from __future__ import annotations

import torch

__all__ = ["ACTIVATION_TYPES", "round_activations"]

# the vec_dot_type of each weight type (Q8_1's values are Q8_0's)
ACTIVATION_TYPES = {
    "Q8_0": "Q8_0",
    "Q5_1": "Q8_0",
    "Q5_0": "Q8_0",
    "Q4_1": "Q8_0",
    "Q4_0": "Q8_0",
    "Q6_K": "Q8_K",
    "Q5_K": "Q8_K",
    "Q4_K": "Q8_K",
    "Q3_K": "Q8_K",
    "Q2_K": "Q8_K",
    "F16": "F16",
}


def _q8_0(x: torch.Tensor) -> torch.Tensor:
    """quantize_row_q8_0_ref then dequantized: blocks of 32, ``d = amax / 127`` stored as fp16,
    codes ``round(x / d)``."""
    blocks = x.reshape(-1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(d == 0, 0.0, 1 / d)
    codes = (blocks * inverse).round()
    return (codes * d.half().float()).reshape(x.shape)


def _q8_k(x: torch.Tensor) -> torch.Tensor:
    """quantize_row_q8_K_ref then dequantized: blocks of 256, the signed value of largest
    magnitude maps to -127, ``d = 1 / iscale`` kept in float32."""
    blocks = x.reshape(-1, 256)
    at = blocks.abs().argmax(-1, keepdim=True)
    peak = blocks.gather(-1, at)
    # a true division (``scalar / tensor`` is ``reciprocal() * scalar`` in torch: two roundings)
    iscale = torch.where(peak == 0, 0.0, torch.full_like(peak, -127.0) / peak)
    codes = (blocks * iscale).round().clamp(max=127)
    d = torch.where(iscale == 0, 0.0, iscale.reciprocal())
    return (codes * d).reshape(x.shape)


def round_activations(x: torch.Tensor, weight_type: str) -> torch.Tensor:
    """``x`` (..., in) as a matmul with a ``weight_type`` weight reads it on llama.cpp's CPU
    backend: quantized to the weight type's dot-product type and back, in ``x``'s dtype."""
    kind = ACTIVATION_TYPES[weight_type]
    if kind == "F16":
        return x.half().to(x.dtype)
    rounded = _q8_0(x.float()) if kind == "Q8_0" else _q8_k(x.float())
    return rounded.to(x.dtype)
