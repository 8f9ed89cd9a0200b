"""Exploration cost on the bundled model, measured side by side in one run.

1. N hypothesis examples of a ``hemorrhage`` test vs N bare forward passes over the same
   evaluation windows (target: <= 1.3x). Run through pytest with the plugin, the baseline
   reference already cached (as in CI after the first run). Forward calls are counted with a
   forward hook on the model. For time, every example is paired with a bare forward pass (and
   a direct ``harness.measure()``) timed right before it, so that the machine's load affects
   both sides alike; neither is counted in the example's time or forward calls.
   Two runs: a property that holds (generation only), and one that breaks (generation and
   shrinking; a failed ``check()`` runs its blame diagnostics only on the example hypothesis
   reports, see ``explore.hypothesis.reporting_example``).
2. Bisection: measures needed to reach tol 0.01 on [0, 1] (target: <= 8).

Exits non-zero when a target is missed.

Run: python -m benchmarks.bench_explore [--tokens 8192] [--examples 20]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

from benchmarks.common import Targets

CONFTEST = '''
import json, os, time
from pathlib import Path

import pytest

from benchmarks.common import forward_pass
from pytest_hemorrhage.explore import hypothesis
from pytest_hemorrhage.plugin import session_key

STATS = {"forward": 0, "examples": 0, "seconds": 0.0, "bare": 0.0, "measure": 0.0}
COUNTING = [True]

@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    hypothesis.configure(config)


@pytest.fixture(scope="session", autouse=True)
def count_forwards(hemorrhage_model):
    def count(*args):
        STATS["forward"] += COUNTING[0]

    handle = hemorrhage_model.model.register_forward_hook(count)
    yield
    handle.remove()


def paired(harness):
    """Time one bare pass and one direct measure (not counted), right before an example."""
    COUNTING[0] = False
    try:
        start = time.perf_counter()
        forward_pass(harness)
        middle = time.perf_counter()
        harness.measure([("prune.magnitude", {"sparsity": 0.3})], frozenset({"ppl_increase"}))
        end = time.perf_counter()
    finally:
        COUNTING[0] = True
    return middle - start, end - middle


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_call(item):
    harness = item.config.stash[session_key].harness()
    inner = item.obj.hypothesis.inner_test
    spent = [0.0]

    def timed(*args, **kwargs):
        bare, measure = paired(harness)
        STATS["bare"] += bare
        STATS["measure"] += measure
        spent[0] += bare + measure
        STATS["examples"] += 1
        return inner(*args, **kwargs)

    item.obj.hypothesis.inner_test = timed
    start = time.perf_counter()
    try:
        with hypothesis.hypothesis_call(item, item.config.stash[session_key]):
            return (yield)
    finally:
        STATS["seconds"] += time.perf_counter() - start - spent[0]
        item.obj.hypothesis.inner_test = inner


def pytest_sessionfinish(session):
    Path(os.environ["BENCH_OUT"]).write_text(json.dumps(STATS))
'''

TESTS = """
import pytest
from hypothesis import given, settings
from pytest_hemorrhage import strategies as hst

@pytest.mark.hemorrhage(ppl_increase={budget})
@settings(max_examples={examples}, database=None)
@given(sparsity=hst.sparsities(max_value={max_sparsity}))
def test_property(hemorrhage, sparsity):
    hemorrhage.check(hemorrhage.measure("prune.magnitude", sparsity=sparsity))
