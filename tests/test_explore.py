"""Threshold search, sweeps, hypothesis shrinking and their reporting, on the bundled model."""

from __future__ import annotations

import dataclasses
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# imported here, before the pytester runs: in-process runs drop the modules they imported
# first, and a second run would then mix two copies of hypothesis
from pytest_hemorrhage import explore, strategies  # noqa: F401
from pytest_hemorrhage.budget import Budget
from pytest_hemorrhage.errors import HemorrhageError
from pytest_hemorrhage.explore import hypothesis  # noqa: F401
from pytest_hemorrhage.fixture import Hemorrhage
from pytest_hemorrhage.modifications import Modification, register_modification
from pytest_hemorrhage.modifications.quant.rtn import rtn_quantize
from pytest_hemorrhage.report import plots, terminal
from pytest_hemorrhage.session import HemorrhageSession
from pytest_hemorrhage.settings import Settings

MODEL = (
    "--hemorrhage-model=hemorrhage-tiny",
    "--hemorrhage-tokens=1024",
    "-p",
    "no:cacheprovider",
    "--hypothesis-profile=hemorrhage-ci",
)


# Until plugin.py calls these itself, the pytester runs get the same wiring from a conftest.
# A modification whose damage grows with x except for a dip where it vanishes (non-monotone).
@dataclasses.dataclass(frozen=True, kw_only=True)
class Bump(Modification):
    x: float = 0.0


@register_modification("test.bump", Bump)
def _bump(config, model, patch, context):
    scale = 0.0 if 0.6 <= config.x <= 0.8 else config.x
    for target in config.targets(model):
        patch.parametrize(target, lambda w, s=scale: w * (1 + s))


# A quantizer that, like hqq, has no 5-7 bit formats: the search must skip them.
@dataclasses.dataclass(frozen=True, kw_only=True)
class Gappy(Modification):
    bits: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bits not in (1, 2, 3, 4, 8):
            raise HemorrhageError(f"{self.name}: bits={self.bits} unsupported; use 1-4 or 8")


@register_modification("test.gappy", Gappy)
def _gappy(config, model, patch, context):
    for target in config.targets(model):
        patch.parametrize(target, lambda w: rtn_quantize(w, config.bits, 32, True))


@pytest.fixture(scope="module")
def small(tiny):
    """A harness over the 8 windows the pytester runs below use (--hemorrhage-tokens=1024)."""
    from pytest_hemorrhage.harness import Harness
    from pytest_hemorrhage.settings import Settings

    return Harness(tiny, Settings.defaults(model="hemorrhage-tiny", tokens=1024))


def _fixture(harness, request, **budget) -> Hemorrhage:
    session = HemorrhageSession(harness.settings)
    return Hemorrhage(harness, Budget(budget), request.node, session)


def _ppl(harness, name, **params) -> float:
    return harness.measure([(name, params)]).metrics["ppl_increase"]


def test_bisection_reaches_tol_in_eight_measures(small, request):
    h = _fixture(small, request, ppl_increase=0.10)
    t = h.find_threshold("prune.magnitude", "sparsity", tol=0.01)
    assert t.evaluations <= 8
    assert t.value is not None and 0 < t.value <= 1
    passing, failing = t.bracket
    assert failing == t.value and (passing is None or failing - passing <= 0.01)
    [record] = h._session.explorations
    assert record["kind"] == "threshold" and record["method"] == "bisection"
    assert len(record["measurements"]) == t.evaluations
    # each point keeps the budget's metric, and broke means exactly "over the budget"
    assert record["metric"] == "ppl_increase"
    for p in record["measurements"]:
        assert p["metric"] == p["metrics"]["ppl_increase"], p
        assert p["broke"] == (p["metric"] > 0.10), p
    # the recorded value at the threshold is what a fresh measure there gives
    at = next(p for p in record["measurements"] if p["x"] == t.value)
    assert at["metric"] == _ppl(small, "prune.magnitude", sparsity=t.value)
    json.dumps(record, allow_nan=False)
    text = terminal.render_explorations(h._session.explorations, width=300)
    assert f"breaks at sparsity={t.value:.4g}" in text
    assert f"{t.evaluations} measures by bisection" in text


