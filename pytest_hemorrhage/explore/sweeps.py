"""Sweeps: a parameter measured over values, with the phase-transition fit (Ma et al. 2025)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import HemorrhageError
from ..metrics import EXTRA_METRICS, METRICS, jsonable
from ..modifications.registry import make
from .fit import PhaseTransition, fit_phase_transition
from .progress import progress
from .search import resolve_domain

if TYPE_CHECKING:
    from ..handle import Handle

__all__ = ["Sweep", "sweep"]


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
        fit: the :class:`~pytest_hemorrhage.explore.fit.PhaseTransition` of ``metric`` vs
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
            "modification": self.modification,
            "param": self.param,
            "fixed": self.fixed,
            "metric": self.metric,
            "budget": self.budget,
            "points": [
                {"value": v, "x": x, "broke": b, "metrics": {k: jsonable(m) for k, m in ms.items()}}
                for v, x, b, ms in zip(
                    self.values, self.compression, self.broke, self.metrics, strict=True
                )
            ],
            "fit": self.fit.to_dict(),
            "s0": self.s0,
            "s0_stderr": self.s0_stderr,
        }


def sweep(
    hemorrhage: Handle,
    name: str,
    param: str,
    values: Sequence[Any],
    *,
    metric: str = "ppl_increase",
    increasing: bool | None = None,
    **fixed: Any,
) -> Sweep:
    """Measure ``param`` at each of ``values`` and fit the phase transition of ``metric``.

    The fit (power law up to s0, exponential above; see
    :func:`~pytest_hemorrhage.explore.fit.fit_phase_transition`) runs on the compression axis,
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
    if metric not in METRICS and metric not in EXTRA_METRICS:
        raise HemorrhageError(
            f"sweep: unknown metric {metric!r}; valid: {', '.join([*METRICS, *EXTRA_METRICS])}"
        )
    values = list(values)
    if len(values) < 2:
        raise HemorrhageError(f"sweep: {param} needs several values, got {values!r}")
    domain = resolve_domain(name, param, integer=None, increasing=increasing)
    budget = hemorrhage.budget
    for v in values:  # every config is valid before the first (slow) measure
        make(name, {**fixed, param: v})
    want = frozenset(budget.limits) | {metric}
    measured: list[dict[str, float]] = []
    broke: list[bool] = []
    with progress(hemorrhage, len(values), f"{name} {param}: sweep") as advance:
        for v in values:
            result = hemorrhage.harness.measure(
                [(name, {**fixed, param: v})], want, level=budget.confidence
            )
            measured.append(dict(result.metrics))
            broke.append(bool(budget.violations(result)))
            advance()
    x = [round(domain.compression(v), 12) for v in values]
    fit = fit_phase_transition(x, [m.get(metric, math.nan) for m in measured])
    s0 = (
        None
        if fit.s0 is None
        else (domain.origin + fit.s0 if domain.increasing else domain.origin - fit.s0)
    )
    result_sweep = Sweep(
        modification=name,
        param=param,
        metric=metric,
        values=values,
        metrics=measured,
        broke=broke,
        compression=x,
        fit=fit,
        s0=s0,
        s0_stderr=fit.s0_stderr,
        fixed=dict(fixed),
        budget=budget.to_dict(),
    )
    hemorrhage.record_exploration("sweep", result_sweep.to_dict())
    return result_sweep
