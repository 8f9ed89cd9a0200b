"""The terminal's comparison with an earlier report (``--hemorrhage-compare``): what changed in
the environment (once for the run, or per result where they differ), then per compared metric
of every result, the old value, the new one and the change; unmatched results noted."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..environment import NOT_RECORDED
from .describe import (
    DEFAULT_METRICS,
    describe_modification,
    environment_change,
    shared_environment_change,
)

__all__ = ["render_comparison", "shown_metrics"]


def _num(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    return f"{value:.4f}" if math.isfinite(value) else str(value)


def shown_metrics(
    record: Mapping[str, Any], comparison: Mapping[str, Any], tolerances: Any
) -> dict[str, Any]:
    """The compared metrics worth a line: those with a tolerance or a budget (else the
    default ones); the JSON report keeps every metric's comparison."""
    budget = {k for k in record.get("budget", {}) if k != "confidence"}
    wanted = set(tolerances) | budget or set(DEFAULT_METRICS)
    return {m: e for m, e in comparison.get("metrics", {}).items() if m in wanted}


def render_comparison(report: Mapping[str, Any]) -> str:
    """Plain lines: ``test  what  metric old -> new (change)``, failures marked ``FAIL``."""
    header = report.get("comparison") or {}
    tolerances = {t["metric"] for t in header.get("fail", [])}
    name = Path(str(header.get("file", "?"))).name
    out = [f"hemorrhage compared with {name}:"]
    results = list(report.get("results", []))
    shared = shared_environment_change(results)
    if shared is not None:
        out.append(f"  environment: {shared}" + (f" in {name}" if shared == NOT_RECORDED else ""))
    unmatched = 0
    for record in results:
        comparison = record.get("comparison") or {}
        test = record.get("nodeid", "").rpartition("::")[2] or record.get("nodeid", "")
        what = describe_modification(record.get("modification", "?"), record.get("params", {}))
        if not comparison.get("matched"):
            unmatched += 1
            out.append(f"  {test}  {what}: not in {name} (not compared)")
            continue
        if shared is None:
            out.append(f"  {test}  {what}  environment: {environment_change(record)}")
        failing = {line.partition(":")[0] for line in comparison.get("failures", [])}
        for metric, entry in shown_metrics(record, comparison, tolerances).items():
            relative = entry.get("relative")
            pct = (
                f", {relative:+.0%}"
                if isinstance(relative, (int, float)) and math.isfinite(relative)
                else ""
            )
            new = record.get("metrics", {}).get(metric)
            mark = "  FAIL" if metric in failing else ""
            out.append(
                f"  {test}  {what}  {metric} {_num(entry.get('old'))} -> {_num(new)} "
                f"({entry.get('change', 0):+.4f}{pct}){mark}"
            )
    if unmatched:
        out.append(f"  {unmatched} result(s) not in {name}: noted, never failed")
    return "\n".join(out) + "\n"
