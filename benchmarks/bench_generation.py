"""What the generation metrics cost, side by side in one run.

For the bundled model under 4-bit RTN (a parametrized weight, recomputed on every use):
  * time of measure() with gen_mismatch / time of measure() without it
  * KV-cached generation / recomputing every prefix (what a loop without a cache would cost)
  * generation inside parametrize.cached() / without it (weights recomputed at every step)
Each ratio is the median over ``--repeats`` rounds of its two sides timed back to back.

Run: python -m benchmarks.bench_generation [--repeats 3]
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from unittest import mock

from benchmarks.common import side_by_side


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    from torch.nn.utils import parametrize

    from pytest_hemorrhage.extras import generation
    from pytest_hemorrhage.harness import Harness
    from pytest_hemorrhage.loading import load_model
    from pytest_hemorrhage.settings import Settings

    torch.manual_seed(0)
    harness = Harness(
        load_model("hemorrhage-tiny", device="cpu"),
        Settings.defaults(model="hemorrhage-tiny", tokens=8192),
    )
    stages = [("quant.rtn", {"bits": 4})]
    gen = frozenset({"gen_mismatch"})
    harness.measure(stages, gen)  # warm: reference, baseline continuations

    measures = side_by_side(
        {"plain": lambda: harness.measure(stages), "gen": lambda: harness.measure(stages, gen)},
        args.repeats,
    )

    count, length, new = generation._plan(harness)
    ids = generation.prompts(harness, count, length)

    class Logits(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(input_ids=x, use_cache=False).logits

    def uncached() -> None:
        with mock.patch.object(parametrize, "cached", nullcontext):
            generation.generate(harness.model, ids, new)

    with harness.modified(stages):
        loops = side_by_side(
            {
                "cached": lambda: generation.generate(harness.model, ids, new),
                "full": lambda: generation.generate(Logits(harness.model), ids, new),
                "uncached": uncached,
            },
            args.repeats,
        )

    print(f"prompts {count} x {length} tokens, {new} new tokens, 4-bit RTN, CPU")
    for label, rounds, a, b in [
        ("measure() with gen metrics / without  ", measures, "gen", "plain"),
        ("recompute every prefix / KV-cached     ", loops, "full", "cached"),
        ("weights per step / parametrize.cached()", loops, "uncached", "cached"),
    ]:
        print(
            f"{label}    {rounds.ratio(a, b):6.2f}x  "
            f"({rounds.median(a):.3f}s / {rounds.median(b):.3f}s)"
        )


if __name__ == "__main__":
    main()
