"""A tiny random-init Llama with a 1,024-wide output head and the bundled tokenizer: a baseline
whose reference is stored top-K (its logits are wider than ``reference.EXACT_VOCAB``), as every
real model's is, and a damaged copy of it to gate.

``baseline`` and ``candidate`` are ``module:factory`` specs for ``--hemorrhage-model`` and
``--hemorrhage-candidate`` (``wide_vocab:baseline``): deterministic, built in a fraction of a
second, no download. The head is wider than the tokenizer's 512 tokens, as a padded vocabulary
is in real checkpoints; the evaluation ids stay below 512.
"""

from __future__ import annotations

import torch

__all__ = ["VOCAB", "baseline", "candidate"]

VOCAB = 1024


def _build(damage: float) -> tuple[torch.nn.Module, object]:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from pytest_hemorrhage.loading import BUNDLED_MODEL

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        # larger than the default 0.02 (near-uniform outputs): the baseline's mass outside its
        # top 124 tokens is then 7-28% per token, the head carrying the rest
        initializer_range=0.25,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    # the caller's RNG is left as it was: this runs inside a user's pytest session
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
        if damage:
            with torch.no_grad():
                weight = model.lm_head.weight
                weight.add_(torch.randn(weight.shape) * weight.std() * damage)
    return model, AutoTokenizer.from_pretrained(BUNDLED_MODEL)


def baseline() -> tuple[torch.nn.Module, object]:
    """The baseline: (model, tokenizer)."""
    return _build(0.0)


def candidate() -> tuple[torch.nn.Module, object]:
    """The baseline with noise on its output head (30% of the weights' spread)."""
    return _build(0.3)
