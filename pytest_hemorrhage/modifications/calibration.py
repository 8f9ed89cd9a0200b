"""Calibration statistics for data-aware modifications (Wanda, SmoothQuant, ...).

One pass of the model over the calibration windows records, for every linear layer, the
per-input-channel L2 norm, mean and maximum magnitude of its inputs, with the windows kept disjoint
from the evaluation ones. The statistics describe the model as it is when the modification is
applied (the baseline, or the output of the earlier stages of a composition) and are computed
once per session for each such state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import HemorrhageError
from .handler import Context
from .registry import Target, is_linear

__all__ = [
    "InputStats",
    "calibrated_inputs",
    "calibration_forwards",
    "input_norms",
    "input_stats",
]


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

    handles = [
        m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if is_linear(m)
    ]
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


def input_norms(model: nn.Module, context: Context, target: Target, what: str) -> torch.Tensor:
    """Wanda's ||X_j||_2 per input channel of ``target``; ``what`` names the caller in errors."""
    stats = calibrated_inputs(model, context, [target], what, "use a magnitude score")
    return stats[target.name].l2
