"""No leaks under faults: randomized compositions of the whole catalogue, faults injected at
random points, the model checked bit for bit against the baseline after each.

Compositions of 1-3 stages are drawn by hypothesis from ``strategies.modifications()`` (every
registered modification, valid random parameters), measured or applied with ``modified()``,
with one fault per composition drawn from:
  * ``none``        nothing injected (refusals such as HemorrhageError still count as faults
                    seen, not injected)
  * ``handler``     a stage's registered handler raises halfway: after its real work, so its
                    changes are on the patch
  * ``forward``     a forward hook on a random block raises on the model's next forward
  * ``keyboard``    KeyboardInterrupt raised by test code inside ``modified()``
  * ``fail``        ``pytest.fail`` raised by test code inside ``modified()``
  * ``shrinking``   a small @given run whose body fails for most examples inside
                    ``modified()``, so hypothesis shrinks (many more apply/undo cycles)
After each: the state_dict's bits and storage (tests/bit_identity.py), module tree, the
config's attributes, no parametrization left, and ``harness.check_pristine()``.

Prints leaks (target 0), faults injected per kind, and errors that are not faults (bugs,
target 0); exits non-zero when a target is missed.

Run: python -m benchmarks.bench_stress [--compositions 1000] [--tokens 256]
"""

from __future__ import annotations

import argparse
import collections
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch.nn.utils import parametrize

from benchmarks.common import Targets
from pytest_hemorrhage import strategies as hst
from pytest_hemorrhage.errors import HemorrhageError
from pytest_hemorrhage.modifications import names, registry
from tests.bit_identity import assert_restored, snapshot

FAULTS = ("none", "handler", "forward", "keyboard", "fail", "shrinking")


class Injected(Exception):
    """A fault this script raised (from a handler or a forward)."""


@dataclass
class Tally:
    """What the run saw."""

    compositions: int = 0
    applied: int = 0  # apply/undo cycles, hypothesis' shrinking included
    injected: collections.Counter[str] = field(default_factory=collections.Counter)
    refusals: int = 0  # HemorrhageError: a stage refused its parameters for this model
    leaks: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # exceptions that are neither
    names: collections.Counter[str] = field(default_factory=collections.Counter)


def compositions(model: torch.nn.Module) -> st.SearchStrategy[list[Any]]:
    """1-3 stages from the whole catalogue, with values for what no domain can guess."""
    blocks = len(registry.blocks(model)[1])
    extra = {
        "expand.layers": {
            "positions": st.lists(st.integers(-blocks, blocks - 1), min_size=1, max_size=3).map(
                tuple
            )
        },
        "prune.layers": {"count": st.integers(0, blocks - 1)},
    }
    params = {n: p for n, p in extra.items() if n in names()}
    return st.lists(hst.modifications(names=catalogue(), params=params), min_size=1, max_size=3)


def catalogue() -> list[str]:
    """The built-in modifications (not those a test suite registered in this process)."""
    return [n for n in names() if registry.get(n)[1].__module__.startswith("pytest_hemorrhage.")]


@contextmanager
def handler_raising(name: str):
    """``name``'s handler does its work, then raises (its changes are on the patch)."""
    config, handler = registry._REGISTRY[name]

    def halfway(*args: Any) -> None:
        handler(*args)
        raise Injected(f"{name}: raised halfway")

    registry._REGISTRY[name] = (config, halfway)
    try:
        yield
    finally:
        registry._REGISTRY[name] = (config, handler)


@contextmanager
def forward_raising(model: torch.nn.Module, block: int):
    """A forward hook on ``block`` that raises on the first forward through it."""

    def hook(*_: Any) -> None:
        raise Injected("forward raised")

    handle = registry.blocks(model)[1][block].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _state(model: torch.nn.Module) -> tuple[Any, ...]:
    return (
        [(n, id(m), type(m)) for n, m in model.named_modules()],
        sorted(model.config.to_dict().items(), key=lambda kv: kv[0])
        if hasattr(model, "config")
        else [],
        model.training,
    )


