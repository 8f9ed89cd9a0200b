"""Where the attention heads and MLP channels of a transformer block are, by architecture: the
layouts structured pruning (``prune.heads``, ``prune.channels``) zeroes units in.

Recognized layouts (names relative to one submodule of a block): Llama-style attention
(``q_proj``/``k_proj``/``v_proj`` with ``o_proj``, ``out_proj`` or ``dense``; grouped-query
attention included), fused q/k/v rows, every query head then every key and value head (GPT-2's
``c_attn`` Conv1D with ``c_proj``, Phi-3's ``qkv_proj`` with ``o_proj``), BERT
(``self.query``/``self.key``/``self.value`` with ``output.dense``), DistilBERT
(``q_lin``/``k_lin``/``v_lin`` with ``out_lin``), and MLPs with
``gate_proj``/``up_proj``/``down_proj`` (SwiGLU), ``gate_up_proj``/``down_proj`` (Phi-3: the
gate rows, then the up rows), ``up_proj``/``down_proj``, ``c_fc``/``c_proj``, ``fc1``/``fc2``,
``dense_h_to_4h``/``dense_4h_to_h``, ``intermediate.dense``/``output.dense`` (BERT) or
``lin1``/``lin2`` (DistilBERT).

A model none of them fits is refused in one line that names its layers (or its experts, for an
MLP that is a mixture of experts) and the pruning methods that do apply to it
(:func:`alternatives`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ...errors import HemorrhageError
from ..experts import expert_stacks
from ..registry import Target, blocks, is_conv1d, is_linear, names_by_expert_support

__all__ = ["MLP", "Attention", "alternatives", "attention_layouts", "fused_experts", "mlp_layouts"]


@dataclass(frozen=True)
class Attention:
    """One block's attention projections; q/k/v are (target, first row) in (out, in) terms."""

    block: int
    q: tuple[Target, int]
    k: tuple[Target, int]
    v: tuple[Target, int]
    o: Target
    heads: int
    kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class MLP:
    """One block's MLP: neuron k is row ``start + k`` of every producer (``starts``, 0 for each
    by default; a fused gate/up producer is listed twice) and column k of the consumer."""

    block: int
    producers: tuple[Target, ...]
    consumer: Target
    width: int
    starts: tuple[int, ...] = ()

    def rows(self) -> list[tuple[Target, int]]:
        """Each producer with the first row of its neurons."""
        return list(zip(self.producers, self.starts or (0,) * len(self.producers), strict=True))


_SEPARATE_QKV = (
    ("q_proj", "k_proj", "v_proj"),
    ("self.query", "self.key", "self.value"),
    ("q_lin", "k_lin", "v_lin"),
)
_FUSED_QKV = ("c_attn", "qkv_proj")  # the q heads' rows, then the k heads', then the v heads'
_OUT_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "output.dense", "out_lin")
_MLP_NAMES = (
    ("gate_proj", "up_proj", "down_proj"),
    ("gate_up_proj", "down_proj"),  # fused: gate rows then up rows (Phi-3)
    ("up_proj", "down_proj"),
    ("c_fc", "c_proj"),
    ("fc1", "fc2"),
    ("dense_h_to_4h", "dense_4h_to_h"),
    ("intermediate.dense", "output.dense"),
    ("lin1", "lin2"),
)


def _target(name: str, module: nn.Module) -> Target:
    return Target(name, module, is_conv1d(module))


def _linears(module: nn.Module) -> dict[str, nn.Module]:
    """The linear layers under ``module`` by relative name (BERT nests them two deep)."""
    return {n: m for n, m in module.named_modules() if n and is_linear(m)}


_EXPECTED = {
    "attention": "q/k/v_proj, a fused qkv_proj or c_attn, query/key/value or q/k/v_lin, with "
    "o_proj, out_proj, dense, c_proj or out_lin",
    "MLP": "gate/up/down_proj, gate_up_proj with down_proj, up/down_proj, c_fc/c_proj, fc1/fc2, "
    "dense_h_to_4h/dense_4h_to_h, intermediate/output.dense or lin1/lin2",
}
_METHOD = {"attention": "prune.heads", "MLP": "prune.channels"}


class _Unrecognized(Exception):
    """A block none of the layouts fits: (block name, block)."""


def fused_experts(module: nn.Module) -> list[str]:
    """Names (relative to ``module``) of the mixture-of-experts weights stored as one 3-D
    parameter per projection (transformers 5's experts), which no layout here reaches."""
    return [stack.name for stack in expert_stacks(module)]


def _layer_names(block: nn.Module, kind: str) -> str:
    """The block's linear layers a refusal names: its attention's, or the rest."""
    names = list(_linears(block))
    attention = [n for n in names if "att" in n.split(".")[0]]
    chosen = attention if kind == "attention" else [n for n in names if n not in attention]
    return ", ".join(chosen or names) or "none"


def _unsupported(
    model: nn.Module, what: str, block_name: str, block: nn.Module, kind: str
) -> HemorrhageError:
    experts = fused_experts(block)
    if kind == "MLP" and experts:
        reason = (
            f"the MLP of block {block_name!r} is a mixture of experts stored as 3-D parameters "
            f"({', '.join(experts)}), whose channels this modification does not prune"
        )
    else:
        reason = (
            f"the {kind} of block {block_name!r} ({_layer_names(block, kind)}) is not a layout "
            f"this modification recognizes ({_EXPECTED[kind]})"
        )
    return HemorrhageError(
        f"{what or _METHOD[kind]}: {type(model).__name__}: {reason}; "
        f"use {alternatives(model, _METHOD[kind])} instead"
    )


