"""Calibration statistics for data-aware modifications (Wanda, SmoothQuant, ...).

One pass of the model over the calibration windows records, for every linear layer, the
per-input-channel L2 norm, mean and maximum magnitude of its inputs, with the windows kept disjoint
from the evaluation ones. The statistics describe the model as it is when the modification is
applied (the baseline, or the output of the earlier stages of a composition) and are computed
once per session for each such state.

Mixture-of-experts weights stored fused are calibrated per expert on the tokens the router sent
to it (``experts.routed_hooks``): each expert's matrix gets the statistics, Hessian or Gram of
its own inputs, named like its target (``...experts.gate_up_proj[3]``). An expert the router
sent fewer than ``min_expert_tokens`` calibration tokens gets its method's data-free
counterpart instead (:class:`RoutedCalibration`), and every result says so per MoE module
(:func:`record_coverage`).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import HemorrhageError
from .experts import ExpertStack, expert_stacks, routed_hooks
from .handler import Context
from .registry import Modification, Patch, Target, is_linear
from .validate import check_int

__all__ = [
    "InputStats",
    "RoutedCalibration",
    "calibrated_inputs",
    "calibration_forwards",
    "falls_back",
    "input_norms",
    "input_stats",
    "record_coverage",
    "routed_grams",
    "routed_statistics",
]


@dataclass(frozen=True, kw_only=True)
class RoutedCalibration(Modification):
    """A modification calibrated on activations, per expert on mixture-of-experts models.

    Each expert's matrix of a fused expert weight is calibrated on the tokens the router sent
    to that expert; an expert sent fewer than ``min_expert_tokens`` of them gets the method's
    data-free counterpart (``fallback``, as GPTQModel's failsafe rounds what calibration did
    not reach to nearest), named with the coverage in ``details["calibration"]``.

    Args:
        min_expert_tokens: calibration tokens an expert needs to be calibrated on its own
            inputs; fewer: the data-free ``fallback``. 0 calibrates every expert reached.
    """

    per_expert: ClassVar[bool | None] = True  # each expert, on the tokens routed to it
    # the data-free method an expert with too few tokens gets, as the reports name it
    fallback: ClassVar[str] = ""
    min_expert_tokens: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "min_expert_tokens", 0)


@dataclass(frozen=True)
class InputStats:
    """Per input channel of one linear layer, over every calibration token."""

    l2: torch.Tensor  # (in_features,) float32: sqrt(sum of x_j^2), Wanda's ||X_j||_2
    abs_max: torch.Tensor  # (in_features,) float32: max |x_j|, SmoothQuant's activation range
    abs_mean: torch.Tensor  # (in_features,) float32: mean |x_j|, AWQ's and ASVD's channel scale
    tokens: int


def input_stats(model: nn.Module, context: Context) -> dict[str, InputStats]:
    """Statistics of every linear layer's input, by module name (computed once per session)."""
    return context.memo(("input_stats", context.applied), lambda: _collect(model, context))


def calibration_forwards(
    context: Context, handles: Sequence[Any], *, before_batch: Callable[[], None] | None = None
) -> None:
    """Run the calibration windows, 8 at a time, through the model as it is now, with the hooks
    of ``handles`` registered; they are removed afterwards, whatever happens.

    Args:
        context: the handler's context (calibration windows, the model's forward).
        handles: the hooks' removable handles.
        before_batch: called before each batch (e.g. to reset per-batch state).
    """
    try:
        with torch.inference_mode():
            for batch in context.calibration_windows().split(8):
                if before_batch is not None:
                    before_batch()
                context.logits(batch)
    finally:
        for handle in handles:
            handle.remove()


def _collect(model: nn.Module, context: Context) -> dict[str, InputStats]:
    sums: dict[str, torch.Tensor] = {}
    maxes: dict[str, torch.Tensor] = {}
    abs_sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + x.square().sum(0)
            abs_sums[name] = abs_sums.get(name, 0) + x.abs().sum(0)
            maxes[name] = torch.maximum(maxes.get(name, x.new_zeros(x.shape[1])), x.abs().amax(0))
            counts[name] = counts.get(name, 0) + x.shape[0]

        return record

    def routed(stack: ExpertStack, expert: int, x: torch.Tensor) -> None:
        hook(f"{stack.name}[{expert}]")(stack.module, (x,))

    handles = [
        m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if is_linear(m)
    ]
    handles += routed_hooks(expert_stacks(model), routed)
    calibration_forwards(context, handles)
    return {
        n: InputStats(
            sums[n].sqrt().cpu(), maxes[n].cpu(), (abs_sums[n] / counts[n]).cpu(), counts[n]
        )
        for n in sums
    }


def calibrated_inputs(
    model: nn.Module, context: Context, targets: Sequence[Target], what: str, instead: str
) -> dict[str, InputStats]:
    """:func:`input_stats`, checked to cover every one of ``targets``: the one check, and the
    one message, for a layer that never ran on the calibration windows (an unused module, a
    branch the model skips), which would have no activation statistics to scale or score by.

    Args:
        model: the model as it is now.
        context: the handler's context.
        targets: the layers the caller needs statistics of.
        what: the caller, named in the error (``config.name``).
        instead: the alternative that needs no calibration, e.g. ``"use quant.rtn"``.

    Raises:
        HemorrhageError: naming the first such layer, and both ways out.
    """
    stats = input_stats(model, context)
    missing = [t.name for t in targets if t.name not in stats]
    if missing:
        raise HemorrhageError(
            f"{what}: layer {missing[0]!r} saw no calibration input, so it has no activation "
            f"statistics; exclude it with exclude=(...) or {instead}"
        )
    return stats


