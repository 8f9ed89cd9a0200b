"""Terminal summary table (rich) for the recorded results."""

from __future__ import annotations

import io
import math
from typing import Any

__all__ = ["render_table"]

DEFAULT_COLUMNS = ("ppl_increase", "kl_mean")  # shown for results measured without a budget


def _params(params: dict[str, Any]) -> str:
    if "stages" in params:
        return " → ".join(
            f"{s['name']}({_params({k: v for k, v in s.items() if k != 'name'})})"
            for s in params["stages"]
        )
    return ", ".join(f"{k}={v}" for k, v in params.items())


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.3g}"


def render_table(records: list[dict[str, Any]], *, width: int = 120, color: bool = False) -> str:
    """Per result: a heading (test, outcome, modification), then one row per budgeted metric
    with value, budget, margin (budget - value) and verdict."""
    from rich.console import Console, Group
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    parts: list[Any] = [Text("hemorrhage", style="bold")]
    for record in records:
        budget = {k: v for k, v in record["budget"].items() if k != "confidence"}
        metrics = list(budget) or [m for m in DEFAULT_COLUMNS if m in record["metrics"]]
        what = (
            _params(record["params"])
            if "stages" in record["params"]
            else f"{record['modification']}({_params(record['params'])})"
        )
        outcome = record.get("outcome") or ""
        style = {"passed": "green", "failed": "red", "xfailed": "yellow"}.get(outcome, "")
        parts.append(
            Text.from_markup(
                f"[bold]{escape(record['nodeid'])}[/] [{style or 'default'}]{outcome}[/] "
                f"{escape(what)}"
            )
        )
        table = Table(box=None, show_header=False, padding=(0, 1), pad_edge=False)
        table.add_column(width=4)
        table.add_column(min_width=20)
        for _ in range(3):
            table.add_column(justify="right", min_width=9)
        table.add_column()
        for metric in metrics:
            value, limit = record["metrics"].get(metric), budget.get(metric)
            margin, verdict = "", ""
            if limit is not None:
                finite = value is not None and math.isfinite(value)
                margin = f"{limit - value:+.4f}" if finite else ""
                verdict = "[red]over[/]" if not finite or value > limit else "[green]ok[/]"
            table.add_row(
                "",
                metric,
                _number(value),
                "" if limit is None else f"≤ {limit:.4f}",
                margin,
                verdict,
            )
        if record.get("nonfinite_tokens"):
            table.add_row(
                "", "non-finite tokens", str(record["nonfinite_tokens"]), "≤ 0", "", "[red]over[/]"
            )
        parts.append(table)
    out = io.StringIO()
    Console(file=out, width=width, force_terminal=color, no_color=not color, highlight=False).print(
        Group(*parts)
    )
    return out.getvalue()
