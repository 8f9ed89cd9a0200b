"""Where the attention heads and MLP channels of a transformer block are, by architecture: the
layouts structured pruning (``prune.heads``, ``prune.channels``) zeroes units in.

Recognized layouts (names relative to one submodule of a block): Llama-style attention
(``q_proj``/``k_proj``/``v_proj`` with ``o_proj``, ``out_proj`` or ``dense``; grouped-query
attention included), GPT-2 (fused ``c_attn`` Conv1D with ``c_proj``), BERT
(``self.query``/``self.key``/``self.value`` with ``output.dense``), DistilBERT
(``q_lin``/``k_lin``/``v_lin`` with ``out_lin``), and MLPs with
``gate_proj``/``up_proj``/``down_proj`` (SwiGLU), ``up_proj``/``down_proj``,
``c_fc``/``c_proj``, ``fc1``/``fc2``, ``dense_h_to_4h``/``dense_4h_to_h``,
``intermediate.dense``/``output.dense`` (BERT) or ``lin1``/``lin2`` (DistilBERT).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ...errors import HemorrhageError
from ..registry import Target, blocks, is_conv1d, is_linear

__all__ = ["MLP", "Attention", "attention_layouts", "mlp_layouts"]


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
    """One block's MLP: neuron k is row k of every producer and column k of the consumer."""

    block: int
    producers: tuple[Target, ...]
    consumer: Target
    width: int


_SEPARATE_QKV = (
    ("q_proj", "k_proj", "v_proj"),
    ("self.query", "self.key", "self.value"),
    ("q_lin", "k_lin", "v_lin"),
)
_OUT_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "output.dense", "out_lin")
_MLP_NAMES = (
    ("gate_proj", "up_proj", "down_proj"),
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


def _unsupported(model: nn.Module, what: str, block: str, expected: str) -> HemorrhageError:
    return HemorrhageError(
        f"{what}: {type(model).__name__} has no {expected} this modification recognizes in block "
        f"{block!r}; supported: Llama-style (q/k/v/o_proj, gate/up/down_proj), GPT-2-style "
        "(c_attn, c_proj, c_fc) and BERT-style (query/key/value, intermediate/output.dense) "
        "layers; use an unstructured pruning (prune.magnitude) instead"
    )


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


def _layouts(model: nn.Module, what: str, expected: str, find: Any) -> list[tuple[str, Any]]:
    """Per transformer block, (block name, ``find``'s layout of the first submodule it claims).

    ``find(index, submodule, name prefix, its linear children)`` returns a layout, ``_SKIP``,
    or None when the submodule is the one but its shapes are not understood.
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
            raise _unsupported(model, what, block_name, expected)
        found.append((block_name, layout))
    return found


def attention_layouts(model: nn.Module, what: str = "") -> list[tuple[str, Attention]]:
    """Per transformer block, (block name, its attention projections); raises if unrecognized."""

    def find(index: int, sub: nn.Module, base: str, linear: dict[str, nn.Module]) -> Any:
        out = next((n for n in _OUT_NAMES if n in linear), None)
        separate = next((qkv for qkv in _SEPARATE_QKV if set(qkv) <= linear.keys()), None)
        if out is None or not (separate or "c_attn" in linear):
            return _SKIP
        geometry = _head_geometry(model, sub)
        if geometry is None:
            return None
        heads, kv_heads, head_dim = geometry
        o = _target(base + out, linear[out])
        if "c_attn" in linear:
            fused = _target(base + "c_attn", linear["c_attn"])
            width = heads * head_dim
            qkv = ((fused, 0), (fused, width), (fused, 2 * width))
            shapes_ok = fused.weight.shape[0] == 3 * width and kv_heads == heads
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

    return _layouts(model, what, "attention projections", find)


def mlp_layouts(model: nn.Module, what: str = "") -> list[tuple[str, MLP]]:
    """Per transformer block, (block name, its MLP projections); raises if unrecognized."""

    def find(index: int, sub: nn.Module, base: str, linear: dict[str, nn.Module]) -> Any:
        if "c_attn" in linear or "q_proj" in linear:  # GPT-2's attention has a c_proj too
            return _SKIP
        names = next((ns for ns in _MLP_NAMES if set(ns) <= linear.keys()), None)
        if names is None:
            return _SKIP
        producers = tuple(_target(base + n, linear[n]) for n in names[:-1])
        consumer = _target(base + names[-1], linear[names[-1]])
        width = consumer.weight.shape[1]
        if all(p.weight.shape[0] == width for p in producers):
            return MLP(index, producers, consumer, width)
        return None

    return _layouts(model, what, "MLP projections", find)
