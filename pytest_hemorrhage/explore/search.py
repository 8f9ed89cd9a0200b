"""Threshold search: the gentlest value of a parameter that breaks the budget (bisection)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..budget import Budget
from ..errors import HemorrhageError
from ..metrics import jsonable
from ..modifications.registry import blocks, get, make
from .domains import Domain, accepts, domain_for, valid_range
from .estimates import save_estimate
from .fit import Threshold, bisect_threshold, monotonicity
from .progress import progress

if TYPE_CHECKING:
    from ..handle import Handle

__all__ = [
    "budget_from_dict",
    "budget_metric",
    "find_threshold",
    "resolve_domain",
    "threshold_from_points",
    "threshold_record",
]


def budget_metric(budget: Mapping[str, Any]) -> str:
    return next((k for k in budget if k != "confidence"), "ppl_increase")


def budget_from_dict(data: Mapping[str, Any]) -> Budget:
    limits = {k: float(v) for k, v in data.items() if k != "confidence"}
    return Budget(limits, data.get("confidence"))


def threshold_from_points(
    points: Sequence[tuple[float, float, bool]], domain: Domain, param: str, method: str
) -> Threshold:
    """The threshold that a set of measured points shows: gentlest break, nearest pass."""
    order = sorted(points, key=lambda p: p[0] if domain.increasing else -p[0])
    broken = [x for x, _, b in order if b]
    value = broken[0] if broken else None
    if value is None:
        passing = order[-1][0] if order else None
        note = f"no break: every {param} measured passes, up to {param}={_fmt(passing)}"
    else:
        gentler = [
            x for x, _, b in order if not b and (x < value if domain.increasing else x > value)
        ]
        passing = gentler[-1] if gentler else None
        note = f"breaks at {param}={_fmt(value)}" + (
            f" (passes at {param}={_fmt(passing)})"
            if passing is not None
            else " (no gentler value measured)"
        )
    # a metric below 0 (slightly better than the baseline) is no damage, not less damage:
    # without this, noise around 0 at the gentle end reads as non-monotone
    clamped = [(x, max(m, 0.0) if math.isfinite(m) else m, b) for x, m, b in points]
    monotone, warning = monotonicity(
        clamped, increasing=domain.increasing, higher_is_worse=True, rtol=0.02
    )
    return Threshold(
        value=value,
        bracket=(passing, value),
        evaluations=len(points),
        measurements=list(order),
        monotone=monotone,
        note=f"{note} by {method}" + (f"; {warning}" if warning else ""),
    )


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _resolve_budget(
    hemorrhage: Handle, budget: Budget | Mapping[str, Any] | None, what: str
) -> Budget:
    if budget is None:
        budget = hemorrhage.budget
    elif not isinstance(budget, Budget):
        budget = Budget.parse(dict(budget), where=f"{hemorrhage.node.nodeid}: {what}")
    if not budget.limits:
        raise HemorrhageError(
            f"{hemorrhage.node.nodeid}: {what} needs a budget to break: mark the test "
            "@pytest.mark.hemorrhage(ppl_increase=0.10) or pass budget={'ppl_increase': 0.10}"
        )
    return budget


def resolve_domain(
    name: str, param: str, *, integer: bool | None, increasing: bool | None
) -> Domain:
    """The search domain of ``param``: known per name (``domains.domain_for``), else a
    fraction in [0, 1] whose damage grows with it; ``integer``/``increasing`` override."""
    fields = [
        f.name for f in dataclasses.fields(get(name)[0]) if f.name not in ("include", "exclude")
    ]
    if param not in fields:
        raise HemorrhageError(f"{name} has no parameter {param!r}; valid: {', '.join(fields)}")
    domain = domain_for(name, param) or Domain(0.0, 1.0)
    if integer is not None and integer != domain.integer:
        domain = replace(domain, integer=integer, resolution=1 if integer else 0.01)
    if increasing is not None:
        domain = replace(domain, increasing=increasing)
    return domain


def _model_bound(hemorrhage: Handle, param: str) -> int | None:
    if param == "count":  # layers dropped: all but one block
        return len(blocks(hemorrhage.model)[1]) - 1
    return None


def find_threshold(
    hemorrhage: Handle,
    name: str,
    param: str,
    *,
    budget: Budget | Mapping[str, float] | None = None,
    lo: float | None = None,
    hi: float | None = None,
    tol: float = 0.01,
    metric: str | None = None,
    integer: bool | None = None,
    increasing: bool | None = None,
    **fixed: Any,
) -> Threshold:
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
        The :class:`~pytest_hemorrhage.explore.fit.Threshold`: ``value``, ``bracket`` (last
        passing, first breaking), ``evaluations``, ``measurements`` (x, metric, broke),
        ``monotone`` and ``note``. It is also recorded for the summary and the report.
    """
    budget = _resolve_budget(hemorrhage, budget, "find_threshold")
    metric = metric or budget_metric(budget.limits)
    domain = resolve_domain(name, param, integer=integer, increasing=increasing)
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
        result = hemorrhage.harness.measure(
            [(name, {**fixed, param: x})], want, level=budget.confidence
        )
        seen[x] = dict(result.metrics)
        advance()
        return bool(budget.violations(result)), result.metrics.get(metric, math.nan)

    steps = (
        math.ceil(
            math.log2(max(2, len(values) if values else (hi - lo) / (1 if domain.integer else tol)))
        )
        + 2
    )
    with progress(hemorrhage, steps, f"{name} {param}: threshold") as advance:
        if values is None:
            threshold = bisect_threshold(
                measure, lo=lo, hi=hi, tol=tol, integer=domain.integer, increasing=domain.increasing
            )
        else:  # gaps (e.g. a quantizer without 5-7 bits): bisect over the valid values' order
            index = bisect_threshold(
                lambda i: measure(values[int(i)]),
                lo=0,
                hi=len(values) - 1,
                integer=True,
                increasing=domain.increasing,
            )
            points = [(values[int(i)], m, b) for i, m, b in index.measurements]
            threshold = threshold_from_points(points, domain, param, "bisection")
            threshold = replace(threshold, measurements=points)
    hemorrhage.record_exploration(
        "threshold",
        threshold_record(
            name,
            param,
            fixed,
            budget.to_dict(),
            metric,
            "bisection",
            domain.increasing,
            threshold,
            [seen[x] for x, _, _ in threshold.measurements],
        ),
    )
    save_estimate(hemorrhage.harness, budget, name, param, fixed, threshold)
    return threshold


def threshold_record(
    name: str,
    param: str,
    fixed: Mapping[str, Any],
    budget: Mapping[str, Any],
    metric: str,
    method: str,
    increasing: bool,
    threshold: Threshold,
    metrics: Sequence[Mapping[str, float]],
) -> dict[str, Any]:
    data = threshold.to_dict()
    for point, values in zip(data["measurements"], metrics, strict=True):
        point["metrics"] = {k: jsonable(v) for k, v in values.items()}
    return {
        "modification": name,
        "param": param,
        "fixed": dict(fixed),
        "method": method,
        "increasing": increasing,
        "metric": metric,
        "budget": dict(budget),
        **data,
    }
