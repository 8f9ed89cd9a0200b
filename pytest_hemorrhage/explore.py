"""Where does the model break? Threshold search, sweeps, and hypothesis glue for the fixture.

* :func:`find_threshold` bisects a parameter for the gentlest value that breaks the budget.
* :func:`sweep` measures a parameter over values and fits the phase transition (Ma et al. 2025).
* :func:`hypothesis_call` makes ``@given`` tests that use the ``hemorrhage`` fixture work out of
  the box and turns their examples into a threshold (the falsifying example is the breaking
  point, the passing example next to it brackets it).
* :func:`register_profiles` registers the ``hemorrhage-ci`` and ``hemorrhage-explore`` settings
  profiles for ``--hypothesis-profile``.

Importing this module imports neither torch nor hypothesis: the plugin calls it from its hooks.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .budget import Budget
from .errors import HemorrhageError

if TYPE_CHECKING:
    import pytest

    from .fixture import Hemorrhage
    from .harness import Harness
    from .session import HemorrhageSession
    from .strategies import Domain
    from .thresholds import PhaseTransition, Threshold

__all__ = [
    "PROFILES",
    "Sweep",
    "adapt_settings",
    "cached_estimate",
    "collect_shrinking",
    "configure",
    "find_threshold",
    "hypothesis_call",
    "register_profiles",
    "render_explorations",
    "reporting_example",
    "sweep",
]

# Settings profiles for --hypothesis-profile. Both keep hypothesis' example database on (even
# where its own "ci" profile turns it off), so a breaking point found once is replayed first
# by the next run: keep the .hypothesis/ directory between CI runs (e.g. a CI cache).
PROFILES: dict[str, dict[str, Any]] = {
    "hemorrhage-ci": {"max_examples": 10, "print_blob": True,
                      "phases": ("explicit", "reuse", "generate", "shrink")},
    "hemorrhage-explore": {"max_examples": 60},
}

_CURRENT: contextvars.ContextVar[tuple[Any, Any] | None] = contextvars.ContextVar(
    "hemorrhage_current_test", default=None)
_ESTIMATES: dict[Path, dict[str, Any]] = {}  # cache file -> its entries, read once per process
ESTIMATES_FILE = "thresholds.json"


# --------------------------------------------------------------------------------------------
# Hypothesis hygiene
# --------------------------------------------------------------------------------------------


def register_profiles() -> None:
    """Register the ``hemorrhage-ci`` (10 examples) and ``hemorrhage-explore`` (60) profiles.

    Both: no deadline (a model evaluation takes as long as it takes), the function-scoped
    ``hemorrhage`` fixture allowed (every measure restores the model exactly), and hypothesis'
    example database on, so breaking points are replayed first on the next run.
    """
    from hypothesis import HealthCheck, Phase, settings
    from hypothesis.errors import InvalidArgument

    try:
        settings.get_profile("hemorrhage-ci")
        return  # registered already
    except InvalidArgument:
        pass
    parent = settings.get_profile("default")
    for name, options in PROFILES.items():
        options = dict(options)
        if "phases" in options:
            options["phases"] = tuple(Phase[p] for p in options["phases"])
        settings.register_profile(
            name, parent, deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
            **options)


def configure(config: pytest.Config) -> None:
    """Register the profiles before hypothesis' own plugin loads ``--hypothesis-profile``."""
    if config.getoption("--hypothesis-profile", None) or "hypothesis" in sys.modules:
        register_profiles()


