"""Regressions against an earlier run (``--hemorrhage-compare`` / ``--hemorrhage-compare-fail``):
every result against the matching one of an earlier JSON report (the last release's), and the
tolerated worsening.

A result matches the old report's result with the same test node id, modification and params;
a candidate matches by its label (its fingerprint changes with every rebuild). A matched result
fails its test when a metric named in ``--hemorrhage-compare-fail`` rose beyond the tolerance:
``metric:N%`` relative to the old value (an old value of 0 then fails on any rise: give an
absolute tolerance for metrics that can be 0) or ``metric:X`` absolute. Every metric is 0 for
the baseline and grows with damage, so a rise is a regression. An unmatched result is noted,
never failed. A matched result also says what changed in the environment it was measured in
(``environment.changes``: a new torch, another device), so that drift is told apart from damage;
an old report from before environments were recorded says ``not recorded``.

This is a core module (not ``report/``) because its verdict fails the test: the check and the
test's report need it while the test runs, as they need the budget. ``report/comparison.py``
only renders the comparison this module computes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .environment import changes
from .errors import HemorrhageError, first_line
from .metrics import EXTRA_METRICS, METRICS, jsonable

__all__ = ["OldReport", "Tolerance", "parse_tolerances", "result_key"]

_EXAMPLE = "e.g. --hemorrhage-compare-fail=kl_mean:10%,top1_disagreement:0.005"


@dataclass(frozen=True)
class Tolerance:
    """The largest tolerated rise of ``metric``: ``limit`` as a fraction of the old value
    (``relative``) or in the metric's own unit."""

    metric: str
    limit: float
    relative: bool

    def __str__(self) -> str:
        return f"{self.limit:.0%}" if self.relative else f"{self.limit:g}"

    def exceeded(self, old: float, new: float) -> bool:
        if math.isnan(new):
            return True
        rise = new - old
        return rise > (self.limit * abs(old) if self.relative else self.limit)


def parse_tolerances(text: str) -> tuple[Tolerance, ...]:
    """``"kl_mean:10%,top1_disagreement:0.005"`` -> tolerances; one line per mistake."""
    where = f"--hemorrhage-compare-fail={text}"
    known = {**METRICS, **EXTRA_METRICS}
    found: list[Tolerance] = []
    for item in (part.strip() for part in text.split(",")):
        metric, sep, value = item.partition(":")
        metric, value = metric.strip(), value.strip()
        relative = value.endswith("%")
        try:
            limit = float(value.removesuffix("%")) / (100 if relative else 1)
        except ValueError:
            sep = ""
        if not sep or not metric or not math.isfinite(limit) or limit < 0:
            raise HemorrhageError(
                f"{where}: {item!r} is not metric:N% or metric:X with a number >= 0; {_EXAMPLE}"
            )
        if metric not in known:
            raise HemorrhageError(
                f"{where}: unknown metric {metric!r}; one of {', '.join(sorted(known))}"
            )
        if any(t.metric == metric for t in found):
            raise HemorrhageError(f"{where}: {metric} is given twice; keep one tolerance")
        found.append(Tolerance(metric, limit, relative))
    return tuple(found)


def result_key(nodeid: str, modification: str, params: dict[str, Any]) -> str:
    """What matches a result across runs: test id, modification and params (candidates: the
    label only)."""
    if modification == "candidate":
        params = {"label": params.get("label")}
    normal = json.loads(json.dumps(jsonable(params), default=str))
    return json.dumps([nodeid, modification, normal], sort_keys=True)


@dataclass
class OldReport:
    """An earlier JSON report's results, by :func:`result_key`, and the environments they were
    measured in (by id; none in a report from before they were recorded)."""

    path: Path
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    environments: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> OldReport:
        where = f"--hemorrhage-compare={path}"
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise HemorrhageError(
                f"{where}: no such file; give the JSON report (--hemorrhage-report) of an "
                "earlier run"
            ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HemorrhageError(
                f"{where}: not a JSON report ({first_line(exc)}); give the file an earlier run "
                "wrote with --hemorrhage-report"
            ) from None
        results = data.get("results") if isinstance(data, dict) else None
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("schema_version"), int)
            or not isinstance(results, list)
            or not all(isinstance(r, dict) and "nodeid" in r and "metrics" in r for r in results)
        ):
            raise HemorrhageError(
                f"{where}: not a pytest-hemorrhage report (no schema_version and results); give "
                "the file an earlier run wrote with --hemorrhage-report"
            )
        environments = data.get("environments")
        old = cls(Path(path), environments=environments if isinstance(environments, dict) else {})
        for record in results:
            key = result_key(record["nodeid"], record.get("modification", ""), record["params"])
            old.results.setdefault(key, record)  # a test measuring the same thing twice: first
        return old

    def compare(
        self,
        record: dict[str, Any],
        tolerances: tuple[Tolerance, ...],
        environment: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The comparison of a new report record: per metric in both, the old value and the
        change; ``failures``: one line per tolerance exceeded; ``environment``: what changed
        from the old result's environment to ``environment`` (the new record's), None where
        either was not recorded."""
        key = result_key(record["nodeid"], record["modification"], record["params"])
        old = self.results.get(key)
        out: dict[str, Any] = {"file": self.path.name, "matched": old is not None}
        if old is None:
            return out
        known = old.get("environment")
        before = self.environments.get(known) if isinstance(known, str) else None
        out["environment"] = changes(before, environment)
        limits = {t.metric: t for t in tolerances}
        metrics, failures = {}, []
        for metric, new in record["metrics"].items():
            before = old["metrics"].get(metric)
            if not isinstance(before, (int, float)) or not math.isfinite(before):
                continue  # not measured then, or non-finite (null in JSON): nothing to compare
            change = new - before
            relative = change / abs(before) if before else (0.0 if change == 0 else math.inf)
            metrics[metric] = {"old": before, "change": change, "relative": relative}
            tolerance = limits.get(metric)
            if tolerance is not None and tolerance.exceeded(before, new):
                rise = _relative(relative) if tolerance.relative else f"{change:+.4g}"
                failures.append(
                    f"{metric}: {new:.4f} vs {before:.4f} in {self.path.name} "
                    f"({rise} > {tolerance})"
                )
        out.update(metrics=metrics, failures=failures)
        return out


def _relative(value: float) -> str:
    return "from 0" if math.isinf(value) else f"{value:+.0%}"
