"""Terminal summary table (rich) for the recorded results."""

from __future__ import annotations

import io
import math
from typing import Any

__all__ = ["render_table"]

DEFAULT_COLUMNS = ("ppl_increase", "kl_mean")  # shown for results measured without a budget


def _params(params: dict[str, Any]) -> str:
    if "stages" in params:
        return " → ".join(f"{s['name']}({_params({k: v for k, v in s.items() if k != 'name'})})"
                          for s in params["stages"])
    return ", ".join(f"{k}={v}" for k, v in params.items())


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.3g}"


def render_table(records: list[dict[str, Any]], *, width: int = 120, color: bool = False) -> str:
    """One row per budgeted metric of each result: value, budget, margin, verdict."""
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="hemorrhage", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("test / modification", overflow="fold", ratio=1)
    table.add_column("metric", no_wrap=True)
    for name in ("value", "budget", "margin"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("", no_wrap=True)
    for record in records:
        budget = {k: v for k, v in record["budget"].items() if k != "confidence"}
        metrics = list(budget) or [m for m in DEFAULT_COLUMNS if m in record["metrics"]]
        test = record["nodeid"].rpartition("::")[2]
        if record.get("outcome"):
            test += f" [{record['outcome']}]"
        for i, metric in enumerate(metrics):
            value = record["metrics"].get(metric)
            limit = budget.get(metric)
            if limit is None:
                margin, verdict = "", ""
            else:
                over = value is None or not math.isfinite(value) or value > limit
                margin = (f"{(limit - value) / limit:+.0%}" if limit and value is not None
                          and math.isfinite(value) else "")
                verdict = "[red]over[/]" if over else "[green]ok[/]"
            what = (_params(record["params"]) if "stages" in record["params"] else
                    f"{record['modification']}({_params(record['params'])})")
            table.add_row(f"{escape(test)}\n  {escape(what)}" if i == 0 else "",
                          metric, _number(value), _number(limit), margin, verdict)
        if record.get("nonfinite_tokens"):
            table.add_row("", "non-finite", str(record["nonfinite_tokens"]), "0", "",
                          "[red]over[/]")
    out = io.StringIO()
    Console(file=out, width=width, force_terminal=color, no_color=not color,
            highlight=False).print(table)
    return out.getvalue()
