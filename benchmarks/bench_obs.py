"""Cost and memory of GPTQ, SparseGPT (quant/gptq.py, prune/sparsegpt.py) and AWQ (quant/awq.py),
side by side in one run (issue 10's targets). Every figure runs on one torch thread, both sides
of every ratio alike (on this shared 2-core machine a second thread straggles behind other
processes' work).

On the bundled model (default), per setting, in rounds; each ratio is the median over rounds of
the numerator over the denominator measured in the same round, so machine noise hits both alike:
  * first apply: a fresh harness (empty session memo) writing a fresh disk cache, as a first
    pytest run does; / (one forward pass over the calibration windows + the per-layer solves
    timed in isolation: the solver functions called alone on the inputs a first apply gave them,
    ``gptq.gptq_quantize``, ``sparsegpt.sparsegpt_prune``, ``awq.search_scale``). Target <= 3x.
    Also printed: the part outside the solves, (first - solves) / forward, the stricter reading
    (3 forward passes, plus the solves at their own cost).
  * cached: a second run (new harness, empty memo, the disk cache warm) applies and restores;
    / one forward pass over the evaluation windows of a default run (8192 tokens: 64 windows of
    128). Target <= 0.1x.
  * held: bytes the parametrizations keep while applied / bytes of the target weights.
With ``--llmcompressor`` and /tmp/llmc (a virtualenv with llm-compressor, see
compare_llmcompressor_obs.py), llm-compressor's ``oneshot`` for GPTQ W4, SparseGPT 60% and AWQ W4
(the compare scripts' recipes: zero points, llm-compressor's own grid choices) on the same model
and windows is timed there once, over a forward pass timed in that process.

With ``--large``: a 23.5M-parameter random-init Llama with Llama-7B's proportions (32 blocks,
MLP 2.69x the hidden size; hidden 256, vocab 512), so that one block's and one layer's share of
the model are a 7B model's (a layer's Hessian is 2% of the model, as down_proj's is in 7B);
each setting in its own process, for the extra peak memory of the first apply. The meter:
``common.PeakMeter``, the kernel's high-water mark of resident memory reset just before, minus
the resident memory at that moment, with ``common.FREED_AT_ONCE`` so that the mark counts what
was alive together, torch's tensors and everything else alike (tracemalloc sees no torch tensor;
sampling RSS misses short peaks; the mark cannot). The same
apply first runs on the bundled model, so that code pages read in once per process (LAPACK's)
do not count. A self-check fills 32 MiB under the meter. Extra = the apply's peak - a bare
forward pass's peak over the same windows (8 at a time, as the apply runs them: the activations
any measurement needs); / the model's bytes, against 0.25 + the largest target's Hessian
(in**2 float32) / the model's bytes. Also printed: the held state's share (SparseGPT's survivors
cannot be smaller than (1 - sparsity) of the target weights in their dtype) and that apply's
first / (forward + solves), the solves timed inside it (one apply: no median).

Exits non-zero when a target is missed.

Run: python -m benchmarks.bench_obs [--large] [--llmcompressor] [--rounds N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchmarks.common import (
    FREED_AT_ONCE,
    PeakMeter,
    Targets,
    calibration_pass,
    in_fresh_process,
    model_bytes,
)
from benchmarks.models import random_llama

SETTINGS = [
    ("quant.gptq", {"bits": 4}),
    ("quant.gptq", {"bits": 3, "act_order": True}),
    ("prune.sparsegpt", {"sparsity": 0.6}),
    ("prune.sparsegpt", {"n": 2, "m": 4}),
    ("quant.awq", {"bits": 4}),
]
LLMC = Path("/tmp/llmc/bin/python")
THREADS = 1  # both sides of every ratio alike; a second thread straggles on a shared machine


def _loaded(large: bool) -> Any:
    from pytest_hemorrhage.loading import load_model

    tiny = load_model("hemorrhage-tiny", device="cpu")
    if not large:
        return tiny
    return random_llama(  # Llama-7B's proportions (32 blocks, MLP 2.69x hidden), narrower
        tiny.tokenizer,
        "random-24m",
        vocab_size=tiny.model.config.vocab_size,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )


def _harness(loaded: Any, cache_dir: Path | None, tokens: int = 8192) -> Any:
    from pytest_hemorrhage.harness import Harness
    from pytest_hemorrhage.settings import Settings

    settings = Settings.defaults(model=loaded.spec, tokens=tokens, cache_dir=cache_dir)
    h = Harness(loaded, settings)
    h.context.calibration_windows()  # tokenized once, as in a session that has measured already
    return h


def _forward(h: Any, windows: Any) -> float:
    """Seconds of one forward pass over ``windows``, 8 at a time, as calibration runs them."""
    start = time.perf_counter()
    calibration_pass(h, windows)
    return time.perf_counter() - start


@contextlib.contextmanager
def _wrapping_solves(wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Iterator[None]:
    """The per-layer solves (``gptq.gptq_quantize``, ``sparsegpt.sparsegpt_prune``,
    ``awq.search_scale``) replaced by ``wrap(solve)`` while the block runs, then put back."""
    from pytest_hemorrhage.modifications.prune import sparsegpt
    from pytest_hemorrhage.modifications.quant import awq, gptq

    real = {
        (gptq, "gptq_quantize"): gptq.gptq_quantize,
        (sparsegpt, "sparsegpt_prune"): sparsegpt.sparsegpt_prune,
        (awq, "search_scale"): awq.search_scale,
    }
    for (module, name), fn in real.items():
        setattr(module, name, wrap(fn))
    try:
        yield
    finally:
        for (module, name), fn in real.items():
            setattr(module, name, fn)


def _recording_solves(
    calls: list[tuple[Callable[..., Any], tuple[Any, ...]]],
) -> contextlib.AbstractContextManager[None]:
    """Record each per-layer solve's function and inputs (cloned) while a first apply runs."""
    import torch

    def spy(fn: Callable[..., Any]) -> Callable[..., Any]:
        def record(*args: Any, **kwargs: Any) -> Any:  # kwargs: ``overwrite``, not repeated
            calls.append((fn, tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)))
            return fn(*args, **kwargs)

        return record

    return _wrapping_solves(spy)


