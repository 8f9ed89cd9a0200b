"""GGUF blocks dequantized in torch, bit for bit what ``gguf.quants.dequantize`` returns, on the
weight's own device; ``Dequantized`` is the parametrization that does it on every use.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from .config import BITS_PER_WEIGHT, BLOCK, QK_K

__all__ = ["Dequantized", "dequantize_torch"]

# Each is the float32 expression gguf's numpy dequantize_blocks evaluates (same products and
# sums, in the same order, one rounding each; eager torch fuses nothing), so the values are
# bit-identical, while the bit unpacking runs as torch integer ops wherever the weight lives.

_T = torch.float32


def _t_half(b: torch.Tensor) -> torch.Tensor:
    """Two little-endian bytes per row -> float32 (rows, 1)."""
    return b.contiguous().view(torch.float16).to(_T)


def _t_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(blocks, 16) bytes -> 32 codes: low nibbles first, then high ones."""
    return torch.cat([qs & 0x0F, qs >> 4], -1)


def _t_bits(b: torch.Tensor, n: int) -> torch.Tensor:
    """Bit j (little-endian across the bytes of each row) of every row, j < n, as 0/1 uint8."""
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device)
    return ((b.unsqueeze(-1) >> shifts) & 1).reshape(len(b), -1)[:, :n]


def _t_q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:].contiguous().view(torch.int8).to(_T) * _t_half(b[:, :2])


def _t_q4_0(b: torch.Tensor) -> torch.Tensor:
    return _t_half(b[:, :2]) * (_t_nibbles(b[:, 2:]).to(torch.int8) - 8).to(_T)


def _t_q4_1(b: torch.Tensor) -> torch.Tensor:
    return _t_half(b[:, :2]) * _t_nibbles(b[:, 4:]).to(_T) + _t_half(b[:, 2:4])


def _t_q5(b: torch.Tensor) -> torch.Tensor:
    """Q5_0 / Q5_1 codes: a nibble and bit j of the 32-bit qh in front of the nibbles."""
    return _t_nibbles(b[:, -16:]) | (_t_bits(b[:, -20:-16], 32) << 4)


def _t_q5_0(b: torch.Tensor) -> torch.Tensor:
    return _t_half(b[:, :2]) * (_t_q5(b).to(torch.int8) - 16).to(_T)


def _t_q5_1(b: torch.Tensor) -> torch.Tensor:
    return _t_half(b[:, :2]) * _t_q5(b).to(_T) + _t_half(b[:, 2:4])


def _t_crumbs(qs: torch.Tensor, groups: int) -> torch.Tensor:
    """(blocks, 32 * groups) bytes -> 2-bit codes: per 32 bytes, shifts 0, 2, 4, 6 in turn."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=qs.device).reshape(1, 1, 4, 1)
    return ((qs.reshape(len(qs), groups, 1, 32) >> shifts) & 3).reshape(len(qs), -1)


def _t_q2_k(b: torch.Tensor) -> torch.Tensor:
    n = len(b)
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _t_half(b[:, 80:82]), _t_half(b[:, 82:84])
    dl = (d * (scales & 0xF).to(_T)).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).to(_T)).reshape(n, 16, 1)
    q = _t_crumbs(qs, 2).reshape(n, 16, 16).to(_T)
    return (dl * q - ml).reshape(n, QK_K)


def _t_q3_k(b: torch.Tensor) -> torch.Tensor:
    n = len(b)
    hmask, qs, packed, d = b[:, :32], b[:, 32:96], b[:, 96:108], _t_half(b[:, 108:110])
    low = torch.cat([packed[:, :8] & 0x0F, packed[:, :8] >> 4], -1)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).reshape(1, 4, 1)
    high = ((packed[:, 8:12].reshape(n, 1, 4) >> shifts) & 3).reshape(n, 16)
    scales = ((low | (high << 4)).to(torch.int8) - 32).to(_T)
    dl = (d * scales).reshape(n, 16, 1)
    ql = _t_crumbs(qs, 2).reshape(n, 16, 16)
    bit = torch.arange(8, dtype=torch.uint8, device=b.device).reshape(1, 1, 8, 1)
    qh = ((hmask.reshape(n, 1, 1, 32) >> bit) & 1).reshape(n, 16, 16) ^ 1
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).to(_T)
    return (dl * q).reshape(n, QK_K)


def _t_scale_min(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: the 6-bit scale and min of each of 8 sub-blocks from 12 bytes."""
    d, m, m_d = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], -1)
    mins = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], -1)
    return sc, mins


