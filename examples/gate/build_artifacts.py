"""Build the release artifacts of the gate example from the bundled model, with the tools users use.

    python examples/gate/build_artifacts.py OUT_DIR            # NF4 checkpoint + GGUF files
    /tmp/llmc/bin/python examples/gate/build_artifacts.py --gptq examples/gate/artifacts

- ``OUT_DIR/nf4``: bitsandbytes NF4 (4-bit NormalFloat, double quantization), saved with
  ``save_pretrained``; transformers reloads it from its ``quantization_config``.
- ``OUT_DIR/tiny-q8_0.gguf`` and ``OUT_DIR/tiny-q4_0.gguf``: llama.cpp GGUF files written with
  the ``gguf`` package (its own Q8_0 / Q4_0 quantizers; norms stay F32), with the tokenizer in
  the file, as llama.cpp's convert script lays them out (q/k rows permuted for its rotary
  layout). transformers dequantizes them on load (``gguf_file=``).
- ``--gptq``: an llm-compressor GPTQ W4A16 checkpoint (compressed-tensors ``pack-quantized``),
  calibrated on the bundled training corpus. llm-compressor pins an older transformers, so it
  runs in a venv of its own::

      python -m venv /tmp/llmc
      /tmp/llmc/bin/pip install torch==2.13.0 llmcompressor
      /tmp/llmc/bin/pip install -e .   # for the bundled model's path only (no deps needed)

  The result (``examples/gate/artifacts/w4a16``, about 0.5 MB) is committed, so the example
  and the tests load it with transformers and compressed-tensors alone
  (``pip install pytest-hemorrhage[gate]``).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

__all__ = ["build_gguf", "build_gptq", "build_nf4", "main"]

HERE = Path(__file__).parent
BUNDLED = HERE.parent.parent / "pytest_hemorrhage" / "assets" / "tiny-llama"
CORPUS = BUNDLED.parent / "corpus" / "train.txt"


def build_nf4(out: Path, source: Path = BUNDLED) -> Path:
    """bitsandbytes NF4 with double quantization, saved with ``save_pretrained``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        source, quantization_config=config, device_map="cpu"
    )
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


def _permute(w, heads: int):
    """llama.cpp's q/k row order: each head's rotary halves interleaved (convert_hf_to_gguf)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def build_gguf(out: Path, qtype: str = "Q8_0", source: Path = BUNDLED) -> Path:
    """A llama.cpp GGUF file of the bundled model: weight matrices in ``qtype`` (gguf's own
    quantizer), norms in F32, the byte-level BPE tokenizer in the file's metadata."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    config = json.loads((source / "config.json").read_text())
    tokenizer = json.loads((source / "tokenizer.json").read_text())
    weights = load_file(source / "model.safetensors")
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    kind = gguf.GGMLQuantizationType[qtype]

    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name(f"hemorrhage-tiny {qtype}")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(int(gguf.LlamaFileType[f"MOSTLY_{qtype}"]))

    vocab = tokenizer["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    special = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [int(gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL) for t in tokens]
    )
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])
    writer.add_add_bos_token(False)

    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_block = {
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
    for i in range(config["num_hidden_layers"]):
        for hf, gg in per_block.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    for hf, gg in names.items():
        w = weights[hf].astype(np.float32)
        if gg.endswith("attn_q.weight"):
            w = _permute(w, heads)
        elif gg.endswith("attn_k.weight"):
            w = _permute(w, kv_heads)
        if w.ndim == 1:
            writer.add_tensor(gg, w)
        else:
            writer.add_tensor(gg, gguf.quantize(w, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def build_gptq(out: Path, source: Path = BUNDLED, samples: int = 64, seq_len: int = 128) -> Path:
    """llm-compressor's GPTQ W4A16 (group size 128, symmetric int4 weights, ``lm_head`` kept),
    calibrated on ``samples`` windows of the bundled training corpus; run it in a venv with
    llmcompressor (see the module docstring)."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source)
    ids = tokenizer(CORPUS.read_text(encoding="utf-8"))["input_ids"]
    rows = [ids[i * seq_len : (i + 1) * seq_len] for i in range(samples)]
    data = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * seq_len] * samples})
    recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])
    oneshot(
        model=model,
        dataset=data,
        recipe=recipe,
        max_seq_length=seq_len,
        num_calibration_samples=samples,
    )
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory to write the artifacts into")
    parser.add_argument("--gptq", action="store_true", help="build the llm-compressor GPTQ one")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.gptq:
        print(build_gptq(args.out / "w4a16"))
        return
    print(build_nf4(args.out / "nf4"))
    for qtype in ("Q8_0", "Q4_0"):
        print(build_gguf(args.out / f"tiny-{qtype.lower()}.gguf", qtype))


if __name__ == "__main__":
    main()
