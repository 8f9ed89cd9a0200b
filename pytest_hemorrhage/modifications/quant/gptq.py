"""``quant.gptq`` (Frantar et al. 2022): weights rounded one input column at a time, each
column's rounding error compensated on the columns not yet rounded through the inverse Hessian
(``hessian.py``). The state kept is the integer codes bit-packed (``bits`` per weight) with a
scale and zero point per group, rebuilt into the weight on every use.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..calibration import RoutedCalibration
from ..handler import Context
from ..hessian import COLUMNS, apply_obs, inverse_hessian_factor, solver_inputs
from ..registry import Patch, Target, register_modification
from ..state import Layout, pack_bits, unpack_bits
from ..validate import check_choice, check_int, check_number
from .rtn import quant_grid

__all__ = ["GPTQ", "gptq_quantize", "gptq_weight"]

LayerState = dict[str, torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class GPTQ(RoutedCalibration):
    """GPTQ (Frantar et al. 2022): weights rounded one input column at a time, each column's
    rounding error compensated on the columns not yet rounded through the inverse Hessian.

    The grid is ``quant.rtn``'s (same ``bits``, ``group_size``, ``symmetric``), so the two differ
    only by the error compensation. An expert's matrix is solved with the Hessian of the tokens
    the router sent that expert; under ``min_expert_tokens`` of them, with the identity, which
    is ``quant.rtn`` on the same grid.

    Args:
        bits: bits per weight, 2-8.
        group_size: input columns sharing a scale (and zero point); 0 means one per output row.
        act_order: process columns by decreasing Hessian diagonal (largest inputs first); with
            dynamic groups a group is then ``group_size`` consecutive columns in that order.
        damp: added to the Hessian's diagonal, as a fraction of its mean (0.01 as in the paper).
        symmetric: absmax grid around zero; otherwise min/max with a zero point.
        static_groups: compute every group's grid from the weights before any compensation
            (llm-compressor's behaviour; groups by original column also under act_order)
            instead of when the algorithm reaches the group (the reference implementation's).
        min_expert_tokens: routed calibration tokens an expert needs (see
            ``RoutedCalibration``).
    """

    fallback: ClassVar[str] = "quant.rtn"

    bits: int = 4
    group_size: int = 128
    act_order: bool = False
    damp: float = 0.01
    symmetric: bool = True
    static_groups: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "bits", 2, 8)
        check_int(self, "group_size", 0)
        check_choice(self, "act_order", (True, False))
        check_number(self, "damp", 0.0, 1e6)
        check_choice(self, "symmetric", (True, False))
        check_choice(self, "static_groups", (True, False))


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    config: GPTQ,
    name: str = "",
    *,
    overwrite: bool = False,
) -> LayerState:
    """GPTQ on one layer: ``weight`` (out, in) with its Hessian (in, in); ``weight`` is not
    modified, nor is ``hessian`` unless ``overwrite`` (then its memory holds the factor: one
    Hessian-sized buffer fewer).

    Returns:
        ``codes`` (out, in) uint8 (integer minus the grid's lowest), ``scale`` and ``zero``
        (out, groups) float32, ``g_idx`` (in,) int32: the group of each input column.
    """
    w, h = solver_inputs(weight, hessian, overwrite)
    rows, columns = w.shape
    size = config.group_size or columns
    groups = math.ceil(columns / size)
    scale = w.new_zeros(rows, groups)
    zero = w.new_zeros(rows, groups)
    g_idx = torch.arange(columns, device=w.device) // size  # by original column
    if config.static_groups:  # every grid from the weights as they are (llm-compressor's order)
        for g in range(groups):
            scale[:, g], zero[:, g], lo, hi = quant_grid(
                w[:, g * size : (g + 1) * size], config.bits, config.symmetric
            )
    perm = None
    if config.act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        w, h = w[:, perm], h[perm[:, None], perm]  # one gather: one copy of H alive, not two
        if not config.static_groups:  # groups are consecutive columns in processing order
            g_idx = g_idx.clone()
            g_idx[perm] = torch.arange(columns, device=w.device) // size
    position_group = (g_idx if perm is None else g_idx[perm]).tolist()
    upper = inverse_hessian_factor(h, w, config.damp, name, config.name)
    del h
    lo, hi = quant_grid(w[:, :1], config.bits, config.symmetric)[2:]
    codes = torch.empty(rows, columns, dtype=torch.uint8, device=w.device)
    for i1 in range(0, columns, COLUMNS):
        i2 = min(i1 + COLUMNS, columns)
        block, errors = w[:, i1:i2].clone(), w.new_zeros(rows, i2 - i1)
        local = upper[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            g = position_group[j]
            if not config.static_groups and j % size == 0:
                # from ``w``, as the reference code: columns past the current one in this block
                # have not received this block's updates yet
                scale[:, g], zero[:, g] = quant_grid(
                    w[:, j : j + size], config.bits, config.symmetric
                )[:2]
            column, s, z = block[:, i], scale[:, g], zero[:, g]
            integer = ((column / s).round() + z).clamp(lo, hi)
            codes[:, j] = (integer - lo).to(torch.uint8)
            error = (column - (integer - z) * s) / local[i, i]
            block[:, i:] -= error[:, None] * local[i, i:][None, :]
            errors[:, i] = error
        w[:, i2:] -= errors @ upper[i1:i2, i2:]
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return {"codes": codes, "scale": scale, "zero": zero, "g_idx": g_idx.to(torch.int32)}


def gptq_weight(state: LayerState, bits: int, symmetric: bool) -> torch.Tensor:
    """The float32 (out, in) weight of a GPTQ state (packed or not), bit-identical to the one
    the solver compensated against."""
    scale, zero, g_idx = state["scale"], state["zero"], state["g_idx"]
    codes, columns = state["codes"], len(g_idx)
    if codes.shape[1] != columns:  # packed: (out, ceil(in * bits / 8)), ``bits`` bits per weight
        bits_of = unpack_bits(codes, columns * bits).view(len(codes), columns, bits)
        shifts = torch.arange(bits, device=codes.device, dtype=torch.uint8)
        codes = (bits_of.to(torch.uint8) << shifts).sum(-1, dtype=torch.uint8)
    lo = -(2 ** (bits - 1)) if symmetric else 0
    return (codes.float() + lo - zero[:, g_idx]) * scale[:, g_idx]


def _pack_codes(state: LayerState, bits: int) -> LayerState:
    codes = state["codes"]
    shifts = torch.arange(bits, device=codes.device, dtype=torch.uint8)
    bits_of = ((codes.unsqueeze(-1) >> shifts) & 1).bool().view(len(codes), -1)
    return {**state, "codes": pack_bits(bits_of)}  # 8 bits: the same bytes


def _gptq_fn(config: GPTQ, state: LayerState) -> Callable[[torch.Tensor], torch.Tensor]:
    def weight(w: torch.Tensor) -> torch.Tensor:
        return gptq_weight(state, config.bits, config.symmetric).to(w.dtype)

    return weight


def _gptq_layout(targets: list[Target], config: GPTQ) -> Layout:
    layout: Layout = {}
    for t in targets:
        rows, columns = t.weight.shape
        groups = math.ceil(columns / (config.group_size or columns))
        layout[t.name] = {
            "codes": ((rows, math.ceil(columns * config.bits / 8)), torch.uint8),
            "scale": ((rows, groups), torch.float32),
            "zero": ((rows, groups), torch.float32),
            "g_idx": ((columns,), torch.int32),
        }
    return layout


@register_modification("quant.gptq", GPTQ)
def apply_gptq(config: GPTQ, model: nn.Module, patch: Patch, context: Context) -> None:
    def solve(
        target: Target, hessian: torch.Tensor, stored: LayerState
    ) -> Callable[[], torch.Tensor]:
        state = gptq_quantize(target.weight, hessian, config, target.name, overwrite=True)
        for key, value in _pack_codes(state, config.bits).items():
            stored[key].copy_(value)
        return functools.partial(gptq_weight, stored, config.bits, config.symmetric)

    targets = config.targets(model)
    layout = _gptq_layout(targets, config)
    apply_obs(
        config, model, patch, context, targets, layout, solve, functools.partial(_gptq_fn, config)
    )