def _solves(calls: list[tuple[Callable[..., Any], tuple[Any, ...]]]) -> float:
    """Seconds of the recorded solves, called alone (none modifies its inputs)."""
    start = time.perf_counter()
    for fn, args in calls:
        fn(*args)
    return time.perf_counter() - start


def _first_apply(loaded: Any, name: str, params: dict[str, Any]) -> float:
    """A first pytest run's apply: fresh harness, empty memo, an empty disk cache written."""
    with tempfile.TemporaryDirectory() as cache:
        h = _harness(loaded, Path(cache))
        start = time.perf_counter()
        with h.modified([(name, params)]):
            return time.perf_counter() - start


def _held(h: Any, name: str, params: dict[str, Any]) -> tuple[int, int]:
    """(bytes the applied parametrizations keep, bytes of the target weights)."""
    from pytest_hemorrhage.modifications import make

    held, weights, seen = 0, 0, set()
    for t in make(name, params).targets(h.model):
        weights += t.weight.numel() * t.weight.element_size()
        fn = t.module.parametrizations.weight[0].fn
        for cell in fn.__closure__ or ():
            value = cell.cell_contents
            tensors = value.values() if isinstance(value, dict) else [value]
            for v in tensors:
                if hasattr(v, "untyped_storage") and id(v) not in seen:  # AWQ: one per group
                    seen.add(id(v))
                    held += v.numel() * v.element_size()
    return held, weights


def measure_small(name: str, params: dict[str, Any], rounds: int) -> dict[str, Any]:
    """Every figure of one setting on the bundled model, in this process."""
    import torch

    torch.set_num_threads(THREADS)
    loaded = _loaded(False)
    h = _harness(loaded, None)
    calibration = h.context.calibration_windows()
    _forward(h, calibration)  # warm up
    calls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
    with _recording_solves(calls), h.modified([(name, params)]):  # untimed: the solves' inputs
        held, weights = _held(h, name, params)
    first, fwd_cal, solves, ratio, outside = [], [], [], [], []
    for _ in range(rounds):
        f, s = _forward(h, calibration), _solves(calls)
        a = _first_apply(loaded, name, params)
        first.append(a)
        fwd_cal.append(f)
        solves.append(s)
        ratio.append(a / (f + s))
        outside.append((a - s) / f)

    cached, fwd_eval, cached_ratio = [], [], []
    with tempfile.TemporaryDirectory() as cache:
        with _harness(loaded, Path(cache)).modified([(name, params)]):  # writes the cache
            pass
        evaluation = h.windows.eval
        _forward(h, evaluation)
        for _ in range(max(rounds, 5)):
            second = _harness(loaded, Path(cache))  # a second pytest run: empty memo
            f = _forward(second, evaluation)
            start = time.perf_counter()
            with second.modified([(name, params)]):
                pass
            c = time.perf_counter() - start
            cached.append(c)
            fwd_eval.append(f)
            cached_ratio.append(c / f)
    med = statistics.median
    return {
        "first": med(first),
        "forward_calibration": med(fwd_cal),
        "solves": med(solves),
        "first_ratio": med(ratio),
        "outside_ratio": med(outside),
        "cached": med(cached),
        "forward_eval": med(fwd_eval),
        "cached_ratio": med(cached_ratio),
        "eval_windows": list(evaluation.shape),
        "held": held,
        "weight_bytes": weights,
    }


