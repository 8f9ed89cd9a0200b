"""Tiny random-init models of the architectures people ship, built from the installed
transformers' config classes (no download): 2 blocks, hidden size 64, 4 query heads over 2
key-value heads where the family has grouped-query attention, 4 experts (2 routed per token)
where it is a mixture of experts, and the bundled tokenizer's vocabulary.

What each one brings that the bundled Llama has not:

- ``qwen2``: q/k/v biases. ``qwen3``: per-head q/k norms. ``granite``: embedding, residual,
  attention and logit multipliers. ``mistral``: a sliding window (transformers' default, 4096:
  wider than any window measured).
- ``qwen3_moe``, ``mixtral``: experts stored as 3-D ``(experts, out, in)`` parameters, a router.
  ``qwen2_moe``: a shared expert and its gate beside them. ``gpt_oss``: ``(experts, in, out)``
  experts with biases, attention sinks, sliding-window layers (window 32) between full ones.
  ``deepseek_v3``: multi-head latent attention (low-rank q and kv, 4-D inputs inside), a dense
  first block, then experts with a shared expert.
- ``gemma``: ``(1 + w)`` RMSNorms, embeddings scaled inside the embedding module.
  ``gemma2``, ``gemma3``: the same norms around each sublayer (input, output), sliding-window
  layers (window 32) between full ones. ``olmo2``: norms on the
  sublayers' outputs only.
- ``phi3``: fused ``qkv_proj`` and ``gate_up_proj``.
- ``gpt2``: Conv1D (weights stored (in, out)), fused ``c_attn``, LayerNorm. ``opt``:
  LayerNorm, ``fc1``/``fc2``. ``gpt_neox``: ``query_key_value`` interleaved per head, parallel
  residual. ``falcon``: multi-query ``query_key_value``, parallel attention and MLP.
  ``stablelm``: LayerNorm with partial rotary. ``starcoder2``: LayerNorm, ``c_fc``/``c_proj``,
  biases.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ARCHITECTURES", "build"]

_DENSE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
_EXPERTS = {"num_experts_per_tok": 2, "moe_intermediate_size": 32}

# name -> (config class, model class, config arguments), all from transformers
ARCHITECTURES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _DENSE),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _DENSE),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**_DENSE, "head_dim": 16}),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {**_DENSE, **_EXPERTS, "head_dim": 16, "num_experts": 4},
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {**_DENSE, **_EXPERTS, "num_experts": 4, "shared_expert_intermediate_size": 64},
    ),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {**_DENSE, "num_local_experts": 4}),
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        {
            **_DENSE,
            "head_dim": 16,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "sliding_window": 32,
            # its YaRN factor (32) over the original 4096 positions: consistent, so no warning
            "max_position_embeddings": 131072,
        },
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        {
            **_DENSE,
            **_EXPERTS,
            "num_key_value_heads": 4,
            "n_routed_experts": 4,
            "n_shared_experts": 1,
            "first_k_dense_replace": 1,
            "n_group": 1,
            "topk_group": 1,
            "q_lora_rank": 32,
            "kv_lora_rank": 16,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 16,
        },
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", _DENSE),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {**_DENSE, "head_dim": 16}),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {**_DENSE, "head_dim": 16, "sliding_window": 32},
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {
            **_DENSE,
            "head_dim": 16,
            "sliding_window": 32,
            "layer_types": ["sliding_attention", "full_attention"],
        },
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", _DENSE),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256},
    ),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        {
            "hidden_size": 64,
            "ffn_dim": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 256,
            "word_embed_proj_dim": 64,
        },
    ),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", _DENSE),
    "falcon": (
        "FalconConfig",
        "FalconForCausalLM",
        {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
    ),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", _DENSE),
    "granite": ("GraniteConfig", "GraniteForCausalLM", _DENSE),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", _DENSE),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", _DENSE),
}


def build(name: str, vocab_size: int, **overrides: Any) -> Any:
    """The random-init model ``name`` (eval mode, float32, seeded: the same weights on every
    call), with ``overrides`` applied to its config arguments."""
    import torch
    import transformers

    config_class, model_class, arguments = ARCHITECTURES[name]
    config = getattr(transformers, config_class)(
        vocab_size=vocab_size,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        **{**arguments, **overrides},
    )
    with torch.random.fork_rng():  # the weights are the seed's, the caller's stream untouched
        torch.manual_seed(0)
        return getattr(transformers, model_class)(config).eval()
