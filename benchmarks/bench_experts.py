"""The cost of measuring every expert of a mixture-of-experts model, side by side in one run
(issue 20's targets).

On a seeded random-init Mixtral (8 experts, top-2, 4 blocks, ~54M parameters, 93% of them in
the fused expert weights) and the default evaluation budget (8,192 tokens, 64 windows of 128,
one batch):
  * time of measure() (apply to every expert + forward + metrics + restore + the end-of-test
    restore detection) / time of a bare forward pass over the same windows and batching
                                                                          target <= 1.2x
  * extra peak resident memory of measure() over a bare forward pass / model bytes
                                                                          target <= 0.3x
for ``quant.rtn`` and ``prune.magnitude``; each result's touched share is printed too (every
expert must be in it). And calibration that follows the router, over the calibration windows:
  * time of collecting the activation statistics (every linear layer's and each expert's on
    the tokens routed to it: what Wanda, AWQ, ASVD use) / time of one bare calibration forward
                                                                          target <= 1.5x
  * time of collecting each expert's Hessian ``X^T X`` on its routed tokens (what GPTQ and
    SparseGPT use) / time of one bare calibration forward: printed, no target (the products
    themselves cost ``in**2`` per routed token, about the experts' own forward again, as a
    dense layer's Hessian does)
Times: one process, one thread, the median over rounds of the per-round
ratio. Memory: a fresh process per phase (``PeakMeter`` after a warm-up, glibc returning freed
memory at once). Exits non-zero when a target is missed.

Run: python -m benchmarks.bench_experts [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import (
    FREED_AT_ONCE,
    PeakMeter,
    Targets,
    forward_pass,
    in_fresh_process,
    model_bytes,
    side_by_side,
)

MODIFICATIONS = {
    "quant.rtn": {"bits": 4, "group_size": 64},
    "prune.magnitude": {"sparsity": 0.5},
}
TIME_TARGET, MEMORY_TARGET, CALIBRATION_TARGET = 1.2, 0.3, 1.5
MIXTRAL = {
    "hidden_size": 512,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "tie_word_embeddings": False,
}


def _harness(cache: Path) -> Any:
    """A Harness on the seeded Mixtral (matrices N(0, 0.02) from a generator of its own)."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from pytest_hemorrhage.harness import Harness
    from pytest_hemorrhage.loading import LoadedModel, load_model
    from pytest_hemorrhage.settings import Settings

    tiny = load_model("hemorrhage-tiny", device="cpu")
    model = MixtralForCausalLM(MixtralConfig(vocab_size=len(tiny.tokenizer), **MIXTRAL)).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    loaded = LoadedModel(model=model, tokenizer=tiny.tokenizer, spec="mixtral-8x-random")
    return Harness(loaded, Settings.defaults(model=loaded.spec, cache_dir=cache))


def _runs(h: Any) -> dict[str, Any]:
    # a measure as a test runs it: with the fixture's end-of-test restore detection
    return {"forward": lambda: forward_pass(h)} | {
        name: (lambda stage=(name, params): (h.measure([stage]), h.check_pristine()))
        for name, params in MODIFICATIONS.items()
    }


def _calibration_runs(h: Any) -> dict[str, Any]:
    """One bare pass over the calibration windows, and the two routed collections over it."""
    from pytest_hemorrhage.modifications import make
    from pytest_hemorrhage.modifications.calibration import (
        calibration_forwards,
        input_stats,
        routed_grams,
    )

    experts = [t for t in make("quant.gptq").targets(h.model) if t.expert is not None]

    def statistics() -> None:
        h.memo.pop(("input_stats", h.context.applied), None)  # collected anew each round
        input_stats(h.model, h.context)

    def hessians() -> None:
        routed_grams(experts, lambda: calibration_forwards(h.context, []), h.model)

    return {
        "forward": lambda: calibration_forwards(h.context, []),
        "statistics": statistics,
        "hessians": hessians,
    }


