"""Core costs of a measure, side by side in one run (issue 2's targets).

For the bundled model and a ~50M-parameter random-init model of the same architecture:
  * time of measure() (apply + forward + metrics + restore) / time of a bare forward pass over
    the same windows with the same batching                      target <= 1.15x
  * baseline forward passes run by a second session with a warm cache   target 0
  * extra peak memory of measure() over a bare forward pass, / model bytes   target <= 0.25x
Peak memory is read from ru_maxrss in a fresh process per phase, so one phase's allocator
state cannot hide another's peak.

Run: python benchmarks/bench_core.py
"""

from __future__ import annotations

import argparse
import json
import resource
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
    """Run one phase in this (fresh) process and report its time and peak memory growth."""
    import torch

    torch.set_num_threads(1)  # steadier side-by-side ratios on a shared 2-core machine
    h = _harness(which, cache)
    calls = []
    h.model.register_forward_hook(lambda *a: calls.append(1))
    h.reference  # noqa: B018  (loads or computes)
    forwards_for_reference = len(calls)
    model_bytes = sum(p.numel() * p.element_size() for p in h.model.parameters())
    h.measure([MODIFICATIONS[0]]) if what != "forward" else list(h._batches())  # warm up
    start_rss = _rss_bytes()
    start = time.perf_counter()
    if what == "forward":
        for _ in h._batches():
            pass
    else:
        h.measure([MODIFICATIONS[int(what)]])
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "seconds": seconds,
        "peak_growth": max(0, peak - start_rss),
        "model_bytes": model_bytes,
        "reference_forwards": forwards_for_reference,
        "cached": h.reference_cached,
    }


def _run(which: str, what: str, cache: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--phase", which, what, str(cache)],
        capture_output=True,
        text=True,
        check=True,
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
            cold = _run(which, "forward", cache)
            forward = min(cold["seconds"], _run(which, "forward", cache)["seconds"])
            base_peak = cold["peak_growth"]
            for i, (name, _params) in enumerate(MODIFICATIONS):
                runs = [_run(which, str(i), cache) for _ in range(2)]
                seconds = min(r["seconds"] for r in runs)
                extra = max(0, min(r["peak_growth"] for r in runs) - base_peak)
                warm = runs[0]["reference_forwards"] if runs[0]["cached"] else "not cached!"
                print(
                    f"{which:10} {name:16} {seconds / forward:12.2f}x "
                    f"{extra / runs[0]['model_bytes']:16.2f}x {warm!s:>29}"
                )


if __name__ == "__main__":
    main()
