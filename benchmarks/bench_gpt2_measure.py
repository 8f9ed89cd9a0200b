"""A measure's cost on a ~57M-parameter GPT-2-style model, side by side in one run (issue 19).

GPT-2 keeps its projections as Conv1D, (in, out) weights that handlers see transposed, which
``bench_core``'s Llamas do not exercise. On 2,048 tokens (16 windows of 128, one batch):
  * time of measure() (apply + forward + metrics + restore + the end-of-test restore
    detection) / time of a bare forward pass over the same windows     target <= 1.15x
  * extra peak memory of measure() over a bare forward pass, / model bytes   target <= 0.25x
Measured as ``bench_core`` measures them (``common.time_or_peak``): the median over rounds of
measure / forward in the same round; the peak resident memory of a fresh process per phase,
after a warm-up run, with glibc told to free at once (``common.FREED_AT_ONCE``). A measure is
timed as a test suite repeats it: what a handler selects once per session (its memo) is
selected in the first round and the warm-up. Exits non-zero when a target is missed.

Run: python -m benchmarks.bench_gpt2_measure [--rounds N]
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

MODIFICATIONS = [
    ("quant.rtn", {"bits": 4, "group_size": 64}),
    ("prune.magnitude", {"sparsity": 0.5}),
]


def _harness(cache: Path):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from pytest_hemorrhage.harness import Harness
    from pytest_hemorrhage.loading import LoadedModel, load_model
    from pytest_hemorrhage.settings import Settings

    tiny = load_model("hemorrhage-tiny", device="cpu")
    torch.manual_seed(0)
    config = GPT2Config(  # 57.9M parameters with the bundled tokenizer's 512-token vocabulary
        vocab_size=len(tiny.tokenizer),
        n_positions=1024,
        n_embd=768,
        n_layer=8,
        n_head=12,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config).eval()
    loaded = LoadedModel(model=model, tokenizer=tiny.tokenizer, spec="gpt2-57m")
    return Harness(loaded, Settings.defaults(model=loaded.spec, tokens=2048, cache_dir=cache))


def phase(what: str, cache: Path, rounds: int) -> dict:
    """Run one phase in this (fresh) process: ``time``, ``forward`` or a modification's index
    (see ``common.time_or_peak``)."""
    import torch

    torch.set_num_threads(1)  # steadier side-by-side ratios on a shared machine
    h = _harness(cache)
    out = reference_figures(h)
    # a measure as a test runs it: with the fixture's end-of-test restore detection (checksums)
    runs = {"forward": lambda: list(h.chunks())} | {
        str(i): (lambda m=m: (h.measure([m]), h.check_pristine()))
        for i, m in enumerate(MODIFICATIONS)
    }
    return out | time_or_peak(runs, what, rounds)


def _run(what: str, cache: Path, rounds: int) -> dict:
    args = ("--phase", what, str(cache), "--rounds", str(rounds))
    return in_fresh_process(__spec__.name, *args, env=FREED_AT_ONCE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="timing rounds. Default: 7.")
    parser.add_argument("--phase", nargs=2, help=argparse.SUPPRESS)  # internal: JSON out
    args = parser.parse_args()
    if args.phase:
        what, cache = args.phase
        print(json.dumps(phase(what, Path(cache), args.rounds)))
        return
    targets = Targets()
    print(f"{'modification':16} {'time/forward':>17} {'extra peak/model':>21}")
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        _run("forward", cache, args.rounds)  # computes and stores the reference
        timing = _run("time", cache, args.rounds)
        base_peak = min(_run("forward", cache, args.rounds)["peak_growth"] for _ in range(2))
        for i, (name, _params) in enumerate(MODIFICATIONS):
            peak = min(_run(str(i), cache, args.rounds)["peak_growth"] for _ in range(2))
            extra = max(0, peak - base_peak) / timing["model_bytes"]
            t = timing["ratio"][str(i)]
            t_ok = targets.at_most(f"{name}: time/forward", t, 1.15)
            m_ok = targets.at_most(f"{name}: extra peak/model", extra, 0.25)
            print(f"{name:16} {t:12.2f}x {t_ok:>4} {extra:12.2f}x {m_ok:>7}")
    targets.finish()


if __name__ == "__main__":
    main()
