"""The memory pre-check's estimate (``pytest_hemorrhage.memory``) beside the real peak of a
measure, at a few window lengths on a small random-init Llama with the bundled vocabulary.

Each window length runs in a fresh process (``--peak L``): the peak resident memory from
before the model is built to after its reference and one ``quant.rtn`` measure, with glibc
returning freed tensors at once (``common.FREED_AT_ONCE``). Targets: the estimate is an upper
bound (measured <= estimate) within 2x (estimate <= 2 x measured), so the pre-check neither
lets an out-of-memory run start nor refuses one that fits by much.

    python -m benchmarks.bench_memory [--windows 2048,8192,16384] [--attention sdpa|eager]
"""

from __future__ import annotations

import argparse
import json

from benchmarks.common import FREED_AT_ONCE, PeakMeter, Targets, in_fresh_process

# Small enough that a 16k window measures in a minute on two cores, wide enough in the MLP that
# the body's activations, not the interpreter, make the peak.
CONFIG = {
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": False,
}


def peak(seq_len: int, attention: str) -> dict[str, float]:
    """One measure at ``seq_len``: its peak resident bytes beside the estimate."""
    import torch
    from transformers import LlamaConfig

    from benchmarks.models import random_llama
    from pytest_hemorrhage.baseline import RESTORE_COPY_BYTES
    from pytest_hemorrhage.harness import Harness, auto_batch
    from pytest_hemorrhage.loading import load_model
    from pytest_hemorrhage.memory import estimate_measure
    from pytest_hemorrhage.settings import Settings

    tokenizer = load_model("hemorrhage-tiny", device="cpu").tokenizer
    config = {**CONFIG, "vocab_size": len(tokenizer), "max_position_embeddings": seq_len}
    settings = Settings.defaults(seq_len=seq_len, tokens=seq_len)
    estimate = estimate_measure(
        LlamaConfig(**config, attn_implementation=attention),
        seq_len=seq_len,
        batch_size=auto_batch(seq_len, config["vocab_size"]),
        tokens=settings.tokens,
        dtype_bytes=4,
        restore_copy_limit=RESTORE_COPY_BYTES,
    )
    meter = PeakMeter()
    meter.start()
    loaded = random_llama(tokenizer, "random", **config)
    loaded.model.set_attn_implementation(attention)
    with torch.inference_mode():
        harness = Harness(loaded, settings)
        harness.reference  # noqa: B018  (computes it)
        harness.measure("quant.rtn")
    return {"measured": meter.peak(), "estimate": estimate.total}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peak", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--windows", default="2048,8192,16384")
    parser.add_argument("--attention", default="sdpa", choices=("sdpa", "eager"))
    args = parser.parse_args()
    if args.peak:
        print(json.dumps(peak(args.peak, args.attention)))
        return
    targets = Targets()
    print(f"{'window':>8} {'measured MB':>12} {'estimate MB':>12} {'ratio':>6}  ({args.attention})")
    for seq_len in (int(w) for w in args.windows.split(",")):
        got = in_fresh_process(
            "benchmarks.bench_memory",
            "--peak",
            str(seq_len),
            "--attention",
            args.attention,
            env=FREED_AT_ONCE,
        )
        ratio = got["estimate"] / got["measured"]
        verdict = (
            targets.at_least(f"{seq_len}: estimate / measured", ratio, 1.0),
            targets.at_most(f"{seq_len}: estimate / measured", ratio, 2.0),
        )
        print(
            f"{seq_len:>8} {got['measured'] / 1e6:>12.0f} {got['estimate'] / 1e6:>12.0f} "
            f"{ratio:>6.2f}  {' '.join(verdict)}"
        )
    targets.finish()


if __name__ == "__main__":
    main()
