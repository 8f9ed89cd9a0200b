"""What a modification touched: the share of the transformer blocks' weights it changed.

A weight counts as touched when a stage computes it anew (a parametrization, for a fused
expert parameter per expert) or replaces it (a module swap, a dropped block), whatever share of
its entries then differs. The block weights are the blocks' matrices (2-D and more: linear
layers, fused experts, routers), not their biases and norms. The record, JSON-ready, goes into
``Result.details["touched"]``; the reports render it (``report/describe.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .experts import expert_stacks, format_indices, stored

__all__ = ["BlockWeight", "block_weights", "starred", "touched_record"]


@dataclass(frozen=True)
class BlockWeight:
    """One weight tensor of the blocks: its name with the block index starred
    (``model.layers.*.mlp.experts.down_proj``), its size, and its experts (0: not stacked)."""

    pattern: str
    numel: int
    experts: int


def block_weights(prefix: str, layers: nn.ModuleList) -> dict[int, BlockWeight]:
    """The blocks' weights by tensor identity (``id`` of the stored tensor, which a
    parametrization keeps as its original)."""
    stacks = {id(stored(s.module, s.param)): s.count for s in expert_stacks(layers)}
    out = {}
    for name, p in layers.named_parameters():
        if p.dim() < 2 or name.endswith("bias"):
            continue
        # a parametrized module lists its tensor as <name>.parametrizations.weight.original
        name = name.replace(".parametrizations.", ".").removesuffix(".original")
        out[id(p)] = BlockWeight(
            starred(prefix, f"{prefix}.{name}"), p.numel(), stacks.get(id(p), 0)
        )
    return out


def starred(prefix: str, name: str) -> str:
    """``name`` with its block index starred: ``model.layers.*.mlp.experts.down_proj``."""
    if prefix and name.startswith(prefix + "."):
        index, _, rest = name[len(prefix) + 1 :].partition(".")
        if index.isdigit():
            return f"{prefix}.*.{rest}"
    return name


def touched_record(
    weights: dict[int, BlockWeight],
    touched: dict[int, set[int] | None],
    stages: list[Any],
) -> dict[str, Any]:
    """``Result.details["touched"]`` for ``stages`` (Modification configs) having touched the
    tensors ``touched`` (``id`` -> the experts touched, None: all of it).

    ``{"share", "parameters", "of", "untouched", "targeted", "changes"}``: the share of the
    block weights touched, by parameter count; the patterns of the weights left whole or in
    part (biggest first; a stack's untouched experts as ``[0-3]``); whether a stage changing
    weights chose its targets (``include``/``exclude``); what the stages change. Stages that
    change no weights (decoding, the KV cache, added layers) give ``share`` None.
    """
    changes = list(dict.fromkeys(c.changes for c in stages))
    weighty = [c for c in stages if c.changes in ("weights", "structure")]
    if not weighty or not weights:
        return {"share": None, "changes": changes}
    done = 0
    left: dict[str, tuple[list[int], set[int], int]] = {}  # pattern -> untouched, experts, of
    for key, weight in weights.items():
        experts = touched.get(key, set())
        if experts is None:
            done += weight.numel
            continue
        per_expert = weight.numel // weight.experts if weight.experts else weight.numel
        hit = len(experts) if weight.experts else 0
        done += hit * per_expert
        if weight.experts and hit == weight.experts:
            continue
        count, missed, _ = left.setdefault(weight.pattern, ([0], set(), weight.experts))
        count[0] += weight.numel - hit * per_expert
        missed.update(set(range(weight.experts)) - experts)
    total = sum(w.numel for w in weights.values())
    untouched = [
        # a stack some of whose experts were touched: the others, as patterns write them
        pattern + (format_indices(missed) if 0 < len(missed) < experts else "")
        for pattern, (_, missed, experts) in sorted(left.items(), key=lambda kv: -kv[1][0][0])
    ]
    return {
        "share": done / total,
        "parameters": done,
        "of": total,
        "untouched": untouched,
        "targeted": any(c.include or c.exclude for c in weighty),
        "changes": changes,
    }
