"""The Optimal Brain Surgeon machinery GPTQ and SparseGPT share (Frantar et al. 2022; Frantar &
Alistarh 2023):

  * the per-layer Hessian ``H = 2 X^T X / tokens`` of the squared reconstruction error, from the
    layer's inputs on the calibration windows;
  * dampening (``damp`` times the mean of diag(H) added to the diagonal; inputs that never fire
    get H_jj = 1 and a zero weight column), then the upper Cholesky factor of H^-1;
  * sequential calibration, block by block as in the papers: the Hessians of block i come from
    the inputs that blocks < i produce *after* their own quantization or pruning. While it runs,
    solved layers are swapped, on a private ``Patch`` that is always undone, for stand-ins that
    rebuild their weight from the compact state on each call; the caller's patch only receives
    the final parametrizations once every layer is solved, so an error (a singular Hessian, too
    little calibration data) leaves the model untouched.

An expert's matrix of a fused expert weight gets the Hessian of the tokens the router sent that
expert (``calibration.routed_grams``); one sent fewer than the config's ``min_expert_tokens``
gets the identity, with which both solves reduce to their data-free counterparts (no
off-diagonal to compensate through: GPTQ rounds to nearest on its grid, SparseGPT keeps the
largest magnitudes).

Block 0's Hessians do not depend on the config, so every GPTQ or SparseGPT config of a session
(a sweep over ``sparsity`` or ``bits``) reuses them. The column-by-column solves themselves live
with their methods (``quant/gptq.py``, ``prune/sparsegpt.py``); their compact results are kept
by ``state.py``, and ``apply_obs`` is the part of a handler the two share (solve into the
cached state, report the experts' coverage, parametrize).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import HemorrhageError
from .calibration import RoutedCalibration, falls_back, record_coverage, routed_grams
from .experts import stored
from .handler import Context
from .registry import Patch, Target, blocks
from .state import Arena, Layout, calibrated, expert_tokens

__all__ = [
    "COLUMNS",
    "apply_obs",
    "solver_inputs",
    "inverse_hessian_factor",
    "sequential_hessians",
    "walk_blocks",
]

COLUMNS = 128  # columns per lazy batch update (both papers' block size)
_BATCH = 8  # calibration windows per forward call


def solver_inputs(
    weight: torch.Tensor, hessian: torch.Tensor, overwrite: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """What a column-by-column solve works on: a float32 copy of ``weight`` (out, in), and
    ``hessian`` (in, in) in float32 on its device, copied unless ``overwrite`` (then the caller's
    Hessian memory holds the factor: one Hessian-sized buffer fewer)."""
    # contiguous: a Conv1D's weight is seen transposed, and a copy keeps the view's strides,
    # which the solves' flattened views of a block cannot take
    w = weight.detach().to(torch.float32, copy=True, memory_format=torch.contiguous_format)
    return w, hessian.to(w.device, torch.float32, copy=not overwrite)


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
    model: nn.Module,
    context: Context,
    targets: list[Target],
    solve: Solve,
    min_expert_tokens: int = 0,
) -> dict[str, int]:
    """Calibrate ``targets`` block by block (``walk_blocks``): collect each block's Hessians
    from the outputs of the blocks before it as already solved, call ``solve(target, hessian)``
    for each of its targets (it returns the new (out, in) weight, or a function that rebuilds
    it), then run the block again with those weights to produce the next block's inputs.
    Targets outside the blocks are solved last, from one pass of the whole model with every
    block solved. The model is unchanged on return.

    ``solve`` owns the Hessian it receives and may overwrite it: a layer's Hessian is handed
    over as is when nothing else needs it, a copy when the session memo or another layer
    reading the same input does, so at most two Hessians of a layer are alive during a solve.

    Returns:
        The calibration tokens each expert target was routed (absent: none); those under
        ``min_expert_tokens`` (or none) were solved with the identity Hessian.
    """
    routed: dict[str, int] = {}

    def collect(chosen: list[Target], run: Callable[[], None]) -> tuple[dict, dict[str, int]]:
        experts: list[Any] = []
        linear = {t.name: t.module for t in chosen if t.expert is None}
        hessians = _accumulate_hessians(
            linear, lambda: experts.append(routed_grams(chosen, run, model))
        )
        sums, counts = experts[0]
        for name, total in sums.items():
            hessians[name] = total.mul_(2 / counts[name])
        return hessians, counts

    def solve_block(
        chosen: list[Target], hessians: dict, counts: dict[str, int], memoized: bool, swaps: Patch
    ) -> None:
        for t in chosen:
            if t.expert is not None and falls_back(min_expert_tokens, counts.get(t.name, 0)):
                hessians.pop(t.name, None)  # too few routed tokens: the data-free solve
                hessian = torch.eye(t.weight.shape[1], device=t.weight.device)
            else:
                hessian = hessians.pop(t.name)
                if memoized or any(hessian is other for other in hessians.values()):
                    hessian = hessian.clone()
            new = solve(t, hessian)
            del hessian  # (its memory held the solve's factor) freed before the next layer
            if t.expert is None:
                swaps.swap_module(t.name, _Solved(new, t.weight.dtype, t.module.bias))
            else:  # one matrix of a fused parameter: edited in place of being swapped
                swaps.parametrize(t, functools.partial(_solved_expert, new))

    def visit(
        index: int | None, chosen: list[Target], run: Callable[[], None], swaps: Patch
    ) -> None:
        memoized = index == 0
        if memoized:  # independent of the config: shared by every config
            shape = context.calibration_windows().shape
            key = ("obs.hessians", context.applied, tuple(t.name for t in chosen), shape)
            hessians, counts = context.memo(key, functools.partial(collect, chosen, run))
            hessians = dict(hessians)
        else:
            hessians, counts = collect(chosen, run)
        routed.update(counts)
        # each fused stack evaluated once for the block: solving expert e parametrizes it on
        # ``swaps``, and reading expert e + 1's weight would otherwise rebuild every expert
        with parametrize.cached():
            solve_block(chosen, hessians, counts, memoized, swaps)

    walk_blocks(model, context, targets, visit)
    return routed


def _solved_expert(new: torch.Tensor | Callable[[], torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    """A solved expert's (out, in) matrix during calibration, as ``_Solved`` for a layer."""
    return (new if isinstance(new, torch.Tensor) else new()).to(w.dtype)