def timing(cache: Path, rounds: int) -> dict[str, Any]:
    """Per modification, the median per-round ratio to the bare forward, and its touched
    record."""
    import torch

    torch.set_num_threads(1)  # steadier side-by-side ratios on a shared machine
    h = _harness(cache)
    h.reference  # noqa: B018  (computed once, or read from the cache)
    runs = _runs(h)
    for run in runs.values():
        run()  # warm-up: lazy imports, allocator pools
    rounds_ = side_by_side(runs, rounds)
    touched = {n: h.measure([(n, p)]).details["touched"] for n, p in MODIFICATIONS.items()}
    calibration = _calibration_runs(h)
    for run in calibration.values():
        run()
    routed = side_by_side(calibration, rounds)
    return {
        "ratio": {n: rounds_.ratio(n, "forward") for n in MODIFICATIONS},
        "calibration": {n: routed.ratio(n, "forward") for n in calibration if n != "forward"},
        "calibration_s": routed.median("forward"),
        "forward_s": rounds_.median("forward"),
        "touched": touched,
        "model_bytes": model_bytes(h.model),
    }


def peak(cache: Path, what: str) -> dict[str, Any]:
    """Peak resident growth of one run of ``what`` (``forward`` or a modification) after a
    warm-up, in this (fresh) process."""
    import torch

    torch.set_num_threads(1)
    h = _harness(cache)
    h.reference  # noqa: B018
    run = _runs(h)[what]
    run()
    meter = PeakMeter()
    meter.start()
    run()
    return {"peak": meter.peak()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds. Default: 3.")
    parser.add_argument("--phase", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        kind, cache, *rest = args.phase
        out = timing(Path(cache), args.rounds) if kind == "time" else peak(Path(cache), *rest)
        print(json.dumps(out))
        return
    module = "benchmarks.bench_experts"
    with tempfile.TemporaryDirectory() as tmp:
        in_fresh_process(module, "--phase", "peak", tmp, "forward")  # stores the reference
        times = in_fresh_process(module, "--phase", "time", tmp, "--rounds", str(args.rounds))
        base = min(
            in_fresh_process(module, "--phase", "peak", tmp, "forward", env=FREED_AT_ONCE)["peak"]
            for _ in range(2)
        )
        peaks = {
            name: min(
                in_fresh_process(module, "--phase", "peak", tmp, name, env=FREED_AT_ONCE)["peak"]
                for _ in range(2)
            )
            for name in MODIFICATIONS
        }
    size = times["model_bytes"]
    print(
        f"Mixtral 8 experts top-2, {size / 2**20:.0f} MiB of weights; a bare forward over the "
        f"evaluation windows: {times['forward_s']:.2f} s"
    )
    print(f"{'modification':16} {'touched':>8} {'time/forward':>13} {'extra peak/model':>17}")
    targets = Targets()
    for name in MODIFICATIONS:
        ratio = times["ratio"][name]
        extra = max(0, peaks[name] - base) / size
        share = times["touched"][name]["share"]
        verdicts = (
            targets.at_least(f"{name}: touched share", share, 0.95),
            targets.at_most(f"{name}: time/forward", ratio, TIME_TARGET),
            targets.at_most(f"{name}: extra peak/model", extra, MEMORY_TARGET),
        )
        print(
            f"{name:16} {share:8.1%} {ratio:12.2f}x {extra:16.2f}x  "
            f"(targets >=95%, <={TIME_TARGET}x, <={MEMORY_TARGET}x: {' '.join(verdicts)})"
        )
    print(
        f"calibration: {times['calibration_s']:.2f} s for one bare forward over the "
        "calibration windows; routed collection / that forward:"
    )
    ratio = times["calibration"]["statistics"]
    verdict = targets.at_most("routed statistics/forward", ratio, CALIBRATION_TARGET)
    print(f"  routed statistics      {ratio:6.2f}x  (target <={CALIBRATION_TARGET}x: {verdict})")
    print(f"  routed expert Hessians {times['calibration']['hessians']:6.2f}x  (no target)")
    sys.stdout.flush()
    targets.finish()


if __name__ == "__main__":
    main()
