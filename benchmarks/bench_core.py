"""Core costs of a measure, side by side in one run (issue 2's targets).

For the bundled model and a ~50M-parameter random-init model of the same architecture:
  * time of measure() (apply + forward + metrics + restore + the end-of-test restore
    detection) / time of a bare forward pass over
    the same windows with the same batching                      target <= 1.15x
  * baseline forward passes run by a second session with a warm cache   target 0
  * extra peak memory of measure() over a bare forward pass, / model bytes   target <= 0.25x
Times come from one process: each round runs the forward and every measure back to back, and the
ratio is the median over rounds of measure / forward in the same round, so machine noise hits
both sides alike. Peak memory is read from ru_maxrss in a fresh process per phase,
with glibc told to mmap every allocation over 64 KiB (MALLOC_MMAP_THRESHOLD_): freed memory then
leaves the process at once, so the peak counts live tensors, not the heap's fragmentation.

Run: python benchmarks/bench_core.py
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


def _load(which: str):
    import torch

    from pytest_hemorrhage.loading import LoadedModel, load_model

    tiny = load_model("hemorrhage-tiny", device="cpu")
    if which == "tiny":
        return tiny
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tiny.model.config.vocab_size,
        hidden_size=640,
        intermediate_size=1728,
        num_hidden_layers=10,
        num_attention_heads=10,
        num_key_value_heads=5,
        tie_word_embeddings=False,
    )
    return LoadedModel(
        model=LlamaForCausalLM(config).eval(), tokenizer=tiny.tokenizer, spec="random-50m"
    )


def _harness(which: str, cache: Path):
    from pytest_hemorrhage.harness import Harness
    from pytest_hemorrhage.settings import Settings

    loaded = _load(which)
    tokens = 8192  # the default evaluation budget
    return Harness(loaded, Settings.defaults(tokens=tokens, cache_dir=cache))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


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
    calls = []
    h.model.register_forward_hook(lambda *a: calls.append(1))
    h.reference  # noqa: B018  (loads or computes)
    forwards_for_reference = len(calls)
    out = {
        "model_bytes": sum(p.numel() * p.element_size() for p in h.model.parameters()),
        "reference_forwards": forwards_for_reference,
        "cached": h.reference_cached,
    }
    # a measure as a test runs it: with the fixture's end-of-test restore detection (checksums)
    runs = {"forward": lambda: list(h.batches())} | {
        str(i): (lambda m=m: (h.measure([m]), h.check_pristine()))
        for i, m in enumerate(MODIFICATIONS)
    }
    if what == "time":
        rounds = []
        for _ in range(ROUNDS[which]):
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


ROUNDS = {"tiny": 15, "50m": 5}


def _run(which: str, what: str, cache: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--phase", which, what, str(cache)],
        capture_output=True,
        text=True,
        check=True,
        env=os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"},
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", nargs=3)
    args = parser.parse_args()
    if args.phase:
        which, what, cache = args.phase
        print(json.dumps(phase(which, what, Path(cache))))
        return
    print(
        f"{'model':10} {'modification':16} {'time/forward':>13} {'extra peak/model':>17} "
        f"{'warm-cache baseline forwards':>29}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for which in ("tiny", "50m"):
            cache = Path(tmp) / which
            _run(which, "forward", cache)  # computes and stores the reference
            timing = _run(which, "time", cache)  # a second session: the cache is warm
            warm = timing["reference_forwards"] if timing["cached"] else "not cached!"
            ratio = timing["ratio"]
            base_peak = min(_run(which, "forward", cache)["peak_growth"] for _ in range(2))
            for i, (name, _params) in enumerate(MODIFICATIONS):
                peak = min(_run(which, str(i), cache)["peak_growth"] for _ in range(2))
                extra = max(0, peak - base_peak) / timing["model_bytes"]
                print(f"{which:10} {name:16} {ratio[str(i)]:12.2f}x {extra:16.2f}x {warm!s:>29}")


if __name__ == "__main__":
    main()
