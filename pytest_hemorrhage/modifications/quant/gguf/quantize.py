"""ggml's reference block quantizers, ported to numpy: float32 weights -> the exact GGUF bytes
``llama-quantize`` writes without an importance matrix (``quantize_row_*_ref`` in
ggml-quants.c; MIT), and the float32 values a GGUF reader gets back (``dequantize``).

The quantizers run on float32 with the reference's operation order (sums accumulated element by
element, products and sums rounded one at a time), vectorized over blocks. Q8_0, Q5_x and Q4_x
equal ``gguf.quants.quantize`` byte for byte; the K-quants equal the reference C compiled without
floating-point contraction (``-ffp-contract=off``). A build that fuses multiply-adds (GCC's
default with ``-march=native`` on an FMA CPU) rounds the K-quant scale searches differently and
itself picks other blocks for a few percent of rows.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ....errors import HemorrhageError
from .config import BLOCK, QK_K

__all__ = ["dequantize", "quantize"]

# --- float32 helpers with the reference's rounding ---------------------------------------------

_F = np.float32


def _rint(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: round half to even (its magic-number trick), as int32."""
    with np.errstate(invalid="ignore"):
        return np.rint(v).astype(np.int32)


def _roundf(v: np.ndarray) -> np.ndarray:
    """C's roundf (half away from zero), exactly, in float32."""
    a = np.abs(v)
    floor = np.floor(a)
    return np.sign(v) * (floor + np.floor(2 * (a - floor)))


def _half(v: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16 (round to nearest even) as 2 little-endian bytes per value."""
    return np.ascontiguousarray(v, dtype=_F).astype(np.float16).reshape(-1, 1).view(np.uint8)


def _from_half(bytes2: np.ndarray) -> np.ndarray:
    return bytes2.copy().view(np.float16).astype(_F).reshape(-1)


def _abs_max(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the largest magnitude and the signed value holding it (the first, on ties)."""
    index = np.abs(x).argmax(-1)[:, None]
    signed = np.take_along_axis(x, index, -1)[:, 0]
    return np.abs(signed), signed


def _pack2(levels: np.ndarray) -> np.ndarray:
    """2-bit levels (blocks, 256) into 64 bytes: byte l of each 128-half holds l, l+32, +64, +96."""
    q = levels.astype(np.uint8).reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | q[:, :, 1] << 2 | q[:, :, 2] << 4 | q[:, :, 3] << 6).reshape(-1, 64)


# --- llama.cpp's scale searches, vectorized over rows of x (one row per sub-block) --------------


