"""Cost of every registered modification, side by side in one run (issue 3's targets).

For each registered modification, with its default (typical) parameters, on the bundled model:
  apply+restore / forward   time of ``harness.modified(config)`` around nothing (apply, undo,
                            pristine check) over the time of one baseline forward pass over
                            the evaluation windows                            target: small
  forward slowdown          a forward pass over the same windows while it is applied, over the
                            baseline's (weights recomputed on use, swapped kernels)
  kept / model              tensor bytes the modification holds while applied, before any
                            forward pass, over the model's bytes
  extra peak / model        peak tensor bytes allocated from apply through one modified
                            forward pass over the windows to the restore, minus the peak of a
                            baseline forward pass, over the model's bytes       target <= 0.25x

Memory is what torch's allocator hands out (``common.Allocations``: exact, immune to the
allocator's caching). Times are medians of ``--repeat`` rounds: apply+restore and the baseline
forward side by side in each round, the applied forward in rounds of its own right after.
Every family module is imported, so modifications not yet listed as built-ins are covered too.

Exits non-zero when a target is missed.

Run: python -m benchmarks.bench_modifications [--model tiny|50m] [--tokens N] [--repeat N]
     [--threads N]
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from typing import Any

from benchmarks.common import Allocations, Targets, forward_pass, model_bytes, side_by_side
from benchmarks.models import MODELS, load


def _register_all_families() -> list[str]:
    from pytest_hemorrhage import modifications
    from pytest_hemorrhage.modifications import names

    prefix = f"{modifications.__name__}."
    for info in pkgutil.walk_packages(modifications.__path__, prefix):  # family packages too
        importlib.import_module(info.name)
    return names()


def measure(harness: Any, name: str, repeat: int) -> dict[str, float]:
    """Apply+restore and a modified forward pass over a baseline one (medians of ``repeat``
    rounds), and the kept and peak tensor bytes."""
    from pytest_hemorrhage.modifications import make

    config = make(name)

    def apply_restore() -> None:
        with harness.modified([config]):
            pass

    apply_restore()  # warm up: calibration statistics are computed once per session
    rounds = side_by_side(
        {"apply": apply_restore, "baseline": lambda: forward_pass(harness)}, repeat
    )
    with harness.modified([config]):
        forward_pass(harness)  # warm up (kernels, caches)
        modified = side_by_side({"forward": lambda: forward_pass(harness)}, repeat)
    with Allocations(harness.device) as memory:
        with harness.modified([config]):
            memory.mark()
            forward_pass(harness)
    return {
        "apply": rounds.ratio("apply", "baseline"),
        "forward": modified.median("forward") / rounds.median("baseline"),
        "kept": memory.at_mark,
        "peak": memory.peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=MODELS, default="tiny")
    parser.add_argument("--tokens", type=int, default=8192, help="evaluation tokens")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of timing (medians)")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (default: torch's); 1 steadies a busy machine",
    )
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from pytest_hemorrhage.harness import Harness
    from pytest_hemorrhage.settings import Settings

    torch.manual_seed(0)
    loaded = load(args.model)
    harness = Harness(loaded, Settings.defaults(tokens=args.tokens))
    size = model_bytes(harness.model)
    names = _register_all_families()
    forward_pass(harness)  # warm up
    forward = side_by_side({"forward": lambda: forward_pass(harness)}, args.repeat)
    with Allocations(harness.device) as baseline:
        forward_pass(harness)
    print(
        f"model {loaded.spec}: {size / 2**20:.1f} MiB, {len(harness.windows.eval)} "
        f"windows of {harness.settings.seq_len} tokens, forward {forward.median('forward'):.3f} s, "
        f"forward peak {baseline.peak / size:.2f}x model, "
        f"{torch.get_num_threads()} threads, {harness.device}"
    )
    print(
        f"{'modification':28} {'apply+restore':>13} {'forward':>9} {'kept':>7} {'extra peak':>10}"
    )
    print(
        f"{'(default parameters)':28} {'/ forward':>13} {'slowdown':>9} {'/ model':>7} "
        f"{'/ model':>10}"
    )
    targets = Targets()
    for name in names:
        try:
            row = measure(harness, name, args.repeat)
        except Exception as exc:  # e.g. a kernel this machine lacks: say so, go on
            print(f"{name:28} n/a: {type(exc).__name__}: {str(exc).splitlines()[0][:60]}")
            continue
        extra = max(0, row["peak"] - baseline.peak) / size
        print(
            f"{name:28} {row['apply']:12.3f}x {row['forward']:8.2f}x "
            f"{row['kept'] / size:6.3f}x {extra:9.3f}x "
            f"{targets.at_most(f'{name}: extra peak/model', extra, 0.25)}"
        )
    targets.finish()


if __name__ == "__main__":
    main()
