"""llama.cpp's per-tensor choice of GGUF type (``llama_tensor_get_type`` in src/llama-quant.cpp;
MIT): which tensors a ``quant.gguf`` config quantizes, each with the type llama.cpp gives it, and
the one-line summary of the tensors that fell back to another type.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ....errors import HemorrhageError
from ...experts import expert_stacks, stored
from ...registry import Target, blocks
from .config import BLOCK, MIXTURES, Gguf, fallback_type

__all__ = ["TensorPlan", "fallback_summary", "plan", "tensors"]

# llama.cpp tensor categories from transformers module names (Llama and GPT-2 layouts)
_CATEGORIES = (
    ("*.v_proj", "attn_v"),
    ("*.c_attn", "attn_qkv"),
    ("*.k_proj", "attn_k"),
    ("*.q_proj", "attn_q"),
    ("*.o_proj", "attn_output"),
    ("*.attn.c_proj", "attn_output"),
    ("*.gate_up_proj", "ffn_gate_up"),
    ("*.up_proj", "ffn_up"),
    ("*.mlp.c_fc", "ffn_up"),
    ("*.gate_proj", "ffn_gate"),
    ("*.down_proj", "ffn_down"),
    ("*.mlp.c_proj", "ffn_down"),
)


def _category(name: str, model: nn.Module, module: nn.Module) -> str:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if module is head:
        return "output"
    if module is embed:
        return "token_embd"
    return next((c for pattern, c in _CATEGORIES if fnmatch.fnmatchcase(name, pattern)), "other")


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _mixture_type(
    config: Gguf, category: str, layer: int, n_layer: int, width: int, n_gqa: float, n_expert: int
) -> str:
    """llama_tensor_get_type_impl for these file types on a non-Falcon model; ``n_expert``
    experts per MoE layer (0: dense), of which llama.cpp special-cases 8."""
    ftype, base = config.type, config.base_type
    if category == "output":
        return "Q8_0" if width % BLOCK[base] or base == "Q8_0" else "Q6_K"
    if n_expert == 8 and category in ("attn_v", "attn_qkv", "attn_k"):
        return "Q8_0"  # llama.cpp: "for the 8-expert model, bumping this to Q8_0 trades ~128MB"
    if n_expert == 8 and category == "attn_output":
        return "Q5_K" if ftype in ("Q2_K", "Q3_K_M", "Q4_K_M") else base
    if category in ("attn_v", "attn_qkv"):  # llama.cpp's category_is_attn_v
        if ftype == "Q2_K":
            return "Q4_K" if n_gqa >= 4 else "Q3_K"
        if ftype == "Q3_K_M":
            return "Q5_K" if layer < 2 else "Q4_K"
        if ftype in ("Q4_K_M", "Q5_K_M") and _use_more_bits(layer, n_layer):
            return "Q6_K"
    elif category == "ffn_down":
        if ftype == "Q2_K":
            return "Q3_K"
        if ftype == "Q3_K_M":
            return "Q5_K" if layer < n_layer // 16 else "Q4_K"
        if ftype in ("Q4_K_M", "Q5_K_M") and _use_more_bits(layer, n_layer):
            return "Q6_K"
    elif category == "attn_output":
        if ftype == "Q2_K":
            return "Q3_K"
        if ftype == "Q3_K_M":
            return "Q4_K"
    return base


# block types llama.cpp has a file type of the same name for: their per-tensor rules apply
_FILE_TYPES = ("Q8_0", "Q6_K", "Q5_1", "Q5_0", "Q4_1", "Q4_0", *MIXTURES)


@dataclass(frozen=True)
class TensorPlan:
    """One tensor's GGUF type: ``asked`` by the mixture, ``type`` after the width fallback."""

    name: str
    category: str
    asked: str
    type: str
    shape: tuple[int, int]

    @property
    def fell_back(self) -> bool:
        return self.asked != self.type


def tensors(config: Gguf, model: nn.Module) -> list[tuple[Target, list[Target]]]:
    """(the tensor to quantize, every module computing with it): the targets, then the token
    embedding and the output head as ``config`` asks (a tied head and embedding are one tensor,
    so asking for either quantizes both modules' tensor, as in llama.cpp). ``exclude`` patterns
    leave any of them alone."""
    targets = config.targets(model)
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = _tied(model)
    names = {m: n for n, m in model.named_modules()}
    wanted = []
    if isinstance(embed, nn.Embedding) and (config.embeddings or (tied and config.head)):
        wanted.append(embed)
    if head is not None and (config.head or (tied and config.embeddings)):
        wanted.append(head)
    extra = [
        Target(names[m], m, False)
        for m in wanted
        if not any(t.module is m for t in targets)
        and not any(fnmatch.fnmatchcase(names[m], p) for p in config.exclude)
    ]
    groups: list[tuple[Target, list[Target]]] = []
    by_weight: dict[int, list[Target]] = {}
    for target in [*targets, *extra]:
        key = (id(stored(target.module, target.param)), target.expert)
        if key in by_weight:
            by_weight[key].append(target)
            continue
        by_weight[key] = [target]
        groups.append((target, by_weight[key]))
    return groups