def test_integer_parameters_search_in_the_damage_direction(small, request):
    budget = (
        _ppl(small, "quant.rtn", bits=2, group_size=32)
        + _ppl(small, "quant.rtn", bits=8, group_size=32)
    ) / 2
    h = _fixture(small, request, ppl_increase=budget)
    t = h.find_threshold("quant.rtn", "bits", group_size=32)
    assert t.evaluations <= 4  # 1 + log2(7 gaps)
    assert isinstance(t.value, int) and 1 < t.value < 8
    assert t.bracket == (t.value + 1, t.value)  # fewer bits is harsher: passes one bit above
    assert all(isinstance(x, int) for x, _, _ in t.measurements)


def test_gaps_in_the_valid_values_are_skipped(small, request):
    budget = (_ppl(small, "test.gappy", bits=2) + _ppl(small, "test.gappy", bits=3)) / 2
    h = _fixture(small, request, ppl_increase=budget)
    t = h.find_threshold("test.gappy", "bits")
    assert {x for x, _, _ in t.measurements} <= {1, 2, 3, 4, 8}
    assert (t.value, t.bracket) == (2, (3, 2))


def test_non_monotone_damage_is_reported_not_hidden(small, request):
    budget = (_ppl(small, "test.bump", x=0.5) + _ppl(small, "test.bump", x=1.0)) / 2
    h = _fixture(small, request, ppl_increase=budget)
    t = h.find_threshold("test.bump", "x")
    assert not t.monotone
    assert "non-monotone" in t.note
    assert "non-monotone" in terminal.render_explorations(h._session.explorations, width=300)


def test_bad_calls_are_clear_errors(small, request):
    h = _fixture(small, request)
    with pytest.raises(HemorrhageError, match="needs a budget"):
        h.find_threshold("prune.magnitude", "sparsity")
    with pytest.raises(HemorrhageError, match="no parameter 'sparsty'; valid: sparsity, scope"):
        h.find_threshold("prune.magnitude", "sparsty", budget={"ppl_increase": 0.1})
    with pytest.raises(HemorrhageError, match="can't have 'ppl'"):
        h.find_threshold("prune.magnitude", "sparsity", budget={"ppl": 0.1})
    with pytest.raises(HemorrhageError, match="unknown metric"):
        h.sweep("prune.magnitude", "sparsity", [0.1, 0.2], metric="ppl")


def _profile(x: np.ndarray, y: np.ndarray, s0: float) -> tuple[np.ndarray, float]:
    """The piecewise law (power law up to s0, exponential above, continuous) fitted to log y
    by least squares with s0 fixed, written out independently of explore.fit:
    ((log a, b, c), residual sum of squares)."""
    below = x <= s0
    design = np.stack(
        [np.ones_like(x), np.where(below, np.log(x), np.log(s0)), np.where(below, 0.0, x - s0)],
        axis=1,
    )
    coef, *_ = np.linalg.lstsq(design, np.log(y), rcond=None)
    return coef, float(np.sum((design @ coef - np.log(y)) ** 2))


def test_sweep_says_why_magnitude_pruning_has_no_transition_here(small, request):
    h = _fixture(small, request, ppl_increase=0.10)
    values = [round(0.1 * i, 1) for i in range(1, 10)]
    s = h.sweep("prune.magnitude", "sparsity", values)
    assert s.values == values and len(s.metrics) == len(values)
    assert s.compression == values  # sparsity is its own compression axis
    assert s.metric == "ppl_increase" and s.curve == [m["ppl_increase"] for m in s.metrics]
    assert all(b == (m > 0.10) for b, m in zip(s.broke, s.curve, strict=True))
    # On the bundled model the curve bends at ~0.5 sparsity, but not sharply enough: the
    # exponential's rate is under twice the power law's there, so no transition is reported.
    assert s.s0 is None and s.s0_stderr is None and not s.fit.transition
    found = re.fullmatch(
        r"the exponential rate c=(\S+) is not clearly larger than the power "
        r"law's local growth b/s0=(\S+) \(for a kink at x=(\S+)\)",
        s.fit.reason,
    )
    assert found, s.fit.reason
    c, local, kink = (float(v) for v in found.groups())
    # the kink is where the piecewise law fits best among those keeping 3 points on each side
    x, y = np.array(s.compression), np.array(s.curve)
    grid = np.linspace(x[2], x[-3], 4001)[:-1]
    best = grid[int(np.argmin([_profile(x, y, k)[1] for k in grid]))]
    assert abs(best - kink) <= 0.001, (best, kink)
    (_, b, rate), _ = _profile(x, y, kink)
    assert rate == pytest.approx(c, rel=0.01) and b / kink == pytest.approx(local, rel=0.01)
    assert rate < 2 * b / kink  # the refusal's rule: the rate must be 2x the local growth
    [record] = h._session.explorations
    assert record["kind"] == "sweep" and len(record["points"]) == len(values)
    assert record["s0"] is None and record["fit"]["reason"] == s.fit.reason
    json.dumps(record, allow_nan=False)
    text = terminal.render_explorations(h._session.explorations, width=300)
    assert f"no phase transition (9 points): the exponential rate c={found.group(1)}" in text


