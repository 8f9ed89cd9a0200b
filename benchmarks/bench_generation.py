"""What the generation metrics cost, side by side in one run.

For the bundled model under 4-bit RTN (a parametrized weight, recomputed on every use):
  * time of measure() with gen_mismatch / time of measure() without it
  * KV-cached generation / recomputing every prefix (what a loop without a cache would cost)
  * generation inside parametrize.cached() / without it (weights recomputed at every step)

Run: python benchmarks/bench_generation.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from unittest import mock


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    from torch.nn.utils import parametrize

    from pytest_hemorrhage import generation
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

    plain = _best(lambda: harness.measure(stages), args.repeats)
    with_gen = _best(lambda: harness.measure(stages, gen), args.repeats)

    count, length, new = generation._plan(harness)
    ids = generation.prompts(harness, count, length)

    class Logits(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(input_ids=x, use_cache=False).logits

    with harness.modified(stages):
        cached = _best(lambda: generation.generate(harness.model, ids, new), args.repeats)
        full = _best(lambda: generation.generate(Logits(harness.model), ids, new), args.repeats)
        with mock.patch.object(parametrize, "cached", nullcontext):
            uncached = _best(lambda: generation.generate(harness.model, ids, new), args.repeats)

    print(f"prompts {count} x {length} tokens, {new} new tokens, 4-bit RTN, CPU")
    print(
        f"measure() with gen metrics / without      {with_gen / plain:6.2f}x  "
        f"({with_gen:.3f}s / {plain:.3f}s)"
    )
    print(
        f"recompute every prefix / KV-cached         {full / cached:6.2f}x  "
        f"({full:.3f}s / {cached:.3f}s)"
    )
    print(
        f"weights per step / parametrize.cached()    {uncached / cached:6.2f}x  "
        f"({uncached:.3f}s / {cached:.3f}s)"
    )


if __name__ == "__main__":
    main()