def adapt_settings(test: Any) -> None:
    """Give a ``@given`` test that uses the ``hemorrhage`` fixture workable settings.

    No deadline unless the test set one itself (model evaluations are slow and their time
    varies), and no ``function_scoped_fixture`` health-check error: the fixture is safe across
    examples because every measure restores the baseline bit for bit.
    """
    from hypothesis import HealthCheck, settings

    fn = getattr(test, "__func__", test)
    current = getattr(fn, "_hypothesis_internal_use_settings", None)
    if current is None or getattr(fn, "_hemorrhage_adapted", False):
        return
    own_deadline = (getattr(fn, "_hypothesis_internal_settings_applied", False)
                    and current.deadline != settings.default.deadline)
    fn._hypothesis_internal_use_settings = settings(
        current,
        deadline=current.deadline if own_deadline else None,
        suppress_health_check={*current.suppress_health_check, HealthCheck.function_scoped_fixture},
    )
    fn._hemorrhage_adapted = True


@contextmanager
def hypothesis_call(item: pytest.Item, session: HemorrhageSession) -> Iterator[None]:
    """Wrap the call of a ``@given`` test that uses the ``hemorrhage`` fixture (else a no-op).

    Before: adapts its settings (see :func:`adapt_settings`) and makes the test known to
    :func:`~pytest_hemorrhage.strategies.near_threshold`. After: turns its examples into a
    threshold exploration (see :func:`collect_shrinking`).
    """
    test = getattr(item, "obj", None)
    current = _CURRENT.get()
    if "hemorrhage" not in getattr(item, "fixturenames", ()) or not getattr(
            test, "is_hypothesis_test", False) or (current is not None and current[0] is item):
        yield  # not a hypothesis test of ours, or already wrapped
        return
    adapt_settings(test)
    token = _CURRENT.set((item, session))
    try:
        yield
    except BaseException as exc:
        _keep_notes(exc)
        raise
    finally:
        _CURRENT.reset(token)
        collect_shrinking(item, session)


def reporting_example() -> bool:
    """False while hypothesis runs an example it will not report (generating, shrinking).

    A failed ``check()`` can then skip its costly diagnostics (blame) on the many examples
    that shrinking tries, and keep them for the falsifying example that hypothesis replays
    last; True outside hypothesis.
    """
    if "hypothesis" not in sys.modules:
        return True
    from hypothesis.control import current_build_context, currently_in_test_context

    return not currently_in_test_context() or current_build_context().is_final


def _keep_notes(exc: BaseException) -> None:
    """Put hypothesis' notes ("Falsifying example: ...") into the message of a failure that
    is reported by its message alone (``check()``'s ``pytest.fail(pytrace=False)``, a
    HemorrhageError): pytest shows notes only with a traceback."""
    import pytest

    notes = getattr(exc, "__notes__", None)
    if not notes:
        return
    if isinstance(exc, pytest.fail.Exception) and not exc.pytrace:
        exc.msg = "\n".join([exc.msg or "", *notes])
        exc.__notes__ = []
    elif isinstance(exc, HemorrhageError) and len(exc.args) == 1:
        exc.args = ("\n".join([str(exc.args[0]), *notes]),)
        exc.__notes__ = []


def collect_shrinking(item: pytest.Item, session: HemorrhageSession) -> None:
    """Turn a hypothesis test's measurements into one threshold per modification.

    Where exactly one numeric parameter varied across the examples, the gentlest value that
    broke the budget is the threshold (hypothesis shrinks toward it) and the harshest passing
    value below it brackets it. The per-example results are then reduced to those two, so the
    summary shows the breaking point instead of one row per example.
    """
    from .strategies import Domain, domain_for

    mine = [r for r in session.records if r["nodeid"] == item.nodeid]
    if not mine:
        return
    keep: set[int] = set()
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in mine:
        groups.setdefault(record["modification"], []).append(record)
    drawn = _given_names(item)
    for name, records in groups.items():
        param = _explored_param(records, drawn)
        if param is None:
            broken = [r for r in records if r["violations"]]
            keep.add(id((broken or records)[-1]))
            continue
        domain = domain_for(name, param) or Domain(0.0, 1.0)
        metric = _budget_metric(records[0]["budget"])
        seen: dict[float, dict[str, Any]] = {}
        for record in records:  # hypothesis replays examples: first measurement of each value
            seen.setdefault(record["params"][param], record)
        points = [(x, r["metrics"].get(metric, math.nan), bool(r["violations"]))
                  for x, r in seen.items()]
        threshold = _threshold_from_points(points, domain, param, "hypothesis shrinking")
        value, passing = threshold.value, threshold.bracket[0]
        for x in (value, passing):
            if x is not None:
                keep.add(id(seen[x]))
        fixed = _non_default(name, {k: v for k, v in records[0]["params"].items()
                                    if k != param})
        budget = records[0]["budget"]
        session.record_exploration(item, "threshold", _threshold_record(
            name, param, fixed, budget, metric, "shrinking", domain.increasing, threshold,
            [seen[x]["metrics"] for x, _, _ in threshold.measurements]))
        if value is not None and session.settings.cache_dir is not None:
            _save_estimate(session.harness(), _budget_from_dict(budget), name, param, fixed,
                           threshold)
    session.records[:] = [r for r in session.records
                          if r["nodeid"] != item.nodeid or id(r) in keep]


