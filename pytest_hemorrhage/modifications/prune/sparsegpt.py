"""``prune.sparsegpt`` (Frantar & Alistarh 2023): weights pruned one column at a time by the OBS
score, the survivors updated to compensate the pruned ones through the inverse Hessian
(``hessian.py``). The state kept is the surviving weights (they change too: that is the error
compensation) with a one-bit mask.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ...errors import HemorrhageError
from ..calibration import RoutedCalibration
from ..handler import Context
from ..hessian import COLUMNS, apply_obs, inverse_hessian_factor, solver_inputs
from ..registry import Patch, Target, register_modification
from ..state import Layout, pack_bits, unpack_bits
from ..validate import check_int, check_number

__all__ = ["SparseGPT", "sparsegpt_prune", "sparsegpt_weight"]

LayerState = dict[str, torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class SparseGPT(RoutedCalibration):
    """SparseGPT (Frantar & Alistarh 2023): weights pruned one column at a time by the OBS score
    ``w^2 / [H^-1]_jj^2``, the survivors updated to compensate the pruned ones.

    Unstructured masks are chosen per block of 128 columns (``sparsity`` of each block, ranked
    over all its rows: the paper's adaptive mask selection) from the weights as compensated so
    far. With ``n``/``m``, each group of ``m`` consecutive inputs keeps its ``n`` best weights
    (as ``prune.nm``: 2:4 keeps 2 of every 4). An expert's matrix is solved with the Hessian of
    the tokens the router sent that expert; under ``min_expert_tokens`` of them, with the
    identity: the same masks by magnitude alone, no compensation.

    Args:
        sparsity: fraction of weights to zero, 0-1 (default 0.5 unless ``n``/``m`` are given).
        n: weights kept in each group of ``m`` (semi-structured N:M sparsity).
        m: group size along the input dimension; every target's in_features must divide by it.
        damp: added to the Hessian's diagonal, as a fraction of its mean (0.01 as in the paper).
        min_expert_tokens: routed calibration tokens an expert needs (see
            ``RoutedCalibration``).
    """

    fallback: ClassVar[str] = "prune.magnitude"
    sparsity: float | None = None
    n: int | None = None
    m: int | None = None
    damp: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.n is None) != (self.m is None):
            raise HemorrhageError(
                f"{self.name}: n={self.n!r}, m={self.m!r}: N:M sparsity needs both, e.g. n=2, m=4"
            )
        if self.n is not None:
            if self.sparsity is not None:
                raise HemorrhageError(
                    f"{self.name}: sparsity={self.sparsity!r} and n:m={self.n}:{self.m} both "
                    "given; pass one of them"
                )
            check_int(self, "m", 1)
            check_int(self, "n", 1, self.m)
        else:
            object.__setattr__(self, "sparsity", 0.5 if self.sparsity is None else self.sparsity)
            check_number(self, "sparsity", 0.0, 1.0)
        check_number(self, "damp", 0.0, 1e6)


def _mask_step(config: SparseGPT) -> int:
    """Columns per block of mask selection: 128, a multiple of ``m`` (N:M groups never
    straddle two blocks)."""
    return COLUMNS if config.m is None else max(config.m, COLUMNS // config.m * config.m)


def _block_pruned(config: SparseGPT, rows: int, width: int) -> int:
    """Weights pruned in a block of ``rows`` x ``width``: the count the stored state's size is
    made from before the solve runs, so it is the solve's own rule."""
    if config.m is None:
        return round(config.sparsity * rows * width)
    return rows * width // config.m * (config.m - config.n)


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    config: SparseGPT,
    name: str = "",
    *,
    overwrite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one layer: ``weight`` (out, in) with its Hessian (in, in); ``weight`` is not
    modified, nor is ``hessian`` unless ``overwrite`` (as for ``gptq_quantize``).

    Returns:
        The compensated float32 weight (zero where pruned) and the bool keep mask, (out, in).
    """
    w, h = solver_inputs(weight, hessian, overwrite)
    rows, columns = w.shape
    upper = inverse_hessian_factor(h, w, config.damp, name, config.name)
    del h
    m, step = config.m, _mask_step(config)
    pruned = torch.zeros(rows, columns, dtype=torch.bool, device=w.device)
    for i1 in range(0, columns, step):
        i2 = min(i1 + step, columns)
        block, errors = w[:, i1:i2].clone(), w.new_zeros(rows, i2 - i1)
        local = upper[i1:i2, i1:i2]
        inv_diag = torch.diagonal(local)
        mask = torch.zeros_like(block, dtype=torch.bool)
        if m is None:  # the block's lowest OBS scores, ranked over all its rows
            k = _block_pruned(config, rows, i2 - i1)
            if k:
                score = (block.square() / inv_diag.square()).flatten()
                mask.view(-1)[score.topk(k, largest=False).indices] = True
        for i in range(i2 - i1):
            if m is not None and i % m == 0:
                score = block[:, i : i + m].square() / inv_diag[i : i + m].square()
                mask.scatter_(1, i + score.topk(m - config.n, dim=1, largest=False).indices, True)
            column = block[:, i]
            error = torch.where(mask[:, i], column, 0) / local[i, i]
            block[:, i:] -= error[:, None] * local[i, i:][None, :]
            block[:, i] = torch.where(mask[:, i], 0, block[:, i])
            errors[:, i] = error
        w[:, i1:i2] = block
        w[:, i2:] -= errors @ upper[i1:i2, i2:]
        pruned[:, i1:i2] = mask
    return w, ~pruned


def sparsegpt_weight(state: LayerState, dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) weight of a SparseGPT state: its surviving values, zeros elsewhere."""
    values = state["values"]
    keep = unpack_bits(state["keep"], int(state["columns"]))
    return torch.zeros(keep.shape, dtype=dtype, device=values.device).masked_scatter_(
        keep, values.to(dtype)
    )


def _sparsegpt_fn(state: LayerState) -> Callable[[torch.Tensor], torch.Tensor]:
    def weight(w: torch.Tensor) -> torch.Tensor:
        return sparsegpt_weight(state, w.dtype)

    return weight


def _sparsegpt_layout(targets: list[Target], config: SparseGPT) -> Layout:
    layout: Layout = {}
    step = _mask_step(config)
    for t in targets:
        rows, columns = t.weight.shape
        pruned = sum(
            _block_pruned(config, rows, min(step, columns - i)) for i in range(0, columns, step)
        )
        layout[t.name] = {
            "values": ((rows * columns - pruned,), t.weight.dtype),
            "keep": ((rows, math.ceil(columns / 8)), torch.uint8),
            "columns": ((), torch.int64),
        }
    return layout


@register_modification("prune.sparsegpt", SparseGPT)
def apply_sparsegpt(config: SparseGPT, model: nn.Module, patch: Patch, context: Context) -> None:
    targets = config.targets(model)
    if config.m is not None:
        for target in targets:
            columns = target.weight.shape[1]
            if columns % config.m:
                raise HemorrhageError(
                    f"{config.name}: layer {target.name!r} has {columns} inputs, not a multiple "
                    f"of m={config.m}; choose an m that divides it or exclude the layer with "
                    "exclude=(...)"
                )

    def solve(
        target: Target, hessian: torch.Tensor, stored: LayerState
    ) -> Callable[[], torch.Tensor]:
        dtype = target.weight.dtype
        new, keep = sparsegpt_prune(target.weight, hessian, config, target.name, overwrite=True)
        stored["values"].copy_(new.to(dtype)[keep])
        stored["keep"].copy_(pack_bits(keep))
        stored["columns"].fill_(keep.shape[1])
        return functools.partial(sparsegpt_weight, stored, dtype)

    layout = _sparsegpt_layout(targets, config)
    apply_obs(config, model, patch, context, targets, layout, solve, _sparsegpt_fn)
