#!/usr/bin/env python
"""Train the wide sibling of the bundled tiny Llama: every weight row a multiple of 256 wide.

llama.cpp's K-quants (Q2_K ... Q6_K) pack 256 weights per block along a row, and the bundled
model's rows are 128 and 384 wide, so there every K-quant falls back to another type. This
model is trained exactly as the bundled one (``scripts/train_tiny_model.py``: same corpus,
tokenizer, seed, optimizer, schedule and step count) with hidden size 256, intermediate size
768 and 2 blocks, then stored as float16 to stay under 5 MB (loaded as float32 on CPU; the
reported perplexity is that of the stored weights). It lives in ``tests/assets/tiny-llama-wide``
and is a test fixture for ``quant.gguf``'s K-quants.

Usage::

    python scripts/train_wide_model.py [--steps N] [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import platform
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "tests" / "assets" / "tiny-llama-wide"
WIDE = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 2}

TRAINING_MD = """\
# tiny-llama-wide

The wide sibling of the bundled `hemorrhage-tiny` (see
`pytest_hemorrhage/assets/tiny-llama/TRAINING.md`): the same corpus, tokenizer, seed,
optimizer, schedule and step count (`scripts/train_tiny_model.py`), with hidden size 256,
intermediate size 768 and 2 blocks, so that every weight row is a multiple of 256 wide, as
llama.cpp's K-quants need. Stored as float16 (< 5 MB); a test fixture for `quant.gguf`.

| metric | value |
|---|---|
| validation perplexity of the stored float16 weights (valid.txt) | **{valid_ppl:.4f}** |
| validation perplexity before the float16 cast | {valid_ppl32:.4f} |
| parameters | {n_params:,} |
| steps | {steps} |
| safetensors SHA-256 | `{sha}` |
| wall time | {wall:.0f} s ({machine}, torch {torch_version}) |

Reproduce with:

    python scripts/train_wide_model.py --steps {steps}
"""


def _tiny_script():
    """``scripts/train_tiny_model.py`` as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        "train_tiny_model", REPO_ROOT / "scripts" / "train_tiny_model.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=700)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)

    tiny = _tiny_script()
    tiny.MODEL_KW.update(WIDE)
    start = time.perf_counter()
    tiny.main(["--steps", str(args.steps), "--out", str(args.out)])

    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(args.out, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.out)
    valid = tiny.encode(tokenizer, (tiny.CORPUS_DIR / "valid.txt").read_text(encoding="ascii"))
    ppl32 = tiny.perplexity(model, valid)
    model.half().save_pretrained(args.out, safe_serialization=True)
    ppl16 = tiny.perplexity(LlamaForCausalLM.from_pretrained(args.out, dtype=torch.float32), valid)
    sha = hashlib.sha256((args.out / "model.safetensors").read_bytes()).hexdigest()
    (args.out / "TRAINING.md").write_text(
        TRAINING_MD.format(
            valid_ppl=ppl16,
            valid_ppl32=ppl32,
            n_params=sum(p.numel() for p in model.parameters()),
            steps=args.steps,
            sha=sha,
            wall=time.perf_counter() - start,
            machine=f"{platform.machine()} CPU",
            torch_version=torch.__version__,
        ),
        encoding="utf-8",
    )
    print(f"float16 validation perplexity {ppl16:.4f} (float32 {ppl32:.4f}); saved to {args.out}")


if __name__ == "__main__":
    main()