def test_bits_are_fitted_on_the_bits_removed_axis(small, request):
    h = _fixture(small, request)
    s = h.sweep("quant.rtn", "bits", [8, 6, 4, 3, 2])
    assert s.compression == [8, 10, 12, 13, 14]  # bits removed from 16
    # 8 bits measures no damage (ppl_increase ~ -1e-3: noise), so the fit drops it and is
    # left with 4 points, too few for 3 on each side of a kink
    no_damage = sum(m <= 0 for m in s.curve)
    assert s.curve[0] <= 0 < min(s.curve[1:]) and no_damage == 1
    assert s.s0 is None and s.fit.n_points == 4
    assert s.fit.reason == (
        "too few points: 4 usable, need 3 on each side of s0 (1 point(s) "
        "dropped: non-finite, x <= 0 or no damage above baseline)"
    )


def test_collect_shrinking_reduces_examples_to_the_breaking_point():
    session = HemorrhageSession(Settings.defaults())
    item = SimpleNamespace(nodeid="t.py::test_x", user_properties=[])
    budget = {"ppl_increase": 0.1}
    # (sparsity, ppl_increase): non-monotone at 0.55 (passes above a break)
    for x, m in [
        (0.9, 0.5),
        (0.3, 0.01),
        (0.6, 0.2),
        (0.45, 0.05),
        (0.5, 0.12),
        (0.55, 0.08),
        (0.5, 0.12),
    ]:
        session.records.append(
            {
                "nodeid": item.nodeid,
                "modification": "prune.magnitude",
                "params": {"sparsity": x, "scope": "layer"},
                "metrics": {"ppl_increase": m},
                "budget": budget,
                "violations": ["over"] if m > 0.1 else [],
                "outcome": None,
            }
        )
    session.records.append(
        {
            "nodeid": "other",
            "modification": "x",
            "params": {},
            "metrics": {},
            "budget": {},
            "violations": [],
            "outcome": None,
        }
    )
    explore.hypothesis.collect_shrinking(item, session)
    [record] = session.explorations
    assert (record["value"], record["bracket"], record["evaluations"]) == (0.5, [0.45, 0.5], 6)
    assert record["method"] == "shrinking" and not record["monotone"]
    kept = [r["params"]["sparsity"] for r in session.records if r["nodeid"] == item.nodeid]
    assert sorted(kept) == [0.45, 0.5] and len(session.records) == 3


def test_noise_around_zero_damage_is_not_called_non_monotone():
    session = HemorrhageSession(Settings.defaults())
    item = SimpleNamespace(nodeid="t.py::test_y", user_properties=[])
    for x, m in [(0.0, 0.0), (0.02, -6e-5), (0.1, 0.01), (0.2, 0.03)]:
        session.records.append(
            {
                "nodeid": item.nodeid,
                "modification": "prune.wanda",
                "params": {"sparsity": x},
                "metrics": {"ppl_increase": m},
                "budget": {"ppl_increase": 0.1},
                "violations": [],
                "outcome": None,
            }
        )
    explore.hypothesis.collect_shrinking(item, session)
    [record] = session.explorations
    assert record["value"] is None and record["bracket"] == [0.2, None]
    assert record["monotone"], record["note"]
    assert "no break" in terminal.render_explorations(session.explorations, width=300)


