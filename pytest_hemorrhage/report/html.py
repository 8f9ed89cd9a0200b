"""``--hemorrhage-html PATH``: the release report, one self-contained HTML page.

A release reviewer's single page: the model and data fingerprints, where the results were
measured (and a warning when the reference was built elsewhere, or the environment changed since
the compared report), every result against its
budget, the explored curves (budget, threshold and phase transition marked) and the per-block
blame of failed checks. Where the windows are long enough to hold several
position buckets, each result's metric is drawn along the window (position buckets, error bars
and budget lines) as inline SVG. The page carries its CSS inline and its curves as base64 PNG
data URIs; it has no script, and its Content-Security-Policy forbids any fetch, so it reads the same
offline, attached to a CI run or mailed around. Without matplotlib the page keeps its tables
and position charts, and says why the curves are missing.

The input is the JSON report's dict (``HemorrhageSession.report()``), before or after the
JSON round trip: a non-finite metric may be a float (``nan``, ``inf``) or ``None``.
"""

from __future__ import annotations

import base64
import html
import io
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..diagnosis import Diagnosis, severity
from .describe import (
    DEFAULT_METRICS,
    compared_value,
    describe_fallbacks,
    describe_modification,
    drift_notes,
    shared_environment_change,
)
from .positions import PositionChart, Series, bucket_label, position_chart

__all__ = ["render_html", "write_html"]

OUTCOME_CLASS = {
    "passed": "ok",
    "xfailed": "warn",
    "xpassed": "warn",
    "failed": "bad",
    "error": "bad",
    "skipped": "muted",
}
KNOWN_KEYS = {
    "schema_version",
    "plugin_version",
    "model",
    "data",
    "baseline",
    "results",
    "explorations",
    "environments",
}
INSTALL = "pip install pytest-hemorrhage[plot]"

# Nothing outside the page may load: no network, no script; images only from data: URIs.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

CSS = """
:root{--ok:#1a7f37;--ok-bg:#dafbe1;--bad:#cf222e;--bad-bg:#ffebe9;--warn:#9a6700;
--warn-bg:#fff8c5;--muted:#57606a;--line:#d0d7de;--bg:#f6f8fa;--accent:#0969da}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:#1f2328;font:14px/1.5 system-ui,-apple-system,
"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1180px;margin:0 auto;padding:24px 20px 48px}
header.top{background:#fff;border-bottom:1px solid var(--line);padding:20px 0 16px}
header.top>div{max-width:1180px;margin:0 auto;padding:0 20px}
h1{font-size:22px;margin:0 0 4px}
h2{font-size:17px;margin:32px 0 10px;padding-bottom:6px;border-bottom:1px solid var(--line)}
main>h2:first-child{margin-top:4px}
h3{font-size:14px;margin:0 0 6px;word-break:break-word}
.sub{color:var(--muted);margin:0}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px}
.banner{margin:14px 0 0;padding:10px 14px;border-radius:6px;font-weight:600}
.banner.ok{background:var(--ok-bg);color:var(--ok)}
.banner.bad{background:var(--bad-bg);color:var(--bad)}
.banner.warn{background:var(--warn-bg);color:var(--warn)}
.banner ul{margin:6px 0 0;padding-left:20px;font-weight:400}
.banner a{color:inherit}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:14px}
.card{background:#fff;border:1px solid var(--line);border-radius:8px;padding:14px 16px;
margin:0 0 14px}
.grid .card{margin:0}
dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;margin:0}
dt{color:var(--muted)}
dd{margin:0;word-break:break-all}
table{border-collapse:collapse;width:100%;background:#fff}
th,td{padding:4px 8px;text-align:left;vertical-align:top}
th{font-weight:600;color:var(--muted);font-size:12px;border-bottom:1px solid var(--line);
white-space:nowrap}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.results{border:1px solid var(--line);border-radius:8px}
table.results tbody{border-top:1px solid var(--line)}
table.results tbody:nth-of-type(even){background:#fbfcfd}
td.test{max-width:330px;word-break:break-word}
td.what{max-width:300px;word-break:break-word}
.badge{display:inline-block;padding:0 7px;border-radius:10px;font-size:12px;font-weight:600;
white-space:nowrap}
.badge.ok{background:var(--ok-bg);color:var(--ok)}
.badge.bad{background:var(--bad-bg);color:var(--bad)}
.badge.warn{background:var(--warn-bg);color:var(--warn)}
.badge.muted{background:#eaeef2;color:var(--muted)}
tr.violation td{color:var(--bad);font-size:12.5px;padding-top:0}
details{margin-top:4px;font-size:12.5px}
summary{color:var(--accent);cursor:pointer}
.note{color:var(--muted);font-style:italic}
.warnline{color:var(--warn)}
.curve{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
.curve img{max-width:100%;width:640px;height:auto;border:1px solid var(--line);border-radius:4px}
.curve table{width:auto;min-width:220px}
.finding{margin:0 0 10px}
.bar{position:relative;width:220px;height:12px;background:#eaeef2;border-radius:2px}
.bar span{position:absolute;left:0;top:0;bottom:0;background:#8c959f;border-radius:2px}
.bar span.hot{background:var(--bad)}
.bar i{position:absolute;top:-2px;bottom:-2px;border-left:2px dashed #1f2328}
tr.begins td{background:var(--bad-bg)}
tr.most td:first-child{font-weight:700}
a{color:var(--accent)}
.along{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
.along svg{width:420px;max-width:100%;height:auto;border:1px solid var(--line);border-radius:4px;
background:#fff}
.along table{width:auto;min-width:220px}
svg text{font:11px system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;fill:#57606a}
svg .axis{stroke:#8c959f;stroke-width:1}
svg .grid{stroke:#eaeef2;stroke-width:1}
svg .err{stroke:var(--accent);stroke-width:1.5}
svg .point{fill:var(--accent)}
svg .budget{stroke:#1f2328;stroke-width:1.5;stroke-dasharray:5 3}
svg .budget.range{stroke:var(--bad)}
@media print{body{background:#fff}.card{break-inside:avoid}}
"""


