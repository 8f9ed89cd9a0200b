"""Weight pruning."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .registry import Modification, Patch, Target, register_modification
from .validate import check_choice, check_number

__all__ = ["MagnitudePruning", "global_threshold"]


@dataclass(frozen=True, kw_only=True)
class MagnitudePruning(Modification):
    """Zero the weights of smallest magnitude.

    Args:
        sparsity: fraction of weights to zero, 0-1.
        scope: ``"layer"`` prunes that fraction of every layer; ``"global"`` ranks all target
            weights together, so layers of small weights lose more.
    """

    sparsity: float = 0.5
    scope: str = "layer"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self, "sparsity", 0.0, 1.0)
        check_choice(self, "scope", ("layer", "global"))


def kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest element (1-based); -inf for k == 0 so that nothing is below it."""
    if k == 0:
        return values.new_tensor(float("-inf"))
    return values.flatten().kthvalue(k).values


def global_threshold(weights: list[torch.Tensor], sparsity: float) -> torch.Tensor:
    """The magnitude below which ``sparsity`` of all ``weights`` lie.

    Bisection on the value instead of concatenating every weight: no copy of the model.
    """
    total = sum(w.numel() for w in weights)
    k = round(sparsity * total)
    if k == 0:
        return torch.tensor(float("-inf"))
    lo, hi = 0.0, max(w.abs().max().item() for w in weights)
    for _ in range(64):  # ends when lo and hi are adjacent floats
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        below = sum(int((w.abs() <= mid).sum()) for w in weights)
        lo, hi = (lo, mid) if below >= k else (mid, hi)
    return torch.tensor(hi)


def _mask_below(threshold: torch.Tensor):
    return lambda w: torch.where(w.abs() > threshold.to(w.device, w.dtype), w, 0)


@register_modification("prune.magnitude", MagnitudePruning)
def apply_magnitude(config: MagnitudePruning, model: nn.Module, patch: Patch, context: object) -> None:
    targets: list[Target] = config.targets(model)
    with torch.no_grad():
        if config.scope == "global":
            t = global_threshold([x.weight.detach() for x in targets], config.sparsity)
            thresholds = [t] * len(targets)
        else:
            thresholds = [
                kth_smallest(x.weight.detach().abs(), round(config.sparsity * x.weight.numel()))
                for x in targets
            ]
    for target, threshold in zip(targets, thresholds):
        patch.parametrize(target, _mask_below(threshold))
