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

Memory is what torch's CPU allocator hands out: ``torch.profiler`` with ``profile_memory=True``
reports every allocation and free with its size, and the running sum of those events is the
tensor memory allocated since the window began and still alive (frees of older tensors are not
reported, so they cannot hide a peak). Unlike RSS it is exact and immune to the allocator's
caching; unlike tracemalloc it sees torch's allocations. It does not see non-tensor Python
objects (a few KB here). On CUDA the same is read from ``torch.cuda.max_memory_allocated``.
Every family module is imported, so modifications not yet listed as built-ins are covered too.

Run: python benchmarks/bench_modifications.py [--model tiny|50m] [--tokens N] [--repeat N]
     [--threads N]
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import time
from collections.abc import Callable
from typing import Any


def _load(which: str) -> Any:
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


def _register_all_families() -> list[str]:
    from pytest_hemorrhage import modifications
    from pytest_hemorrhage.modifications import names

    for info in pkgutil.iter_modules(modifications.__path__):
        importlib.import_module(f"{modifications.__name__}.{info.name}")
    return names()


def _seconds(fn: Callable[[], Any], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _forward(harness: Any) -> None:
    for _ in harness.batches():  # the measure's own batching, without the metrics
        pass


class Allocations:
    """Peak and marked levels of tensor bytes allocated inside the block and still alive."""

    def __init__(self, device: Any) -> None:
        self.cuda = device.type == "cuda"
        self.peak = self.at_mark = 0

    def __enter__(self) -> Allocations:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            from torch.profiler import ProfilerActivity, profile

            self.profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self.profiler.__enter__()
        return self

    def mark(self) -> None:
        """Remember the current level (read at exit)."""
        import torch

        if self.cuda:
            self.at_mark = torch.cuda.memory_allocated() - self.start
        else:
            with torch.profiler.record_function("bench_mark"):  # its time stamp is the mark
                pass

    def __exit__(self, *exc: Any) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
            return
        self.profiler.__exit__(*exc)
        events = sorted(self.profiler.profiler.kineto_results.events(), key=lambda e: e.start_ns())
        level = 0
        for event in events:
            if event.name() == "[memory]":
                level += event.nbytes()
                self.peak = max(self.peak, level)
            elif event.name() == "bench_mark":
                self.at_mark = level


def measure(harness: Any, name: str, repeat: int) -> dict[str, float]:
    """Seconds of apply+restore, of a baseline and a modified forward pass (the best of
    ``repeat``, taken side by side so that load on the machine affects both alike), and the
    kept and peak tensor bytes."""
    from pytest_hemorrhage.modifications import make

    config = make(name)

    def apply_restore() -> None:
        with harness.modified([config]):
            pass

    apply_restore()  # warm up: calibration statistics are computed once per session
    seconds = _seconds(apply_restore, repeat)
    baseline = _seconds(lambda: _forward(harness), repeat)
    with harness.modified([config]):
        _forward(harness)  # warm up (kernels, caches)
        modified = _seconds(lambda: _forward(harness), repeat)
    with Allocations(harness.device) as memory:
        with harness.modified([config]):
            memory.mark()
            _forward(harness)
    return {
        "apply": seconds,
        "baseline": baseline,
        "forward": modified,
        "kept": memory.at_mark,
        "peak": memory.peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("tiny", "50m"), default="tiny")
    parser.add_argument("--tokens", type=int, default=8192, help="evaluation tokens")
    parser.add_argument("--repeat", type=int, default=3, help="timings keep the best of N")
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
    loaded = _load(args.model)
    harness = Harness(loaded, Settings.defaults(tokens=args.tokens))
    model_bytes = sum(t.numel() * t.element_size() for t in harness.model.state_dict().values())
    names = _register_all_families()
    _forward(harness)  # warm up
    forward = _seconds(lambda: _forward(harness), args.repeat)
    with Allocations(harness.device) as baseline:
        _forward(harness)
    print(
        f"model {loaded.spec}: {model_bytes / 2**20:.1f} MiB, {len(harness.windows.eval)} "
        f"windows of {harness.settings.seq_len} tokens, forward {forward:.3f} s, "
        f"forward peak {baseline.peak / model_bytes:.2f}x model, "
        f"{torch.get_num_threads()} threads, {harness.device}"
    )
    print(
        f"{'modification':28} {'apply+restore':>13} {'forward':>9} {'kept':>7} {'extra peak':>10}"
    )
    print(
        f"{'(default parameters)':28} {'/ forward':>13} {'slowdown':>9} {'/ model':>7} "
        f"{'/ model':>10}"
    )
    for name in names:
        try:
            row = measure(harness, name, args.repeat)
        except Exception as exc:  # e.g. a kernel this machine lacks: say so, go on
            print(f"{name:28} n/a: {type(exc).__name__}: {str(exc).splitlines()[0][:60]}")
            continue
        extra = max(0, row["peak"] - baseline.peak)
        print(
            f"{name:28} {row['apply'] / row['baseline']:12.3f}x "
            f"{row['forward'] / row['baseline']:8.2f}x "
            f"{row['kept'] / model_bytes:6.3f}x {extra / model_bytes:9.3f}x"
        )


if __name__ == "__main__":
    main()
