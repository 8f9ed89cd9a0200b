"""Assistant-only scoring of chat data against scoring the same windows over every token.

On the bundled model and its chat set (``--hemorrhage-data`` = the bundled conversations, 32
windows of 128 tokens by default), two harnesses over the same windows and reference measure
the same modification side by side in rounds: one scores the assistant's tokens (the default
for chat data: a mask over the per-token measures), the other no mask at all (every token,
as raw text is scored). Prints the median of per-round time ratios, the tokens each scored,
and the time of the masking itself (summarizing a measure's per-token stats with and without
the mask).

Target (the exit status is non-zero when it is missed): assistant-only / every token <= 1.05.

Run: python -m benchmarks.bench_chat [--rounds 6] [--tokens 4096]
"""

from __future__ import annotations

import argparse
import statistics
import time

from benchmarks.common import Targets, side_by_side

STAGE = [("quant.rtn", {"bits": 4})]
TARGET = 1.05


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=4096)
    args = parser.parse_args()

    import torch

    from pytest_hemorrhage.chat import BUNDLED_CHAT
    from pytest_hemorrhage.harness import Harness
    from pytest_hemorrhage.loading import load_model
    from pytest_hemorrhage.metrics import summarize, token_stats
    from pytest_hemorrhage.settings import Settings

    torch.set_num_threads(1)  # steadier on a shared machine; both sides alike
    tiny = load_model("hemorrhage-tiny", device="cpu")
    settings = Settings.defaults(
        model="hemorrhage-tiny", data=BUNDLED_CHAT, tokens=args.tokens, cache_dir=None
    )
    assistant = Harness(tiny, settings)
    every = Harness(tiny, settings)
    every.scored = None  # no mask: every token of the same windows, as raw text is scored
    assert torch.equal(assistant.windows.eval, every.windows.eval)
    every.__dict__["reference"] = assistant.reference  # one baseline for both
    a, e = assistant.measure(STAGE), every.measure(STAGE)  # warm-up
    print(
        f"{len(assistant.windows.eval)} windows of {assistant.windows.eval.shape[1]} tokens; "
        f"scored: assistant-only {a.tokens} tokens {a.details['scored']}, every token "
        f"{e.tokens} (padding included); kl_mean {a.metrics['kl_mean']:.4f} vs "
        f"{e.metrics['kl_mean']:.4f}"
    )
    fns = {"assistant": lambda: assistant.measure(STAGE), "every": lambda: every.measure(STAGE)}
    # half the rounds in each order, so that neither side always runs first
    forth = side_by_side(fns, (args.rounds + 1) // 2)
    back = side_by_side(dict(reversed(fns.items())), args.rounds // 2)
    seconds = {k: forth.seconds[k] + back.seconds[k] for k in fns}
    ratio = statistics.median(a / e for a, e in zip(*seconds.values(), strict=True))
    targets = Targets()
    print(
        f"measure {STAGE[0][0]} {STAGE[0][1]}: assistant-only "
        f"{statistics.median(seconds['assistant']):.3f} s, every token "
        f"{statistics.median(seconds['every']):.3f} s, median ratio {ratio:.3f} over "
        f"{args.rounds} rounds (target <= {TARGET}): "
        + targets.at_most("assistant-only / every token", ratio, TARGET)
    )

    # the masking alone: summarizing one measure's per-token stats, with and without the mask
    with assistant.modified(STAGE):
        logits = torch.cat([lg for lg, *_ in assistant.chunks()])
    reference = assistant.reference
    plain = token_stats(logits, reference)
    masked = assistant._marked(plain, reference)
    times = {}
    for name, stats in (("mask", masked), ("no mask", plain)):
        start = time.perf_counter()
        for _ in range(20):
            summarize(stats, reference)
        times[name] = (time.perf_counter() - start) / 20
    print(
        f"summarize: with the mask {times['mask'] * 1e3:.2f} ms, without "
        f"{times['no mask'] * 1e3:.2f} ms, against "
        f"{statistics.median(seconds['every']) * 1e3:.0f} ms a measure"
    )
    targets.finish()


if __name__ == "__main__":
    main()