def routed_statistics(
    model: nn.Module,
    context: Context,
    config: RoutedCalibration,
    targets: Sequence[Target],
    patch: Patch,
    instead: str,
) -> dict[str, InputStats | None]:
    """:func:`calibrated_inputs` of ``targets``, with each expert's from the tokens routed to
    it: None for an expert under ``config.min_expert_tokens`` (the caller gives it the neutral
    statistic that makes its method ``config.fallback``), the coverage recorded on ``patch``.

    Args:
        model: the model as it is now.
        context: the handler's context.
        config: the modification (its name, threshold and fallback).
        targets: the weights the caller needs statistics of.
        patch: where the coverage goes (``details["calibration"]``).
        instead: the data-free alternative a linear layer without inputs is pointed to.
    """
    linear = [t for t in targets if t.expert is None]
    stats = calibrated_inputs(model, context, linear, config.name, instead)
    tokens = {t.name: stats[t.name].tokens if t.name in stats else 0 for t in targets}
    short = record_coverage(patch, config, targets, tokens)
    return {t.name: None if t.name in short else stats[t.name] for t in targets}


def falls_back(min_expert_tokens: int, tokens: int) -> bool:
    """Whether an expert the router sent ``tokens`` calibration tokens gets the data-free
    fallback: under ``min_expert_tokens``, and always with none (nothing to calibrate on)."""
    return tokens < max(min_expert_tokens, 1)


def record_coverage(
    patch: Patch, config: RoutedCalibration, targets: Sequence[Target], tokens: Mapping[str, int]
) -> set[str]:
    """Record on ``patch`` how calibration reached the experts among ``targets`` and return
    the names of those that fall back (under ``config.min_expert_tokens`` routed tokens).

    ``patch.details["calibration"]`` gains, per experts module, over the experts targeted in
    it: ``experts``, ``reached`` (with any routed token), ``tokens_min`` and
    ``tokens_median`` (routed calibration tokens per expert), ``fallback`` (the indices given
    ``fallback_method``) and ``min_tokens``. The one home of this record and its threshold.

    Args:
        patch: the patch whose details the results carry.
        config: the modification.
        targets: its targets (linear layers are left out of the record).
        tokens: calibration tokens per target name (absent: none).
    """
    per_module: dict[str, dict[int, int]] = {}
    for t in targets:
        if t.expert is not None:  # an expert's matrices saw the same tokens (else: the fewest)
            seen = per_module.setdefault(t.base.rpartition(".")[0], {})
            seen[t.expert] = min(seen.get(t.expert, tokens.get(t.name, 0)), tokens.get(t.name, 0))
    short = {
        t.name
        for t in targets
        if t.expert is not None and falls_back(config.min_expert_tokens, tokens.get(t.name, 0))
    }
    if not per_module:  # a dense model's result carries no record
        return short
    record = patch.details.setdefault("calibration", {})
    for module, seen in per_module.items():
        counts = [seen[e] for e in sorted(seen)]
        record[module] = {
            "method": config.name,
            "experts": len(counts),
            "reached": sum(1 for n in counts if n),
            "tokens_min": min(counts),
            "tokens_median": statistics.median(counts),
            "min_tokens": config.min_expert_tokens,
            "fallback": [e for e in sorted(seen) if falls_back(config.min_expert_tokens, seen[e])],
            "fallback_method": config.fallback,
        }
    return short


def routed_grams(
    targets: Sequence[Target], run: Callable[[], None], model: nn.Module
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """``X^T X`` (float32, not normalized) and the token count of each expert target's inputs
    over the calls ``run`` makes, from the tokens routed to that expert; experts the router
    sent nothing have neither. Linear targets are left to the caller (``run`` runs once, with
    or without expert targets)."""
    wanted = {t.name for t in targets if t.expert is not None}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def record(stack: ExpertStack, expert: int, x: torch.Tensor) -> None:
        name = f"{stack.name}[{expert}]"
        flat = x.detach().float()
        total = sums.setdefault(name, flat.new_zeros(flat.shape[1], flat.shape[1]))
        total.addmm_(flat.t(), flat)
        counts[name] = counts.get(name, 0) + len(flat)

    modules = {id(t.module) for t in targets if t.expert is not None}
    stacks = [s for s in expert_stacks(model) if id(s.module) in modules] if modules else []
    handles = routed_hooks(stacks, record, wanted)
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return sums, counts


def input_norms(model: nn.Module, context: Context, target: Target, what: str) -> torch.Tensor:
    """Wanda's ||X_j||_2 per input channel of ``target``; ``what`` names the caller in errors."""
    stats = calibrated_inputs(model, context, [target], what, "use a magnitude score")
    return stats[target.name].l2
