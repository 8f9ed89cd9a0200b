"""A function-preserving widening of a Llama model: every row a multiple of 256 wide.

llama.cpp's K-quants pack 256 weights per row block, and the bundled model's rows are 128 and
384 wide, so there every K-quant falls back. ``widened(model)`` doubles every width by
duplication (Net2Net): the hidden state becomes ``[h, h]`` (embedding and norm weights
concatenated with themselves), attention gets twice the query and key-value heads (the copies
keep each query head on its own key-value head), the MLP twice the neurons, and every weight
reading a doubled input is halved on both copies. The model computes the same function (up to
float rounding: its sums have twice the terms), with trained weights, deterministically and with
no random draw. Each K-quant super-block then holds a trained row's values twice, so a K-quant's
damage here is its damage on the bundled model's weights, without the width fallback.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["widened"]


def _double(w: torch.Tensor, rows: bool, cols: bool) -> torch.Tensor:
    """``w`` with its rows and/or columns repeated; a repeated input dimension halves ``w``."""
    if cols:
        w = torch.cat([w, w], 1) / 2
    if rows:
        w = torch.cat([w, w], 0)
    return w


def widened(model: nn.Module) -> nn.Module:
    """A LlamaForCausalLM twice as wide as ``model`` computing the same function."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    config = LlamaConfig(
        **{
            **cfg.to_dict(),
            "hidden_size": 2 * cfg.hidden_size,
            "intermediate_size": 2 * cfg.intermediate_size,
            "num_attention_heads": 2 * cfg.num_attention_heads,
            "num_key_value_heads": 2 * cfg.num_key_value_heads,
            "head_dim": head_dim,
        }
    )
    wide = LlamaForCausalLM(config).to(next(model.parameters()).dtype).eval()
    source = dict(model.state_dict())
    state = {}
    for name, w in source.items():
        if name.endswith("embed_tokens.weight"):
            state[name] = torch.cat([w, w], 1)  # hidden [h, h]
        elif name.endswith("norm.weight"):
            state[name] = torch.cat([w, w])
        elif name.endswith("lm_head.weight"):
            state[name] = _double(w, rows=False, cols=True)
        else:  # every projection: a doubled output and a doubled input
            state[name] = _double(w, rows=True, cols=True)
    wide.load_state_dict(state, strict=True)
    return wide
