"""No leaks under faults, small: 50 randomized compositions of the whole catalogue with faults
injected at random points (see benchmarks/bench_stress.py for the 1,000-composition run)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest


def _stress():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_stress.py"
    spec = importlib.util.spec_from_file_location("bench_stress", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def stress():
    return _stress()


def test_fifty_compositions_with_faults_leave_the_baseline_bit_identical(
    tiny, make_harness, stress
):
    tally = stress.run(make_harness(tiny, tokens=256, calibration_windows=2), 50)
    assert tally.compositions == 50
    assert {k for k, n in tally.injected.items() if n} >= {"handler", "forward", "shrinking"}
    assert tally.leaks == []
    assert tally.errors == []


def test_a_leak_is_seen(tiny, make_harness, stress, monkeypatch):
    """The check can fail: an undo that forgets a parametrization is reported as a leak."""
    from pytest_hemorrhage.modifications import registry

    monkeypatch.setattr(registry.Patch, "undo", lambda self: self._undo.clear())
    harness = make_harness(tiny, tokens=256, calibration_windows=2)
    tally = stress.Tally()
    stress.Stress(harness, tally).one([registry.make("quant.rtn", {"bits": 2})], "none", 0, True)
    monkeypatch.undo()
    assert len(tally.leaks) == 1 and "quant.rtn" in tally.leaks[0]
