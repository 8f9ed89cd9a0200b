"""Core costs of a measure, side by side in one run (issue 2's targets).

For the bundled model and a ~50M-parameter random-init model of the same architecture:
  * time of measure() (apply + forward + metrics + restore + the end-of-test restore
    detection) / time of a bare forward pass over
    the same windows with the same batching                      target <= 1.15x
  * baseline forward passes run by a second session with a warm cache   target 0
  * extra peak memory of measure() over a bare forward pass, / model bytes   target <= 0.25x
Times come from one process: each round runs the forward and every measure back to back, and the
ratio is the median over rounds of measure / forward in the same round, so machine noise hits
both sides alike. Peak memory is the peak resident memory of a fresh process per phase, with
glibc told to mmap every allocation over 64 KiB (``common.FREED_AT_ONCE``): freed memory then
leaves the process at once, so the peak counts live tensors, not the heap's fragmentation.
Exits non-zero when a target is missed.

Run: python -m benchmarks.bench_core
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.common import (
    FREED_AT_ONCE,
    Targets,
    in_fresh_process,
    reference_figures,
    time_or_peak,
)
from benchmarks.models import MODELS, load

MODIFICATIONS = [
    ("quant.rtn", {"bits": 4, "group_size": 64}),
    ("prune.magnitude", {"sparsity": 0.5}),
]
ROUNDS = {"tiny": 15, "50m": 5}


def _harness(which: str, cache: Path):
    from pytest_hemorrhage.harness import Harness
    from pytest_hemorrhage.settings import Settings

    tokens = 8192  # the default evaluation budget
    return Harness(load(which), Settings.defaults(tokens=tokens, cache_dir=cache))


def phase(which: str, what: str, cache: Path) -> dict:
    """Run one phase in this (fresh) process.

    ``time``: forward and every measure, back to back in each round; per round each one's time
    over the forward's, median over rounds (machine noise hits neighbours alike).
    ``forward`` or a modification's index: peak memory growth of that one operation after a
    warm-up.
    """
    import torch

    torch.set_num_threads(1)  # steadier side-by-side ratios on a shared 2-core machine
    h = _harness(which, cache)
    out = reference_figures(h)
    # a measure as a test runs it: with the fixture's end-of-test restore detection (checksums)
    runs = {"forward": lambda: list(h.chunks())} | {
        str(i): (lambda m=m: (h.measure([m]), h.check_pristine()))
        for i, m in enumerate(MODIFICATIONS)
    }
    return out | time_or_peak(runs, what, ROUNDS[which])


def _run(which: str, what: str, cache: Path) -> dict:
    args = ("--phase", which, what, str(cache))
    return in_fresh_process(__spec__.name, *args, env=FREED_AT_ONCE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", nargs=3, help=argparse.SUPPRESS)  # internal: JSON out
    args = parser.parse_args()
    if args.phase:
        which, what, cache = args.phase
        print(json.dumps(phase(which, what, Path(cache))))
        return
    targets = Targets()
    print(
        f"{'model':10} {'modification':16} {'time/forward':>17} {'extra peak/model':>21} "
        f"{'warm-cache baseline forwards':>29}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for which in MODELS:
            cache = Path(tmp) / which
            _run(which, "forward", cache)  # computes and stores the reference
            timing = _run(which, "time", cache)  # a second session: the cache is warm
            warm = timing["reference_forwards"] if timing["cached"] else "not cached!"
            warm_ok = targets.check(f"{which}: warm-cache baseline forwards", warm == 0, str(warm))
            ratio = timing["ratio"]
            base_peak = min(_run(which, "forward", cache)["peak_growth"] for _ in range(2))
            for i, (name, _params) in enumerate(MODIFICATIONS):
                peak = min(_run(which, str(i), cache)["peak_growth"] for _ in range(2))
                extra = max(0, peak - base_peak) / timing["model_bytes"]
                t = ratio[str(i)]
                t_ok = targets.at_most(f"{which} {name}: time/forward", t, 1.15)
                m_ok = targets.at_most(f"{which} {name}: extra peak/model", extra, 0.25)
                print(
                    f"{which:10} {name:16} {t:12.2f}x {t_ok:>4} {extra:12.2f}x {m_ok:>7} "
                    f"{warm!s:>22} {warm_ok}"
                )
    targets.finish()


if __name__ == "__main__":
    main()