def _make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(rmse_type=1, no importance weights): (scale, levels 0..2*nmax-1)."""
    rows, n = x.shape
    amax, signed = _abs_max(x)
    zero = amax < _F(1e-15)
    with np.errstate(divide="ignore", invalid="ignore"):
        safe = np.where(zero, _F(1), signed)
        w = x * x

        def sums(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            q = np.clip(_rint(iscale[:, None] * x), -nmax, nmax - 1)
            ql = q.astype(_F)
            sumlx, suml2 = np.zeros(rows, _F), np.zeros(rows, _F)
            for i in range(n):
                sumlx = sumlx + w[:, i] * x[:, i] * ql[:, i]
                suml2 = suml2 + w[:, i] * ql[:, i] * ql[:, i]
            return q, sumlx, suml2

        q, sumlx, suml2 = sums(_F(-nmax) / safe)
        scale = np.where(suml2 != 0, sumlx / suml2, _F(0)).astype(_F)
        best = scale * sumlx
        levels = q
        for step in range(-9, 10):
            if step == 0:
                continue
            q, sumlx, suml2 = sums(-(_F(nmax) + _F(0.1) * _F(step)) / safe)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            levels = np.where(better[:, None], q, levels)
            scale = np.where(better, sumlx / suml2, scale).astype(_F)
            best = np.where(better, scale * sumlx, best).astype(_F)
    return np.where(zero, _F(0), scale), np.where(zero[:, None], 0, levels + nmax)


def _make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_q3_quants(do_rmse=true): (scale, levels 0..2*nmax-1), coordinate descent included."""
    rows, n = x.shape
    amax, signed = _abs_max(x)
    zero = amax < _F(1e-15)
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = _F(-nmax) / np.where(zero, _F(1), signed)
        levels = np.clip(_rint(iscale[:, None] * x), -nmax, nmax - 1)
        w = x * x
        sumlx, suml2 = np.zeros(rows, _F), np.zeros(rows, _F)
        for i in range(n):
            li = levels[:, i].astype(_F)
            sumlx = sumlx + w[:, i] * x[:, i] * li
            suml2 = suml2 + w[:, i] * li * li
        for _ in range(5):
            changed = np.zeros(rows, bool)
            for i in range(n):
                li = levels[:, i].astype(_F)
                slx = sumlx - w[:, i] * x[:, i] * li
                sl2 = suml2 - w[:, i] * li * li
                new = np.clip(_rint(x[:, i] * sl2 / slx), -nmax, nmax - 1)
                newf = new.astype(_F)
                slx2 = slx + w[:, i] * x[:, i] * newf
                sl22 = sl2 + w[:, i] * newf * newf
                take = (
                    (slx > 0)
                    & (new != levels[:, i])
                    & (sl22 > 0)
                    & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
                )
                levels[:, i] = np.where(take, new, levels[:, i])
                sumlx = np.where(take, slx2, sumlx)
                suml2 = np.where(take, sl22, suml2)
                changed |= take
            if not changed.any():  # a pass that changes nothing would change nothing again
                break
        scale = np.where(suml2 > 0, sumlx / suml2, _F(0)).astype(_F)
    return np.where(zero, _F(0), scale), np.where(zero[:, None], 0, levels + nmax)


