"""What the benchmarks share: timing side by side in rounds, resident memory, targets checked
with an exit status, phases in a fresh process, and the forward passes a ratio divides by.

Heavy imports (torch) stay inside the functions that need them.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "FREED_AT_ONCE",
    "ROOT",
    "Allocations",
    "PeakMeter",
    "Rounds",
    "Targets",
    "calibration_pass",
    "forward_pass",
    "in_fresh_process",
    "model_bytes",
    "peak_resident_bytes",
    "reference_figures",
    "resident_bytes",
    "side_by_side",
    "time_or_peak",
]

ROOT = Path(__file__).resolve().parents[1]  # the checkout

# glibc told to mmap every allocation over 64 KiB: a freed tensor then leaves the process at
# once, so a peak of resident memory counts what was alive together, not the heap's
# fragmentation. Every large temporary becomes a fresh mmap that the kernel zero-fills, a cost a
# process with glibc's default (adaptive) threshold does not pay: set it for memory, not timing.
FREED_AT_ONCE = {"MALLOC_MMAP_THRESHOLD_": "65536"}


@dataclass
class Rounds:
    """Seconds of named callables: per name, one entry per round."""

    seconds: dict[str, list[float]]

    def median(self, name: str) -> float:
        """The median seconds of ``name``."""
        return statistics.median(self.seconds[name])

    def ratio(self, name: str, over: str) -> float:
        """The median over rounds of ``name``'s seconds over ``over``'s in the same round."""
        pairs = zip(self.seconds[name], self.seconds[over], strict=True)
        return statistics.median(a / b for a, b in pairs)

    def ratios(self, over: str) -> dict[str, float]:
        """:meth:`ratio` of every name over ``over``."""
        return {name: self.ratio(name, over) for name in self.seconds}

    def each_round(self) -> Iterator[dict[str, float]]:
        """Per round, the seconds of every name (for a ratio of sums)."""
        for values in zip(*self.seconds.values(), strict=True):
            yield dict(zip(self.seconds, values, strict=True))


def side_by_side(fns: Mapping[str, Callable[[], object]], rounds: int) -> Rounds:
    """Each of ``fns`` called once per round, back to back in order, for ``rounds`` rounds.

    Load on the shared machine then hits neighbours alike, and the median of per-round ratios
    (:meth:`Rounds.ratio`) cancels most of it.
    """
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    return Rounds(seconds)


def time_or_peak(runs: Mapping[str, Callable[[], object]], what: str, rounds: int) -> dict:
    """One phase of a benchmark that runs each phase in a fresh process. ``what="time"``: every
    run's time over ``runs["forward"]``'s (:func:`side_by_side`, ``{"ratio": {name: median}}``);
    else the growth of peak resident memory over one run of ``runs[what]`` after a warm-up run
    (``{"peak_growth": bytes}``: the process's peak, so nothing before may have gone higher)."""
    if what == "time":
        return {"ratio": side_by_side(runs, rounds).ratios("forward")}
    runs[what]()  # warm up: allocator pools, lazy imports, the session memo
    start = resident_bytes()
    runs[what]()
    return {"peak_growth": max(0, peak_resident_bytes() - start)}


def _status_bytes(field: str) -> int:
    """A size from ``/proc/self/status`` (``VmRSS``, ``VmHWM``), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def resident_bytes() -> int:
    """This process's resident memory now."""
    return _status_bytes("VmRSS")


def peak_resident_bytes() -> int:
    """This process's peak resident memory since it started (or since ``PeakMeter.start``)."""
    return _status_bytes("VmHWM")


class PeakMeter:
    """Peak resident memory since :meth:`start` (the kernel's high-water mark, reset there),
    minus the resident memory at :meth:`start`; sampling would miss short peaks."""

    def start(self) -> None:
        import ctypes
        import gc

        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap pages leave before the baseline
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
        self.base = resident_bytes()

    def peak(self) -> int:
        return peak_resident_bytes() - self.base


class Allocations:
    """Peak and marked levels of tensor bytes allocated inside the block and still alive.

    On the CPU: ``torch.profiler`` with ``profile_memory=True`` reports every allocation and
    free with its size, and the running sum of those events is the tensor memory allocated since
    the block began and still alive (frees of older tensors are not reported, so they cannot
    hide a peak). Unlike resident memory it is exact and immune to the allocator's caching;
    unlike tracemalloc it sees torch's allocations; it does not see non-tensor Python objects.
    On CUDA: ``torch.cuda.max_memory_allocated``.
    """

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


class Targets:
    """The targets a benchmark checks: each judged where its figure is printed, and the exit
    status non-zero when any was missed (:meth:`finish`)."""

    def __init__(self) -> None:
        self.checked = 0
        self.missed: list[str] = []

    def at_most(self, what: str, value: float, limit: float) -> str:
        """``"ok"`` when ``value <= limit``, else ``"MISSED"`` (remembered)."""
        return self.check(what, value <= limit, f"{value:.4g} > {limit:.4g}")

    def at_least(self, what: str, value: float, limit: float) -> str:
        """``"ok"`` when ``value >= limit``, else ``"MISSED"`` (remembered)."""
        return self.check(what, value >= limit, f"{value:.4g} < {limit:.4g}")

    def check(self, what: str, ok: bool, why: str = "") -> str:
        """``"ok"`` or ``"MISSED"`` for a target judged by the caller."""
        self.checked += 1
        if not ok:
            self.missed.append(f"{what}: {why}" if why else what)
        return "ok" if ok else "MISSED"

    def finish(self) -> None:
        """Print the verdict; exit with status 1 when a target was missed."""
        if self.missed:
            print(f"\n{len(self.missed)} of {self.checked} targets MISSED:")
            for line in self.missed:
                print(f"  {line}")
            raise SystemExit(1)
        print(f"\nall {self.checked} targets met")


def in_fresh_process(
    module: str, *args: str, env: Mapping[str, str] | None = None, python: str = sys.executable
) -> Any:
    """``python -m module *args`` in a new process started in the checkout's root (so that
    ``benchmarks`` and this checkout's ``pytest_hemorrhage`` import there, whichever Python it
    is); the JSON value of the last line it prints."""
    run = subprocess.run(
        [python, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    if run.returncode:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def model_bytes(model: Any) -> int:
    """Bytes of a model's parameters (a tied weight counted once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def reference_figures(harness: Any) -> dict[str, Any]:
    """Load or compute ``harness``'s reference: the baseline forward passes that took, whether
    it came from the cache, and the model's bytes."""
    calls: list[int] = []
    handle = harness.model.register_forward_hook(lambda *args: calls.append(1))
    try:
        harness.reference  # noqa: B018  (loads or computes)
    finally:
        handle.remove()
    return {
        "model_bytes": model_bytes(harness.model),
        "reference_forwards": len(calls),
        "cached": harness.reference_cached,
    }


def forward_pass(harness: Any, windows: Any = None, model: Any = None) -> None:
    """One forward pass over ``windows`` (default: the evaluation windows) in the harness's own
    batches, inference mode, logits dropped batch by batch: a measure without its scoring.
    ``model`` runs them (default: the harness's, as modified now)."""
    for _ in harness.chunks(windows=windows, model=model):
        pass


def calibration_pass(harness: Any, windows: Any) -> None:
    """A forward pass over calibration ``windows`` 8 at a time, as calibration runs them."""
    import torch

    with torch.no_grad():
        for ids in windows.split(8):
            harness.context.logits(ids)