LayerState = dict[str, torch.Tensor]


def apply_obs(
    config: RoutedCalibration,
    model: nn.Module,
    patch: Patch,
    context: Context,
    targets: list[Target],
    layout: Layout,
    solve: Callable[[Target, torch.Tensor, LayerState], Callable[[], torch.Tensor]],
    weight: Callable[[LayerState], Callable[[torch.Tensor], torch.Tensor]],
) -> None:
    """What a GPTQ or SparseGPT handler does around its solve: calibrate ``targets``
    (``sequential_hessians``) into one ``state.Arena`` of ``layout``, kept by
    ``state.calibrated``; record the experts' coverage on ``patch``; parametrize each target.

    Args:
        config: the modification.
        model: the model ``targets`` are in.
        patch: the patch that receives the parametrizations and the coverage record.
        context: the handler's context.
        targets: the layers to solve.
        layout: each target's stored state; each expert target also stores, under
            ``"tokens"``, the calibration tokens it was routed (a cached result still reports
            its coverage).
        solve: ``solve(target, hessian, stored)`` solves ``target`` into ``stored`` (its views
            of the arena; it owns ``hessian``, as in ``sequential_hessians``) and returns a
            function that rebuilds its (out, in) weight from them.
        weight: ``weight(state)``: a target's parametrization from its stored state (without
            ``"tokens"``), on the device of the tensor it parametrizes.
    """

    def compute() -> dict[str, Any]:
        # tokens last: the entries' order is the stored layout, which cached results share
        full = {t.name: {**layout[t.name], **expert_tokens(t)} for t in targets}
        arena = Arena(full, targets[0].weight.device)
        states = arena.states()
        routed = sequential_hessians(
            model,
            context,
            targets,
            lambda target, hessian: solve(target, hessian, states[target.name]),
            config.min_expert_tokens,
        )
        for t in targets:
            if t.expert is not None:
                states[t.name]["tokens"].fill_(routed.get(t.name, 0))
        return arena.packed()

    states = calibrated(config, context, targets[0].weight, compute)
    tokens = {t.name: int(states[t.name]["tokens"]) for t in targets if t.expert is not None}
    record_coverage(patch, config, targets, tokens)
    for target in targets:
        # views of the stored buffers where already there; the stored tensor's device, as
        # reading an expert's weight after another's edit would rebuild the whole stack
        device = stored(target.module, target.param).device
        state = {k: v.to(device) for k, v in states[target.name].items() if k != "tokens"}
        patch.parametrize(target, weight(state))
