"""Structured pruning: attention heads, MLP channels and whole transformer blocks.

Heads and channels are zeroed, not cut out: a head whose output-projection columns are zero,
or an MLP neuron whose down-projection column is zero, adds nothing to the residual stream
whatever its biases, so the outputs equal those of the smaller model with the unit removed.
The producing rows (q/k/v, gate/up, c_fc) are zeroed as well, so weight counts match the
removal. Blocks are really removed: the block list is swapped for a shorter one.
The layouts recognized are in ``layouts.py``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ...errors import HemorrhageError
from ..calibration import calibration_forwards, input_norms
from ..handler import Context
from ..registry import (
    Modification,
    Patch,
    Target,
    blocks,
    register_modification,
    replace_blocks,
)
from ..validate import check_choice, check_int, check_number
from .layouts import MLP, Attention, attention_layouts, mlp_layouts
from .unstructured import taylor_scores

__all__ = [
    "ChannelPruning",
    "HeadPruning",
    "LayerPruning",
    "block_similarity",
]


# --- configs -----------------------------------------------------------------------------------

_IMPORTANCE = ("activation", "weight", "taylor")


@dataclass(frozen=True, kw_only=True)
class HeadPruning(Modification):
    """Zero whole attention heads.

    With grouped-query attention, pruning a query head zeroes its q rows and o_proj columns;
    a key/value head shared by a group is kept until every query head of its group is pruned,
    then its k and v rows are zeroed too.

    Args:
        fraction: share of the query heads to prune, 0-1 (default 0.25 unless ``heads`` is given).
        heads: explicit ``(layer, head)`` pairs to prune instead, e.g. ``((0, 1), (3, 0))``;
            layer indexes the transformer blocks, head the query heads.
        importance: how ``fraction`` picks heads: ``"activation"`` ranks by the norm of the
            head's contribution to o_proj's output on the calibration windows
            (``sqrt(sum_j ||W_o[:, j]||^2 ||X_j||^2)``); ``"weight"`` by
            ``||W_o[:, head]|| * ||W_v[head]||``; ``"taylor"`` by LLM-Pruner's first-order
            group importance (Ma et al. 2023): ``|W ⊙ dL/dW|`` (``prune.gradient``'s scores,
            from the calibration LM loss) summed over the head's q rows and o_proj columns,
            plus its share (1/group size) of its key/value head's k and v rows.
        scope: ``"layer"`` prunes ``fraction`` of each block's heads; ``"global"`` ranks all
            heads together.
    """

    per_expert: ClassVar[bool | None] = None  # attention heads: experts are not its targets
    changes: ClassVar[str] = "structure"
    fraction: float | None = None
    heads: tuple[tuple[int, int], ...] = ()
    importance: str = "activation"
    scope: str = "layer"

    def __post_init__(self) -> None:
        super().__post_init__()
        _pairs(self, "heads")
        _fraction_or(self, "heads")
        check_choice(self, "importance", _IMPORTANCE)
        check_choice(self, "scope", ("layer", "global"))


@dataclass(frozen=True, kw_only=True)
class ChannelPruning(Modification):
    """Zero whole MLP neurons (intermediate channels).

    Args:
        fraction: share of the intermediate neurons to prune, 0-1.
        importance: ``"activation"`` ranks neuron k by ``||W_down[:, k]|| * ||X_k||_2`` over the
            calibration windows; ``"weight"`` by the product of its rows' and column's norms;
            ``"taylor"`` by LLM-Pruner's first-order group importance: ``|W ⊙ dL/dW|``
            (``prune.gradient``'s scores, from the calibration LM loss) summed over the
            neuron's producer rows and consumer column.
        scope: ``"layer"`` prunes ``fraction`` of each block's neurons; ``"global"`` ranks all
            neurons together.
    """

    per_expert: ClassVar[bool | None] = None  # dense MLP channels; experts' are not (yet)
    changes: ClassVar[str] = "structure"
    fraction: float = 0.25
    importance: str = "activation"
    scope: str = "layer"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self, "fraction", 0.0, 1.0)
        check_choice(self, "importance", _IMPORTANCE)
        check_choice(self, "scope", ("layer", "global"))


@dataclass(frozen=True, kw_only=True)
class LayerPruning(Modification):
    """Remove whole transformer blocks (ShortGPT / SLEB-style depth pruning).

    ``include``/``exclude`` patterns here match block names such as ``model.layers.3``
    (``"*.layers.0.*"`` works too) and limit which blocks may be removed.

    Args:
        count: how many blocks to remove (default 1 unless ``indices`` is given).
        indices: explicit block indices to remove instead, e.g. ``(2, 3)``.
        selection: how ``count`` picks blocks: ``"importance"`` removes the blocks whose output
            is most similar (mean cosine) to their input on the calibration windows, i.e. that
            change the residual stream least; ``"last"`` removes the last ones.
    """

    changes: ClassVar[str] = "structure"
    count: int | None = None
    indices: tuple[int, ...] = ()
    selection: str = "importance"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.indices, int) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.indices
        ):
            raise HemorrhageError(
                f"{self.name}: indices={self.indices!r} must be block indices >= 0, "
                "e.g. indices=(2, 3)"
            )
        object.__setattr__(self, "indices", tuple(sorted(set(self.indices))))
        if self.indices and self.count is not None:
            raise HemorrhageError(
                f"{self.name}: count={self.count!r} and indices={self.indices!r} both given; "
                "pass one of them"
            )
        if not self.indices:
            object.__setattr__(self, "count", 1 if self.count is None else self.count)
            check_int(self, "count", 0)
        check_choice(self, "selection", ("importance", "last"))


def _pairs(config: Any, field: str) -> None:
    value = getattr(config, field)
    try:
        pairs = tuple(
            (int(a), int(b))
            for a, b in value
            if not isinstance(a, bool)
            and not isinstance(b, bool)
            and a == int(a)
            and b == int(b)
            and a >= 0
            and b >= 0
        )
    except (TypeError, ValueError):
        pairs = None
    if isinstance(value, str) or pairs is None or len(pairs) != len(value):
        raise HemorrhageError(
            f"{config.name}: {field}={value!r} must be (layer, head) pairs of indices >= 0, "
            f"e.g. {field}=((0, 1), (3, 0))"
        )
    object.__setattr__(config, field, tuple(sorted(set(pairs))))


def _fraction_or(config: Any, field: str) -> None:
    if getattr(config, field) and config.fraction is not None:
        raise HemorrhageError(
            f"{config.name}: fraction={config.fraction!r} and {field}=... both given; "
            "pass one of them"
        )
    if not getattr(config, field):
        object.__setattr__(config, "fraction", 0.25 if config.fraction is None else config.fraction)
        check_number(config, "fraction", 0.0, 1.0)


# --- zeroing rows and columns ------------------------------------------------------------------


class _Zeroing:
    """Rows and columns to zero per module, applied as one parametrization each."""

    def __init__(self) -> None:
        self.plans: dict[str, tuple[Target, torch.Tensor, torch.Tensor]] = {}

    def _plan(self, target: Target) -> tuple[Target, torch.Tensor, torch.Tensor]:
        if target.name not in self.plans:
            out_features, in_features = target.weight.shape
            self.plans[target.name] = (
                target,
                torch.ones(out_features, dtype=torch.bool),
                torch.ones(in_features, dtype=torch.bool),
            )
        return self.plans[target.name]

    def rows(self, target: Target, start: int, stop: int) -> None:
        self._plan(target)[1][start:stop] = False

    def columns(self, target: Target, start: int, stop: int) -> None:
        self._plan(target)[2][start:stop] = False

    def apply(self, patch: Patch) -> None:
        for target, rows, columns in self.plans.values():
            patch.parametrize(target, _zero(rows, columns))


def _zero(rows: torch.Tensor, columns: torch.Tensor):
    rows, columns = rows.unsqueeze(1), columns.unsqueeze(0)

    def mask(w: torch.Tensor) -> torch.Tensor:
        keep = rows.to(w.device) & columns.to(w.device)
        return torch.where(keep, w, 0)

    return mask


def _eligible(config: Modification, model: nn.Module, names: list[str]) -> set[str]:
    """Of ``names`` (linear layers), those the config's include/exclude patterns select."""
    chosen = {t.name for t in config.targets(model)}
    return {n for n in names if n in chosen}


def _lowest(scores: list[tuple[float, Any]], fraction: float, scope: str) -> list[Any]:
    """Keys of the lowest-scoring ``fraction`` of units, per group (``layer``) or over all."""
    if scope == "global":
        ranked = sorted(scores, key=lambda s: s[0])
        return [key for _, key in ranked[: round(fraction * len(ranked))]]
    by_group: dict[Any, list[tuple[float, Any]]] = {}
    for score, key in scores:
        by_group.setdefault(key[0], []).append((score, key))
    chosen = []
    for group in by_group.values():
        ranked = sorted(group, key=lambda s: s[0])
        chosen += [key for _, key in ranked[: round(fraction * len(ranked))]]
    return chosen


def _taylor_sums(
    model: nn.Module, context: Context, targets: list[Target]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per target, the row and column sums of ``|W ⊙ dL/dW|`` over the calibration windows.

    The sums are all a group importance needs (a unit is rows of its producers and columns of
    its consumer), so only they are kept, memoized per model state and target set.
    """
    unique = list({t.name: t for t in targets}.values())  # GPT-2's c_attn is q, k and v

    def compute() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        scores = taylor_scores(model, context, unique)
        return {name: (s.sum(1), s.sum(0)) for name, s in scores.items()}

    return context.memo(("taylor_sums", context.applied, tuple(t.name for t in unique)), compute)


def _column_norms(target: Target) -> torch.Tensor:
    return target.weight.detach().float().norm(dim=0)


def _row_norms(target: Target) -> torch.Tensor:
    return target.weight.detach().float().norm(dim=1)


# --- heads -------------------------------------------------------------------------------------


def _head_scores(
    config: HeadPruning, model: nn.Module, context: Context, layouts: list[Attention]
) -> list[tuple[float, tuple[int, int]]]:
    scores = []
    taylor = {}
    if config.importance == "taylor":
        taylor = _taylor_sums(
            model, context, [t for a in layouts for t in (a.q[0], a.k[0], a.v[0], a.o)]
        )
    with torch.no_grad():
        for a in layouts:
            d, group = a.head_dim, a.heads // a.kv_heads
            o_norms = _column_norms(a.o)
            if config.importance == "taylor":
                per_head = _taylor_heads(a, taylor)
            elif config.importance == "activation":
                l2 = input_norms(model, context, a.o, config.name).to(o_norms.device)
                contribution = (o_norms * l2).square()
                per_head = contribution.view(a.heads, d).sum(1).sqrt()
            else:
                v, start = a.v
                v_norms = _row_norms(v)[start : start + a.kv_heads * d].view(a.kv_heads, d)
                v_per_head = v_norms.square().sum(1).sqrt().repeat_interleave(group)
                per_head = o_norms.view(a.heads, d).square().sum(1).sqrt() * v_per_head
            scores += [(float(s), (a.block, h)) for h, s in enumerate(per_head.tolist())]
    return scores


def _taylor_heads(
    a: Attention, taylor: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """Per query head, its q rows' and o columns' Taylor sums plus its share of k/v rows'."""
    d, group = a.head_dim, a.heads // a.kv_heads

    def rows(proj: tuple[Target, int], count: int) -> torch.Tensor:
        target, start = proj
        return taylor[target.name][0][start : start + count * d].view(count, d).sum(1)

    kv = (rows(a.k, a.kv_heads) + rows(a.v, a.kv_heads)) / group
    o_columns = taylor[a.o.name][1].view(a.heads, d).sum(1)
    return rows(a.q, a.heads) + o_columns + kv.repeat_interleave(group)


@register_modification("prune.heads", HeadPruning)
def apply_heads(config: HeadPruning, model: nn.Module, patch: Patch, context: Context) -> None:
    named = attention_layouts(model, config.name)
    eligible = _eligible(config, model, [a.o.name for _, a in named])
    layouts = [a for _, a in named if a.o.name in eligible]
    if config.heads:
        by_block = {a.block: a for _, a in named}
        for layer, head in config.heads:
            if layer not in by_block or head >= by_block[layer].heads:
                raise HemorrhageError(
                    f"{config.name}: heads contains ({layer}, {head}) but the model has "
                    f"{len(named)} blocks of {named[0][1].heads} query heads; use layer < "
                    f"{len(named)} and head < {named[0][1].heads}"
                )
        chosen = list(config.heads)
    else:
        scores = _head_scores(config, model, context, layouts)
        chosen = _lowest(scores, config.fraction, config.scope)
    zeroing = _Zeroing()
    by_block = {a.block: a for _, a in named}
    pruned: dict[int, set[int]] = {}
    for layer, head in chosen:
        a, d = by_block[layer], by_block[layer].head_dim
        q, start = a.q
        zeroing.rows(q, start + head * d, start + (head + 1) * d)
        zeroing.columns(a.o, head * d, (head + 1) * d)
        pruned.setdefault(layer, set()).add(head)
    for layer, heads in pruned.items():
        a = by_block[layer]
        group = a.heads // a.kv_heads
        for kv in range(a.kv_heads):
            if set(range(kv * group, (kv + 1) * group)) <= heads:  # no query head reads it now
                for target, start in (a.k, a.v):
                    zeroing.rows(target, start + kv * a.head_dim, start + (kv + 1) * a.head_dim)
    zeroing.apply(patch)


# --- MLP channels ------------------------------------------------------------------------------


def _channel_scores(
    config: ChannelPruning, model: nn.Module, context: Context, layouts: list[MLP]
) -> list[tuple[float, tuple[int, int]]]:
    scores = []
    taylor = {}
    if config.importance == "taylor":
        taylor = _taylor_sums(
            model, context, [t for m in layouts for t in (*m.producers, m.consumer)]
        )
    with torch.no_grad():
        for mlp in layouts:
            importance = _column_norms(mlp.consumer)
            if config.importance == "taylor":
                importance = taylor[mlp.consumer.name][1] + sum(
                    taylor[p.name][0][start : start + mlp.width] for p, start in mlp.rows()
                )
            elif config.importance == "activation":
                l2 = input_norms(model, context, mlp.consumer, config.name)
                importance = importance * l2.to(importance.device)
            else:
                for producer, start in mlp.rows():
                    importance = importance * _row_norms(producer)[start : start + mlp.width]
            scores += [(float(s), (mlp.block, k)) for k, s in enumerate(importance.tolist())]
    return scores


@register_modification("prune.channels", ChannelPruning)
def apply_channels(
    config: ChannelPruning, model: nn.Module, patch: Patch, context: Context
) -> None:
    named = mlp_layouts(model, config.name)
    eligible = _eligible(config, model, [m.consumer.name for _, m in named])
    layouts = [m for _, m in named if m.consumer.name in eligible]
    scores = _channel_scores(config, model, context, layouts)
    chosen = _lowest(scores, config.fraction, config.scope)
    by_block = {m.block: m for m in layouts}
    zeroing = _Zeroing()
    for layer, k in chosen:
        mlp = by_block[layer]
        for producer, start in mlp.rows():
            zeroing.rows(producer, start + k, start + k + 1)
        zeroing.columns(mlp.consumer, k, k + 1)
    zeroing.apply(patch)


# --- whole blocks ------------------------------------------------------------------------------


def block_similarity(model: nn.Module, context: Context) -> list[float]:
    """Per block, the mean cosine similarity of its output and input hidden states over the
    calibration windows (1 = the block leaves the residual stream unchanged). Memoized."""
    return context.memo(("block_similarity", context.applied), lambda: _similarity(model, context))


def _similarity(model: nn.Module, context: Context) -> list[float]:
    _, layers = blocks(model)
    inputs: dict[int, torch.Tensor] = {}
    totals = [0.0] * len(layers)
    count = [0]

    def before(index: int):
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            inputs[index] = args[0] if args else kwargs["hidden_states"]

        return record

    def after(index: int):
        def record(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            out = output[0] if isinstance(output, (tuple, list)) else output
            cos = nn.functional.cosine_similarity(inputs.pop(index).float(), out.float(), dim=-1)
            totals[index] += float(cos.sum())
            if index == 0:
                count[0] += cos.numel()

        return record

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(before(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(after(i), with_kwargs=True))
    calibration_forwards(context, handles)
    return [t / max(count[0], 1) for t in totals]


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name + ".", p) for p in patterns)


@register_modification("prune.layers", LayerPruning)
def apply_layers(config: LayerPruning, model: nn.Module, patch: Patch, context: Context) -> None:
    prefix, layers = blocks(model)
    total = len(layers)
    names = [f"{prefix}.{i}" for i in range(total)]
    eligible = [
        i
        for i, n in enumerate(names)
        if (not config.include or _matches(n, config.include)) and not _matches(n, config.exclude)
    ]
    if config.indices:
        bad = [i for i in config.indices if i >= total]
        if bad:
            raise HemorrhageError(
                f"{config.name}: indices={config.indices!r} names block {bad[0]} but the model "
                f"has {total} blocks; use indices in 0..{total - 1}"
            )
        dropped = list(config.indices)
    else:
        if config.count > len(eligible) or config.count >= total:
            raise HemorrhageError(
                f"{config.name}: count={config.count} but {len(eligible)} of the model's {total} "
                f"blocks may be removed and at least one must stay; use count <= "
                f"{min(len(eligible), total - 1)}"
            )
        if config.selection == "last":
            dropped = eligible[len(eligible) - config.count :] if config.count else []
        else:
            similarity = block_similarity(model, context)
            dropped = sorted(eligible, key=lambda i: -similarity[i])[: config.count]
    if len(set(dropped)) >= total:
        raise HemorrhageError(
            f"{config.name}: removing blocks {sorted(dropped)} leaves none of the {total}; "
            "keep at least one"
        )
    kept = [i for i in range(total) if i not in set(dropped)]
    if len(kept) == total:
        return
    replace_blocks(patch, prefix, [layers[i] for i in kept], kept)
