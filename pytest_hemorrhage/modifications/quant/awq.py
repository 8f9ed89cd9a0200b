"""AWQ: activation-aware weight quantization (Lin et al. 2023).

Weights that multiply large activations matter most. AWQ scales input channel j of a weight up
by ``s_j`` before round-to-nearest quantization and divides the input by ``s_j``: the function
is unchanged before quantization, and the salient channels lose less to rounding. The scale is
``s = mean|x|**alpha`` (normalized so that ``max(s) * min(s) = 1``) with ``alpha`` chosen on a
grid over [0, 1) to minimize the quantized layers' output error on calibration activations;
``alpha = 0`` is plain RTN, so on the calibration data AWQ is never worse than RTN.

Where the scale goes. The official code folds ``1/s`` into the operation producing the input
(the RMSNorm/LayerNorm weight for q/k/v and gate/up, v_proj for o_proj, up_proj for down_proj)
and quantizes ``W diag(s)``. Here the effective weight is ``Q(W diag(s)) diag(1/s)``, a
parametrization of the target alone: the same product up to float rounding, but it touches no
norm weight (which include/exclude do not select), needs no knowledge of what feeds each layer
(GQA's v_proj cannot absorb o_proj's scale; GPT-2's fused c_attn feeds c_proj only through the
attention), and restores like every other parametrization. Layers that read the same input
tensor (q/k/v; gate/up; found by identity during the calibration pass) share one scale, as
they must to be foldable into one norm.

The quantizer is ``quant.rtn``'s (``rtn_quantize``), so ``quant.awq`` against ``quant.rtn`` with
the same bits, group size and symmetry isolates the scaling. The official code also searches a
per-group weight clipping range after scaling; that is not done here (it is a separate
improvement of the rounding grid, not activation awareness).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..calibration import (
    RoutedCalibration,
    calibrated_inputs,
    calibration_forwards,
    falls_back,
    input_stats,
    record_coverage,
    routed_grams,
)
from ..handler import Context
from ..hessian import walk_blocks
from ..registry import Patch, Target, register_modification
from ..state import calibrated, pack_states
from ..validate import check_choice, check_int
from .rtn import rtn_quantize

__all__ = ["AWQ", "FORMAT", "InputGram", "awq_scales", "input_grams", "search_scale"]

# bump when the cached scales change meaning or layout (2: state.Arena's; 3: experts' tokens)
FORMAT = 3
_TOKENS = "#tokens"  # the stored entry of each expert's routed calibration tokens


@dataclass(frozen=True, kw_only=True)
class AWQ(RoutedCalibration):
    """Activation-aware scaling searched per layer group, then ``quant.rtn``'s rounding.

    An expert's matrix of a fused expert weight is scaled by the tokens the router sent that
    expert (its own group); under ``min_expert_tokens`` of them it is not scaled: ``quant.rtn``.

    Args:
        bits: bits per weight, 1-8.
        group_size: input channels sharing a quantization scale; 0 means one per output row.
        symmetric: absmax scaling around zero (``quant.rtn``'s default); the official AWQ uses
            a zero point (``symmetric=False``).
        grid: number of ``alpha`` values tried, ``alpha = i / grid`` for i in 0..grid-1
            (the official code's 20).
        min_expert_tokens: routed calibration tokens an expert needs (see
            ``RoutedCalibration``).
    """

    fallback: ClassVar[str] = "quant.rtn"

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    grid: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "bits", 1, 8)
        check_int(self, "group_size", 0)
        check_choice(self, "symmetric", (True, False))
        check_int(self, "grid", 1, 1000)


@dataclass(frozen=True)
class InputGram:
    """The calibration input shared by a group of layers: ``X^T X / n`` over its tokens."""

    members: tuple[str, ...]  # the layers reading this input, in call order
    gram: torch.Tensor  # (in, in) float32, on the CPU


def input_grams(model: nn.Module, context: Context, targets: list[Target]) -> list[InputGram]:
    """The mean input outer product of every group of ``targets`` that reads one tensor.

    Layers are grouped by the identity of their input tensor in the first forward pass (q/k/v
    receive one ``hidden_states`` object, gate/up one ``x``). Memoized per model state and
    target set; kept on the CPU (``in**2`` floats per group).
    """
    key = ("input_grams", context.applied, tuple(t.name for t in targets))

    def forwards(handles: list[Any], new_batch: Callable[[], None]) -> None:
        calibration_forwards(context, handles, before_batch=new_batch)

    return context.memo(key, lambda: _collect_grams(targets, forwards))


def _collect_grams(
    targets: list[Target], run: Callable[[list[Any], Callable[[], None]], None]
) -> list[InputGram]:
    """The Grams of ``targets``' input groups over what ``run(handles, new_batch)`` runs (it
    removes the hooks' ``handles`` when done; ``new_batch()`` may be called between batches)."""
    owner_of: dict[str, str] = {}  # layer -> the first layer of its group
    members: dict[str, list[str]] = {}
    grams: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    last: list = [None, ""]  # the latest input seen by any target, and whose group it fed

    def hook(name: str):
        def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            shared = x is last[0]
            if name not in owner_of:
                owner = last[1] if shared else name
                owner_of[name] = owner
                members.setdefault(owner, []).append(name)
            owner = owner_of[name]
            if owner == name and not shared:  # one accumulation per distinct input tensor
                flat = x.detach().float().reshape(-1, x.shape[-1])
                grams[name] = grams.get(name, 0) + flat.T @ flat
                counts[name] = counts.get(name, 0) + flat.shape[0]
            last[0], last[1] = x, owner

        return record

    handles = [t.module.register_forward_pre_hook(hook(t.name)) for t in targets]

    def new_batch() -> None:
        last[0] = None  # inputs are shared within a batch only

    try:
        run(handles, new_batch)
    finally:
        new_batch()  # let go of the last input
    return [InputGram(tuple(members[o]), (grams[o] / counts[o]).cpu()) for o in grams]


def _output_error(
    weights: list[torch.Tensor], gram: torch.Tensor, scale: torch.Tensor, config: AWQ
) -> float:
    """``sum_m ||X (W_m - Q(W_m diag(s)) diag(1/s))^T||^2 / n``, from the Gram ``X^T X / n``."""
    total = 0.0
    for w in weights:
        q = rtn_quantize(w * scale, config.bits, config.group_size, config.symmetric) / scale
        d = w - q
        total += float(((d @ gram) * d).sum())
    return total


def search_scale(
    weights: list[torch.Tensor], gram: torch.Tensor, mean: torch.Tensor, config: AWQ
) -> torch.Tensor:
    """The per-layer solve of AWQ: for one group of layers reading one input (their float32
    (out, in) weights and the Gram ``X^T X / n`` on the layers' device, the per-channel mean
    |x| on the CPU), the scale ``mean**alpha`` (normalized) whose quantized layers have the
    least output error over the grid of ``alpha``; on the CPU."""
    best, best_error = torch.ones_like(mean), float("inf")
    with torch.no_grad():
        for i in range(config.grid):
            s = mean.pow(i / config.grid).clamp_min(1e-4)
            s = s / (s.max() * s.min()).sqrt()
            error = _output_error(weights, gram, s.to(gram.device), config)
            if error < best_error:  # strictly: ties keep the smaller alpha (RTN first)
                best, best_error = s, error
    return best


def awq_scales(
    model: nn.Module, context: Context, config: AWQ, targets: list[Target]
) -> dict[str, Any]:
    """Per target, the searched input-channel scale (float32, on the CPU); ones for an expert
    that falls back; under ``"#tokens"``, each expert target's routed calibration tokens.

    The Grams come block by block (``hessian.walk_blocks``, on the unmodified model: each block's
    inputs are the baseline's), each block's searched and let go before the next: holding every
    layer's Gram at once would take about the model's own size again. Kept in the session memo
    and on disk next to the reference (``state.calibrated``): a second pytest run applies AWQ
    without a calibration pass.
    """

    def compute() -> dict[str, Any]:
        linear = [t for t in targets if t.expert is None]
        calibrated_inputs(model, context, linear, config.name, "use quant.rtn")
        stats = input_stats(model, context)
        by_name = {t.name: t for t in targets}
        scales: dict[str, Any] = {}
        tokens: dict[str, torch.Tensor] = {}

        def visit(index: int | None, chosen: list[Target], run: Callable[[], None], _) -> None:
            routed: list[Any] = []

            def block(handles: list[Any], new_batch: Callable[[], None]) -> None:
                try:
                    routed.append(routed_grams(chosen, run, model))
                finally:
                    for handle in handles:
                        handle.remove()

            groups = _collect_grams([t for t in chosen if t.expert is None], block)
            sums, counts = routed[0]
            for t in chosen:  # each expert's matrix: a group of its own
                if t.expert is None:
                    continue
                tokens[t.name] = torch.tensor(counts.get(t.name, 0))
                if falls_back(config.min_expert_tokens, counts.get(t.name, 0)):
                    scales[t.name] = torch.ones(t.weight.shape[1])
                else:
                    gram = (sums[t.name] / counts[t.name]).cpu()
                    groups.append(InputGram((t.name,), gram))
            for group in groups:
                device = by_name[group.members[0]].weight.device
                mean = stats[group.members[0]].abs_mean.float()
                weights = [by_name[n].weight.detach().float() for n in group.members]
                best = search_scale(weights, group.gram.to(device), mean, config)
                for name in group.members:
                    scales[name] = best

        walk_blocks(model, context, targets, visit, observe_only=True)
        if tokens:
            scales[_TOKENS] = tokens
        return pack_states(scales)

    return calibrated(config, context, targets[0].weight, compute, name="awq", format=FORMAT)


def _scaled_rtn(scale: torch.Tensor, config: AWQ):
    def quantize(w: torch.Tensor) -> torch.Tensor:
        s = scale.to(w.device)
        q = rtn_quantize(w.float() * s, config.bits, config.group_size, config.symmetric)
        return (q / s).to(w.dtype)

    return quantize


@register_modification("quant.awq", AWQ)
def apply_awq(config: AWQ, model: nn.Module, patch: Patch, context: Context) -> None:
    targets = config.targets(model)
    scales = awq_scales(model, context, config, targets)
    tokens = {name: int(n) for name, n in scales.get(_TOKENS, {}).items()}
    record_coverage(patch, config, targets, tokens)
    for target in targets:
        patch.parametrize(target, _scaled_rtn(scales[target.name], config))
