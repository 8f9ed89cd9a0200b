"""Weight pruning: unstructured (magnitude, Wanda, gradient) and semi-structured N:M.

Every mask is recomputed on each forward pass from the original weight and a little state
(a threshold per layer or per output row, an input-norm vector), or, for the gradient scores
that no small state can reproduce, from one bit per weight; no full-size mask or weight copy
is kept. Structured pruning (heads, MLP channels, whole blocks) lives in ``structured.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ...errors import HemorrhageError
from ..calibration import InputStats, RoutedCalibration, routed_statistics
from ..handler import Context
from ..registry import Modification, Patch, Target, register_modification
from ..state import pack_bits, unpack_bits
from ..validate import check_choice, check_int, check_number

__all__ = [
    "GradientPruning",
    "MagnitudePruning",
    "NMPruning",
    "WandaPruning",
    "global_threshold",
    "row_thresholds",
    "taylor_scores",
]


@dataclass(frozen=True, kw_only=True)
class MagnitudePruning(Modification):
    """Zero the weights of smallest magnitude.

    Args:
        sparsity: fraction of weights to zero, 0-1.
        scope: ``"layer"`` prunes that fraction of every layer (every expert's matrix of a
            fused expert weight); ``"global"`` ranks all target weights together, so layers
            of small weights lose more.
    """

    per_expert: ClassVar[bool | None] = True  # each expert of a fused expert weight
    sparsity: float = 0.5
    scope: str = "layer"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self, "sparsity", 0.0, 1.0)
        check_choice(self, "scope", ("layer", "global"))


@dataclass(frozen=True, kw_only=True)
class _RowPruning(Modification):
    """Zero the weights of lowest score within each output row.

    Args:
        sparsity: fraction of every output row's weights to zero, 0-1.
    """

    sparsity: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self, "sparsity", 0.0, 1.0)


@dataclass(frozen=True, kw_only=True)
class WandaPruning(_RowPruning, RoutedCalibration):
    """Wanda (Sun et al. 2023): zero the weights of smallest ``|W_ij| * ||X_j||_2`` per output row.

    ``||X_j||_2`` is the norm of input channel j over the calibration windows, taken from the
    model as it is when the stage runs (all layers at once, not re-collected layer by layer
    after pruning the earlier ones as the reference implementation does); for an expert's
    matrix, over the tokens the router sent that expert. An expert under
    ``min_expert_tokens`` is pruned by ``|W_ij|`` alone, within each row.

    Args:
        sparsity: fraction of every output row's weights to zero, 0-1.
        min_expert_tokens: routed calibration tokens an expert needs (see
            ``RoutedCalibration``).
    """

    fallback: ClassVar[str] = "prune.magnitude"


@dataclass(frozen=True, kw_only=True)
class GradientPruning(_RowPruning):
    """Gradient-aware pruning: zero the weights of smallest first-order Taylor score per row.

    The score of weight ij is ``sum over calibration windows w of |W_ij * dL_w/dW_ij|``, with
    ``L_w`` the language-model loss of window w and the model in eval mode (no dropout).
    Summing per window keeps weights whose gradients cancel across windows. Unlike magnitude,
    the score does not change when a channel's activations are scaled up and the weights
    reading them scaled down by the same factor.

    The scores are computed once per session for each model state (memoized) and kept on the
    CPU as within-row ranks, 2 bytes per weight; the pruned model holds 1 bit per weight.

    Args:
        sparsity: fraction of every output row's weights to zero, 0-1.
    """


@dataclass(frozen=True, kw_only=True)
class NMPruning(RoutedCalibration):
    """Semi-structured N:M sparsity: keep the ``n`` largest of every ``m`` consecutive inputs.

    Args:
        n: weights kept in each group, 1-m (2 for 2:4).
        m: group size along the input dimension; every target's in_features must divide by it.
        score: ``"magnitude"`` ranks by ``|W|``; ``"wanda"`` by ``|W| * ||X||_2``
            (calibration: an expert's matrix on the tokens routed to it).
        min_expert_tokens: with ``score="wanda"``, routed calibration tokens an expert needs
            to be scored by its inputs; fewer: by ``|W|`` (see ``RoutedCalibration``).
    """

    fallback: ClassVar[str] = "prune.nm score=magnitude"
    n: int = 2
    m: int = 4
    score: str = "magnitude"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "m", 1)
        check_int(self, "n", 1, self.m)
        check_choice(self, "score", ("magnitude", "wanda"))


def kth_smallest_magnitude(weight: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest ``|weight|`` (1-based); -inf for k == 0 so that nothing is below it.

    One copy of ``weight`` at a time (its magnitudes, selected in place), and none for the
    transpose: the order of the elements does not matter, so a transposed view is read in its
    stored order.
    """
    if k == 0:
        return weight.new_tensor(float("-inf"))
    weight = weight.detach()
    if weight.dim() == 2 and not weight.is_contiguous() and weight.t().is_contiguous():
        weight = weight.t()  # GPT-2's Conv1D stores (in, out)
    if weight.device.type == "cpu":  # numpy's introselect is ~10x faster than kthvalue on CPU
        import numpy as np

        magnitudes = np.abs(weight.reshape(-1).float().numpy())  # exact for half precisions
        magnitudes.partition(k - 1)
        return torch.as_tensor(magnitudes[k - 1])
    return weight.abs().flatten().kthvalue(k).values


def row_thresholds(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Per row of ``scores`` (out, in), its k-th smallest score (-inf for k == 0), shape (out, 1).

    Keeping ``scores > threshold`` zeroes exactly k weights per row unless scores tie.
    """
    if k == 0:
        return scores.new_full((scores.shape[0], 1), float("-inf"))
    if scores.device.type == "cpu":
        import numpy as np

        part = np.partition(scores.detach().float().numpy(), k - 1, axis=1)[:, k - 1 : k]
        return torch.from_numpy(part)
    return scores.kthvalue(k, dim=1, keepdim=True).values


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


def _mask_below(threshold: float):
    # zeroes every |w| <= threshold in one pass, in a third of torch.where(|w| > t, w, 0)'s
    # time; a NaN weight stays, as the selection ranks NaN above every magnitude
    return lambda w: torch.nn.functional.hardshrink(w, threshold)


def _magnitude_thresholds(config: MagnitudePruning, targets: list[Target]) -> list[torch.Tensor]:
    with torch.no_grad():
        if config.scope == "global":
            t = global_threshold([x.weight.detach() for x in targets], config.sparsity)
            return [t] * len(targets)
        return [
            kth_smallest_magnitude(x.weight, round(config.sparsity * x.weight.numel()))
            for x in targets
        ]


@register_modification("prune.magnitude", MagnitudePruning)
def apply_magnitude(
    config: MagnitudePruning, model: nn.Module, patch: Patch, context: Context
) -> None:
    targets: list[Target] = config.targets(model)
    # a pure function of the weights and the config: selected once per session for each model
    # state (the stages before this one) and selection, not on every measure of a test suite
    key = ("prune.magnitude", config, context.applied, tuple(t.name for t in targets))
    thresholds = context.memo(key, lambda: _magnitude_thresholds(config, targets))
    for target, threshold in zip(targets, thresholds, strict=True):
        patch.parametrize(target, _mask_below(float(threshold.to(target.weight.dtype))))


# --- Wanda -------------------------------------------------------------------------------------


def _norms(stats: InputStats | None, weight: torch.Tensor) -> torch.Tensor:
    """Wanda's ``||X_j||_2``; ones for an expert that falls back (the score is then ``|W|``)."""
    if stats is None:
        return torch.ones(weight.shape[1], dtype=torch.float32)
    return stats.l2


def _wanda_mask(l2: torch.Tensor, threshold: torch.Tensor):
    def mask(w: torch.Tensor) -> torch.Tensor:
        # same expression, dtype and device as when the thresholds were taken: same bits
        score = w.abs() * l2.to(w.device, w.dtype)
        return torch.where(score > threshold.to(w.device, w.dtype), w, 0)

    return mask


@register_modification("prune.wanda", WandaPruning)
def apply_wanda(config: WandaPruning, model: nn.Module, patch: Patch, context: Context) -> None:
    targets = config.targets(model)
    stats = routed_statistics(model, context, config, targets, patch, "use a magnitude score")
    state = []
    with torch.no_grad():
        for target in targets:
            w = target.weight.detach()
            l2 = _norms(stats[target.name], w)
            k = round(config.sparsity * w.shape[1])
            state.append((l2, row_thresholds(w.abs() * l2.to(w.device, w.dtype), k)))
    for target, (l2, threshold) in zip(targets, state, strict=True):
        patch.parametrize(target, _wanda_mask(l2, threshold))


# --- gradient (first-order Taylor) -------------------------------------------------------------


def taylor_scores(
    model: nn.Module, context: Context, targets: list[Target], windows: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """``sum_w |W ⊙ dL_w/dW|`` over the calibration windows w, per target, float32 (out, in).

    ``windows`` (token ids, one window per row) replaces the calibration windows if given.

    ``W`` is each target's effective weight (after any earlier stage) and ``L_w`` the loss of
    window w (``context.window_losses``: mean next-token NLL, or an encoder's contrastive
    loss), in eval mode. ``dL_w/dW`` is assembled from each layer's input
    and output gradient (``g^T x``), which needs no ``.grad`` on any parameter: gradients are
    taken with ``torch.autograd.grad`` with respect to the layer outputs, so nothing accumulates
    into ``.grad`` and no ``requires_grad`` flag changes. The sums are kept in host memory
    (float32, 4 bytes per weight); the device holds one layer's gradient at a time.
    """
    captured: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor):
            # a model whose parameters are frozen records no graph: start one at this output
            out = output if output.requires_grad else output.detach().requires_grad_()
            captured.setdefault(name, []).append((args[0].detach(), out))
            return out

        return record

    sums = {t.name: torch.zeros(t.weight.shape, dtype=torch.float32) for t in targets}
    handles = [t.module.register_forward_hook(hook(t.name)) for t in targets]
    was_training = model.training
    model.eval()
    try:
        if windows is None:
            windows = context.calibration_windows()
        for batch in windows.split(8):
            captured.clear()
            with torch.enable_grad():
                # summing the per-window losses keeps each window's gradient separate
                loss = context.window_losses(batch).sum()
                calls = [(name, x, out) for name, seen in captured.items() for x, out in seen]
                grads = torch.autograd.grad(loss, [out for _, _, out in calls], allow_unused=True)
            del loss
            _accumulate(sums, calls, grads, len(batch))
            del calls, grads
    finally:
        for h in handles:
            h.remove()
        captured.clear()
        model.train(was_training)
    with torch.no_grad():
        return {t.name: sums[t.name].mul_(t.weight.detach().float().abs().cpu()) for t in targets}


def _accumulate(sums: dict[str, torch.Tensor], calls: list, grads: tuple, windows: int) -> None:
    """Add each window's ``|dL_w/dW|`` (summed over a module's calls first) to ``sums``."""
    by_name: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for (name, x, _), g in zip(calls, grads, strict=True):
        if g is not None:
            by_name.setdefault(name, []).append((x, g))
    with torch.no_grad():
        for name, pairs in by_name.items():
            per_window = [
                (g.reshape(windows, -1, g.shape[-1]), x.reshape(windows, -1, x.shape[-1]))
                for x, g in pairs
            ]
            # a few windows at a time: (chunk, out, in) stays under ~64 MB of float32
            chunk = max(1, (1 << 24) // sums[name].numel())
            for b in range(0, windows, chunk):
                grad_w = sum(
                    torch.bmm(g[b : b + chunk].float().transpose(1, 2), x[b : b + chunk].float())
                    for g, x in per_window
                )
                sums[name] += grad_w.abs_().sum(0).cpu()


def _row_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every score within its row (0 = smallest, ties by position).

    Ranks reproduce the float32 ordering exactly for every sparsity in half the memory.
    """
    dtype = torch.int16 if scores.shape[1] <= torch.iinfo(torch.int16).max else torch.int32
    order = scores.argsort(dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return ranks.to(dtype)


def _gradient_ranks(
    model: nn.Module, context: Context, targets: list[Target]
) -> dict[str, torch.Tensor]:
    def compute() -> dict[str, torch.Tensor]:
        scores = taylor_scores(model, context, targets)
        return {name: _row_ranks(scores.pop(name)) for name in list(scores)}  # one at a time

    key = ("prune.gradient", context.applied, tuple(t.name for t in targets))
    return context.memo(key, compute)


def _bit_mask(packed: torch.Tensor):
    def mask(w: torch.Tensor) -> torch.Tensor:
        return torch.where(unpack_bits(packed.to(w.device), w.shape[1]), w, 0)

    return mask


@register_modification("prune.gradient", GradientPruning)
def apply_gradient(
    config: GradientPruning, model: nn.Module, patch: Patch, context: Context
) -> None:
    targets = config.targets(model)
    ranks = _gradient_ranks(model, context, targets)
    for target in targets:
        w = target.weight
        k = round(config.sparsity * w.shape[1])
        keep = ranks[target.name].to(w.device) >= k
        patch.parametrize(target, _bit_mask(pack_bits(keep)))


# --- N:M ---------------------------------------------------------------------------------------


def nm_keep(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask keeping the ``n`` highest of every ``m`` consecutive scores in each row."""
    out_features, in_features = scores.shape
    groups = scores.reshape(out_features, in_features // m, m)
    keep = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.view(out_features, in_features)


def _nm_mask(n: int, m: int, l2: torch.Tensor | None):
    def mask(w: torch.Tensor) -> torch.Tensor:
        score = w.abs() if l2 is None else w.abs() * l2.to(w.device, w.dtype)
        return torch.where(nm_keep(score, n, m), w, 0)

    return mask


@register_modification("prune.nm", NMPruning)
def apply_nm(config: NMPruning, model: nn.Module, patch: Patch, context: Context) -> None:
    targets = config.targets(model)
    for target in targets:
        columns = target.weight.shape[1]
        if columns % config.m:
            raise HemorrhageError(
                f"{config.name}: layer {target.name!r} has {columns} inputs, not a multiple of "
                f"m={config.m}; choose an m that divides it or exclude the layer with exclude=(...)"
            )
    norms: list[torch.Tensor | None] = [None] * len(targets)
    if config.score == "wanda":
        stats = routed_statistics(model, context, config, targets, patch, "use a magnitude score")
        norms = [_norms(stats[t.name], t.weight) for t in targets]
    for target, l2 in zip(targets, norms, strict=True):
        patch.parametrize(target, _nm_mask(config.n, config.m, l2))
