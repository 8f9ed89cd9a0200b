"""Costs of a measure on an encoder (the real all-MiniLM-L6-v2), side by side in one run.

  * time of measure() (apply + encoder forward + pooling + the four embedding metrics +
    restore) / time of a bare forward pass of the encoder over the same texts, same batches
                                                                   target <= 1.15x
  * encoder forward passes run by a second session with a warm cache   target 0
  * extra peak memory of measure() over a bare forward pass, / model bytes   target <= 0.25x
Method as benchmarks/bench_core.py: per round the forward and every measure back to back, the
median over rounds of each one's time over the forward's; peak resident memory in a fresh
process per phase with ``common.FREED_AT_ONCE`` (only the memory phases: see there why timing
runs without it). Exits non-zero when a target is missed.

Needs the extra pytest-hemorrhage[minilm]. Run: python -m benchmarks.bench_encoder
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.bench_core import MODIFICATIONS  # the same measures as on the causal LMs
from benchmarks.common import (
    FREED_AT_ONCE,
    Targets,
    in_fresh_process,
    reference_figures,
    time_or_peak,
)

TOKENS = 4096  # about 190 sentences of the bundled corpus
ROUNDS = 5


def _harness(cache: Path):
    from pytest_hemorrhage.harness import Harness
    from pytest_hemorrhage.loading import MINILM_NAME, load_model
    from pytest_hemorrhage.settings import Settings

    loaded = load_model(MINILM_NAME, device="cpu")
    return Harness(loaded, Settings.defaults(model=MINILM_NAME, tokens=TOKENS, cache_dir=cache))


def phase(what: str, cache: Path) -> dict:
    """One phase in this (fresh) process: ``time`` (ratios), or the peak memory growth of
    ``forward`` or of one modification's measure after a warm-up."""
    import torch

    torch.set_num_threads(1)  # steadier side-by-side ratios on a shared 2-core machine
    h = _harness(cache)
    out = reference_figures(h) | {"texts": len(h.texts.texts)}

    def bare_forward() -> None:
        with torch.inference_mode():
            for batch in h.texts.batches:
                h.model(**batch)

    runs = {"forward": bare_forward} | {
        str(i): (lambda m=m: h.measure([m])) for i, m in enumerate(MODIFICATIONS)
    }
    return out | time_or_peak(runs, what, ROUNDS)


def _run(what: str, cache: Path) -> dict:
    env = {} if what == "time" else FREED_AT_ONCE
    return in_fresh_process(__spec__.name, "--phase", what, str(cache), env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", nargs=2, help=argparse.SUPPRESS)  # internal: JSON out
    args = parser.parse_args()
    if args.phase:
        what, cache = args.phase
        print(json.dumps(phase(what, Path(cache))))
        return
    targets = Targets()
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        cold = _run("forward", cache)  # computes and stores the reference
        timing = _run("time", cache)  # a second session: the cache is warm
        warm = timing["reference_forwards"] if timing["cached"] else "not cached!"
        warm_ok = targets.check("warm-cache baseline forwards", warm == 0, str(warm))
        base_peak = min(_run("forward", cache)["peak_growth"] for _ in range(2))
        print(
            f"all-MiniLM-L6-v2, {timing['texts']} texts; cold session: "
            f"{cold['reference_forwards']} baseline forwards"
        )
        print(
            f"{'modification':16} {'time/forward':>17} {'extra peak/model':>21} "
            f"{'warm-cache baseline forwards':>29}"
        )
        for i, (name, _params) in enumerate(MODIFICATIONS):
            peak = min(_run(str(i), cache)["peak_growth"] for _ in range(2))
            extra = max(0, peak - base_peak) / timing["model_bytes"]
            t = timing["ratio"][str(i)]
            t_ok = targets.at_most(f"{name}: time/forward", t, 1.15)
            m_ok = targets.at_most(f"{name}: extra peak/model", extra, 0.25)
            print(f"{name:16} {t:12.2f}x {t_ok:>4} {extra:12.2f}x {m_ok:>7} {warm!s:>22} {warm_ok}")
    targets.finish()


if __name__ == "__main__":
    main()
