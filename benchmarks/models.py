"""The models the benchmarks (and tests) run beside the bundled one: seeded random-init Llamas
and a function-preserving widening of a trained model.

``widened(model)``: llama.cpp's K-quants pack 256 weights per row block, and the bundled
model's rows are 128 and 384 wide, so there every K-quant falls back. ``widened`` doubles every
width by duplication (Net2Net): the hidden state becomes ``[h, h]`` (embedding and norm weights
concatenated with themselves), attention gets twice the query and key-value heads (the copies
keep each query head on its own key-value head), the MLP twice the neurons, and every weight
reading a doubled input is halved on both copies. The model computes the same function (up to
float rounding: its sums have twice the terms), with trained weights, deterministically and
with no random draw. Each K-quant super-block then holds a trained row's values twice, so a
K-quant's damage there is its damage on the bundled model's weights, without the width
fallback.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LLAMA_50M", "MODELS", "load", "random_llama", "widened"]

# ~50M parameters with the bundled model's architecture and vocabulary (untied head)
LLAMA_50M = {
    "hidden_size": 640,
    "intermediate_size": 1728,
    "num_hidden_layers": 10,
    "num_attention_heads": 10,
    "num_key_value_heads": 5,
    "tie_word_embeddings": False,
}
MODELS = ("tiny", "50m")  # what ``load`` takes


def random_llama(tokenizer: Any, spec: str, seed: int = 0, **config: Any) -> Any:
    """A LoadedModel: a LlamaForCausalLM of ``config`` with ``tokenizer``, its matrices drawn
    from N(0, 0.02) by a generator of its own (the global RNG untouched), norms at 1."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pytest_hemorrhage.loading import LoadedModel

    generator = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec)


def load(which: str) -> Any:
    """The bundled model (``"tiny"``) or a ~50M-parameter random-init model of its
    architecture, vocabulary and tokenizer (``"50m"``), on the CPU."""
    from pytest_hemorrhage.loading import load_model

    tiny = load_model("hemorrhage-tiny", device="cpu")
    if which == "tiny":
        return tiny
    if which != "50m":
        raise ValueError(f"no model {which!r}: one of {MODELS}")
    vocab = tiny.model.config.vocab_size
    return random_llama(tiny.tokenizer, "random-50m", vocab_size=vocab, **LLAMA_50M)


def _double(w: Any, rows: bool, cols: bool) -> Any:
    """``w`` with its rows and/or columns repeated; a repeated input dimension halves ``w``."""
    import torch

    if cols:
        w = torch.cat([w, w], 1) / 2
    if rows:
        w = torch.cat([w, w], 0)
    return w


def widened(model: Any) -> Any:
    """A LlamaForCausalLM twice as wide as ``model`` computing the same function."""
    import torch
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
    state = {}
    for name, w in model.state_dict().items():
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
