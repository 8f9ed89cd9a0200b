"""Benchmarks: scripts that print ratios measured side by side in one run.

Run one from the checkout's root as a module, e.g. ``python -m benchmarks.bench_core``. A
script that checks a target prints ``ok`` or ``MISSED`` beside the figure and exits non-zero
when one is missed. What they share (timing in rounds, peak memory, targets, the models) is in
``benchmarks.common`` and ``benchmarks.models``.
"""