def _tied(model: nn.Module) -> bool:
    """The output head computes with the input embedding's tensor (llama.cpp: no output.weight)."""
    if not (hasattr(model, "get_output_embeddings") and hasattr(model, "get_input_embeddings")):
        return False
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embed is not None and _original(head) is _original(embed)


def _original(module: nn.Module) -> torch.Tensor:
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def plan(config: Gguf, model: nn.Module) -> list[TensorPlan]:
    """Every tensor ``config`` quantizes, with the type llama.cpp gives it, in model order."""
    try:
        prefix, block_list = blocks(model)
    except HemorrhageError:
        prefix, block_list = "", nn.ModuleList()
    n_layer = len(block_list)
    cfg: Any = getattr(model, "config", None)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None) or 1
    n_gqa = heads / (getattr(cfg, "num_key_value_heads", None) or heads)
    n_expert = max((s.count for s in expert_stacks(block_list)), default=0)
    out = []
    for target, _ in tensors(config, model):
        category = _category(target.base, model, target.module)
        if category == "token_embd" and _tied(model):  # llama.cpp: the output's type
            category = "output"
        rows, width = target.weight.shape
        match = re.match(re.escape(prefix) + r"\.(\d+)\.", target.name) if prefix else None
        layer = int(match.group(1)) if match else 0
        if config.pure or config.type not in _FILE_TYPES:
            asked = config.base_type
        else:
            asked = _mixture_type(config, category, layer, n_layer, width, n_gqa, n_expert)
        out.append(
            TensorPlan(target.name, category, asked, fallback_type(asked, width), (rows, width))
        )
    return out


def fallback_summary(plans: list[TensorPlan]) -> str:
    """Which tensors fell back to which type, block indices grouped, and a block whose every
    tensor fell back the same way written ``.*``:
    ``Q4_K -> Q5_0 for model.layers.{0..3}.*; Q6_K -> Q8_0 for model.layers.{0,3}.mlp.down_proj``.
    ``plans`` is every tensor's plan (those that kept their type say which blocks are whole)."""
    # one expert's matrix falls back as its whole stack does: named by the stack
    split = [(p, re.match(r"(.*?)\.(\d+)\.(.*?)(?:\[\d+\])?$", p.name)) for p in plans]
    in_block: dict[tuple[str, int], set[str]] = {}
    for p, m in split:
        if m:
            in_block.setdefault((m.group(1), int(m.group(2))), set()).add(p.name)
    changes: dict[str, list[tuple[TensorPlan, re.Match[str] | None]]] = {}
    for p, m in split:
        if p.fell_back:
            changes.setdefault(f"{p.asked} -> {p.type}", []).append((p, m))
    parts = []
    for change, members in changes.items():
        names = {p.name for p, _ in members}
        whole = {key for key, block in in_block.items() if len(block) > 1 and block <= names}
        groups: dict[str, list[int]] = {}  # name template -> block indices
        for p, m in members:
            if m is None:
                groups.setdefault(p.name, [])
            elif (m.group(1), int(m.group(2))) in whole:
                groups.setdefault(f"{m.group(1)}.{{}}.*", []).append(int(m.group(2)))
            else:
                groups.setdefault(f"{m.group(1)}.{{}}.{m.group(3)}", []).append(int(m.group(2)))
        shown = [t.format(_indices(v)) if v else t for t, v in groups.items()]
        parts.append(f"{change} for {', '.join(dict.fromkeys(shown))}")
    return "; ".join(parts)


def _indices(values: list[int]) -> str:
    """``3``, ``{0,1}``, ``{0..3}``, ``{0..2,5}``: runs of three or more as ranges."""
    ordered = sorted(set(values))
    if len(ordered) == 1:
        return str(ordered[0])
    runs: list[list[int]] = []
    for v in ordered:
        if runs and v == runs[-1][-1] + 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    text = ",".join(f"{r[0]}..{r[-1]}" if len(r) > 2 else ",".join(map(str, r)) for r in runs)
    return "{" + text + "}"
