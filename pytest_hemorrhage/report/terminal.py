"""The terminal summary (rich): results against their budgets, and the thresholds found."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["render_explorations", "render_table"]

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


def render_explorations(explorations: Sequence[Mapping[str, Any]], *, width: int = 120,
                        color: bool = False) -> str:
    """One row per threshold search or sweep: what was explored and where it breaks."""
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


def _measures(n: int) -> str:
    return f"{n} measure" + ("" if n == 1 else "s")


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"
