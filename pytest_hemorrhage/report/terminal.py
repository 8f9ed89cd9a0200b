"""The terminal summary (rich): results against their budgets, and the thresholds found.

By default one row per test: its verdict, the measure closest to its budget, that metric and
its margin (budget - value). With ``-v``, every measure with every budgeted metric and one line
of its first metric along the window (per position bucket). Cells never
wrap: what does not fit the terminal is cut with an ellipsis (the JSON and HTML reports keep the
full text); below ``NARROW`` columns the tables become plain lines.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

from .describe import (
    DEFAULT_METRICS,
    compared_value,
    describe_fallbacks,
    describe_modification,
    describe_touched,
    describe_untouched,
)
from .positions import position_chart

__all__ = [
    "closest_metric",
    "early_stop_note",
    "render_explorations",
    "render_notes",
    "render_results",
    "render_table",
]

NARROW = 60  # columns below which tables become plain lines


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.3g}"


def _what(record: Mapping[str, Any]) -> str:
    return describe_modification(record["modification"], record["params"])


def closest_metric(record: Mapping[str, Any]) -> tuple[str, float | None, float | None]:
    """The budgeted metric of ``record`` nearest to (or furthest past) its budget, as
    ``(metric, value, limit)``: the largest ratio of what the budget compares (the value, or
    its upper bound with ``confidence``) to the limit. Without a budget: kl_mean (or the first
    metric), with no limit."""
    budget = {k: v for k, v in record["budget"].items() if k != "confidence"}
    metrics = record["metrics"]

    def ratio(metric: str) -> float:
        value, limit = compared_value(record, metric), budget[metric]
        if value is None or not math.isfinite(value):
            return math.inf
        return value / limit if limit > 0 else (math.inf if value > 0 else 0.0)

    if budget:
        metric = max(budget, key=ratio)
        return metric, metrics.get(metric), budget[metric]
    metric = next((m for m in (*DEFAULT_METRICS[::-1], *metrics) if m in metrics), "")
    return metric, metrics.get(metric), None


def _verdict(record: Mapping[str, Any]) -> str:
    return record.get("outcome") or ("over" if record.get("violations") else "measured")


def render_results(
    records: Sequence[Mapping[str, Any]],
    *,
    width: int = 80,
    color: bool = False,
    verbose: bool = False,
) -> str:
    """The results part of the summary: one row per test, or every measure with ``verbose``;
    then, once each, what modifications applied other than asked (:func:`render_notes`)."""
    if verbose:
        return (
            render_table(list(records), width=width, color=color)
            + render_notes(records, width=width)
            + early_stop_note(records)
        )
    by_test: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        by_test.setdefault(record["nodeid"], []).append(record)
    rows = []
    for nodeid, mine in by_test.items():
        worst = max(mine, key=lambda r: _severity(r))
        metric, value, limit = closest_metric(worst)
        what = _what(worst) + (f" +{len(mine) - 1} more" if len(mine) > 1 else "")
        compared = compared_value(worst, metric) if limit is not None else value
        margin = (
            f"{limit - compared:+.3g}"
            if limit is not None and compared is not None and math.isfinite(compared)
            else ""
        )
        shown = (
            f"{metric} {_g3(value)}"
            + (
                f" (bound {_g3(compared)})"
                if compared is not None and math.isfinite(compared) and compared != value
                else ""
            )
            + (f" ≤ {limit:.3g}" if limit is not None else "")
        )
        rows.append((_verdict(worst), nodeid.rpartition("::")[2] or nodeid, what, shown, margin))
    header = ("verdict", "test", "modification", "closest to budget", "margin")
    table = _table(
        "hemorrhage (one row per test; -v: every measure)",
        header,
        rows,
        width=width,
        color=color,
        flexible=(1, 2),
    )
    return table + render_notes(records, width=width) + early_stop_note(records)


def early_stop_note(records: Sequence[Mapping[str, Any]]) -> str:
    """One line on ``--hemorrhage-early-stop``: measures stopped early and the share of tokens
    they used; those too close to call (every token); those with no budget to decide on."""
    runs = [r["details"]["early_stop"] for r in records if "early_stop" in r.get("details", {})]
    if not runs:
        return ""
    stopped = [e for e in runs if e["stopped"]]
    parts = []
    if stopped:
        share = sum(e["tokens"] for e in stopped) / sum(e["tokens_max"] for e in stopped)
        parts.append(
            f"{len(stopped)} of {len(runs)} measures settled early on {share:.0%} of their tokens"
        )
    unbudgeted = sum(not e["budgeted"] for e in runs)
    close = len(runs) - len(stopped) - unbudgeted
    if close:
        parts.append(f"{close} too close to call used every token")
    if unbudgeted:
        parts.append(
            f"{unbudgeted} had no budgeted token metric to decide on and used every "
            "token (early stopping needs a budget)"
        )
    return "early stop: " + "; ".join(parts) + "\n"


def render_notes(records: Sequence[Mapping[str, Any]], *, width: int = 80) -> str:
    """One line per distinct fallback the results report (e.g. ``quant.gguf fallbacks: Q4_K ->
    Q5_0 for model.layers.{0..3}.*``) and per modification that left block weights unchanged
    unasked (``describe_untouched``), however many measures applied it; wrapped, not cut."""
    import textwrap

    lines = dict.fromkeys(line for record in records for line in describe_fallbacks(record))
    lines.update(dict.fromkeys(filter(None, map(describe_untouched, records))))
    wrapped = [
        textwrap.fill(
            line,
            max(width - 1, 40),
            subsequent_indent="    ",
            break_long_words=False,
            break_on_hyphens=False,
        )
        for line in lines
    ]
    return "".join(f"{text}\n" for text in wrapped)


def _severity(record: Mapping[str, Any]) -> float:
    metric, _, limit = closest_metric(record)
    value = compared_value(record, metric) if limit is not None else record["metrics"].get(metric)
    if value is None or not math.isfinite(value):
        return math.inf
    return value / limit if limit else value


_STYLES = {
    "passed": "green",
    "failed": "red",
    "xfailed": "yellow",
    "over": "red",
    "xpassed": "yellow",
    "error": "red",
}


def _table(
    title: str,
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    width: int,
    color: bool,
    flexible: Sequence[int],
) -> str:
    """A borderless table that fits ``width``: fixed columns take their widest cell, the
    ``flexible`` ones share the rest and cut what does not fit with an ellipsis. Plain
    ``a · b · c`` lines below ``NARROW`` columns."""
    if width < NARROW:
        lines = [title] + [" · ".join(c for c in row if c) for row in rows]
        return "\n".join(lines) + "\n"
    natural = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    fixed = sum(w for i, w in enumerate(natural) if i not in flexible)
    spare = max(len(flexible) * 8, width - 1 - fixed - 2 * (len(header) - 1))
    widths = list(natural)
    for n, i in enumerate(flexible):  # the first flexible column first, up to its natural width
        others = sum(natural[j] for j in flexible[n + 1 :])
        widths[i] = min(natural[i], max(spare // len(flexible), spare - others, 8))
        spare -= widths[i]
    for i in flexible:  # what a column left goes to the others, in order
        extra = min(spare, natural[i] - widths[i])
        widths[i] += extra
        spare -= extra
    right = [name == "margin" for name in header]

    def line(cells: Sequence[str], paint: str = "") -> str:
        out = []
        for k, (cell, w) in enumerate(zip(cells, widths, strict=True)):
            text = cell if len(cell) <= w else cell[: w - 1] + "…"
            text = text.rjust(w) if right[k] else text.ljust(w)
            if k == 0 and paint and color:
                text = f"{paint}{text}{_RESET}"
            out.append(text)
        return (" " + "  ".join(out)).rstrip()

    rule = " " + "─" * (sum(widths) + 2 * (len(widths) - 1))
    body = [line(row, _ANSI.get(_STYLES.get(row[0], ""), "")) for row in rows]
    bold = (_BOLD, _RESET) if color else ("", "")
    return "\n".join([f"{bold[0]}{title}{bold[1]}", "", line(header), rule, *body]) + "\n"


_ANSI = {"green": "\x1b[32m", "red": "\x1b[31m", "yellow": "\x1b[33m"}
_BOLD, _RESET = "\x1b[1m", "\x1b[0m"


def _print(renderable: Any, width: int, color: bool) -> str:
    from rich.console import Console

    out = io.StringIO()
    Console(file=out, width=width, force_terminal=color, no_color=not color, highlight=False).print(
        renderable
    )
    return out.getvalue()


def render_table(records: list[dict[str, Any]], *, width: int = 80, color: bool = False) -> str:
    """Per result: a heading (test, outcome, modification), then one line per budgeted metric
    with value, budget, margin and verdict; with ``confidence``, margin and verdict are the
    upper bound's (what the check compared), shown after the verdict."""
    paint = (
        (lambda text, style: f"{_ANSI[style]}{text}{_RESET}")
        if color
        else (lambda text, style: text)
    )
    lines = [f"{_BOLD}hemorrhage{_RESET}" if color else "hemorrhage"]
    for record in records:
        budget = {k: v for k, v in record["budget"].items() if k != "confidence"}
        metrics = list(budget) or [m for m in DEFAULT_METRICS if m in record["metrics"]]
        outcome = record.get("outcome") or ""
        heading = f"{record['nodeid']} {outcome} {_what(record)}"
        if len(heading) > width:
            heading = heading[: width - 1] + "…"
        if outcome in _STYLES and color:
            heading = heading.replace(f" {outcome} ", f" {paint(outcome, _STYLES[outcome])} ", 1)
        lines.append(heading)
        rows = []
        for metric in metrics:
            value, limit = record["metrics"].get(metric), budget.get(metric)
            margin, verdict = "", ""
            if limit is not None:
                compared = compared_value(record, metric)
                finite = compared is not None and math.isfinite(compared)
                margin = f"{limit - compared:+.4f}" if finite else ""
                over = not finite or compared > limit
                verdict = paint("over", "red") if over else paint("ok", "green")
                if compared != value and finite:
                    level = record["budget"]["confidence"]
                    verdict += f" (upper {level:.0%} bound {_number(compared)})"
            rows.append(
                (metric, _number(value), "" if limit is None else f"≤ {limit:.4f}", margin, verdict)
            )
        if record.get("nonfinite_tokens"):
            rows.append(
                (
                    "non-finite tokens",
                    str(record["nonfinite_tokens"]),
                    "≤ 0",
                    "",
                    paint("over", "red"),
                )
            )
        for metric, value, limit, margin, verdict in rows:
            lines.append(f"      {metric:<20} {value:>9} {limit:>9} {margin:>9} {verdict}".rstrip())
        touched = describe_touched(record)
        if touched:
            lines.append(f"      {touched}")
        along = _by_position(record, width - 6)
        if along:
            lines.append(f"      {along}")
    return "\n".join(lines) + "\n"