def test_adapt_settings_keeps_a_deadline_the_user_chose():
    @given(st.integers())
    def plain(x):
        pass

    @settings(deadline=1234)
    @given(st.integers())
    def own(x):
        pass

    for test in (plain, own):
        explore.hypothesis.adapt_settings(test)
        used = test._hypothesis_internal_use_settings
        assert HealthCheck.function_scoped_fixture in used.suppress_health_check
    assert plain._hypothesis_internal_use_settings.deadline is None
    assert own._hypothesis_internal_use_settings.deadline.total_seconds() == 1.234


def test_reporting_example_is_only_the_replayed_falsifying_example():
    seen = []

    @settings(database=None, max_examples=50)
    @given(st.integers(0, 100))
    def shrinks(x):
        seen.append((x, explore.reporting_example()))
        assert x < 10

    with pytest.raises(AssertionError):
        shrinks()
    assert seen[-1] == (10, True)  # the replay that hypothesis reports
    assert not any(reporting for _, reporting in seen[:-1])
    assert explore.reporting_example()  # outside hypothesis


def test_plots_are_written_per_curve(small, request, tmp_path):
    pytest.importorskip("matplotlib")
    h = _fixture(small, request, ppl_increase=0.10)
    h.sweep("prune.magnitude", "sparsity", [0.2, 0.5, 0.8])
    h.find_threshold("quant.rtn", "bits", lo=2, hi=4)
    paths = plots.write_plots(h._session.explorations, tmp_path / "plots")
    assert [p.name for p in paths] == [
        "test_plots_are_written_per_curve-sweep-prune.magnitude-sparsity.png",
        "test_plots_are_written_per_curve-threshold-quant.rtn-bits.png",
    ]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    with pytest.raises(HemorrhageError, match=re.escape("pip install pytest-hemorrhage[plot]")):
        plots.write_plots([], "unused")


@pytest.fixture
def profile_restored():
    """The outer run's hypothesis profile back after in-process runs load another one."""
    before = settings.get_current_profile_name()
    yield
    settings.load_profile(before)


# The database is the default one, named explicitly: in-process pytester runs share the outer
# run's hypothesis, whose default directory was fixed when it was first imported.
SHRINK_VS_BISECT = """
import json, pytest
from hypothesis import given, settings
from hypothesis.database import DirectoryBasedExampleDatabase
from pytest_hemorrhage import strategies as hst

BUDGET = {budget!r}

@pytest.mark.hemorrhage(ppl_increase=BUDGET)
@settings(max_examples=30, database=DirectoryBasedExampleDatabase(".hypothesis/examples"))
@given(sparsity=hst.sparsities(min_value=0.3, max_value=0.95))
def test_shrink(hemorrhage, sparsity):
    hemorrhage.check(hemorrhage.measure("prune.magnitude", sparsity=sparsity))

@pytest.mark.hemorrhage(ppl_increase=BUDGET)
def test_bisect(hemorrhage):
    t = hemorrhage.find_threshold("prune.magnitude", "sparsity", lo=0.3, hi=0.95)
    assert t.evaluations <= 8
"""

NEAR = """
import pytest
from hypothesis import given, settings, Phase
from pytest_hemorrhage import strategies as hst

@pytest.mark.hemorrhage(ppl_increase={budget!r})
@settings(max_examples=20, phases=[Phase.generate], database=None)
@given(sparsity=hst.near_threshold("prune.magnitude", "sparsity", lo=0.3, hi=0.95))
def test_near(hemorrhage, sparsity):
    with open("drawn.txt", "a") as f:
        f.write(f"{{sparsity}}\\n")
"""


def _falsifying(output: str) -> float:
    # hypothesis >= 6.16x says "Failing test case", older releases "Falsifying example"
    match = re.search(
        r"(?:Falsifying example|Failing test case): test_shrink\(.*?sparsity=([0-9.]+)",
        output,
        re.S,
    )
    assert match, output
    return float(match.group(1))