class Stress:
    """Runs compositions with faults against one harness and checks each restore."""

    def __init__(self, harness: Any, tally: Tally) -> None:
        self.harness, self.tally = harness, tally
        self.model = harness.model
        self.bits = snapshot(self.model)
        self.state = _state(self.model)
        self.ids = harness.windows.eval[:2].to(harness.device)

    def one(self, stages: list[Any], fault: str, where: int, via_measure: bool) -> None:
        t = self.tally
        t.compositions += 1
        t.names.update(s.name for s in stages)
        t.injected[fault] += fault != "none"
        raised: BaseException | None = None
        try:
            if fault == "shrinking":
                self._shrinking(stages)
            elif fault == "handler":
                with handler_raising(stages[where % len(stages)].name):
                    self._run(stages, via_measure)
            elif fault == "forward":
                blocks = len(registry.blocks(self.model)[1])
                with forward_raising(self.model, where % blocks):
                    self._run(stages, via_measure)
            else:
                self._run(stages, via_measure=False, body=fault)
        except (Injected, KeyboardInterrupt, pytest.fail.Exception) as exc:
            raised = exc
        except HemorrhageError as exc:
            raised = exc
            t.refusals += 1
        except Exception as exc:  # a bug in a modification: count it, then keep going
            raised = exc
            t.errors.append(f"{[s.name for s in stages]} {fault}: {type(exc).__name__}: {exc}")
        if fault in ("handler", "keyboard", "fail") and raised is None:
            t.errors.append(f"{[s.name for s in stages]} {fault}: the fault was swallowed")
        self._check(stages, fault)

    def _run(self, stages: list[Any], via_measure: bool, body: str = "none") -> None:
        h = self.harness
        self.tally.applied += 1
        if via_measure:
            h.measure(stages)
            return
        with h.modified(stages), torch.no_grad():
            h.context.logits(self.ids)
            if body == "keyboard":
                raise KeyboardInterrupt
            if body == "fail":
                pytest.fail("test code failed inside modified()", pytrace=False)

    def _shrinking(self, stages: list[Any]) -> None:
        """A small hypothesis run that fails inside ``modified()``: shrinking re-applies."""
        sizes = st.integers(0, 40)

        @settings(
            max_examples=8,
            deadline=None,
            database=None,
            derandomize=True,
            phases=(Phase.generate, Phase.shrink),
            report_multiple_bugs=False,
            suppress_health_check=list(HealthCheck),
        )
        @given(n=sizes)
        def user_test(n: int) -> None:
            self._run(stages, via_measure=False)
            with self.harness.modified(stages):
                assert n < 3, "over budget"  # fails for most n: shrinks toward n=3

        try:
            user_test()
        except AssertionError as exc:
            raise Injected("hypothesis shrank and reported") from exc

    def _check(self, stages: list[Any], fault: str) -> None:
        what = f"{[f'{s.name} {s.params()}' for s in stages]} fault={fault}"
        try:
            assert_restored(self.model, self.bits)
            assert _state(self.model) == self.state, "modules, config or mode changed"
            left = [n for n, m in self.model.named_modules() if parametrize.is_parametrized(m)]
            assert not left, f"parametrizations left on {left}"
            self.harness.check_pristine()
        except (AssertionError, HemorrhageError) as exc:
            self.tally.leaks.append(f"{what}: {exc}")
            for _, module in self.model.named_modules():  # best effort, so the run can go on
                for name in list(getattr(module, "parametrizations", {})):
                    parametrize.remove_parametrizations(module, name, leave_parametrized=False)
            with torch.no_grad():
                for key, tensor in self.model.state_dict().items():
                    if key in self.bits:
                        tensor.copy_(self.bits[key][0])
            self.harness._pristine.update(_versions(self.harness))


def _versions(harness: Any) -> dict[str, Any]:
    from pytest_hemorrhage.baseline import snapshot

    return snapshot(harness.model)


def run(harness: Any, count: int) -> Tally:
    """``count`` compositions with faults against ``harness``; the tally of what happened."""
    tally = Tally()
    stress = Stress(harness, tally)

    @settings(
        max_examples=count,
        deadline=None,
        database=None,
        derandomize=True,
        phases=(Phase.generate,),
        suppress_health_check=list(HealthCheck),
    )
    @given(
        stages=compositions(harness.model),
        fault=st.sampled_from(FAULTS),
        where=st.integers(0, 7),
        via_measure=st.booleans(),
    )
    def draw(stages: list[Any], fault: str, where: int, via_measure: bool) -> None:
        stress.one(stages, fault, where, via_measure)

    # derandomize=True: the draws depend only on this code and count, not on a seed
    draw()
    return tally


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--compositions", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()

    from pytest_hemorrhage.harness import Harness
    from pytest_hemorrhage.loading import load_model
    from pytest_hemorrhage.settings import Settings

    torch.set_num_threads(1)
    loaded = load_model("hemorrhage-tiny", device="cpu")
    harness = Harness(
        loaded,
        Settings.defaults(model="hemorrhage-tiny", tokens=args.tokens, calibration_windows=2),
    )
    start = time.perf_counter()
    tally = run(harness, args.compositions)
    seconds = time.perf_counter() - start
    print(
        f"compositions          {tally.compositions} ({tally.applied} apply/undo cycles, "
        f"{seconds:.0f} s)"
    )
    print(
        f"modifications drawn   {len(tally.names)} of {len(catalogue())}: "
        + ", ".join(f"{n} {c}" for n, c in sorted(tally.names.items()))
    )
    print(
        f"faults injected       {sum(tally.injected.values())}: "
        + ", ".join(f"{k} {tally.injected[k]}" for k in FAULTS if k != "none")
    )
    print(f"refusals (HemorrhageError) {tally.refusals}")
    targets = Targets()
    verdict = targets.at_most("errors (not faults)", len(tally.errors), 0)
    print(f"errors (not faults)   {len(tally.errors)}   (target 0: {verdict})")
    for line in tally.errors[:20]:
        print("   ", line)
    verdict = targets.at_most("leaks", len(tally.leaks), 0)
    print(f"leaks                 {len(tally.leaks)}   (target 0: {verdict})")
    for line in tally.leaks[:20]:
        print("   ", line)
    targets.finish()


if __name__ == "__main__":
    main()