"""


def run_pytest(
    directory: Path, tokens: int, *, budget: float, max_sparsity: float, examples: int
) -> dict[str, float]:
    """One in-process pytest run of the property; its counters."""
    import pytest

    (directory / "conftest.py").write_text(CONFTEST)
    (directory / "test_bench.py").write_text(
        textwrap.dedent(TESTS.format(budget=budget, examples=examples, max_sparsity=max_sparsity))
    )
    out = directory / "stats.json"
    os.environ["BENCH_OUT"] = str(out)
    cwd = os.getcwd()
    os.chdir(directory)
    try:
        for name in ("conftest", "test_bench"):
            sys.modules.pop(name, None)
        pytest.main(
            [
                "-q",
                "-p",
                "no:cacheprovider",
                "--no-header",
                "-o",
                "addopts=",
                "--hemorrhage-model=hemorrhage-tiny",
                f"--hemorrhage-tokens={tokens}",
                f"--hemorrhage-cache-dir={directory / 'cache'}",
                "-W",
                "ignore",
                "--tb=no",
                "--no-summary",
                "test_bench.py",
            ]
        )
    finally:
        os.chdir(cwd)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--examples", type=int, default=20)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)  # steadier side-by-side ratios on a shared 2-core machine
    from pytest_hemorrhage.budget import Budget
    from pytest_hemorrhage.fixture import Hemorrhage
    from pytest_hemorrhage.harness import Harness
    from pytest_hemorrhage.loading import load_model
    from pytest_hemorrhage.session import HemorrhageSession
    from pytest_hemorrhage.settings import Settings

    loaded = load_model("hemorrhage-tiny", device="cpu")
    harness = Harness(loaded, Settings.defaults(model="hemorrhage-tiny", tokens=args.tokens))
    windows = harness.windows.eval
    batches = -(-len(windows) // harness.batch_size)
    print(
        f"bundled model, {len(windows)} windows x {windows.shape[1]} tokens, "
        f"{batches} forward call(s) per pass, torch threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )

    targets = Targets()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        # fill the reference cache first, so the runs below measure the steady state
        run_pytest(directory, args.tokens, budget=10.0, max_sparsity=0.1, examples=1)
        runs = [
            (
                "property holds (generation only)",
                dict(budget=10.0, max_sparsity=0.3, examples=args.examples),
            ),
            (
                "property breaks (generation + shrinking)",
                dict(budget=0.10, max_sparsity=0.9, examples=args.examples),
            ),
        ]
        for label, options in runs:
            stats = run_pytest(directory, args.tokens, **options)
            n = stats["examples"]
            print(f"\n{label}: {n} examples")
            calls = stats["forward"] / (n * batches)
            seconds = stats["seconds"] / stats["bare"]
            print(
                f"  forward calls: {stats['forward']} vs {n * batches} for {n} bare passes "
                f"-> ratio {calls:.2f} "
                f"(target <= 1.3: {targets.at_most(f'{label}: forward calls', calls, 1.3)})"
            )
            print(
                f"  time: {stats['seconds']:.1f} s vs {stats['bare']:.1f} s for {n} paired "
                f"bare passes -> ratio {seconds:.2f} "
                f"(target <= 1.3: {targets.at_most(f'{label}: time', seconds, 1.3)})"
            )
            print(
                f"  of which harness.measure() itself: {stats['measure'] / stats['bare']:.2f}x "
                f"a bare pass; hypothesis + pytest + check() on top: "
                f"{stats['seconds'] / stats['measure']:.2f}x"
            )

    node = SimpleNamespace(nodeid="bench::bisection", user_properties=[], config=None)
    for name in ("prune.magnitude", "prune.wanda"):
        session = HemorrhageSession(harness.settings)
        fixture = Hemorrhage(harness, Budget({"ppl_increase": 0.10}), node, session)
        start = time.perf_counter()
        threshold = fixture.find_threshold(name, "sparsity", lo=0.0, hi=1.0, tol=0.01)
        seconds = time.perf_counter() - start
        passing, failing = threshold.bracket
        width = (failing - passing) if None not in (passing, failing) else float("nan")
        verdict = targets.at_most(f"bisection {name}: measures", threshold.evaluations, 8)
        print(
            f"\nbisection {name} sparsity, ppl_increase <= 0.10, tol 0.01 on [0, 1]: "
            f"{threshold.evaluations} measures (target <= 8: {verdict}), threshold "
            f"{threshold.value:.4f}, bracket width {width:.4f}, {seconds:.1f} s, "
            f"monotone={threshold.monotone}"
        )
    targets.finish()


if __name__ == "__main__":
    main()