def test_shrinking_and_bisection_agree_and_the_database_replays(
    pytester, small, monkeypatch, profile_restored
):
    monkeypatch.setenv("COLUMNS", "200")  # summary lines read whole, not wrapped
    # a budget that magnitude pruning crosses mid-range on this model, whatever its training
    budget = round(_ppl(small, "prune.magnitude", sparsity=0.7), 6)
    pytester.makepyfile(test_explore_me=SHRINK_VS_BISECT.format(budget=budget))
    result = pytester.runpytest(
        *MODEL, "--hemorrhage-report=report.json", "--hemorrhage-plot=plots"
    )
    result.assert_outcomes(passed=1, failed=1)
    output = result.stdout.str()
    assert "FailedHealthCheck" not in output and "DeadlineExceeded" not in output
    shrunk = _falsifying(output)
    report = json.loads((pytester.path / "report.json").read_text())
    by_method = {e["method"]: e for e in report["explorations"]}
    bisected = by_method["bisection"]["value"]
    assert abs(shrunk - bisected) <= 0.01 + 1e-9, (shrunk, bisected)
    assert by_method["shrinking"]["value"] == shrunk
    first_run = by_method["shrinking"]["evaluations"]
    # the summary names both thresholds; the example rows are reduced to the bracket
    assert re.search(rf"breaks at sparsity={shrunk:.4g}.*measures by hypothesis", output)
    assert re.search(rf"breaks at sparsity={bisected:.4g}.*measures by bisection", output)
    rows = [r for r in report["results"] if r["nodeid"].endswith("test_shrink")]
    assert 1 <= len(rows) <= 2 and any(r["params"]["sparsity"] == shrunk for r in rows)
    assert len(list((pytester.path / "plots").glob("test_*-threshold-*.png"))) == 2

    # next run: hypothesis replays the saved breaking point first, so it shrinks less
    result = pytester.runpytest(*MODEL, "--hemorrhage-report=report.json")
    result.assert_outcomes(passed=1, failed=1)
    assert _falsifying(result.stdout.str()) == shrunk
    report = json.loads((pytester.path / "report.json").read_text())
    again = next(e for e in report["explorations"] if e["method"] == "shrinking")
    assert again["evaluations"] < first_run

    # and near_threshold, exploring, draws around the threshold persisted by the first run
    pytester.makepyfile(test_near=NEAR.format(budget=budget))
    explore = (*MODEL[:-1], "--hypothesis-profile=hemorrhage-explore")
    pytester.runpytest(*explore, "test_near.py").assert_outcomes(passed=1)
    drawn = [float(x) for x in (pytester.path / "drawn.txt").read_text().split()]
    near = sum(abs(x - shrunk) <= 0.05 for x in drawn)
    assert near >= 0.3 * len(drawn), (shrunk, drawn)
    # while under hemorrhage-ci it steers nothing: the draws of a run with an empty cache
    gated = []
    for cache in ((), ("--hemorrhage-cache-dir=empty",)):
        (pytester.path / "drawn.txt").unlink()
        pytester.runpytest(*MODEL, *cache, "test_near.py").assert_outcomes(passed=1)
        gated.append((pytester.path / "drawn.txt").read_text())
    assert gated[0] == gated[1]


# A release gate's property that holds everywhere: the report is "passes up to" the harshest
# example drawn, which moves with every example drawn unless the draws are the same each run.
HOLDS = """
import pytest
from hypothesis import given
from pytest_hemorrhage import strategies as hst

@pytest.mark.hemorrhage(ppl_increase=1e9)
@given(sparsity=hst.sparsities(max_value=0.3))
def test_holds(hemorrhage, sparsity):
    with open("drawn.txt", "a") as f:
        f.write(f"{sparsity}\\n")
    hemorrhage.check(hemorrhage.measure("prune.magnitude", sparsity=sparsity))
"""


def test_the_ci_profile_explores_the_same_examples_on_every_run(pytester, profile_restored):
    pytester.makepyfile(test_ci_draws=HOLDS)  # not test_gate: tests/test_gate.py may be imported
    runs = []
    for _ in range(2):
        result = pytester.runpytest(
            "--hemorrhage-model=hemorrhage-tiny",
            "--hemorrhage-tokens=256",
            "-p",
            "no:cacheprovider",
            "--hypothesis-profile=hemorrhage-ci",
            "--hemorrhage-report=report.json",
        )
        result.assert_outcomes(passed=1)
        drawn = (pytester.path / "drawn.txt").read_text().split()
        (pytester.path / "drawn.txt").unlink()
        [record] = json.loads((pytester.path / "report.json").read_text())["explorations"]
        runs.append((drawn, record["bracket"], record["measurements"]))
    assert len(set(runs[0][0])) > 3  # it explored, not one value
    assert runs[0] == runs[1]