def alternatives(model: nn.Module, besides: str) -> str:
    """The pruning methods other than ``besides`` that apply to ``model``, for a refusal to
    suggest: ``prune.heads`` / ``prune.channels`` where their layouts fit every block,
    ``prune.layers`` always, and ``prune.magnitude`` where it reaches every block weight (a
    model with fused experts: only where it prunes them expert by expert)."""
    found = []
    for name, find in (("prune.heads", _attention_find), ("prune.channels", _mlp_find)):
        if name != besides:
            try:
                _layouts(model, find(model))
            except _Unrecognized:
                continue
            found.append(name)
    if besides != "prune.layers":
        found.append("prune.layers")
    _, layers = blocks(model)
    if not fused_experts(layers):
        found.append("prune.magnitude")
    elif "prune.magnitude" in names_by_expert_support():
        found.append("prune.magnitude (experts included)")
    return " or ".join([", ".join(found[:-1]), found[-1]] if len(found) > 1 else found)


def _head_geometry(model: nn.Module, attention: nn.Module) -> tuple[int, int, int] | None:
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(attention, "num_heads", None)
    if not heads:
        return None
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = (
        getattr(attention, "head_dim", None)
        or getattr(config, "head_dim", None)
        or getattr(config, "hidden_size", 0) // heads
    )
    return heads, kv_heads, head_dim


_SKIP = object()  # a finder's answer for "not this submodule, look further"


def _layouts(model: nn.Module, find: Any) -> list[tuple[str, Any]]:
    """Per transformer block, (block name, ``find``'s layout of the first submodule it claims).

    ``find(index, submodule, name prefix, its linear children)`` returns a layout, ``_SKIP``,
    or None when the submodule is the one but its shapes are not understood.

    Raises:
        _Unrecognized: a block where no submodule gives a layout.
    """
    prefix, layers = blocks(model)
    found = []
    for index, block in enumerate(layers):
        block_name = f"{prefix}.{index}"
        layout = None
        for sub_name, sub in block.named_modules():
            base = f"{block_name}.{sub_name}." if sub_name else f"{block_name}."
            layout = find(index, sub, base, _linears(sub))
            if layout is not _SKIP:
                break
        if layout is None or layout is _SKIP:
            raise _Unrecognized(block_name, block)
        found.append((block_name, layout))
    return found


def _recognized(model: nn.Module, what: str, kind: str, find: Any) -> list[tuple[str, Any]]:
    try:
        return _layouts(model, find)
    except _Unrecognized as exc:
        raise _unsupported(model, what, *exc.args, kind) from None


def _attention_find(model: nn.Module) -> Any:
    def find(index: int, sub: nn.Module, base: str, linear: dict[str, nn.Module]) -> Any:
        out = next((n for n in _OUT_NAMES if n in linear), None)
        separate = next((qkv for qkv in _SEPARATE_QKV if set(qkv) <= linear.keys()), None)
        fused_name = next((n for n in _FUSED_QKV if n in linear), None)
        if out is None or not (separate or fused_name):
            return _SKIP
        geometry = _head_geometry(model, sub)
        if geometry is None:
            return None
        heads, kv_heads, head_dim = geometry
        o = _target(base + out, linear[out])
        if fused_name:
            fused = _target(base + fused_name, linear[fused_name])
            q_rows, kv_rows = heads * head_dim, kv_heads * head_dim
            qkv = ((fused, 0), (fused, q_rows), (fused, q_rows + kv_rows))
            shapes_ok = fused.weight.shape[0] == q_rows + 2 * kv_rows
        else:
            qkv = tuple((_target(base + n, linear[n]), 0) for n in separate)
            shapes_ok = (
                qkv[0][0].weight.shape[0] == heads * head_dim
                and qkv[1][0].weight.shape[0] == kv_heads * head_dim
                and qkv[2][0].weight.shape[0] == kv_heads * head_dim
            )
        if shapes_ok and o.weight.shape[1] == heads * head_dim and heads % kv_heads == 0:
            return Attention(index, *qkv, o, heads, kv_heads, head_dim)
        return None

    return find


def _mlp_find(model: nn.Module) -> Any:
    def find(index: int, sub: nn.Module, base: str, linear: dict[str, nn.Module]) -> Any:
        if any(n in linear for n in ("q_proj", *_FUSED_QKV)):  # GPT-2's attention has a c_proj
            return _SKIP
        names = next((ns for ns in _MLP_NAMES if set(ns) <= linear.keys()), None)
        if names is None:
            return _SKIP
        producers = tuple(_target(base + n, linear[n]) for n in names[:-1])
        consumer = _target(base + names[-1], linear[names[-1]])
        width = consumer.weight.shape[1]
        if names[0] == "gate_up_proj":
            if producers[0].weight.shape[0] == 2 * width:
                return MLP(index, producers * 2, consumer, width, (0, width))
        elif all(p.weight.shape[0] == width for p in producers):
            return MLP(index, producers, consumer, width)
        return None

    return find


def attention_layouts(model: nn.Module, what: str = "") -> list[tuple[str, Attention]]:
    """Per transformer block, (block name, its attention projections); raises if unrecognized."""
    return _recognized(model, what, "attention", _attention_find(model))


def mlp_layouts(model: nn.Module, what: str = "") -> list[tuple[str, MLP]]:
    """Per transformer block, (block name, its MLP projections); raises if unrecognized."""
    return _recognized(model, what, "MLP", _mlp_find(model))
