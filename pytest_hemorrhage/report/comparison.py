"""The terminal's comparison with an earlier report (``--hemorrhage-compare``): per compared
metric of every result, the old value, the new one and the change; unmatched results noted."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .describe import describe_modification

__all__ = ["render_comparison"]


def _num(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    return f"{value:.4f}" if math.isfinite(value) else str(value)


def render_comparison(report: Mapping[str, Any]) -> str:
    """Plain lines: ``test  what  metric old -> new (change)``, failures marked ``FAIL``."""
    header = report.get("comparison") or {}
    name = Path(str(header.get("file", "?"))).name
    out = [f"hemorrhage compared with {name}:"]
    unmatched = 0
    for record in report.get("results", []):
        comparison = record.get("comparison") or {}
        test = record.get("nodeid", "").rpartition("::")[2] or record.get("nodeid", "")
        what = describe_modification(record.get("modification", "?"), record.get("params", {}))
        if not comparison.get("matched"):
            unmatched += 1
            out.append(f"  {test}  {what}: not in {name} (not compared)")
            continue
        failing = {line.partition(":")[0] for line in comparison.get("failures", [])}
        for metric, entry in comparison.get("metrics", {}).items():
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
