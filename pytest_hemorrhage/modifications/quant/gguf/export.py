"""The GGUF file of a Llama-layout model: float32, or quantized as ``llama-quantize`` would
quantize it for a ``quant.gguf`` config (every tensor in its planned type, the same bytes).

It is the file ``quant.gguf`` simulates, so llama.cpp itself (in-process, or a server) can run
it and the two measures be compared. Layout as llama.cpp's ``convert_hf_to_gguf.py`` writes a
Llama model (q/k rows permuted for its rotary layout; norms in F32) with the byte-level BPE
tokenizer in the file's metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ....errors import HemorrhageError
from .config import Gguf
from .plan import plan
from .quantize import quantize

__all__ = ["write_gguf"]

_PER_BLOCK = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order: each head's rotary halves interleaved (convert_hf_to_gguf)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def _names(layers: int) -> dict[str, str]:
    names = {
        "model.embed_tokens": "token_embd",
        "model.norm": "output_norm",
        "lm_head": "output",
    }
    for i in range(layers):
        for hf, gg in _PER_BLOCK.items():
            names[f"model.layers.{i}.{hf}"] = f"blk.{i}.{gg}"
    return names


def _add_tokenizer(writer: Any, tokenizer: Any, config: Any) -> None:
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise HemorrhageError(
            f"write_gguf: the tokenizer is {spec['model']['type']}, not byte-level BPE; only "
            "BPE tokenizers are written (convert other models with llama.cpp's script)"
        )
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    special = {t["content"] for t in spec.get("added_tokens", ())}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    kinds = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    writer.add_token_types([int(k) for k in kinds])
    writer.add_token_merges(merges)
    for key in ("bos", "eos", "pad"):
        value = getattr(config, f"{key}_token_id", None)
        if value is not None:
            getattr(writer, f"add_{key}_token_id")(value)
    writer.add_add_bos_token(False)


def write_gguf(
    model: nn.Module, tokenizer: Any, path: str | Path, config: Gguf | None = None
) -> Path:
    """Write ``model`` (a transformers Llama) to ``path`` as GGUF: every matrix in float32, or,
    given ``config``, each tensor ``config`` quantizes in the type ``plan(config, model)`` gives
    it, with the bytes ``quant.gguf`` computes with.

    Raises:
        HemorrhageError: not a Llama-layout model, or not a byte-level BPE tokenizer.
    """
    import gguf

    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) != "llama":
        raise HemorrhageError(
            f"write_gguf: {type(model).__name__} is not a Llama-layout model "
            f"(model_type={getattr(cfg, 'model_type', None)!r}); only llama is written here"
        )
    types = {} if config is None else {p.name: p.type for p in plan(config, model)}
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(getattr(cfg, "name_or_path", "") or "model")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(getattr(cfg, "head_dim", cfg.hidden_size // heads))
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    _add_tokenizer(writer, tokenizer, cfg)
    modules = dict(model.named_modules())
    for hf, gg in _names(cfg.num_hidden_layers).items():
        module = modules.get(hf)
        if module is None:  # a tied head: llama.cpp reads token_embd
            continue
        with torch.no_grad():
            w = module.weight.detach().float().cpu().numpy()
        if gg.endswith("attn_q"):
            w = _permute(w, heads)
        elif gg.endswith("attn_k"):
            w = _permute(w, kv_heads)
        qtype = types.get(hf)
        if qtype is None or w.ndim == 1:
            writer.add_tensor(f"{gg}.weight", np.ascontiguousarray(w, dtype=np.float32))
        else:
            kind = gguf.GGMLQuantizationType[qtype]
            writer.add_tensor(f"{gg}.weight", quantize(w, qtype), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
