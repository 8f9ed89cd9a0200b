"""quant.kv_cache: what scoring windows through a quantized cache costs (issue 11's target).

On the bundled model, side by side in one process, per round: a plain measure (quant.rtn at 8
bits, a parametrization: one forward pass per batch), and quant.kv_cache measures at several
chunk sizes (each window fed in chunks through transformers' QuantizedCache, hqq backend). The
ratio is the median over rounds of kv_cache / plain in the same round.   target <= 2x

It also prints the damage per chunk size and why the cost grows: smaller chunks mean more tokens
read a quantized cache (with 128-token windows, chunk C leaves the first C tokens of each window
in full precision), and more of the cache is quantized. With residual_length=0 transformers
re-quantizes the whole cache at each chunk (HQQ's optimizer over every cached element), so a
window quantizes C + 2C + ... + (n-1)C positions per layer (the last chunk's re-quantization,
which nothing reads, is skipped). 64 is the default chunk. Exits non-zero when the target is
missed at the default chunk.

Run: python -m benchmarks.bench_kv_cache [--rounds 5] [--tokens 8192]
"""

from __future__ import annotations

import argparse

from benchmarks.common import Targets, side_by_side


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=8192)
    args = parser.parse_args()

    import torch

    from pytest_hemorrhage.harness import Harness
    from pytest_hemorrhage.loading import load_model
    from pytest_hemorrhage.settings import Settings

    # one thread: on a shared machine a second one straggles and the ratios swing (19x at 32
    # tokens measured with two threads under load, 4.3x with one, the same code)
    torch.set_num_threads(1)
    harness = Harness(
        load_model("hemorrhage-tiny", device="cpu"),
        Settings.defaults(model="hemorrhage-tiny", tokens=args.tokens),
    )
    plain = [("quant.rtn", {"bits": 8})]
    chunks = (16, 32, 64)
    cases = {c: [("quant.kv_cache", {"bits": 4, "chunk": c})] for c in chunks}
    harness.measure(plain)  # the reference, computed before timing
    damage: dict[int, float] = {}

    def kv_cache(c: int) -> None:
        damage[c] = harness.measure(cases[c]).metrics["kl_mean"]

    runs = {"plain": lambda: harness.measure(plain)}
    runs |= {str(c): lambda c=c: kv_cache(c) for c in chunks}
    timing = side_by_side(runs, args.rounds)
    targets = Targets()
    print(
        f"bundled model, {harness.windows.eval.numel()} tokens in windows of "
        f"{harness.windows.eval.shape[1]}; {args.rounds} rounds"
    )
    print(
        "chunk  kv_cache(4 bits)/plain measure  kl_mean   scored tokens reading the cache  "
        "positions quantized per window"
    )
    seq = harness.windows.eval.shape[1]
    for c in chunks:
        scored = seq - 1  # the last token of a window is only a target
        reading = max(0, scored - c)
        n = -(-seq // c)
        volume = c * n * (n - 1) // 2
        ratio = timing.ratio(str(c), "plain")
        # the target is the default chunk's; smaller ones show how the cost grows
        verdict = targets.at_most(f"chunk {c}: kv_cache/plain", ratio, 2) if c == 64 else ""
        print(
            f"{c:5d}  {ratio:30.2f}x  {damage[c]:.5f}   "
            f"{reading:3d}/{scored} ({reading / scored:.0%}){'':15s}{volume:<8} {verdict}"
        )
    targets.finish()


if __name__ == "__main__":
    main()