def _given_names(item: pytest.Item) -> set[str]:
    """The arguments that ``@given`` draws (the test's parameters that are not fixtures)."""
    import inspect

    inner = getattr(getattr(getattr(item, "obj", None), "hypothesis", None), "inner_test", None)
    if inner is None:
        return set()
    return set(inspect.signature(inner).parameters) - set(getattr(item, "fixturenames", ()))


def _explored_param(records: list[dict[str, Any]], drawn: set[str]) -> str | None:
    """The one numeric parameter that the examples explored, else None.

    The one whose value varied; when hypothesis measured a single value (e.g. it replayed a
    saved breaking point that was already minimal), the numeric parameter named like a drawn
    argument.
    """
    if "stages" in records[0]["params"]:
        return None
    numeric = [k for k, v in records[0]["params"].items()
               if all(isinstance(r["params"].get(k), (int, float))
                      and not isinstance(r["params"].get(k), bool) for r in records)]
    varying = [k for k in records[0]["params"]
               if len({_hashable(r["params"].get(k)) for r in records}) > 1]
    if varying:
        return varying[0] if len(varying) == 1 and varying[0] in numeric else None
    named = [k for k in numeric if k in drawn]
    return named[0] if len(named) == 1 else None


def _non_default(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` without those at the modification's default (as a user would write them)."""
    from .modifications import make

    try:
        defaults = make(name).params()
    except HemorrhageError:  # no defaults for a required parameter: keep them all
        return dict(params)
    return {k: v for k, v in params.items() if defaults.get(k, object()) != v}


def _hashable(value: Any) -> Any:
    return json.dumps(value, sort_keys=True, default=str)


def _budget_metric(budget: Mapping[str, Any]) -> str:
    return next((k for k in budget if k != "confidence"), "ppl_increase")


def _budget_from_dict(data: Mapping[str, Any]) -> Budget:
    limits = {k: float(v) for k, v in data.items() if k != "confidence"}
    return Budget(limits, data.get("confidence"))


def _threshold_from_points(points: Sequence[tuple[float, float, bool]], domain: Domain,
                           param: str, method: str) -> Threshold:
    """The threshold that a set of measured points shows: gentlest break, nearest pass."""
    from .thresholds import Threshold, _monotonicity

    order = sorted(points, key=lambda p: p[0] if domain.increasing else -p[0])
    broken = [x for x, _, b in order if b]
    value = broken[0] if broken else None
    if value is None:
        passing = order[-1][0] if order else None
        note = f"no break: every {param} measured passes, up to {param}={_fmt(passing)}"
    else:
        gentler = [x for x, _, b in order if not b and (
            x < value if domain.increasing else x > value)]
        passing = gentler[-1] if gentler else None
        note = (f"breaks at {param}={_fmt(value)}" +
                (f" (passes at {param}={_fmt(passing)})" if passing is not None else
                 " (no gentler value measured)"))
    # a metric below 0 (slightly better than the baseline) is no damage, not less damage:
    # without this, noise around 0 at the gentle end reads as non-monotone
    clamped = [(x, max(m, 0.0) if math.isfinite(m) else m, b) for x, m, b in points]
    monotone, warning = _monotonicity(clamped, increasing=domain.increasing,
                                      higher_is_worse=True, rtol=0.02)
    return Threshold(value=value, bracket=(passing, value), evaluations=len(points),
                     measurements=list(order), monotone=monotone,
                     note=f"{note} by {method}" + (f"; {warning}" if warning else ""))


def _measures(n: int) -> str:
    return f"{n} measure" + ("" if n == 1 else "s")


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


# --------------------------------------------------------------------------------------------
# Threshold estimates, persisted for near_threshold()
# --------------------------------------------------------------------------------------------


def _estimate_key(harness: Harness, budget: Budget, name: str, param: str,
                  fixed: Mapping[str, Any]) -> str:
    from .modifications import make

    params = make(name, dict(fixed)).params()  # defaults filled in: one key however it's called
    params.pop(param, None)
    parts = [harness.loaded.fingerprint, harness.data_fingerprint, name, param, params,
             budget.to_dict()]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _estimates(path: Path) -> dict[str, Any]:
    if path not in _ESTIMATES:
        try:
            _ESTIMATES[path] = json.loads(path.read_text())
        except (OSError, ValueError):
            _ESTIMATES[path] = {}  # none yet, or unreadable: estimates are only a hint
    return _ESTIMATES[path]


def _save_estimate(harness: Harness, budget: Budget, name: str, param: str,
                   fixed: Mapping[str, Any], threshold: Threshold) -> None:
    cache_dir = harness.settings.cache_dir
    if cache_dir is None or threshold.value is None:
        return
    path = Path(cache_dir) / ESTIMATES_FILE
    key = _estimate_key(harness, budget, name, param, fixed)
    entry = {"value": threshold.value, "bracket": list(threshold.bracket), "modification": name,
             "param": param, "budget": budget.to_dict(), "updated": time.time()}
    _estimates(path)[key] = entry
    try:
        from filelock import FileLock

        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock", timeout=10):  # xdist workers share the file
            try:
                entries = json.loads(path.read_text())
            except (OSError, ValueError):
                entries = {}
            entries[key] = entry
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
            tmp.replace(path)
    except OSError:
        pass  # an unwritable cache only costs the next run its hint


def cached_estimate(name: str, param: str, fixed: Mapping[str, Any]) -> float | None:
    """The threshold of ``param`` found earlier for the running test's model, data and budget
    (this session or a previous one), or None outside a hemorrhage test or when none is known."""
    current = _CURRENT.get()
    if current is None:
        return None
    item, session = current
    if session.settings.cache_dir is None:
        return None
    key = _estimate_key(session.harness(), session.budget_for(item), name, param, fixed)
    entry = _estimates(Path(session.settings.cache_dir) / ESTIMATES_FILE).get(key)
    return None if entry is None else entry.get("value")


# --------------------------------------------------------------------------------------------
# Bisection and sweeps
# --------------------------------------------------------------------------------------------


def _resolve_budget(hemorrhage: Hemorrhage, budget: Budget | Mapping[str, Any] | None,
                    what: str) -> Budget:
    if budget is None:
        budget = hemorrhage.budget
    elif not isinstance(budget, Budget):
        budget = Budget.parse(dict(budget), where=f"{hemorrhage._node.nodeid}: {what}")
    if not budget.limits:
        raise HemorrhageError(
            f"{hemorrhage._node.nodeid}: {what} needs a budget to break: mark the test "
            "@pytest.mark.hemorrhage(ppl_increase=0.10) or pass budget={'ppl_increase': 0.10}")
    return budget


def _domain(name: str, param: str, *, integer: bool | None, increasing: bool | None) -> Domain:
    """The search domain of ``param``: known per name (``strategies.domain_for``), else a
    fraction in [0, 1] whose damage grows with it; ``integer``/``increasing`` override."""
    import dataclasses

    from .modifications.registry import get
    from .strategies import Domain, domain_for

    fields = [f.name for f in dataclasses.fields(get(name)[0])
              if f.name not in ("include", "exclude")]
    if param not in fields:
        raise HemorrhageError(f"{name} has no parameter {param!r}; valid: {', '.join(fields)}")
    domain = domain_for(name, param) or Domain(0.0, 1.0)
    if integer is not None and integer != domain.integer:
        domain = replace(domain, integer=integer, resolution=1 if integer else 0.01)
    if increasing is not None:
        domain = replace(domain, increasing=increasing)
    return domain


def _model_bound(hemorrhage: Hemorrhage, param: str) -> int | None:
    if param == "count":  # layers dropped: all but one block
        from .modifications.registry import blocks

        return len(blocks(hemorrhage.model)[1]) - 1
    return None


def find_threshold(hemorrhage: Hemorrhage, name: str, param: str, *,
                   budget: Budget | Mapping[str, float] | None = None,
                   lo: float | None = None, hi: float | None = None, tol: float = 0.01,
                   metric: str | None = None, integer: bool | None = None,
                   increasing: bool | None = None, **fixed: Any) -> Threshold:
    """The gentlest value of ``param`` whose modification breaks the budget (bisection).

    Assumes damage is monotone in ``param``; the measured points are checked for evidence
    against that and the result says so (``monotone``, ``note``) rather than hiding it.

    Args:
        hemorrhage: the test's fixture.
        name: the modification, e.g. ``"prune.wanda"``.
        param: the parameter searched, e.g. ``"sparsity"`` or ``"bits"``.
        budget: the budget to break (default: the test's), a Budget or ``{metric: max}``.
        lo: smallest value searched (default: the parameter's domain, e.g. 0 for sparsity,
            1 bit).
        hi: largest value searched (default: the domain, e.g. 1 for sparsity, 8 bits).
        tol: final bracket width for a continuous parameter (integers are exact).
        metric: the metric kept per measurement and checked for monotone damage (default:
            the budget's first).
        integer: search whole values only (default: known per parameter, e.g. bits).
        increasing: damage grows with the value (default: known per parameter; bits: False).
        **fixed: the modification's other parameters, e.g. ``group_size=64``.

    Returns:
        The :class:`~pytest_hemorrhage.thresholds.Threshold`: ``value``, ``bracket`` (last
        passing, first breaking), ``evaluations``, ``measurements`` (x, metric, broke),
        ``monotone`` and ``note``. It is also recorded for the summary and the report.
    """
    from .modifications.registry import make
    from .strategies import accepts, valid_range
    from .thresholds import bisect_threshold

    budget = _resolve_budget(hemorrhage, budget, "find_threshold")
    metric = metric or _budget_metric(budget.limits)
    domain = _domain(name, param, integer=integer, increasing=increasing)
    if hi is None and domain.hi is None:
        hi = _model_bound(hemorrhage, param)
    make(name, fixed)  # bad fixed parameters: the config's error, before any measure
    lo, hi = valid_range(name, param, domain, lo, hi, fixed=fixed)
    values: list[Any] | None = None
    if domain.integer:
        lo, hi = int(math.ceil(lo)), int(math.floor(hi))
        values = [v for v in range(lo, hi + 1) if accepts(name, {**fixed, param: v})]
        if len(values) == hi - lo + 1:
            values = None  # contiguous: bisect on the values themselves
    want = frozenset(budget.limits) | {metric}
    seen: dict[float, dict[str, float]] = {}

    def measure(x: Any) -> tuple[bool, float]:
        result = hemorrhage.harness.measure([(name, {**fixed, param: x})], want)
        seen[x] = dict(result.metrics)
        advance()
        return bool(budget.violations(result)), result.metrics.get(metric, math.nan)

    steps = math.ceil(math.log2(max(2, len(values) if values else (hi - lo) / (
        1 if domain.integer else tol)))) + 2
    with _progress(hemorrhage, steps, f"{name} {param}: threshold") as advance:
        if values is None:
            threshold = bisect_threshold(measure, lo=lo, hi=hi, tol=tol,
                                         integer=domain.integer, increasing=domain.increasing)
        else:  # gaps (e.g. a quantizer without 5-7 bits): bisect over the valid values' order
            index = bisect_threshold(lambda i: measure(values[int(i)]), lo=0,
                                     hi=len(values) - 1, integer=True,
                                     increasing=domain.increasing)
            points = [(values[int(i)], m, b) for i, m, b in index.measurements]
            threshold = _threshold_from_points(points, domain, param, "bisection")
            threshold = replace(threshold, measurements=points)
    hemorrhage._session.record_exploration(hemorrhage._node, "threshold", _threshold_record(
        name, param, fixed, budget.to_dict(), metric, "bisection", domain.increasing, threshold,
        [seen[x] for x, _, _ in threshold.measurements]))
    _save_estimate(hemorrhage.harness, budget, name, param, fixed, threshold)
    return threshold


def _threshold_record(name: str, param: str, fixed: Mapping[str, Any],
                      budget: Mapping[str, Any], metric: str, method: str, increasing: bool,
                      threshold: Threshold, metrics: Sequence[Mapping[str, float]]
                      ) -> dict[str, Any]:
    data = threshold.to_dict()
    for point, values in zip(data["measurements"], metrics, strict=True):
        point["metrics"] = {k: _json(v) for k, v in values.items()}
    return {"modification": name, "param": param, "fixed": dict(fixed), "method": method,
            "increasing": increasing, "metric": metric, "budget": dict(budget), **data}


def _json(value: float) -> float | None:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


@dataclass(frozen=True)
class Sweep:
    """A parameter swept over values, with the phase-transition fit of one metric.

    Args:
        modification: the modification's name.
        param: the parameter swept.
        metric: the metric fitted.
        values: the parameter's values, as given.
        metrics: every metric measured, per value.
        broke: per value, whether the test's budget was exceeded (all False without budget).
        compression: the fit's x per value: distance from no compression, growing with damage
            (the value itself for sparsity-like parameters; 16 - bits for bits).
        fit: the :class:`~pytest_hemorrhage.thresholds.PhaseTransition` of ``metric`` vs
            ``compression``; ``fit.s0`` is on the compression axis.
        s0: the phase-transition point in the parameter's own units, or None when the data
            show no transition (``fit.reason`` says why).
        s0_stderr: its uncertainty (same units).
        fixed: the modification's other parameters.
        budget: the test's budget.
    """

    modification: str
    param: str
    metric: str
    values: list[Any]
    metrics: list[dict[str, float]]
    broke: list[bool]
    compression: list[float]
    fit: PhaseTransition
    s0: float | None
    s0_stderr: float | None
    fixed: dict[str, Any]
    budget: dict[str, Any]

    @property
    def curve(self) -> list[float]:
        """The fitted metric per value."""
        return [m.get(self.metric, math.nan) for m in self.metrics]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the curve, every metric per point, and the fit."""
        return {
            "modification": self.modification, "param": self.param, "fixed": self.fixed,
            "metric": self.metric, "budget": self.budget,
            "points": [{"value": v, "x": x, "broke": b,
                        "metrics": {k: _json(m) for k, m in ms.items()}}
                       for v, x, b, ms in zip(self.values, self.compression, self.broke,
                                              self.metrics, strict=True)],
            "fit": self.fit.to_dict(), "s0": self.s0, "s0_stderr": self.s0_stderr,
        }


def sweep(hemorrhage: Hemorrhage, name: str, param: str, values: Sequence[Any], *,
          metric: str = "ppl_increase", increasing: bool | None = None,
          **fixed: Any) -> Sweep:
    """Measure ``param`` at each of ``values`` and fit the phase transition of ``metric``.

    The fit (power law up to s0, exponential above; see
    :func:`~pytest_hemorrhage.thresholds.fit_phase_transition`) runs on the compression axis,
    where damage grows and 0 means unmodified; ``metric`` must be zero for the unmodified model
    (every hemorrhage metric is). Points with no damage (metric <= 0) carry no information for
    a power law and are dropped by the fit, which says so in its reason.

    Args:
        hemorrhage: the test's fixture.
        name: the modification, e.g. ``"prune.magnitude"``.
        param: the parameter swept, e.g. ``"sparsity"``.
        values: its values, any order.
        metric: the metric fitted (any metric; extra metrics are computed when named).
        increasing: damage grows with the value (default: known per parameter).
        **fixed: the modification's other parameters.

    Returns:
        The :class:`Sweep`; also recorded (with its curve) for the summary, report and plots.
    """
    from .metrics import EXTRA_METRICS, METRICS
    from .modifications.registry import make
    from .thresholds import fit_phase_transition

    if metric not in METRICS and metric not in EXTRA_METRICS:
        raise HemorrhageError(f"sweep: unknown metric {metric!r}; valid: "
                              f"{', '.join([*METRICS, *EXTRA_METRICS])}")
    values = list(values)
    if len(values) < 2:
        raise HemorrhageError(f"sweep: {param} needs several values, got {values!r}")
    domain = _domain(name, param, integer=None, increasing=increasing)
    budget = hemorrhage.budget
    for v in values:  # every config is valid before the first (slow) measure
        make(name, {**fixed, param: v})
    want = frozenset(budget.limits) | {metric}
    measured: list[dict[str, float]] = []
    broke: list[bool] = []
    with _progress(hemorrhage, len(values), f"{name} {param}: sweep") as advance:
        for v in values:
            result = hemorrhage.harness.measure([(name, {**fixed, param: v})], want)
            measured.append(dict(result.metrics))
            broke.append(bool(budget.violations(result)))
            advance()
    x = [round(domain.compression(v), 12) for v in values]
    fit = fit_phase_transition(x, [m.get(metric, math.nan) for m in measured])
    s0 = None if fit.s0 is None else (
        domain.origin + fit.s0 if domain.increasing else domain.origin - fit.s0)
    result_sweep = Sweep(modification=name, param=param, metric=metric, values=values,
                         metrics=measured, broke=broke, compression=x, fit=fit,
                         s0=s0, s0_stderr=fit.s0_stderr, fixed=dict(fixed),
                         budget=budget.to_dict())
    hemorrhage._session.record_exploration(hemorrhage._node, "sweep", result_sweep.to_dict())
    return result_sweep


@contextmanager
def _progress(hemorrhage: Hemorrhage, total: int, description: str
              ) -> Iterator[Callable[[], None]]:
    """``advance()`` per step; a transient rich bar on the terminal once the run looks long.

    The bar appears only on an interactive terminal, after the first step predicts more than
    two seconds to go; pytest's capture is suspended just while the bar is drawn.
    """
    stream = sys.__stderr__
    config = getattr(getattr(hemorrhage, "_node", None), "config", None)
    capman = config.pluginmanager.getplugin("capturemanager") if config is not None else None
    state: dict[str, Any] = {"done": 0, "start": time.perf_counter(), "bar": None,
                             "interactive": stream is not None
                             and not hasattr(config, "workerinput")}

    def outside() -> Any:
        return capman.global_and_fixture_disabled() if capman is not None else nullcontext()

    def advance() -> None:
        state["done"] += 1
        if not state["interactive"]:
            return
        bar = state["bar"]
        if bar is None:
            elapsed = time.perf_counter() - state["start"]
            if elapsed / state["done"] * (total - state["done"]) < 2.0:
                return
            from rich.console import Console
            from rich.progress import Progress

            with outside():  # while pytest captures, stderr is a file, not the terminal
                console = Console(file=stream)  # decides it is interactive when created
                state["interactive"] = console.is_interactive
                if not state["interactive"]:
                    return
                bar = Progress(console=console, transient=True, auto_refresh=False,
                               redirect_stdout=False, redirect_stderr=False)
                state["bar"] = bar
                state["task"] = bar.add_task(description, total=total, completed=state["done"])
                bar.start()
        with outside():
            bar.update(state["task"], completed=min(state["done"], total))
            bar.refresh()

    try:
        yield advance
    finally:
        if state["bar"] is not None:
            with outside():
                state["bar"].stop()


# --------------------------------------------------------------------------------------------
# Terminal summary
# --------------------------------------------------------------------------------------------


def render_explorations(explorations: Sequence[Mapping[str, Any]], *, width: int = 120,
                        color: bool = False) -> str:
    """One row per threshold search or sweep: what was explored and where it breaks."""
    import io

    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="hemorrhage thresholds", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("test", overflow="fold", ratio=1)
    table.add_column("explored", overflow="fold")
    table.add_column("found", overflow="fold", ratio=2)
    for record in explorations:
        test = record["nodeid"].rpartition("::")[2]
        if record["kind"] == "decoding_calibration":
            before, after = record["kl_mean"]
            top_p = f", top_p {record['top_p']:g}" if record["top_p"] is not None else ""
            table.add_row(escape(test), "decoding calibration",
                          f"temperature {record['temperature']:.3g}{top_p}: "
                          f"kl_mean {before:.4f} → {after:.4f}")
            continue
        fixed = ", ".join(f"{k}={v}" for k, v in record.get("fixed", {}).items())
        what = f"{record['modification']}({fixed}) {record['param']}" if fixed else (
            f"{record['modification']} {record['param']}")
        table.add_row(escape(test), escape(what), _describe(record))
    out = io.StringIO()
    Console(file=out, width=width, force_terminal=color, no_color=not color,
            highlight=False).print(table)
    return out.getvalue()


def _describe(record: Mapping[str, Any]) -> str:
    from rich.markup import escape

    param = record["param"]
    if record["kind"] == "sweep":
        fit = record["fit"]
        n = len(record["points"])
        if record["s0"] is None:
            return f"[yellow]no phase transition[/] ({n} points): {escape(fit['reason'])}"
        se = record["s0_stderr"]
        return (f"phase transition at {param}={record['s0']:.3g}"
                + (f" ± {se:.2g}" if se is not None else "")
                + f" (fit R² {fit['r2']:.2f}, {n} points, {escape(record['metric'])})")
    how = {"bisection": "bisection", "shrinking": "hypothesis"}.get(record["method"], "")
    limit = record["budget"].get(record["metric"])
    over = f" ({record['metric']} > {limit:g})" if limit is not None else ""
    if record["value"] is None:
        text = (f"no break: passes up to {param}={_fmt(record['bracket'][0])}; "
                f"{_measures(record['evaluations'])} by {how}")
    else:
        passing = record["bracket"][0]
        text = (f"[bold]breaks at {param}={_fmt(record['value'])}[/]{over}; "
                + (f"passes at {param}={_fmt(passing)}" if passing is not None else
                   "breaks at every value measured")
                + f"; {_measures(record['evaluations'])} by {how}")
    if not record["monotone"]:
        note = record["note"].partition("non-monotone damage: ")[2] or record["note"]
        text += f"\n[yellow]non-monotone:[/] {escape(note)}"
    return text
