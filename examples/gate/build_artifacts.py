"""Build the release artifacts of the gate example from the bundled model, with the tools users use.

    python examples/gate/build_artifacts.py OUT_DIR            # NF4 checkpoint + GGUF files
    /tmp/llmc/bin/python examples/gate/build_artifacts.py --gptq examples/gate/artifacts

- ``OUT_DIR/nf4``: bitsandbytes NF4 (4-bit NormalFloat, double quantization), saved with
  ``save_pretrained``; transformers reloads it from its ``quantization_config``.
- ``OUT_DIR/tiny-q8_0.gguf`` and ``OUT_DIR/tiny-q4_0.gguf``: llama.cpp GGUF files written by
  ``pytest_hemorrhage.modifications.quant.gguf.export.write_gguf`` (Q8_0 / Q4_0 blocks, norms in
  F32), with the tokenizer in the file, as llama.cpp's convert script lays them out (q/k rows
  permuted for its rotary layout). llama.cpp runs them (or transformers dequantizes them).
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


def build_gguf(out: Path, qtype: str = "Q8_0", source: Path = BUNDLED) -> Path:
    """A llama.cpp GGUF file of the bundled model: every matrix in ``qtype`` (``--pure``: the
    embeddings and the head too), norms in F32, the byte-level BPE tokenizer in the file's
    metadata; the blocks are ``gguf.quants.quantize``'s bytes (the project's port, equal to
    them byte for byte: tests/test_gguf.py)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pytest_hemorrhage.modifications.quant.gguf import Gguf
    from pytest_hemorrhage.modifications.quant.gguf.export import write_gguf

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source)
    return write_gguf(model, tokenizer, out, Gguf(type=qtype, pure=True))


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
