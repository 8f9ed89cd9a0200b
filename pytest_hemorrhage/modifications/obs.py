"""Optimal Brain Surgeon family: GPTQ quantization and SparseGPT pruning.

Both methods (Frantar et al. 2022; Frantar & Alistarh 2023) share one machinery, kept here:
  * the per-layer Hessian ``H = 2 X^T X / tokens`` of the squared reconstruction error, from the
    layer's inputs on the calibration windows;
  * dampening (``damp`` times the mean of diag(H) added to the diagonal; inputs that never fire
    get H_jj = 1 and a zero weight column), then the upper Cholesky factor of H^-1;
  * column-by-column rounding or pruning, each column's error spread over the columns not yet
    processed through that factor, with lazy updates in blocks of 128 columns;
  * sequential calibration, block by block as in the papers: the Hessians of block i come from
    the inputs that blocks < i produce *after* their own quantization or pruning. While it runs,
    solved layers are swapped, on a private ``Patch`` that is always undone, for stand-ins that
    rebuild their weight from the compact state on each call; the caller's patch only receives
    the final parametrizations once every layer is solved, so an error (a singular Hessian, too
    little calibration data) leaves the model untouched.

The results are small states the parametrizations rebuild the weight from on every use: GPTQ's
integer codes bit-packed (``bits`` per weight) with a scale and zero point per group; SparseGPT's
surviving weights (they change too: that is the error compensation) with a one-bit mask. Every
layer's state is a view of one flat buffer per dtype (``Arena``), sized before the first solve
and filled in place, so it is in memory once and stored on disk as a handful of tensors. It is
computed once per model, calibration data, earlier stages and config: kept in the session memo
(the last few configs) and on disk under a content hash when the context has a ``cache_dir``.
Block 0's Hessians do not depend on the config, so every GPTQ or SparseGPT config of a session
(a sweep over ``sparsity`` or ``bits``) reuses them.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import HemorrhageError
from ..reference import cache_key, cached
from .prune import pack_bits, unpack_bits
from .quant import quant_grid
from .registry import Modification, Patch, Target, blocks, register_modification
from .validate import check_choice, check_int, check_number

if TYPE_CHECKING:
    from ..harness import Context

__all__ = [
    "Arena",
    "FORMAT",
    "GPTQ",
    "SparseGPT",
    "gptq_quantize",
    "gptq_weight",
    "calibrated",
    "inverse_hessian_factor",
    "pack_states",
    "sequential_hessians",
    "sparsegpt_prune",
    "sparsegpt_weight",
    "unpack_states",
    "walk_blocks",
]

FORMAT = 3  # bump when the stored state changes (3: flat buffers per dtype plus an index)
_COLUMNS = 128  # columns per lazy batch update (both papers' block size)
_BATCH = 8  # calibration windows per forward call
_RECENT = 4  # configs whose results the session memo keeps (a sweep's neighbours)

LayerState = dict[str, torch.Tensor]


# --- configs -----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class GPTQ(Modification):
    """GPTQ (Frantar et al. 2022): weights rounded one input column at a time, each column's
    rounding error compensated on the columns not yet rounded through the inverse Hessian.

    The grid is ``quant.rtn``'s (same ``bits``, ``group_size``, ``symmetric``), so the two differ
    only by the error compensation.

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
    """

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


@dataclass(frozen=True, kw_only=True)
class SparseGPT(Modification):
    """SparseGPT (Frantar & Alistarh 2023): weights pruned one column at a time by the OBS score
    ``w^2 / [H^-1]_jj^2``, the survivors updated to compensate the pruned ones.

    Unstructured masks are chosen per block of 128 columns (``sparsity`` of each block, ranked
    over all its rows: the paper's adaptive mask selection) from the weights as compensated so
    far. With ``n``/``m``, each group of ``m`` consecutive inputs keeps its ``n`` best weights
    (as ``prune.nm``: 2:4 keeps 2 of every 4).

    Args:
        sparsity: fraction of weights to zero, 0-1 (default 0.5 unless ``n``/``m`` are given).
        n: weights kept in each group of ``m`` (semi-structured N:M sparsity).
        m: group size along the input dimension; every target's in_features must divide by it.
        damp: added to the Hessian's diagonal, as a fraction of its mean (0.01 as in the paper).
    """

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


# --- the shared solve ----------------------------------------------------------------------------


def inverse_hessian_factor(
    hessian: torch.Tensor, weight: torch.Tensor, damp: float, name: str, what: str
) -> torch.Tensor:
    """The upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, in ``hessian``'s memory.

    ``hessian`` (in, in) and ``weight`` (out, in) are modified in place: inputs that never fire
    (H_jj == 0) get H_jj = 1 and a zero weight column, as in both papers; ``hessian`` is then
    overwritten by its factors (each step in place: no second Hessian-sized buffer is kept, and
    the values are those of the out-of-place calls) and is the returned factor.

    Raises:
        HemorrhageError: H is not positive definite even after dampening.
    """
    if not torch.isfinite(hessian).all():
        raise HemorrhageError(
            f"{what}: layer {name!r} saw non-finite calibration activations, so its Hessian "
            "is undefined; exclude it with exclude=(...) or fix the model's overflow first"
        )
    diag = torch.arange(len(hessian), device=hessian.device)
    dead = hessian[diag, diag] == 0
    hessian[diag[dead], diag[dead]] = 1
    weight[:, dead] = 0
    hessian[diag, diag] += damp * hessian[diag, diag].mean()
    info = torch.zeros((), dtype=torch.int32, device=hessian.device)
    torch.linalg.cholesky_ex(hessian, out=(hessian, info))  # lower factor L
    if not info:
        torch.cholesky_inverse(hessian, out=hessian)  # H^-1 from L
        torch.linalg.cholesky_ex(hessian, upper=True, out=(hessian, info))
    if info or not torch.isfinite(hessian).all():
        raise HemorrhageError(
            f"{what}: the Hessian of layer {name!r} is singular even after dampening "
            f"(damp={damp:g}); use a larger damp, e.g. damp={max(10 * damp, 0.01):g}, or more "
            "calibration windows"
        )
    return hessian


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
    w = weight.detach().to(torch.float32, copy=True)
    h = hessian.to(w.device, torch.float32, copy=not overwrite)
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
    for i1 in range(0, columns, _COLUMNS):
        i2 = min(i1 + _COLUMNS, columns)
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


def _mask_step(config: SparseGPT) -> int:
    """Columns per block of mask selection: 128, a multiple of ``m`` (N:M groups never
    straddle two blocks)."""
    return _COLUMNS if config.m is None else max(config.m, _COLUMNS // config.m * config.m)


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
    w = weight.detach().to(torch.float32, copy=True)
    h = hessian.to(w.device, torch.float32, copy=not overwrite)
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


# --- sequential calibration ----------------------------------------------------------------------


class _Captured(Exception):
    """Stops the forward pass at the first block, carrying that block's inputs."""


@dataclass
class _Batch:
    """One batch of calibration windows at a block's input."""

    hidden: torch.Tensor
    args: tuple[Any, ...]  # the block's other positional arguments (the same for every block)
    kwargs: dict[str, Any]  # masks, position embeddings, ... (the same for every block)
    positional: bool  # whether the hidden states came positionally

    def run(self, block: nn.Module) -> torch.Tensor:
        if self.positional:
            out = block(self.hidden, *self.args, **self.kwargs)
        else:
            out = block(hidden_states=self.hidden, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out


def _first_block_inputs(
    model: nn.Module, context: Context, first: nn.Module, windows: torch.Tensor
) -> list[_Batch]:
    """The first block's inputs for each batch of ``windows`` (only the embeddings run)."""

    def grab(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if args:
            raise _Captured(_Batch(args[0], args[1:], dict(kwargs), True))
        kwargs = dict(kwargs)
        raise _Captured(_Batch(kwargs.pop("hidden_states"), (), kwargs, False))

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    batches = []
    try:
        for ids in windows.split(_BATCH):
            try:
                context.logits(ids)
            except _Captured as captured:
                batches.append(captured.args[0])
            else:
                raise HemorrhageError(
                    f"{type(model).__name__}: its forward pass never reached the first block, "
                    "so GPTQ/SparseGPT cannot calibrate it; pass include=(...) patterns naming "
                    "the layers to modify"
                )
    finally:
        handle.remove()
    return batches


def _accumulate_hessians(
    modules: dict[str, nn.Module], run: Callable[[], None]
) -> dict[str, torch.Tensor]:
    """``2 X^T X / tokens`` of each module's input over the calls ``run`` makes.

    Modules fed the same tensor one after the other (q/k/v; gate/up) share one Hessian object.
    Only the latest input is kept (to recognize it by identity): keeping every input seen until
    the end, as a table by ``id`` must, held a block's activations for all the windows.
    """
    sums: dict[str, torch.Tensor] = {}
    tokens: dict[int, int] = {}
    last: list[Any] = [None, ""]  # the latest input a module read, and whose Hessian it fed

    def hook(name: str):
        def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            if x is last[0]:  # another reader of the same input
                sums.setdefault(name, sums[last[1]])
                return
            last[0], last[1] = x, name
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            total = sums.setdefault(name, flat.new_zeros(flat.shape[1], flat.shape[1]))
            total.addmm_(flat.t(), flat)
            tokens[id(total)] = tokens.get(id(total), 0) + len(flat)

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
        last.clear()
    for total in {id(t): t for t in sums.values()}.values():
        total.mul_(2 / tokens[id(total)])
    return sums


def _run_all(block: nn.Module, batches: list[_Batch], moved: list[bool] | None = None) -> None:
    """Run ``block`` over every batch; given ``moved`` (once: it is then set), the outputs
    become the batches' hidden states, the next block's inputs."""
    advance = moved is not None and not moved[0]
    for batch in batches:
        out = batch.run(block)
        if advance:
            batch.hidden = out
    if moved is not None:
        moved[0] = True


def _run_model(context: Context, windows: torch.Tensor) -> None:
    for ids in windows.split(_BATCH):
        context.logits(ids)


class _Solved(nn.Module):
    """A solved layer during calibration, in place of the original: the new (out, in) weight,
    or a function rebuilding it from the compact state on every call (so no solved layer keeps
    a dense copy of its weight: they would add up to the targets' whole size), and the original
    bias."""

    def __init__(
        self,
        weight: torch.Tensor | Callable[[], torch.Tensor],
        dtype: torch.dtype,
        bias: torch.Tensor | None,
    ) -> None:
        super().__init__()
        self.new = weight.to(dtype) if isinstance(weight, torch.Tensor) else weight
        self.dtype, self.bias = dtype, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.new if isinstance(self.new, torch.Tensor) else self.new().to(self.dtype)
        return nn.functional.linear(x, weight, self.bias)


Solve = Callable[[Target, torch.Tensor], torch.Tensor | Callable[[], torch.Tensor]]
Visit = Callable[[int | None, list[Target], Callable[[], None], Patch], None]


def walk_blocks(
    model: nn.Module,
    context: Context,
    targets: list[Target],
    visit: Visit,
    *,
    observe_only: bool = False,
) -> None:
    """Run the calibration windows through the model one block at a time, every window through
    a block before the next block, and let ``visit`` calibrate each block's targets.

    For each block holding targets, ``visit(index, chosen, run, swaps)``: ``run()`` runs that
    block over every batch of windows (hooks ``visit`` registers see its layers' inputs), and
    what ``visit`` swaps in on ``swaps`` is what the block then runs with to produce the next
    block's inputs. With ``observe_only`` (``visit`` swaps nothing and calls ``run`` once), that
    one run's outputs are the next block's inputs: one pass per block instead of two. Targets
    outside the blocks are visited last (``index`` None), ``run`` being a pass of the whole
    model as the visits left it. Only the windows' hidden states between two blocks and one
    block's activations are alive at once. The model is unchanged on return (``swaps`` is
    private and always undone).
    """
    windows = context.calibration_windows()  # too little data fails here, before any work
    prefix, layers = blocks(model)
    by_block: dict[int, list[Target]] = {}
    rest = []
    for t in targets:
        head, _, tail = t.name.partition(prefix + ".")
        index = tail.split(".", 1)[0]
        if head == "" and tail and index.isdigit():
            by_block.setdefault(int(index), []).append(t)
        else:
            rest.append(t)
    last = len(layers) - 1 if rest else max(by_block, default=-1)
    swaps = Patch(model)
    try:
        with torch.no_grad():
            batches = _first_block_inputs(model, context, layers[0], windows) if last >= 0 else []
            for i in range(last + 1):
                block, chosen = layers[i], by_block.get(i, [])
                moved = [False] if observe_only and i < last else None
                if chosen:
                    visit(i, chosen, functools.partial(_run_all, block, batches, moved), swaps)
                if i < last and not (moved and moved[0]):
                    for batch in batches:
                        batch.hidden = batch.run(block)
            del batches
            if rest:
                visit(None, rest, functools.partial(_run_model, context, windows), swaps)
    finally:
        swaps.undo()


def sequential_hessians(
    model: nn.Module, context: Context, targets: list[Target], solve: Solve
) -> None:
    """Calibrate ``targets`` block by block (``walk_blocks``): collect each block's Hessians
    from the outputs of the blocks before it as already solved, call ``solve(target, hessian)``
    for each of its targets (it returns the new (out, in) weight, or a function that rebuilds
    it), then run the block again with those weights to produce the next block's inputs.
    Targets outside the blocks are solved last, from one pass of the whole model with every
    block solved. The model is unchanged on return.

    ``solve`` owns the Hessian it receives and may overwrite it: a layer's Hessian is handed
    over as is when nothing else needs it, a copy when the session memo or another layer
    reading the same input does, so at most two Hessians of a layer are alive during a solve.
    """

    def visit(
        index: int | None, chosen: list[Target], run: Callable[[], None], swaps: Patch
    ) -> None:
        modules = {t.name: t.module for t in chosen}
        memoized = index == 0
        if memoized:  # independent of the config: shared by every config
            shape = context.calibration_windows().shape
            key = ("obs.hessians", context.applied, tuple(modules), shape)
            hessians = dict(
                context.memo(key, functools.partial(_accumulate_hessians, modules, run))
            )
        else:
            hessians = _accumulate_hessians(modules, run)
        for t in chosen:
            hessian = hessians.pop(t.name)
            if memoized or any(hessian is other for other in hessians.values()):
                hessian = hessian.clone()
            new = solve(t, hessian)
            del hessian  # (its memory held the solve's factor) freed before the next layer
            swaps.swap_module(t.name, _Solved(new, t.weight.dtype, t.module.bias))

    walk_blocks(model, context, targets, visit)


# --- caching: a handful of flat tensors -------------------------------------------------------

States = dict[str, Any]  # {layer: tensor} or {layer: {key: tensor}}
Layout = dict[str, dict[str, tuple[tuple[int, ...], torch.dtype]]]


class Arena:
    """Every layer's state as views of one flat buffer per dtype.

    The solves write their results straight into these views (no copy of the whole state at
    the end, so the state is in memory once), and the disk cache stores the buffers and an
    index: loading an entry is a few large reads instead of unpickling a small tensor per layer
    and key (torch's weights-only unpickler costs about a quarter of a millisecond per tensor,
    which was most of a cached apply on a small model).
    """

    def __init__(self, layout: Layout, device: torch.device | str = "cpu") -> None:
        sizes: dict[torch.dtype, int] = {}
        self.entries: list[tuple[tuple[str, ...], torch.dtype, int, tuple[int, ...]]] = []
        for name, keys in layout.items():
            for key, (shape, dtype) in keys.items():
                offset = sizes.get(dtype, 0)
                self.entries.append(((name, key) if key else (name,), dtype, offset, shape))
                sizes[dtype] = offset + math.prod(shape)
        # empty, not zeros: pages are only touched (made resident) as the solves fill them
        self.flats = {d: torch.empty(n, dtype=d, device=device) for d, n in sizes.items()}

    def states(self) -> States:
        """``{layer: {key: view}}`` (``{layer: view}`` for a layout with empty keys)."""
        return _views(self.flats, self.entries)

    def packed(self) -> dict[str, Any]:
        """What the disk cache stores: the flat buffers, the index and the names."""
        slot = {d: i for i, d in enumerate(self.flats)}
        index: list[int] = []
        for _, dtype, offset, shape in self.entries:
            index += [slot[dtype], offset, len(shape), *shape]
        return {
            "flats": list(self.flats.values()),
            "index": torch.tensor(index, dtype=torch.int64),
            "names": "\n".join("\t".join(path) for path, *_ in self.entries),
        }


def _views(
    flats: dict[torch.dtype, torch.Tensor],
    entries: list[tuple[tuple[str, ...], torch.dtype, int, tuple[int, ...]]],
) -> States:
    states: States = {}
    for path, dtype, offset, shape in entries:
        view = flats[dtype][offset : offset + math.prod(shape)].view(shape)
        if len(path) == 1:
            states[path[0]] = view
        else:
            states.setdefault(path[0], {})[path[1]] = view
    return states


def pack_states(states: States) -> dict[str, Any]:
    """``states`` (``{layer: tensor}`` or ``{layer: {key: tensor}}``) in ``Arena``'s stored form
    (one copy of each tensor; for results computed outside an arena, e.g. AWQ's scales)."""
    layout: Layout = {}
    for name, value in states.items():
        tensors = value if isinstance(value, dict) else {"": value}
        layout[name] = {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}
    arena = Arena(layout, "cpu")
    stored = arena.states()
    for name, value in states.items():
        if isinstance(value, dict):
            for key, t in value.items():
                stored[name][key].copy_(t)
        else:
            stored[name].copy_(value)
    return arena.packed()


def unpack_states(packed: dict[str, Any]) -> States:
    """Inverse of ``Arena.packed``/``pack_states``: views of the stored flat buffers."""
    flats = {t.dtype: t for t in packed["flats"]}
    dtypes = [t.dtype for t in packed["flats"]]
    index = packed["index"].tolist()
    names = packed["names"].split("\n") if packed["names"] else []
    entries = []
    i = 0
    for name in names:
        slot, offset, ndim = index[i : i + 3]
        shape = tuple(index[i + 3 : i + 3 + ndim])
        i += 3 + ndim
        entries.append((tuple(name.split("\t")), dtypes[slot], offset, shape))
    return _views(flats, entries)


def calibrated(
    config: Modification,
    context: Context,
    weight: torch.Tensor,
    compute: Callable[[], dict[str, Any]],
    *,
    name: str = "obs",
    format: int = FORMAT,
) -> States:
    """The calibration result of ``config``: session memo, else the disk cache next to the
    reference, else ``compute()`` (stored in both).

    ``compute`` returns the result packed (``Arena.packed()`` or ``pack_states(...)``); the
    caller gets it unpacked (``{layer: tensor}`` or ``{layer: {key: tensor}}``, views of the
    packed buffers, on the CPU when read from disk). The key hashes everything the result
    depends on: the config, the stages applied before it, the seed, the baseline's content
    hash, the calibration windows, and the dtype and device kind of ``weight`` (a target's).
    The memo keeps the last few configs of each ``name`` (a sweep's neighbours); the disk cache
    (``reference.cached``: lock, atomic write, damaged entries rebuilt) lets a second pytest
    run apply without calibrating.
    """
    windows = context.calibration_windows()
    key = cache_key(
        name,
        format,
        config.to_dict(),
        [c.to_dict() for c in context.applied],
        context.seed,
        context.fingerprint,
        tuple(windows.shape),
        windows.cpu().numpy().tobytes(),
        str(weight.dtype),
        weight.device.type,
    )
    recent: OrderedDict[str, States] = context.memo((f"{name}.recent",), OrderedDict)
    if key not in recent:
        packed = cached(key, context.cache_dir, compute, name=name, format=format)[0]
        recent[key] = unpack_states(packed)
        while len(recent) > _RECENT:
            recent.popitem(last=False)
    recent.move_to_end(key)
    return recent[key]


# --- handlers ------------------------------------------------------------------------------------


def _gptq_fn(state: LayerState, config: GPTQ) -> Callable[[torch.Tensor], torch.Tensor]:
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
    targets = config.targets(model)

    def compute() -> dict[str, Any]:
        arena = Arena(_gptq_layout(targets, config), targets[0].weight.device)
        states = arena.states()

        def solve(target: Target, hessian: torch.Tensor) -> Callable[[], torch.Tensor]:
            stored = states[target.name]
            state = gptq_quantize(target.weight, hessian, config, target.name, overwrite=True)
            for key, value in _pack_codes(state, config.bits).items():
                stored[key].copy_(value)
            return functools.partial(gptq_weight, stored, config.bits, config.symmetric)

        sequential_hessians(model, context, targets, solve)
        return arena.packed()

    states = calibrated(config, context, targets[0].weight, compute)
    for target in targets:
        device = target.weight.device  # views of the stored buffers where already there
        state = {k: v.to(device) for k, v in states[target.name].items()}
        patch.parametrize(target, _gptq_fn(state, config))


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

    def compute() -> dict[str, Any]:
        arena = Arena(_sparsegpt_layout(targets, config), targets[0].weight.device)
        states = arena.states()

        def solve(target: Target, hessian: torch.Tensor) -> Callable[[], torch.Tensor]:
            dtype, stored = target.weight.dtype, states[target.name]
            new, keep = sparsegpt_prune(target.weight, hessian, config, target.name, overwrite=True)
            stored["values"].copy_(new.to(dtype)[keep])
            stored["keep"].copy_(pack_bits(keep))
            stored["columns"].fill_(keep.shape[1])
            return functools.partial(sparsegpt_weight, stored, dtype)

        sequential_hessians(model, context, targets, solve)
        return arena.packed()

    states = calibrated(config, context, targets[0].weight, compute)
    for target in targets:
        device = target.weight.device
        patch.parametrize(
            target, _sparsegpt_fn({k: v.to(device) for k, v in states[target.name].items()})
        )