def _by_position(record: Mapping[str, Any], width: int) -> str:
    """One line of the charts' first metric along the window (:mod:`.positions`):
    ``by position: kl_mean 0.0482 (1-15), 0.0423 (16-63), 0.043 (64-127)``; the first and the
    last bucket only when all of them would be wider than ``width``. Empty without a chart."""
    chart = position_chart(record)
    if chart is None:
        return ""
    series = chart.series[0]
    cells = [f"{_g3(v)} ({label})" for v, label in zip(series.values, chart.labels, strict=True)]
    line = f"by position: {series.metric} {', '.join(cells)}"
    if len(line) > width:
        line = f"by position: {series.metric} {cells[0]} … {cells[-1]}"
    return line


def render_explorations(
    explorations: Sequence[Mapping[str, Any]], *, width: int = 80, color: bool = False
) -> str:
    """Per threshold search, sweep or calibration: a heading line (test, what was explored)
    and the finding on the line below, wrapped at word boundaries, never inside a cell."""
    from rich.console import Group
    from rich.markup import escape
    from rich.padding import Padding
    from rich.text import Text

    parts: list[Any] = [Text("hemorrhage thresholds", style="bold")]
    for record in explorations:
        test = record["nodeid"].rpartition("::")[2]
        if record["kind"] == "decoding_calibration":
            before, after = record["kl_mean"]
            top_p = f", top_p {record['top_p']:g}" if record["top_p"] is not None else ""
            what, found = (
                "decoding calibration",
                (
                    f"temperature {record['temperature']:.3g}{top_p}: "
                    f"kl_mean {before:.4f} → {after:.4f}"
                ),
            )
        else:
            fixed = ", ".join(f"{k}={v}" for k, v in record.get("fixed", {}).items())
            what = (
                f"{record['modification']}({fixed}) {record['param']}"
                if fixed
                else f"{record['modification']} {record['param']}"
            )
            found = _describe(record)
        heading = Text.from_markup(f"[bold]{escape(test)}[/] · {escape(what)}", overflow="ellipsis")
        heading.no_wrap = True
        parts.append(heading)
        parts.append(Padding(Text.from_markup(found), (0, 0, 0, 2)))
    return _print(Group(*parts), width, color)