def _timing_solves(seconds: list[float]) -> contextlib.AbstractContextManager[None]:
    """Add the time of each per-layer solve to ``seconds[0]`` (nothing kept: memory is measured
    around it)."""

    def timed(fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[0] += time.perf_counter() - start

        return run

    return _wrapping_solves(timed)


def measure_large(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Extra peak memory of a first apply of one setting, and that apply's time."""
    import torch

    from pytest_hemorrhage.modifications import make

    torch.set_num_threads(THREADS)
    # the same apply on the bundled model first: code pages (LAPACK's, the kernels') are read in
    # once per process and would otherwise count as the measured apply's memory
    with _harness(_loaded(False), None).modified([(name, params)]):
        pass
    loaded = _loaded(True)
    h = _harness(loaded, None, tokens=1024)
    calibration = h.context.calibration_windows()
    _forward(h, calibration)  # threads, allocator and lazy state warm before the baseline
    meter = PeakMeter()
    meter.start()
    probe = torch.empty(32 << 20, dtype=torch.uint8).fill_(1)  # the meter's self-check
    check = meter.peak()
    del probe
    meter.start()
    forward = _forward(h, calibration)
    forward_peak = meter.peak()
    solves = [0.0]
    meter.start()
    with _timing_solves(solves):
        start = time.perf_counter()
        with h.modified([(name, params)]):
            first = time.perf_counter() - start
            peak = meter.peak()
            held, weights = _held(h, name, params)
    targets = make(name, params).targets(h.model)
    return {
        "check": check,
        "peak": peak,
        "forward_peak": forward_peak,
        "held": held,
        "weight_bytes": weights,
        "model_bytes": model_bytes(h.model),
        "hessian_bytes": max(t.weight.shape[1] ** 2 * 4 for t in targets),
        "params": sum(p.numel() for p in h.model.parameters()),
        "first": first,
        "forward_calibration": forward,
        "solves": solves[0],
    }


def theirs() -> dict[str, Any]:
    """llm-compressor's oneshot for GPTQ W4 g128, SparseGPT 60% and AWQ W4 g128 (the recipes of
    compare_llmcompressor_obs.py and compare_llmcompressor_awq.py; run in /tmp/llmc's Python)."""
    import torch

    from benchmarks.compare_llmcompressor_awq import _awq_theirs
    from benchmarks.compare_llmcompressor_obs import _gptq_modifier, _sparse_modifier, _theirs

    torch.set_num_threads(THREADS)
    loaded = _loaded(False)
    h = _harness(loaded, None)
    windows = h.context.calibration_windows()
    _forward(h, windows)
    out = {"forward_calibration": statistics.median(_forward(h, windows) for _ in range(3))}
    out["quant.gptq"] = _theirs(loaded, windows, _gptq_modifier(None))[0]
    out["prune.sparsegpt"] = _theirs(loaded, windows, _sparse_modifier("0:0", 0.6))[0]
    out["quant.awq"] = _awq_theirs(loaded, windows)[0]
    return out


def _child(mode: str, *args: Any, python: str = sys.executable) -> dict[str, Any]:
    """One measurement in a fresh process (``python``: llm-compressor's own for ``theirs``)."""
    return in_fresh_process(
        __spec__.name, "--child", json.dumps([mode, *args]), env=FREED_AT_ONCE, python=python
    )


def run_small(rounds: int, llmcompressor: bool, targets: Targets) -> None:
    print(
        f"model: hemorrhage-tiny; 16 calibration windows of 128 tokens; {THREADS} torch "
        f"thread(s); medians over {rounds} rounds (cached: {max(rounds, 5)}), each setting in "
        "its own process"
    )
    print(
        f"{'modification':42s} {'first':>6s} {'fwd':>6s} {'solves':>6s} "
        f"{'first/(fwd+solves)':>18s} {'(first-solves)/fwd':>18s} "
        f"{'cached':>7s} {'eval fwd':>8s} {'cached/eval':>11s} {'held/W':>6s}"
    )
    results = {}
    for name, params in SETTINGS:
        r = _child("small", name, params, rounds)
        results[(name, json.dumps(params))] = r
        label = f"{name} {params}"
        flags = [
            targets.at_most(f"{label}: first/(fwd+solves)", r["first_ratio"], 3),
            targets.at_most(f"{label}: cached/eval", r["cached_ratio"], 0.1),
        ]
        print(
            f"{label:42s} {r['first']:5.2f}s {r['forward_calibration']:5.2f}s "
            f"{r['solves']:5.2f}s {r['first_ratio']:17.2f}x {r['outside_ratio']:17.2f}x "
            f"{r['cached'] * 1000:5.1f}ms {r['forward_eval']:7.2f}s {r['cached_ratio']:10.4f}x "
            f"{r['held'] / r['weight_bytes']:6.3f}  {'/'.join(flags)}"
        )
    print(
        f"targets: first/(fwd+solves) <= 3; cached/eval <= 0.1 (eval: "
        f"{'x'.join(map(str, r['eval_windows']))} tokens)"
    )
    if not llmcompressor:
        return
    if not LLMC.exists():
        print(f"llm-compressor: {LLMC} not found (see compare_llmcompressor_obs.py to make it)")
        return
    t = _child("theirs", python=str(LLMC))
    print(
        "\nfirst apply next to llm-compressor's oneshot (same model, windows and threads; "
        "each over a forward pass over the calibration windows timed in its own process)"
    )
    print(f"{'':42s} {'this project':>18s} {'llm-compressor':>18s}")
    for label, name, params in [
        ("GPTQ W4 g128", "quant.gptq", {"bits": 4}),
        ("SparseGPT 60%", "prune.sparsegpt", {"sparsity": 0.6}),
        ("AWQ W4 g128", "quant.awq", {"bits": 4}),
    ]:
        mine = results[(name, json.dumps(params))]
        fwd = t["forward_calibration"]
        print(
            f"{label:42s} {mine['first']:7.2f}s {mine['first'] / mine['forward_calibration']:7.1f}x"
            f"  {t[name]:7.2f}s {t[name] / fwd:7.1f}x"
        )


def run_large(targets: Targets) -> None:
    print(
        "model: random-init Llama, 32 blocks, hidden 256, MLP 688 (Llama-7B's proportions); "
        f"16 calibration windows of 128 tokens; {THREADS} torch thread(s); each setting in "
        "its own process"
    )
    print(
        f"{'modification':42s} {'peak':>6s} {'fwd peak':>8s} {'extra':>6s} {'held':>6s} "
        f"{'target':>6s} {'first/(fwd+solves)':>18s}   (memory / the model's bytes)"
    )
    for name, params in SETTINGS:
        r = _child("large", name, params)
        model = r["model_bytes"]
        target = 0.25 + r["hessian_bytes"] / model
        peak, forward, held = r["peak"] / model, r["forward_peak"] / model, r["held"] / model
        extra = peak - forward
        ratio = r["first"] / (r["forward_calibration"] + r["solves"])
        label = f"{name} {params}"
        verdict = targets.at_most(f"{label}: extra peak/model", extra, target)
        if extra > target and extra - held <= target:  # over by what the method must keep
            verdict += " (the held state alone)"
        print(
            f"{label:42s} {peak:6.3f} {forward:8.3f} {extra:6.3f} {held:6.3f} {target:6.3f} "
            f"{ratio:17.2f}x  {verdict}"
        )
    print(
        f"model: {r['params'] / 1e6:.1f}M parameters, {model / 2**20:.1f} MiB; largest Hessian "
        f"{r['hessian_bytes'] / 2**20:.2f} MiB; meter self-check: 32 MiB filled read as "
        f"{r['check'] / 2**20:.2f} MiB"
    )
    print(
        "peak: the apply's peak over the resident memory before it; fwd peak: a bare forward "
        "pass's over the calibration windows, 8 at a time, as the apply runs them; extra = peak "
        "- fwd peak, judged against target = 0.25 + one Hessian; held: the applied state (in it)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help="peak memory on a ~24M model")
    parser.add_argument("--llmcompressor", action="store_true", help="time llm-compressor too")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per setting (default 3)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one measurement, JSON out
    args = parser.parse_args()
    if args.child:
        mode, *rest = json.loads(args.child)
        fn = {"small": measure_small, "large": measure_large, "theirs": theirs}[mode]
        print(json.dumps(fn(*rest)))
        return
    targets = Targets()
    if args.large:
        run_large(targets)
    else:
        run_small(args.rounds, args.llmcompressor, targets)
    targets.finish()


if __name__ == "__main__":
    main()
