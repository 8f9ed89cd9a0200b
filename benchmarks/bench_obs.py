"""Cost and memory of GPTQ and SparseGPT (modifications/obs.py), side by side in one run.

For each setting, on the bundled model (or a ~50M-parameter random-init Llama with ``--large``):
  * first apply: calibration + solves, / one forward pass over the calibration windows, with
    the solves' own time apart. Target (issue 10): <= 3x the forward pass plus the solves.
  * second run, cached: a new harness (empty session memo) reading the disk cache; apply +
    restore / one forward pass over the evaluation windows. Target: <= 0.1x.
  * held: bytes the parametrizations keep while applied / bytes of the target weights.
  * extra peak: the process's peak resident memory during the first apply minus its peak
    after loading and one forward pass over the calibration windows, / the model's bytes, with
    one layer's (the largest) Hessian alongside. Each setting runs in its own process for that.
    Target: <= 0.25x the model's bytes plus one layer's Hessian.

The disk cache is ``Settings.cache_dir`` (``--hemorrhage-cache-dir``), a temporary directory here.

Run: python benchmarks/bench_obs.py [--large]
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

SETTINGS = [
    ("quant.gptq", {"bits": 4}),
    ("quant.gptq", {"bits": 3, "act_order": True}),
    ("prune.sparsegpt", {"sparsity": 0.6}),
    ("prune.sparsegpt", {"n": 2, "m": 4}),
]


def _loaded(large: bool):
    import torch

    from pytest_hemorrhage.loading import LoadedModel, load_model

    tiny = load_model("hemorrhage-tiny", device="cpu")
    if not large:
        return tiny
    from transformers import LlamaConfig, LlamaForCausalLM

    g = torch.Generator().manual_seed(0)
    config = LlamaConfig(
        vocab_size=tiny.model.config.vocab_size,
        hidden_size=640,
        intermediate_size=1728,
        num_hidden_layers=10,
        num_attention_heads=10,
        num_key_value_heads=5,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02 if p.dim() > 1 else torch.ones_like(p))
    return LoadedModel(model=model, tokenizer=tiny.tokenizer, spec="random-50m")


def _harness(loaded, cache_dir: Path | None):
    from pytest_hemorrhage.harness import Harness
    from pytest_hemorrhage.settings import Settings

    return Harness(loaded, Settings.defaults(model=loaded.spec, tokens=2048, cache_dir=cache_dir))


def _forward(h, windows) -> float:
    import torch

    start = time.perf_counter()
    with torch.no_grad():
        for ids in windows.split(8):
            h.context.logits(ids)
    return time.perf_counter() - start


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_one(name: str, params: dict, large: bool, cache_dir: Path) -> dict:
    """One setting, in this process: every figure but the ratios."""
    import torch

    from pytest_hemorrhage.modifications import make, obs

    torch.set_num_threads(2)
    loaded = _loaded(large)
    h = _harness(loaded, cache_dir)
    calibration = h.context.calibration_windows()
    _forward(h, calibration)
    forward_calibration = min(_forward(h, calibration) for _ in range(2))
    before_peak = _peak_bytes()

    solves = [0.0]
    for fn in ("gptq_quantize", "sparsegpt_prune"):
        real = getattr(obs, fn)

        def timed(*args, _real=real, **kwargs):
            start = time.perf_counter()
            try:
                return _real(*args, **kwargs)
            finally:
                solves[0] += time.perf_counter() - start

        setattr(obs, fn, timed)
    start = time.perf_counter()
    with h.modified([(name, params)]):
        first = time.perf_counter() - start
        extra_peak = _peak_bytes() - before_peak
        targets = make(name, params).targets(h.model)
        held = 0
        for t in targets:
            fn = t.module.parametrizations.weight[0].fn
            state = next(
                c.cell_contents for c in fn.__closure__ if isinstance(c.cell_contents, dict)
            )
            held += sum(v.numel() * v.element_size() for v in state.values())
    weight_bytes = sum(t.weight.numel() * t.weight.element_size() for t in targets)
    model_bytes = sum(p.numel() * p.element_size() for p in h.model.parameters())
    hessian_bytes = max(t.weight.shape[1] ** 2 * 4 for t in targets)

    second = _harness(loaded, cache_dir)  # a second pytest run: empty memo, warm disk cache
    evaluation = second.windows.eval
    _forward(second, evaluation)
    forward_eval = min(_forward(second, evaluation) for _ in range(2))
    start = time.perf_counter()
    with second.modified([(name, params)]):
        pass
    cached = time.perf_counter() - start
    return {
        "first": first,
        "solves": solves[0],
        "forward_calibration": forward_calibration,
        "cached": cached,
        "forward_eval": forward_eval,
        "held": held,
        "weight_bytes": weight_bytes,
        "model_bytes": model_bytes,
        "hessian_bytes": hessian_bytes,
        "extra_peak": extra_peak,
    }


def run(large: bool) -> None:
    with tempfile.TemporaryDirectory() as cache:
        print(
            f"model: {'random-50m' if large else 'hemorrhage-tiny'}; 16 calibration windows of "
            "128 tokens; each setting in its own process"
        )
        print(
            f"{'modification':44s} {'first/fwd':>9s} {'(solves)':>8s} {'target':>6s} "
            f"{'cached/eval':>11s} {'held/W':>6s} {'peak/model':>10s} {'+H/model':>8s}"
        )
        for name, params in SETTINGS:
            out = (
                subprocess.run(
                    [sys.executable, __file__, "--one", json.dumps([name, params, large, cache])],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            r = json.loads(out)
            fwd = r["forward_calibration"]
            first, solves = r["first"] / fwd, r["solves"] / fwd
            target = 3 + solves
            cached = r["cached"] / r["forward_eval"]
            peak = r["extra_peak"] / r["model_bytes"]
            hess = r["hessian_bytes"] / r["model_bytes"]
            flags = []
            if first > target:
                flags.append("FIRST OVER")
            if cached > 0.1:
                flags.append("CACHED OVER")
            if peak > 0.25 + hess:
                flags.append("PEAK OVER")
            label = f"{name} {params}"
            print(
                f"{label:44s} {first:8.2f}x {solves:7.2f}x {target:5.2f}x "
                f"{cached:10.3f}x {r['held'] / r['weight_bytes']:6.3f} {peak:10.3f} "
                f"{hess:8.3f}  {' '.join(flags)}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help="a ~50M-parameter random model")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one setting, JSON out
    args = parser.parse_args()
    if args.one:
        name, params, large, cache = json.loads(args.one)
        print(json.dumps(measure_one(name, params, large, Path(cache))))
    else:
        run(args.large)


if __name__ == "__main__":
    main()