def _make_qkx2_quants(
    x: np.ndarray,
    weights: np.ndarray,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants: (scale, -min, levels 0..nmax) minimizing the weighted error."""
    rows, n = x.shape
    lo, hi = x[:, 0].copy(), x[:, 0].copy()
    sum_w = weights[:, 0].copy()
    sum_x = sum_w * x[:, 0]
    for i in range(1, n):
        lo = np.minimum(lo, x[:, i])
        hi = np.maximum(hi, x[:, i])
        sum_w = sum_w + weights[:, i]
        sum_x = sum_x + weights[:, i] * x[:, i]
    lo = np.where(lo > 0, _F(0), lo)
    flat = hi == lo

    def error(scale: np.ndarray, low: np.ndarray, levels: np.ndarray) -> np.ndarray:
        total = np.zeros(rows, _F)
        lf = levels.astype(_F)
        for i in range(n):
            diff = scale * lf[:, i] + low - x[:, i]
            total = total + weights[:, i] * (np.abs(diff) if use_mad else diff * diff)
        return total

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = _F(nmax) / np.where(flat, _F(1), hi - lo)
        scale = _F(1) / iscale
        levels = np.clip(_rint(iscale[:, None] * (x - lo[:, None])), 0, nmax)
        best = error(scale, lo, levels)
        for step in range(nstep + 1):
            # the reference measures from the best min found so far, span included
            span = np.where(flat, _F(1), hi - lo)
            iscale = (_F(rmin) + _F(rdelta) * _F(step) + _F(nmax)) / span
            aux = np.clip(_rint(iscale[:, None] * (x - lo[:, None])), 0, nmax)
            af = aux.astype(_F)
            sum_l, sum_l2, sum_xl = np.zeros(rows, _F), np.zeros(rows, _F), np.zeros(rows, _F)
            for i in range(n):
                wl = weights[:, i] * af[:, i]
                sum_l = sum_l + wl
                sum_l2 = sum_l2 + wl * af[:, i]
                sum_xl = sum_xl + wl * x[:, i]
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            positive = this_min > 0
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale).astype(_F)
            this_min = np.where(positive, _F(0), this_min).astype(_F)
            current = error(this_scale, this_min, aux)
            better = (det > 0) & (current < best) & ~flat
            levels = np.where(better[:, None], aux, levels)
            best = np.where(better, current, best)
            scale = np.where(better, this_scale, scale)
            lo = np.where(better, this_min, lo)
    scale = np.where(flat, _F(0), scale).astype(_F)
    levels = np.where(flat[:, None], 0, levels)
    return scale, (-lo).astype(_F), levels


# --- block quantizers: float32 (blocks, block size) -> uint8 (blocks, bytes per block) ---------


def _q8_0(x: np.ndarray) -> np.ndarray:
    d = np.abs(x).max(-1) / _F(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, _F(0), _F(1) / d).astype(_F)
    q = _roundf(x * inv[:, None]).astype(np.int8).view(np.uint8)
    return np.concatenate([_half(d), q], -1)


def _symmetric(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0 / Q5_0: d = (the signed value of largest magnitude) / -levels/2; codes 0..levels-1."""
    _, signed = _abs_max(x)
    d = (signed / _F(-(levels // 2))).astype(_F)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, _F(0), _F(1) / d).astype(_F)
    q = np.trunc(x * inv[:, None] + _F(levels // 2 + 0.5)).astype(np.int32)
    return d, np.minimum(levels - 1, q).astype(np.uint8)


def _affine(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_1 / Q5_1: d = (max - min) / (levels - 1), m = min; codes 0..levels-1."""
    hi, lo = x.max(-1), x.min(-1)
    d = ((hi - lo) / _F(levels - 1)).astype(_F)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, _F(0), _F(1) / d).astype(_F)
    q = np.trunc((x - lo[:, None]) * inv[:, None] + _F(0.5)).astype(np.int32)
    return d, lo, np.minimum(levels - 1, q).astype(np.uint8)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """32 codes into 16 bytes: low nibble j, high nibble j + 16."""
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """Bit 4 of each of 32 codes, little-endian, as 4 bytes."""
    return np.packbits((q >> 4) & 1, axis=-1, bitorder="little")


def _q4_0(x: np.ndarray) -> np.ndarray:
    d, q = _symmetric(x, 16)
    return np.concatenate([_half(d), _nibbles(q)], -1)


def _q5_0(x: np.ndarray) -> np.ndarray:
    d, q = _symmetric(x, 32)
    return np.concatenate([_half(d), _high_bits(q), _nibbles(q)], -1)


def _q4_1(x: np.ndarray) -> np.ndarray:
    d, m, q = _affine(x, 16)
    return np.concatenate([_half(d), _half(m), _nibbles(q)], -1)


def _q5_1(x: np.ndarray) -> np.ndarray:
    d, m, q = _affine(x, 32)
    return np.concatenate([_half(d), _half(m), _high_bits(q), _nibbles(q)], -1)


def _requantize(
    x: np.ndarray, d: np.ndarray, dm: np.ndarray, levels: np.ndarray, lo: int, hi: int, offset: int
) -> np.ndarray:
    """The reference's last pass: each sub-block's weights rounded on its stored scale (and
    min); a sub-block whose scale stored as zero keeps the search's levels."""
    with np.errstate(divide="ignore", invalid="ignore"):
        fresh = np.clip(_rint((x + dm[..., None]) / d[..., None]), lo, hi) + offset
    return np.where((d != 0)[..., None], fresh, levels)


def _q2_k(x: np.ndarray) -> np.ndarray:
    nb = len(x)
    sub = x.reshape(-1, 16)
    scales, mins, levels = _make_qkx2_quants(sub, np.abs(sub), 3, -0.5, 0.1, 15, True)
    scales, mins = scales.reshape(nb, 16), mins.reshape(nb, 16)
    max_scale = np.maximum(scales.max(-1), 0)
    max_min = np.maximum(mins.max(-1), 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ls = np.where(max_scale[:, None] > 0, _rint((_F(15) / max_scale)[:, None] * scales), 0)
        lm = np.where(max_min[:, None] > 0, _rint((_F(15) / max_min)[:, None] * mins), 0)
    packed_scales = ((ls & 0xFF) | ((lm << 4) & 0xFF)).astype(np.uint8)
    d = np.where(max_scale > 0, max_scale / _F(15), _F(0)).astype(_F)
    dmin = np.where(max_min > 0, max_min / _F(15), _F(0)).astype(_F)
    dh, mh = _half(d), _half(dmin)
    sub_d = _from_half(dh)[:, None] * (packed_scales & 0xF).astype(_F)
    sub_m = _from_half(mh)[:, None] * (packed_scales >> 4).astype(_F)
    q = _requantize(x.reshape(nb, 16, 16), sub_d, sub_m, levels.reshape(nb, 16, 16), 0, 3, 0)
    return np.concatenate([packed_scales, _pack2(q.reshape(nb, QK_K)), dh, mh], -1)


def _q3_k(x: np.ndarray) -> np.ndarray:
    nb = len(x)
    scales, levels = _make_q3_quants(x.reshape(-1, 16), 4)
    scales = scales.reshape(nb, 16)
    _, max_scale = _abs_max(scales)
    nonzero = max_scale != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(nonzero, _F(-32) / np.where(nonzero, max_scale, _F(1)), _F(0))
        l6 = np.clip(_rint(iscale[:, None] * scales), -32, 31) + 32
    l6 = np.where(nonzero[:, None], l6, 0).astype(np.uint8)
    packed = np.zeros((nb, 12), np.uint8)
    packed[:, :8] = (l6[:, :8] & 0xF) | ((l6[:, 8:] & 0xF) << 4)
    for j in range(16):
        packed[:, 8 + j % 4] |= (l6[:, j] >> 4) << (2 * (j // 4))
    with np.errstate(divide="ignore"):
        dh = _half(np.where(nonzero, _F(1) / np.where(nonzero, iscale, _F(1)), _F(0)))
    sub_d = _from_half(dh)[:, None] * (l6.astype(np.int32) - 32).astype(_F)
    q = _requantize(
        x.reshape(nb, 16, 16), sub_d, np.zeros_like(sub_d), levels.reshape(nb, 16, 16), -4, 3, 4
    ).reshape(nb, QK_K)
    high = q > 3
    hmask = np.packbits(
        high.reshape(nb, 8, 32).transpose(0, 2, 1), axis=-1, bitorder="little"
    ).reshape(nb, 32)
    return np.concatenate([hmask, _pack2(np.where(high, q - 4, q)), packed, dh], -1)


def _k_scales(
    scales: np.ndarray, mins: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K / Q5_K super-block scales: 6-bit scale and min per 32-weight sub-block, packed
    into 12 bytes; returns (packed, d bytes, dmin bytes, per-sub-block d, per-sub-block dmin)."""
    max_scale = np.maximum(scales.max(-1), 0)
    max_min = np.maximum(mins.max(-1), 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_scale = np.where(max_scale > 0, _F(63) / max_scale, _F(0)).astype(_F)
        inv_min = np.where(max_min > 0, _F(63) / max_min, _F(0)).astype(_F)
    ls = np.minimum(63, _rint(inv_scale[:, None] * scales) & 0xFF).astype(np.uint8)
    lm = np.minimum(63, _rint(inv_min[:, None] * mins) & 0xFF).astype(np.uint8)
    packed = np.zeros((len(scales), 12), np.uint8)
    packed[:, :4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    packed[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    packed[:, 8:] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    dh = _half(max_scale / _F(63))
    mh = _half(max_min / _F(63))
    sub_d = _from_half(dh)[:, None] * ls.astype(_F)
    sub_m = _from_half(mh)[:, None] * lm.astype(_F)
    return packed, dh, mh, sub_d, sub_m


def _kx_levels(x: np.ndarray, nmax: int, rmin: float, nstep: int) -> tuple[np.ndarray, ...]:
    """Q4_K / Q5_K: the per-32 search with weights av_x + |x|, av_x = rms of the sub-block."""
    nb = len(x)
    sub = x.reshape(-1, 32)
    sum_x2 = np.zeros(len(sub), _F)
    for i in range(32):
        sum_x2 = sum_x2 + sub[:, i] * sub[:, i]
    weights = np.sqrt(sum_x2 / _F(32))[:, None] + np.abs(sub)
    scales, mins, levels = _make_qkx2_quants(sub, weights, nmax, rmin, 0.1, nstep, False)
    packed, dh, mh, sub_d, sub_m = _k_scales(scales.reshape(nb, 8), mins.reshape(nb, 8))
    q = _requantize(x.reshape(nb, 8, 32), sub_d, sub_m, levels.reshape(nb, 8, 32), 0, nmax, 0)
    return packed, dh, mh, q.reshape(nb, 4, 2, 32).astype(np.uint8)


def _q4_k(x: np.ndarray) -> np.ndarray:
    packed, dh, mh, q = _kx_levels(x, 15, -1.0, 20)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(len(x), 128)
    return np.concatenate([dh, mh, packed, qs], -1)


def _q5_k(x: np.ndarray) -> np.ndarray:
    packed, dh, mh, q = _kx_levels(x, 31, -0.5, 15)
    qs = ((q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)).reshape(len(x), 128)
    qh = np.zeros((len(x), 32), np.uint8)
    for k in range(4):  # pair k of sub-blocks sets bits 2k and 2k+1
        qh |= ((q[:, k, 0] >> 4) << (2 * k)) | ((q[:, k, 1] >> 4) << (2 * k + 1))
    return np.concatenate([dh, mh, packed, qh, qs], -1)


def _q6_k(x: np.ndarray) -> np.ndarray:
    nb = len(x)
    scales, levels = _make_qx_quants(x.reshape(-1, 16), 32)
    scales = scales.reshape(nb, 16)
    amax, max_scale = _abs_max(scales)
    zero = amax < _F(1e-15)
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = _F(-128) / np.where(zero, _F(1), max_scale)
        sc = np.minimum(127, _rint(iscale[:, None] * scales)).astype(np.int8)
        dh = _half(_F(1) / iscale)
    sub_d = _from_half(dh)[:, None] * sc.astype(_F)
    q = _requantize(
        x.reshape(nb, 16, 16), sub_d, np.zeros_like(sub_d), levels.reshape(nb, 16, 16), -32, 31, 32
    )
    q = q.reshape(nb, 2, 4, 32).astype(np.uint8)
    ql = np.concatenate(
        [
            (q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4),
            (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4),
        ],
        -1,
    ).reshape(nb, 128)
    qh = (
        (q[:, :, 0] >> 4)
        | ((q[:, :, 1] >> 4) << 2)
        | ((q[:, :, 2] >> 4) << 4)
        | ((q[:, :, 3] >> 4) << 6)
    ).reshape(nb, 64)
    block = np.concatenate([ql, qh, sc.view(np.uint8), dh], -1)
    block[zero] = 0  # the reference zeroes an all-zero super-block
    return block


def _f16(x: np.ndarray) -> np.ndarray:
    return _half(x.reshape(-1)).reshape(len(x), -1)


_QUANTIZERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Q8_0": _q8_0,
    "Q6_K": _q6_k,
    "Q5_1": _q5_1,
    "Q5_K": _q5_k,
    "Q5_0": _q5_0,
    "Q4_1": _q4_1,
    "Q4_K": _q4_k,
    "Q4_0": _q4_0,
    "Q3_K": _q3_k,
    "Q2_K": _q2_k,
    "F16": _f16,
}


def quantize(weight: np.ndarray | torch.Tensor, qtype: str) -> np.ndarray:
    """GGUF blocks of ``weight`` (rows, row length), as llama.cpp's reference quantizer writes
    them: uint8 (rows, bytes per row), the layout ``gguf.quants.dequantize`` reads."""
    if isinstance(weight, torch.Tensor):
        weight = weight.detach().to("cpu", torch.float32).numpy()
    x = np.ascontiguousarray(weight, dtype=_F)
    rows, width = x.shape
    size = BLOCK[qtype]
    if width % size:
        raise HemorrhageError(
            f"GGUF {qtype}: rows of {width} are not a multiple of its block of {size}"
        )
    return _QUANTIZERS[qtype](x.reshape(-1, size)).reshape(rows, -1)


def dequantize(blocks: np.ndarray, qtype: str) -> np.ndarray:
    """The float32 values a GGUF reader gets from ``blocks``: ``gguf.quants.dequantize``."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    return gguf_dequantize(blocks, GGMLQuantizationType[qtype])