def render_html(report: Mapping[str, Any]) -> str:
    """The report as one self-contained HTML page.

    Args:
        report: the JSON report's dict (``HemorrhageSession.report()``).

    Returns:
        The page's text (UTF-8 when written).
    """
    results = list(report.get("results") or [])
    explorations = list(report.get("explorations") or [])
    model = report.get("model") or {}
    title = f"hemorrhage report: {model.get('spec', 'no model')}"
    body = [
        _page_header(report, results),
        "<main>",
        _fingerprints(report),
        _results(results),
        _positions(results),
        _curves(explorations),
        _blame(results),
        "</main>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_escape(title)}</title><style>{CSS}</style></head><body>\n"
        + "\n".join(part for part in body if part)
        + "\n</body></html>\n"
    )


def write_html(report: Mapping[str, Any], path: Path | str) -> Path | None:
    """Write :func:`render_html`'s page to ``path`` (parent directories created).

    A path that cannot be written costs the page, not the run: one warning naming the path
    and the reason, and None; the verdicts are left as they are.

    Returns:
        The path written, or None when it could not be.
    """
    path = Path(path)
    page = render_html(report)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(page, encoding="utf-8")
    except OSError as exc:
        if isinstance(exc, (FileExistsError, NotADirectoryError)):
            reason, where = f"{_file_in_the_way(path)} is not a directory", ""
        else:
            reason = exc.strerror or str(exc)
            where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else ""
        warnings.warn(
            f"hemorrhage: could not write the HTML report to {path}: {reason}{where}; "
            "the test verdicts are unchanged",
            stacklevel=2,
        )
        return None
    return path


def _file_in_the_way(path: Path) -> Path:
    """The ancestor of ``path`` that exists but is not a directory."""
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            return parent
    return path.parent


# -- formatting ------------------------------------------------------------------------------


def _escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number_text(value: Any) -> str:
    """A metric for reading: 4 decimals in the usual range, 3 significant digits outside."""
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _escape(value)
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4f}" if 0.001 <= abs(value) < 1000 else f"{value:.3g}"