def _describe(record: Mapping[str, Any]) -> str:
    from rich.markup import escape

    param = record["param"]
    if record["kind"] == "sweep":
        fit = record["fit"]
        n = len(record["points"])
        if record["s0"] is None:
            return f"[yellow]no phase transition[/] ({n} points): {escape(fit['reason'])}"
        se = record["s0_stderr"]
        return (
            f"phase transition at {param}={record['s0']:.3g}"
            + (f" ± {se:.2g}" if se is not None else "")
            + f" (fit R² {fit['r2']:.2f}, {n} points, {escape(record['metric'])})"
        )
    how = {"bisection": "bisection", "shrinking": "hypothesis"}.get(record["method"], "")
    limit = record["budget"].get(record["metric"])
    over = f" ({record['metric']} > {limit:g})" if limit is not None else ""
    if record["value"] is None:
        text = (
            f"no break: passes up to {param}={_fmt(record['bracket'][0])}; "
            f"{_measures(record['evaluations'])} by {how}"
        )
    else:
        passing = record["bracket"][0]
        text = (
            f"[bold]breaks at {param}={_fmt(record['value'])}[/]{over}; "
            + (
                f"passes at {param}={_fmt(passing)}"
                if passing is not None
                else "breaks at every value measured"
            )
            + f"; {_measures(record['evaluations'])} by {how}"
        )
    if not record["monotone"]:
        note = record["note"].partition("non-monotone damage: ")[2] or record["note"]
        text += f"\n[yellow]non-monotone:[/] {escape(note)}"
    return text


def _measures(n: int) -> str:
    return f"{n} measure" + ("" if n == 1 else "s")


def _g3(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"
