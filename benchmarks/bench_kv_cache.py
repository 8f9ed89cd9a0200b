"""quant.kv_cache: what scoring windows through a quantized cache costs, at the default window
and at long ones (issue 22: <= 2x a plain measure at any chunk that is a multiple of 64).

Side by side in one process, per round: a plain measure (quant.rtn at 8 bits, a
parametrization: one forward pass per batch), and quant.kv_cache measures at several chunk
sizes (each window scored as if fed in chunks through the quantized cache, hqq backend, 4
bits). The ratio is the median over rounds of kv_cache / plain in the same round. Target:
<= 2x at every chunk that is a multiple of 64.

- the default window: the bundled model, 128-token windows, chunks 16, 32 and 64 (16 and 32
  show the cost of more forward passes; they are not targets);
- long windows (``--long``, default 4,096 and 16,384 tokens): one window each, on a small
  random-init Llama (benchmarks/models.py: the bundled model's shape and vocabulary, its
  positions widened to the window), chunks 64 and 256.

Each key and value is quantized once, so quantizing costs in proportion to the window, not its
square, and a model with SDPA attention (these two) scores a window in one forward pass whose
attention reads each chunk's quantized past (see the module docstring of
``pytest_hemorrhage/modifications/quant/kv_cache.py``). What remains: HQQ's optimizer, up to 20
passes of a dozen elementwise operations over each cached element, about 0.5x the plain forward
pass per token on a model this narrow (512 cached elements per token against 0.8M weights; at
real widths the cache is a far smaller share of the work); and attention under a mask, chunk by
chunk, where one pass over the window runs a causal kernel (about 1.1x its attention at 4,096
tokens in 64-token chunks, 1.4x at 16,384). Fed chunk by chunk through the cache instead (the
path of models the one pass does not cover), the same windows cost 2.0-2.2x at 64-token chunks:
the whole model runs once per chunk. It also prints the damage (kl_mean) and the share of
scored tokens reading a quantized cache.

Run: python -m benchmarks.bench_kv_cache [--rounds 3] [--tokens 8192] [--long 4096,16384]
"""

from __future__ import annotations

import argparse

from benchmarks.common import Targets, side_by_side

DEFAULT_CHUNKS = (16, 32, 64)
LONG_CHUNKS = (64, 256)


def _harness(loaded, tokens: int, seq_len: int):
    from pytest_hemorrhage.harness import Harness
    from pytest_hemorrhage.settings import Settings

    settings = Settings.defaults(
        model=loaded.spec, tokens=tokens, seq_len=seq_len, calibration_windows=0
    )
    return Harness(loaded, settings)


def _measure(harness, chunks, rounds: int, label: str, targets: Targets) -> None:
    """Time the plain measure and kv_cache at ``chunks`` side by side; print one line each."""
    plain = [("quant.rtn", {"bits": 8})]
    harness.measure(plain)  # the reference, computed before timing
    damage: dict[int, float] = {}

    def kv_cache(c: int) -> None:
        config = {"bits": 4, "chunk": c}
        damage[c] = harness.measure([("quant.kv_cache", config)]).metrics["kl_mean"]

    runs = {"plain": lambda: harness.measure(plain)}
    runs |= {str(c): lambda c=c: kv_cache(c) for c in chunks}
    timing = side_by_side(runs, rounds)
    windows, seq = harness.windows.eval.shape
    print(
        f"\n{label}: {windows} window(s) of {seq} tokens; {rounds} rounds; plain measure "
        f"{timing.median('plain'):.2f} s"
    )
    print("chunk  kv_cache(4 bits)/plain  kl_mean    scored tokens reading a quantized cache")
    for c in chunks:
        scored = seq - 1  # the last token of a window is only a target
        reading = max(0, scored - c)
        ratio = timing.ratio(str(c), "plain")
        verdict = targets.at_most(f"{label}, chunk {c}", ratio, 2) if c % 64 == 0 else ""
        print(
            f"{c:5d}  {ratio:22.2f}x  {damage[c]:.3e}  {reading}/{scored} "
            f"({reading / scored:.0%})  {verdict}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument(
        "--long", default="4096,16384", help="long window lengths, comma-separated ('' for none)"
    )
    args = parser.parse_args()

    import torch

    from benchmarks.models import random_llama
    from pytest_hemorrhage.loading import load_model

    # one thread: on a shared machine a second one straggles and the ratios swing
    torch.set_num_threads(1)
    targets = Targets()
    tiny = load_model("hemorrhage-tiny", device="cpu")
    default = _harness(tiny, args.tokens, 128)
    _measure(default, DEFAULT_CHUNKS, args.rounds, "bundled model, default window", targets)
    shape = {
        k: getattr(tiny.model.config, k)
        for k in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
        )
    }
    for length in (int(n) for n in args.long.split(",") if n):
        model = random_llama(
            tiny.tokenizer, f"random-{length}", max_position_embeddings=length, **shape
        )
        label = f"random Llama of the bundled shape, {length}-token window"
        _measure(_harness(model, length, length), LONG_CHUNKS, args.rounds, label, targets)
    targets.finish()


if __name__ == "__main__":
    main()