def _signed(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return ""
    return ("+" if value >= 0 else "−") + _number_text(abs(value))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _modification_text(record: Mapping[str, Any]) -> str:
    """A result's (or stage's) modification with its parameters."""
    return describe_modification(record.get("modification", "?"), record.get("params") or {})


def _badge(outcome: str | None) -> str:
    if not outcome:
        return '<span class="badge muted">not run</span>'
    return f'<span class="badge {OUTCOME_CLASS.get(outcome, "muted")}">{_escape(outcome)}</span>'


# -- header and fingerprints -----------------------------------------------------------------


def _page_header(report: Mapping[str, Any], results: Sequence[Mapping[str, Any]]) -> str:
    model = report.get("model") or {}
    outcomes: dict[str, str | None] = {}
    for record in results:
        outcomes[record.get("nodeid", "")] = record.get("outcome")
    counts: dict[str, int] = {}
    for outcome in outcomes.values():
        counts[outcome or "not run"] = counts.get(outcome or "not run", 0) + 1
    over = [(i, r) for i, r in enumerate(results) if r.get("violations")]
    tally = ", ".join(f"{n} {o}" for o, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    sub = (
        f"plugin {_escape(report.get('plugin_version', '?'))} · report schema "
        f"{_escape(report.get('schema_version', '?'))} · {len(results)} measure"
        f"{'' if len(results) == 1 else 's'} in {len(outcomes)} test"
        f"{'' if len(outcomes) == 1 else 's'}" + (f" ({_escape(tally)})" if tally else "")
    )
    if not results:
        banner = '<div class="banner ok">no measures were recorded</div>'
    elif not over:
        banner = (
            f'<div class="banner ok">every measure within its budget '
            f"({len(results)} of {len(results)})</div>"
        )
    else:
        items = "".join(
            f'<li><a href="#r{i}">{_escape(r.get("nodeid", ""))}</a>: '
            f"{_escape(_modification_text(r))}</li>"
            for i, r in over[:20]
        )
        more = f"<li>… and {len(over) - 20} more</li>" if len(over) > 20 else ""
        banner = (
            f'<div class="banner bad">{len(over)} of {len(results)} measures over budget'
            f"<ul>{items}{more}</ul></div>"
        )
    notes = drift_notes(report)
    shared = shared_environment_change(list(results)) if report.get("comparison") else None
    if shared is not None:
        name = Path(str((report.get("comparison") or {}).get("file", "?"))).name
        notes.append(f"environment since {name}: {shared}")
    banner += "".join(f'<div class="banner warn">{_escape(note)}</div>' for note in notes)
    return (
        f'<header class="top"><div><h1>Hemorrhage release report: '
        f"<code>{_escape(model.get('spec', 'no model'))}</code></h1>"
        f'<p class="sub">{sub}</p>{banner}</div></header>'
    )


def _fingerprints(report: Mapping[str, Any]) -> str:
    cards = []
    for key, title in (("model", "Model"), ("data", "Evaluation data"), ("baseline", "Baseline")):
        if isinstance(report.get(key), Mapping):
            cards.append(_card_dl(title, report[key]))
    reference = (report.get("data") or {}).get("reference_environment")
    measured = {r.get("environment") for r in report.get("results") or []}
    for key, environment in (report.get("environments") or {}).items():
        if isinstance(environment, Mapping):
            whose = [
                w
                for w, used in (("results", key in measured), ("reference", key == reference))
                if used
            ]
            title = f"Environment {key}" + (f" ({', '.join(whose)})" if whose else "")
            cards.append(_card_dl(title, _environment_rows(environment)))
    for key, value in report.items():  # sections later versions add (e.g. settings)
        if key not in KNOWN_KEYS and isinstance(value, Mapping):
            cards.append(_card_dl(key.replace("_", " ").capitalize(), value))
    if not cards:
        return (
            '<h2 id="fingerprints">Model and data</h2>'
            '<p class="note">no model was loaded in this run</p>'
        )
    return f'<h2 id="fingerprints">Model and data</h2><div class="grid">{"".join(cards)}</div>'


def _environment_rows(environment: Mapping[str, Any]) -> dict[str, str]:
    """An environment (``environment.measured_in``) as one line per group."""
    rows = {}
    for key, value in environment.items():
        if isinstance(value, Mapping):
            value = ", ".join(
                f"{k} {v}" if key == "packages" else f"{k}={v}"
                for k, v in value.items()
                if v is not None
            )
        rows[key.replace("_", " ")] = "–" if value in (None, "") else str(value)
    return rows


def _card_dl(title: str, values: Mapping[str, Any]) -> str:
    rows = []
    for key, value in values.items():
        shown = _escape(value) if isinstance(value, (str, Mapping, list)) else _number_text(value)
        if "fingerprint" in key or key == "spec":
            shown = f"<code>{shown}</code>"
        rows.append(f"<dt>{_escape(key)}</dt><dd>{shown}</dd>")
    return f'<section class="card"><h3>{_escape(title)}</h3><dl>{"".join(rows)}</dl></section>'


# -- results ---------------------------------------------------------------------------------


def _results(results: Sequence[Mapping[str, Any]]) -> str:
    head = '<h2 id="results">Results against their budgets</h2>'
    if not results:
        return head + '<p class="note">no measures were recorded</p>'
    blamed = {i for i, r in enumerate(results) if (r.get("details") or {}).get("blame")}
    charted = {i for i, r in enumerate(results) if position_chart(r) is not None}
    rows = [_result_rows(i, r, i in blamed, i in charted) for i, r in enumerate(results)]
    return (
        head + '<table class="results"><thead><tr><th>test</th><th>modification</th>'
        '<th>metric</th><th class="n">value</th><th class="n">± stderr</th>'
        '<th class="n">budget</th><th class="n">margin</th><th>verdict</th></tr></thead>'
        + "".join(rows)
        + "</table>"
    )


def _result_rows(index: int, record: Mapping[str, Any], blamed: bool, charted: bool) -> str:
    budget = dict(record.get("budget") or {})
    confidence = budget.pop("confidence", None)
    metrics = record.get("metrics") or {}
    stderr = record.get("stderr") or {}
    violations = list(record.get("violations") or [])
    names = list(budget) or [m for m in DEFAULT_METRICS if m in metrics] or list(metrics)[:2]
    lines = []
    for metric in names:
        value, limit, se = metrics.get(metric), budget.get(metric), stderr.get(metric)
        compared = compared_value(record, metric)
        margin = limit - compared if _finite(limit) and _finite(compared) else None
        verdict = ""
        if limit is not None:
            # the plugin's verdict (its violation lines); a non-finite value is never ok
            over = not _finite(value) or any(v.startswith(f"{metric}:") for v in violations)
            verdict = (
                '<span class="badge bad">over</span>'
                if over
                else '<span class="badge ok">ok</span>'
            )
        bound = (
            f' <span class="note">(upper {confidence:.0%} bound {_number_text(compared)})</span>'
            if compared != value and _finite(compared)
            else ""
        )
        lines.append(
            f'<td>{_escape(metric)}</td><td class="n">{_number_text(value)}{bound}</td>'
            f'<td class="n">{"" if se is None else "± " + _number_text(se)}</td>'
            f'<td class="n">{"" if limit is None else "≤ " + _number_text(limit)}</td>'
            f'<td class="n">{_signed(margin)}</td><td>{verdict}</td>'
        )
    if record.get("nonfinite_tokens"):
        lines.append(
            f'<td>non-finite tokens</td><td class="n">{_number_text(record["nonfinite_tokens"])}'
            '</td><td></td><td class="n">≤ 0</td><td></td>'
            '<td><span class="badge bad">over</span></td>'
        )
    if not lines:
        lines.append('<td colspan="6" class="note">no metrics</td>')
    nodeid = record.get("nodeid", "")
    test = (
        f'<td class="test" rowspan="{len(lines)}"><span class="mono">{_escape(nodeid)}</span> '
        f"{_badge(record.get('outcome'))}"
        + (f' <a href="#p{index}">by position ↓</a>' if charted else "")
        + (f' <a href="#b{index}">blame ↓</a>' if blamed else "")
        + "</td>"
    )
    what = (
        f'<td class="what" rowspan="{len(lines)}"><code>'
        f"{_escape(_modification_text(record))}</code>"
        f"{_folded_details(record)}</td>"
    )
    out = [f'<tbody id="r{index}"><tr>{test}{what}{lines[0]}</tr>']
    out += [f"<tr>{line}</tr>" for line in lines[1:]]
    shown = {f"{m}:" for m in names}
    for violation in violations:  # lines the budget rows do not already show
        if not any(violation.startswith(s) for s in shown):
            out.append(
                '<tr class="violation"><td></td><td></td>'
                f'<td colspan="6">{_escape(violation)}</td></tr>'
            )
    out.append("</tbody>")
    return "".join(out)


def _folded_details(record: Mapping[str, Any]) -> str:
    """Every metric, the perplexities, what was applied other than asked (GGUF fallbacks) and
    the composition's stages, folded away."""
    metrics = record.get("metrics") or {}
    stderr = record.get("stderr") or {}
    rows = [
        f'<tr><td>{_escape(k)}</td><td class="n">{_number_text(v)}</td><td class="n">'
        f"{'' if stderr.get(k) is None else '± ' + _number_text(stderr[k])}</td></tr>"
        for k, v in metrics.items()
    ]
    facts = [
        f"{label} {_number_text(record[key])}"
        for key, label in (
            ("baseline_ppl", "baseline ppl"),
            ("modified_ppl", "modified ppl"),
            ("tokens", "tokens"),
        )
        if key in record
    ]
    stages = ""
    if record.get("stages"):
        items = "".join(
            f"<li><code>{_escape(_modification_text(s))}</code>: "
            + ", ".join(
                f"{_escape(k)} {_number_text(v)}"
                for k, v in (s.get("metrics") or {}).items()
                if k in DEFAULT_METRICS
            )
            + "</li>"
            for s in record["stages"]
        )
        stages = f"<p>after each earlier stage:</p><ul>{items}</ul>"
    notes = "".join(
        f'<p class="fallback">{_escape(line)}</p>' for line in describe_fallbacks(record)
    )
    if not rows and not facts and not stages and not notes:
        return ""
    return (
        f"<details><summary>all {len(metrics)} metrics</summary>"
        f"<p>{_escape(' · '.join(facts))}</p>{notes}"
        f"<table>{''.join(rows)}</table>{stages}</details>"
    )


# -- by position -----------------------------------------------------------------------------

# one chart's size in SVG user units and its plot area's margins
CHART_WIDTH, CHART_HEIGHT = 420, 220
LEFT, RIGHT, TOP, BOTTOM = 58, 14, 14, 40


def _positions(results: Sequence[Mapping[str, Any]]) -> str:
    cards = []
    for i, record in enumerate(results):
        chart = position_chart(record)
        if chart is not None:
            cards.append(_position_card(i, record, chart))
    if not cards:
        return ""
    return (
        '<h2 id="positions">Where along the context: metrics by position</h2>'
        '<p class="sub">each metric over the tokens whose prediction had that many tokens of '
        "context (log-spaced buckets), ± its standard error; dashed: the budget, a "
        "position range's drawn over that range only.</p>" + "".join(cards)
    )


def _position_card(index: int, record: Mapping[str, Any], chart: PositionChart) -> str:
    charts = "".join(_position_svg(chart, series) for series in chart.series)
    head = "".join(f'<th class="n">{_escape(s.metric)}</th>' for s in chart.series)
    rows = "".join(
        f'<tr><td class="n">{_escape(label)}</td><td class="n">{_number_text(tokens)}</td>'
        + "".join(
            f'<td class="n">{_number_text(s.values[i])}'
            + ("" if s.stderr[i] is None else f" ± {_number_text(s.stderr[i])}")
            + "</td>"
            for s in chart.series
        )
        + "</tr>"
        for i, (label, tokens) in enumerate(zip(chart.labels, chart.tokens, strict=True))
    )
    limits = [
        f"{_escape(limit.key)} ≤ {_number_text(limit.value)} (positions "
        f"{_escape(bucket_label(limit.lo, limit.hi))})"
        for s in chart.series
        for limit in s.limits
    ]
    legend = f'<p class="sub">budget: {", ".join(limits)}</p>' if limits else ""
    return (
        f'<section class="card" id="p{index}"><h3><a href="#r{index}" class="mono">'
        f"{_escape(record.get('nodeid', ''))}</a> · "
        f"<code>{_escape(_modification_text(record))}</code></h3>"
        f'<div class="along">{charts}<table><thead><tr><th class="n">positions</th>'
        f'<th class="n">tokens</th>{head}</tr></thead><tbody>{rows}</tbody></table></div>'
        f"{legend}</section>"
    )


def _position_svg(chart: PositionChart, series: Series) -> str:
    """One metric along the window: a point per bucket with its error bar, a dashed line per
    budget over the positions it covers, the buckets' positions under the axis."""
    n = len(chart.buckets)
    finite = [
        (v, se if _finite(se) else 0.0)
        for v, se in zip(series.values, series.stderr, strict=True)
        if _finite(v)
    ]
    lows = [v - se for v, se in finite] + [0.0]
    highs = [v + se for v, se in finite] + [limit.value for limit in series.limits]
    top = _nice(max([h for h in highs if h > 0] or [1.0]) * 1.05)
    bottom = -_nice(-min(lows)) if min(lows) < 0 else 0.0  # a model better than its baseline
    width, height = CHART_WIDTH - LEFT - RIGHT, CHART_HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + width * x / n

    def py(y: float) -> float:
        return TOP + height * (top - y) / (top - bottom)

    out = [
        f'<svg class="positions" viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}" role="img" '
        f'aria-label="{_escape(series.metric)} by position" xmlns="http://www.w3.org/2000/svg">'
        f"<title>{_escape(series.metric)} by position</title>"
    ]
    ticks = {0.0, top / 2, top} | ({bottom} if bottom < -top / 8 else set())
    for tick in sorted(ticks):
        y = py(tick)
        out.append(
            f'<line class="grid" x1="{LEFT}" x2="{LEFT + width}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text x="{LEFT - 5}" y="{y + 4:.1f}" text-anchor="end">{_number_text(tick)}</text>'
        )
    out.append(
        f'<line class="axis" x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{TOP + height}"/>'
        f'<line class="axis" x1="{LEFT}" x2="{LEFT + width}" y1="{TOP + height}" '
        f'y2="{TOP + height}"/>'
        f'<text x="{LEFT + width / 2:.1f}" y="{CHART_HEIGHT - 4}" text-anchor="middle">'
        f"{_escape(series.metric)} by position (tokens of context)</text>"
    )
    for i, label in enumerate(chart.labels):
        out.append(
            f'<text x="{px(i + 0.5):.1f}" y="{TOP + height + 15}" text-anchor="middle">'
            f"{_escape(label)}</text>"
        )
    for limit in series.limits:
        ranged = " range" if limit.ranged else ""
        y = py(limit.value)
        out.append(
            f'<line class="budget{ranged}" data-key="{_escape(limit.key)}" '
            f'x1="{px(chart.x(limit.lo)):.1f}" x2="{px(chart.x(limit.hi)):.1f}" '
            f'y1="{y:.1f}" y2="{y:.1f}"><title>budget {_escape(limit.key)} ≤ '
            f"{_number_text(limit.value)} (positions {_escape(bucket_label(limit.lo, limit.hi))})"
            "</title></line>"
        )
    for i, (value, se) in enumerate(zip(series.values, series.stderr, strict=True)):
        if not _finite(value):
            continue  # the table says what it was
        x = px(i + 0.5)
        tip = (
            f"{series.metric} {_number_text(value)}"
            + (f" ± {_number_text(se)}" if _finite(se) else "")
            + f" at positions {chart.labels[i]} ({_number_text(chart.tokens[i])} tokens)"
        )
        bar = ""
        if _finite(se) and se > 0:
            y0, y1 = py(value - se), py(value + se)
            bar = (
                f'<line class="err" x1="{x:.1f}" x2="{x:.1f}" y1="{y0:.1f}" y2="{y1:.1f}"/>'
                f'<line class="err" x1="{x - 4:.1f}" x2="{x + 4:.1f}" y1="{y0:.1f}" y2="{y0:.1f}"/>'
                f'<line class="err" x1="{x - 4:.1f}" x2="{x + 4:.1f}" y1="{y1:.1f}" y2="{y1:.1f}"/>'
            )
        out.append(
            f'<g class="bucket"><title>{_escape(tip)}</title>{bar}'
            f'<circle class="point" cx="{x:.1f}" cy="{py(value):.1f}" r="3.5"/></g>'
        )
    out.append("</svg>")
    return "".join(out)


def _nice(x: float) -> float:
    """The round number at or above ``x`` an axis ends at: 1, 2, 2.5 or 5 times a power of 10."""
    power = 10 ** math.floor(math.log10(x))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= x * (1 - 1e-9))


# -- curves ----------------------------------------------------------------------------------


def _curves(explorations: Sequence[Mapping[str, Any]]) -> str:
    curves = [r for r in explorations if r.get("kind") in ("threshold", "sweep")]
    calibrations = [r for r in explorations if r.get("kind") == "decoding_calibration"]
    if not curves and not calibrations:
        return ""
    out = ['<h2 id="curves">Where it breaks: thresholds and sweeps</h2>']
    plotting = _can_plot()
    if curves and not plotting:
        out.append(
            f'<p class="note">curves not drawn: matplotlib is not installed '
            f"(<code>{_escape(INSTALL)}</code>); the measured points are listed below.</p>"
        )
    for record in curves:
        out.append(_curve_card(record, plotting))
    if calibrations:
        out.append(_calibrations(calibrations))
    return "".join(out)


def _curve_card(record: Mapping[str, Any], plotting: bool) -> str:
    param = record.get("param", "?")
    fixed = record.get("fixed") or {}
    what = (
        describe_modification(record.get("modification", "?"), fixed)
        if fixed
        else record.get("modification", "?")
    )
    kind = (
        "sweep" if record["kind"] == "sweep" else (f"threshold ({record.get('method', 'search')})")
    )
    image = ""
    if plotting:
        try:
            image = (
                f'<img alt="{_escape(what)} {_escape(param)} {_escape(kind)}" '
                f'src="data:image/png;base64,{_png(record)}">'
            )
        except Exception as exc:  # a figure that cannot be drawn must not cost the page
            image = f'<p class="note">(no curve: {_escape(type(exc).__name__)}: {_escape(exc)})</p>'
    return (
        f'<section class="card"><h3><span class="mono">{_escape(record.get("nodeid", ""))}</span>'
        f" · {_escape(what)} {_escape(param)} {_escape(kind)}</h3>"
        f'<p class="finding">{_finding(record)}</p>'
        f'<div class="curve">{image}{_points(record)}</div></section>'
    )


def _finding(record: Mapping[str, Any]) -> str:
    """What the curve says, in one sentence (HTML)."""
    param = _escape(record.get("param", "?"))
    metric = record.get("metric", "")
    if record["kind"] == "sweep":
        n = len(record.get("points") or [])
        fit = record.get("fit") or {}
        if record.get("s0") is None:
            return (
                f'<span class="warnline">no phase transition</span> ({n} points): '
                f"{_escape(fit.get('reason', ''))}"
            )
        se = record.get("s0_stderr")
        r2 = fit.get("r2")
        return (
            f"<b>phase transition at {param} = {_number_text(record['s0'])}</b>"
            + (f" ± {_number_text(se)}" if _finite(se) else "")
            + (f" (fit R² {r2:.2f}" if _finite(r2) else " (")
            + f", {n} points, {_escape(metric)})"
        )
    limit = (record.get("budget") or {}).get(metric)
    over = f" ({_escape(metric)} &gt; {_number_text(limit)})" if limit is not None else ""
    passing, _ = (list(record.get("bracket") or [None, None]) + [None, None])[:2]
    how = {"bisection": "bisection", "shrinking": "hypothesis shrinking"}.get(
        record.get("method", ""), _escape(record.get("method", ""))
    )
    evaluations = record.get("evaluations", len(record.get("measurements") or []))
    if record.get("value") is None:
        text = (
            f"<b>no break</b>: passes up to {param} = {_number_text(passing)}; "
            f"{evaluations} measures by {how}"
        )
    else:
        text = (
            f"<b>breaks at {param} = {_number_text(record['value'])}</b>{over}; "
            + (
                f"passes at {param} = {_number_text(passing)}"
                if passing is not None
                else "breaks at every value measured"
            )
            + f"; {evaluations} measures by {how}"
        )
    if record.get("monotone") is False:
        text += f'<br><span class="warnline">non-monotone: {_escape(record.get("note", ""))}</span>'
    return text


def _points(record: Mapping[str, Any]) -> str:
    metric = record.get("metric", "")
    if record["kind"] == "sweep":
        points = [
            (p.get("value"), (p.get("metrics") or {}).get(metric), p.get("broke"))
            for p in record.get("points") or []
        ]
    else:
        points = sorted(
            (
                (p.get("x"), p.get("metric"), p.get("broke"))
                for p in record.get("measurements") or []
            ),
            key=lambda p: p[0] if _finite(p[0]) else math.inf,
        )
    rows = "".join(
        f'<tr><td class="n">{_number_text(x)}</td><td class="n">{_number_text(y)}</td><td>'
        + ('<span class="badge bad">over</span>' if broke else '<span class="badge ok">ok</span>')
        + "</td></tr>"
        for x, y, broke in points
    )
    return (
        f'<table><thead><tr><th class="n">{_escape(record.get("param", ""))}</th>'
        f'<th class="n">{_escape(metric)}</th><th>budget</th></tr></thead>'
        f"<tbody>{rows}</tbody></table>"
    )


def _calibrations(records: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for r in records:
        before, after = (list(r.get("kl_mean") or [None, None]) + [None, None])[:2]
        stages = " → ".join(
            describe_modification(s.get("name", "?"), {k: v for k, v in s.items() if k != "name"})
            for s in r.get("modification") or []
        )
        rows.append(
            f'<tr><td class="mono">{_escape(r.get("nodeid", ""))}</td>'
            f"<td><code>{_escape(stages)}</code></td>"
            f'<td class="n">{_number_text(r.get("temperature"))}</td>'
            f'<td class="n">{_number_text(r.get("top_p"))}</td>'
            f'<td class="n">{_number_text(before)} → {_number_text(after)}</td></tr>'
        )
    return (
        '<section class="card"><h3>Decoding calibrations</h3><table><thead><tr>'
        '<th>test</th><th>calibrated modification</th><th class="n">temperature</th>'
        '<th class="n">top_p</th><th class="n">kl_mean before → after</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></section>"
    )


def _can_plot() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _png(record: Mapping[str, Any]) -> str:
    """The record's curve as base64 PNG, drawn by the plot code into memory."""
    from .plots import plot_curve

    buffer = io.BytesIO()
    plot_curve(buffer, record, record.get("budget"))
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# -- blame -----------------------------------------------------------------------------------


def _blame(results: Sequence[Mapping[str, Any]]) -> str:
    cards = [
        _blame_card(i, r, r["details"]["blame"])
        for i, r in enumerate(results)
        if isinstance((r.get("details") or {}).get("blame"), Mapping)
    ]
    if not cards:
        return ""
    return (
        '<h2 id="blame">Where the hemorrhage starts: per-block blame</h2>'
        '<p class="sub">relative L2 drift of the residual stream after each block, '
        "modified vs baseline; the dashed mark is the level at which a block counts as "
        "bleeding; attention entropy in nats (negative: sharper attention).</p>" + "".join(cards)
    )


def _blame_card(index: int, record: Mapping[str, Any], blame: Mapping[str, Any]) -> str:
    blocks = list(blame.get("blocks") or [])
    threshold = blame.get("threshold")
    begins, most = blame.get("begins"), blame.get("most")
    diagnosis = Diagnosis.from_dict(dict(blame))  # worded as the terminal words it
    label = [b.label for b in diagnosis.blocks]
    drifts = [b.get("drift_l2") for b in blocks]
    top = max([d for d in drifts if _finite(d)] + [threshold if _finite(threshold) else 0.0, 1e-12])
    entropy = any(b.get("attn_entropy_shift") is not None for b in blocks)
    attribution = any(b.get("kl_mean") is not None for b in blocks)
    head = (
        '<tr><th>block</th><th>drift</th><th class="n">rel. L2</th>'
        '<th class="n">1 − cos</th><th>sublayer drifting most</th>'
        + (
            '<th class="n">attn entropy change</th><th class="n">mean |change|</th>'
            if entropy
            else ""
        )
        + (
            '<th class="n">one-block kl_mean</th><th class="n">adds to kl_mean</th>'
            '<th class="n">share</th>'
            if attribution
            else ""
        )
        + "</tr>"
    )
    rows = []
    for i, b in enumerate(blocks):
        drift = b.get("drift_l2")
        width = min(100.0, 100.0 * drift / top) if _finite(drift) else 100.0
        hot = not _finite(drift) or (_finite(threshold) and drift > threshold)
        mark = (
            f'<i style="left:{min(100.0, 100.0 * threshold / top):.1f}%"></i>'
            if _finite(threshold)
            else ""
        )
        sub = max((b.get("sublayers") or {}).items(), key=lambda kv: severity(kv[1]), default=None)
        sublayer = "" if sub is None else f"<code>{_escape(sub[0])}</code> {_number_text(sub[1])}"
        classes = " ".join(c for c, on in (("begins", i == begins), ("most", i == most)) if on)
        rows.append(
            f'<tr class="{classes}"><td>{_escape(label[i])} '
            f'<span class="note">{_escape(b.get("name", ""))}'
            f'</span></td><td><div class="bar"><span class="{"hot" if hot else ""}" '
            f'style="width:{width:.1f}%"></span>{mark}</div></td>'
            f'<td class="n">{_number_text(drift)}</td>'
            f'<td class="n">{_number_text(b.get("drift_cos"))}</td>'
            f"<td>{sublayer}</td>"
            + (
                f'<td class="n">{_signed(b.get("attn_entropy_change"))}</td>'
                f'<td class="n">{_number_text(b.get("attn_entropy_shift"))}</td>'
                if entropy
                else ""
            )
            + (
                f'<td class="n">{_number_text(b.get("kl_mean"))}</td>'
                f'<td class="n">{_signed(b.get("kl_added"))}</td><td class="n">'
                f"{'' if b.get('share') is None else format(b['share'], '.0%')}</td>"
                if attribution
                else ""
            )
            + "</tr>"
        )
    notes = "".join(f'<p class="note">{_escape(n)}</p>' for n in blame.get("notes") or [])
    what = _modification_text(record)
    return (
        f'<section class="card" id="b{index}"><h3><a href="#r{index}" class="mono">'
        f"{_escape(record.get('nodeid', ''))}</a> · <code>{_escape(what)}</code></h3>"
        f'<p class="finding">{_escape(diagnosis.finding() or "")}</p>'
        f"<table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>{notes}"
        f'<p class="sub">{_number_text(blame.get("tokens"))} tokens</p></section>'
    )
