#!/usr/bin/env python
"""Cost of blame diagnostics and of task scoring, measured side by side on the bundled model.

Claims checked (printed as ratios; the exit status is non-zero when one fails):

- blame adds at most one forward pass of the modified model to a measurement (hooks, not
  re-runs); the baseline's pass is memoized once per session. One-at-a-time attribution costs
  one full measurement per block and runs only when asked.
- task scoring runs one forward pass per batch of items (all choices of several items padded
  together), not one per choice; both give the same log-likelihoods.

Times are medians of 3 calls (one where a second would not be the same work).

Run: python -m benchmarks.bench_blame_tasks [--model hemorrhage-tiny] [--tokens 2048]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import Targets, side_by_side
from pytest_hemorrhage.blame import diagnose
from pytest_hemorrhage.extras.tasks import DEFAULT_TASK, encode_task, load_task, score_task
from pytest_hemorrhage.harness import Harness
from pytest_hemorrhage.loading import load_model, model_logits
from pytest_hemorrhage.settings import Settings

STAGES = [("quant.rtn", {"bits": 3})]


def counted(model: Any, fn: Callable[[], Any], repeat: int = 3) -> tuple[Any, int, float]:
    """``fn()``'s value, the forward calls of ``model`` one call made, and the median seconds of
    ``repeat`` calls."""
    calls: list[int] = []
    values: list[Any] = []
    handle = model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        timing = side_by_side({"fn": lambda: values.append(fn())}, repeat)
    finally:
        handle.remove()
    return values[-1], len(calls) // repeat, timing.median("fn")


def per_choice(model: Any, encoded: Any) -> torch.Tensor:
    """The naive way: one forward pass per choice."""
    width = max(len(c) for c in encoded.continuations)
    loglik = torch.full((len(encoded.contexts), width), -float("inf"), dtype=torch.float64)
    with torch.inference_mode():
        for i, (ctx, conts) in enumerate(zip(encoded.contexts, encoded.continuations, strict=True)):
            for j, cont in enumerate(conts):
                ids = torch.tensor([(*ctx, *cont)[:-1]])
                logp = torch.log_softmax(model_logits(model, ids).float(), -1)[0]
                loglik[i, j] = sum(logp[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont))
    return loglik


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hemorrhage-tiny")
    parser.add_argument("--tokens", type=int, default=2048)
    args = parser.parse_args()
    torch.manual_seed(0)
    targets = Targets()
    loaded = load_model(args.model, device="cpu")
    harness = Harness(loaded, Settings.defaults(model=args.model, tokens=args.tokens))
    model = harness.model
    harness.reference  # noqa: B018  (computed before timing)

    print(
        f"model {args.model}: {len(harness.windows.eval)} evaluation windows of "
        f"{harness.settings.seq_len} tokens, batch {harness.batch_size}"
    )
    result, measure_calls, measure_s = counted(model, lambda: harness.measure(STAGES))
    _, first_calls, first_s = counted(model, lambda: diagnose(harness, result), repeat=1)
    _, blame_calls, blame_s = counted(model, lambda: diagnose(harness, result))
    _, attr_calls, attr_s = counted(
        model, lambda: diagnose(harness, result, attribution=True), repeat=1
    )
    print("\nblame (quant.rtn bits=3)")
    print(f"  measure                    {measure_calls:4d} forward calls  {measure_s:7.3f} s")
    print(
        f"  blame, first in session    {first_calls:4d} forward calls  {first_s:7.3f} s"
        "  (baseline pass memoized + modified pass)"
    )
    share = blame_calls / measure_calls
    print(
        f"  blame                      {blame_calls:4d} forward calls  {blame_s:7.3f} s"
        f"  -> +{blame_calls} forward ({share:.2f}x a measurement's, target <= 1: "
        f"{targets.at_most('blame: forward calls / a measurement', share, 1)}), "
        f"{blame_s / measure_s:.2f}x its time"
    )
    print(
        f"  blame with attribution     {attr_calls:4d} forward calls  {attr_s:7.3f} s"
        f"  -> {attr_s / measure_s:.1f}x a measurement's time (one per block + the pass)"
    )

    task = load_task(DEFAULT_TASK)
    encoded = encode_task(task, loaded.tokenizer, 512)
    choices = sum(len(c) for c in encoded.continuations)
    tokens = harness.batch_size * harness.settings.seq_len
    batched, batched_calls, batched_s = counted(
        model, lambda: score_task(model, encoded, device="cpu", batch_tokens=tokens).loglik
    )
    naive, naive_calls, naive_s = counted(model, lambda: per_choice(model, encoded), repeat=1)
    gap = (batched - naive).abs().max().item()
    print(f"\ntask scoring ({task.name}: {len(task.items)} items, {choices} choices)")
    print(f"  batched items              {batched_calls:4d} forward calls  {batched_s:7.3f} s")
    print(f"  one forward per choice     {naive_calls:4d} forward calls  {naive_s:7.3f} s")
    fewer = targets.check("task scoring: fewer forward calls", batched_calls < naive_calls)
    same = targets.at_most("task scoring: log-likelihood gap", gap, 1e-4)
    print(
        f"  -> {naive_calls / batched_calls:.0f}x fewer forward calls ({fewer}), "
        f"{naive_s / batched_s:.1f}x faster; largest log-likelihood gap {gap:.1e} "
        f"(target <= 1e-4: {same})"
    )
    targets.finish()


if __name__ == "__main__":
    main()