def _t_kx(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Q4_K / Q5_K: d * sc * q - dmin * m per 32-weight sub-block."""
    n = len(b)
    sc, mins = _t_scale_min(b[:, 4:16])
    d = (_t_half(b[:, :2]) * sc.to(_T)).reshape(n, 8, 1)
    dm = (_t_half(b[:, 2:4]) * mins.to(_T)).reshape(n, 8, 1)
    return (d * q.reshape(n, 8, 32).to(_T) - dm).reshape(n, QK_K)


def _t_q4_k(b: torch.Tensor) -> torch.Tensor:
    qs = b[:, 16:].reshape(len(b), 4, 1, 32)
    return _t_kx(b, torch.cat([qs & 0x0F, qs >> 4], 2))


def _t_q5_k(b: torch.Tensor) -> torch.Tensor:
    n = len(b)
    qs = b[:, 48:].reshape(n, 4, 1, 32)
    ql = torch.cat([qs & 0x0F, qs >> 4], 2).reshape(n, 8, 32)
    bit = torch.arange(8, dtype=torch.uint8, device=b.device).reshape(1, 8, 1)
    qh = (b[:, 16:48].reshape(n, 1, 32) >> bit) & 1
    return _t_kx(b, ql | (qh << 4))


def _t_q6_k(b: torch.Tensor) -> torch.Tensor:
    n = len(b)
    ql, qh, scales = b[:, :128], b[:, 128:192], b[:, 192:208]
    d = (_t_half(b[:, 208:210]) * scales.contiguous().view(torch.int8).to(_T)).reshape(n, 16, 1)
    low = ql.reshape(n, 2, 1, 64)
    low = torch.cat([low & 0x0F, low >> 4], 2).reshape(n, 8, 32)
    high = _t_crumbs(qh, 2).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).to(_T)
    return (d * q).reshape(n, QK_K)


def _t_f16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).to(_T)


_TORCH_DEQUANTIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Q8_0": _t_q8_0,
    "Q6_K": _t_q6_k,
    "Q5_1": _t_q5_1,
    "Q5_K": _t_q5_k,
    "Q5_0": _t_q5_0,
    "Q4_1": _t_q4_1,
    "Q4_K": _t_q4_k,
    "Q4_0": _t_q4_0,
    "Q3_K": _t_q3_k,
    "Q2_K": _t_q2_k,
    "F16": _t_f16,
}
_BYTES = {qtype: round(bits * BLOCK[qtype] / 8) for qtype, bits in BITS_PER_WEIGHT.items()}


def dequantize_torch(blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """:func:`dequantize` in torch on ``blocks``' device: uint8 (rows, bytes per row) -> float32
    (rows, row length), bit for bit what ``gguf.quants.dequantize`` returns."""
    rows = len(blocks)
    flat = blocks.reshape(-1, _BYTES[qtype])
    return _TORCH_DEQUANTIZERS[qtype](flat).reshape(rows, -1)


# --- llama.cpp's per-tensor choice -------------------------------------------------------------


class Dequantized(nn.Module):
    """Holds one tensor's GGUF blocks; its weight is their dequantization on every use, in
    torch where the weight lives (:func:`dequantize_torch`, bit for bit gguf's)."""

    def __init__(self, blocks: np.ndarray, qtype: str) -> None:
        super().__init__()
        self.blocks, self.qtype = blocks, qtype
        self._on: dict[torch.device, torch.Tensor] = {}  # the blocks, per device (host: shared)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        packed = self._on.get(w.device)
        if packed is None:
            packed = self._on[w.device] = torch.from_numpy(self.blocks).to(w.device)
        return dequantize_torch(packed, self.qtype).to(w.dtype)
