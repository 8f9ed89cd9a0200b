"""The Markdown summary a CI job shows: appended to ``$GITHUB_STEP_SUMMARY`` when it is set.

Results with their budgets, margins (budget - value, or - its upper bound with ``confidence``,
per budgeted metric) and verdicts; a note when the reference was built under another
environment; the comparison with an earlier report (what changed in the environment, old value
and change per compared metric, unmatched results noted); and the thresholds found. GitHub
renders the file on the run's summary page.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .comparison import shown_metrics
from .describe import (
    DEFAULT_METRICS,
    compared_value,
    describe_modification,
    drift_notes,
    environment_change,
    shared_environment_change,
)

__all__ = ["append_step_summary", "render_markdown"]

_MARK = {"passed": "✅ passed", "failed": "❌ failed", "skipped": "⏭ skipped"}


def _num(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "–"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4g}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _verdict(record: Mapping[str, Any]) -> str:
    outcome = record.get("outcome")
    if outcome in _MARK:
        return _MARK[outcome]
    return outcome or ("❌ over budget" if record.get("violations") else "measured")


def _results(records: list[Mapping[str, Any]]) -> list[str]:
    lines = [
        "| verdict | test | measured | metric | value | budget | margin |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for record in records:
        budget = {k: v for k, v in record.get("budget", {}).items() if k != "confidence"}
        metrics = record.get("metrics", {})
        shown = list(budget) or [m for m in DEFAULT_METRICS if m in metrics]
        what = describe_modification(record.get("modification", "?"), record.get("params", {}))
        test = record.get("nodeid", "").rpartition("::")[2] or record.get("nodeid", "")
        for i, metric in enumerate(shown):
            value, limit = metrics.get(metric), budget.get(metric)
            compared = compared_value(record, metric) if limit is not None else value
            margin = (
                _num(limit - compared)
                if isinstance(limit, (int, float)) and isinstance(compared, (int, float))
                else "–"
            )
            shown_value = _num(value)
            if isinstance(compared, float) and math.isfinite(compared) and compared != value:
                level = record["budget"]["confidence"]
                shown_value += f" (upper {level:.0%} bound {_num(compared)})"
            first = (_verdict(record), f"`{_cell(test)}`", _cell(what)) if i == 0 else ("", "", "")
            lines.append(
                f"| {' | '.join(first)} | {metric} | {shown_value} | {_num(limit)} | {margin} |"
            )
    return lines


def _comparison(report: Mapping[str, Any]) -> list[str]:
    header = report.get("comparison") or {}
    tolerances = {
        t["metric"]: (f"{t['limit']:.0%}" if t["relative"] else f"{t['limit']:g}")
        for t in header.get("fail", [])
    }
    results = list(report.get("results", []))
    shared = shared_environment_change(results)
    per_result = [
        f"`{_cell(r.get('nodeid', '').rpartition('::')[2])}` "
        f"{_cell(describe_modification(r.get('modification', '?'), r.get('params', {})))}: "
        f"{_cell(str(environment_change(r)))}"
        for r in results
        if shared is None and environment_change(r) is not None
    ]
    lines = [
        "",
        f"### Compared with `{_cell(Path(str(header.get('file', '?'))).name)}`",
        "",
        *([f"Environment: {_cell(shared)}", ""] if shared is not None else []),
        *(["Environment per result: " + "; ".join(per_result), ""] if per_result else []),
        "| test | measured | metric | old | new | change | tolerance |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    unmatched = []
    for record in results:
        comparison = record.get("comparison") or {}
        what = describe_modification(record.get("modification", "?"), record.get("params", {}))
        test = record.get("nodeid", "").rpartition("::")[2]
        if not comparison.get("matched"):
            unmatched.append(f"`{_cell(test)}` {_cell(what)}")
            continue
        failing = {line.partition(":")[0] for line in comparison.get("failures", [])}
        for metric, entry in shown_metrics(record, comparison, tolerances).items():
            new = record.get("metrics", {}).get(metric)
            relative = entry.get("relative")
            change = _num(entry.get("change"))
            if isinstance(relative, (int, float)) and math.isfinite(relative):
                change += f" ({relative:+.0%})"
            flag = " ❌" if metric in failing else ""
            lines.append(
                f"| `{_cell(test)}` | {_cell(what)} | {metric} | {_num(entry.get('old'))} | "
                f"{_num(new)} | {change}{flag} | {tolerances.get(metric, '–')} |"
            )
    if unmatched:
        lines += ["", "Not in the old report (not compared): " + "; ".join(unmatched)]
    return lines


def _thresholds(explorations: list[Mapping[str, Any]]) -> list[str]:
    found = [e for e in explorations if e.get("kind") == "threshold"]
    if not found:
        return []
    lines = [
        "",
        "### Thresholds found",
        "",
        "| test | modification | parameter | breaks at | metric |",
        "|---|---|---|---:|---|",
    ]
    for e in found:
        test = e.get("nodeid", "").rpartition("::")[2]
        lines.append(
            f"| `{_cell(test)}` | {_cell(str(e.get('modification')))} | {e.get('param')} | "
            f"{_num(e.get('value'))} | {e.get('metric')} |"
        )
    return lines


def render_markdown(report: Mapping[str, Any]) -> str:
    """The summary of one run's JSON report (see ``HemorrhageSession.report``)."""
    model = report.get("model", {})
    records = list(report.get("results", []))
    lines = [
        "## pytest-hemorrhage",
        "",
        f"Baseline `{_cell(str(model.get('spec', '?')))}` (fingerprint "
        f"`{model.get('fingerprint', '?')}`), {len(records)} result(s).",
        "",
        *(f"> ⚠️ {_cell(note)}\n" for note in drift_notes(report)),
        *_results(records),
    ]
    if report.get("comparison"):
        lines += _comparison(report)
    lines += _thresholds(list(report.get("explorations", [])))
    return "\n".join(lines) + "\n"


def append_step_summary(report: Mapping[str, Any], path: str | Path) -> None:
    """Append :func:`render_markdown` to ``path`` (``$GITHUB_STEP_SUMMARY``); an unwritable
    path is one warning, never a failed run."""
    if not (report.get("results") or report.get("explorations")):
        return
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(render_markdown(report) + "\n")
    except OSError as exc:
        warnings.warn(f"cannot append the hemorrhage summary to {path}: {exc}", stacklevel=2)
