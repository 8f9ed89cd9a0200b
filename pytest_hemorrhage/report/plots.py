"""``--hemorrhage-plot DIR``: one PNG per explored curve (metric vs parameter, budget, PTP),
one per failed check's blame (drift per block) and one per result measured over several
position buckets (its metrics along the window, with the budget lines: :mod:`.positions`).

matplotlib is an optional extra (``pip install pytest-hemorrhage[plot]``), imported only here
and only when plots are asked for. Figures are drawn on their own canvas (no pyplot), so the
user's matplotlib backend and global state are left alone.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import HemorrhageError
from ..explore.fit import PhaseTransition
from .describe import describe_modification
from .positions import PositionChart, position_chart

__all__ = ["plot_blame", "plot_curve", "plot_positions", "require_matplotlib", "write_plots"]

INSTALL = "pip install pytest-hemorrhage[plot]"


def require_matplotlib() -> None:
    """Raise a HemorrhageError naming the install command when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise HemorrhageError(
            f"--hemorrhage-plot needs matplotlib, which is not installed; "
            f"run `{INSTALL}` or drop the option"
        ) from None


def write_plots(
    explorations: Sequence[Mapping[str, Any]],
    directory: Path | str,
    results: Sequence[Mapping[str, Any]] = (),
) -> list[Path]:
    """Write one PNG per recorded threshold search or sweep, one per result with blame
    figures and one per result with several position buckets, into ``directory``.

    Args:
        explorations: the session's exploration records (as in the JSON report).
        directory: where the files go (created if missing).
        results: the session's result records; those whose ``details`` hold ``blame`` get a
            ``blame-<modification>-<digest>.png``, those with two or more position buckets a
            ``positions-<test>-<modification>-<digest>.png`` (digest: of the parameters).

    Returns:
        The paths written, in record order.
    """
    require_matplotlib()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    used: set[str] = set()
    for record in explorations:
        if record["kind"] not in ("threshold", "sweep"):
            continue  # no curve to draw (e.g. a decoding calibration)
        path = directory / f"{_unique(_stem(record), used)}.png"
        plot_curve(path, record, record.get("budget"))
        paths.append(path)
    for result in results:
        digest = hashlib.blake2b(repr(result["params"]).encode(), digest_size=4).hexdigest()
        blame = result.get("details", {}).get("blame")
        if blame:
            stem = _unique(f"blame-{_safe(result['modification'])}-{digest}", used)
            paths.append(plot_blame(directory / f"{stem}.png", blame))
        chart = position_chart(result)
        if chart is not None:
            test = _safe(result.get("nodeid", "").rpartition("::")[2] or "measure")[:100]
            stem = _unique(f"positions-{test}-{_safe(result['modification'])}-{digest}", used)
            paths.append(plot_positions(directory / f"{stem}.png", result, chart))
    return paths


def _unique(stem: str, used: set[str]) -> str:
    name, n = stem, 1
    while name in used:
        n += 1
        name = f"{stem}-{n}"
    used.add(name)
    return name


def _safe(text: str) -> str:
    return re.sub(r"[^\w.+-]", "_", text)


def _stem(record: Mapping[str, Any]) -> str:
    test = record.get("nodeid", "explore").rpartition("::")[2] or "explore"
    raw = f"{test}-{record['kind']}-{record['modification']}-{record['param']}"
    return re.sub(r"_?-_?", "-", re.sub(r"[^A-Za-z0-9_.-]+", "_", raw)).strip("_")[:150]


def plot_curve(
    path: Path | str | BinaryIO,
    record: Mapping[str, Any],
    budget: Mapping[str, float] | None = None,
) -> Path | str | BinaryIO:
    """Draw one exploration record: its metric vs the parameter, the budget, and the
    phase-transition point (sweep) or threshold and bracket (threshold search).

    Args:
        path: the PNG to write (a path or a binary file object).
        record: a ``"sweep"`` or ``"threshold"`` exploration record (JSON-ready dict).
        budget: ``{metric: maximum}``; a horizontal line is drawn at the record's metric's.

    Returns:
        ``path``.
    """
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metric, param = record["metric"], record["param"]
    fig = Figure(figsize=(6.4, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if record["kind"] == "sweep":
        xs = [p["value"] for p in record["points"]]
        ys = [_y(p["metrics"].get(metric)) for p in record["points"]]
        broke = [p["broke"] for p in record["points"]]
        increasing = _increasing(record["points"])
        ax.plot(xs, ys, color="0.6", lw=1, zorder=1)
        _fit_line(ax, record, increasing)
        s0 = record.get("s0")
        if s0 is not None:
            se = record.get("s0_stderr") or 0.0
            ax.axvspan(s0 - se, s0 + se, color="tab:orange", alpha=0.2, lw=0)
            ax.axvline(
                s0,
                color="tab:orange",
                ls="--",
                label=f"PTP {param}={s0:.3g}" + (f" ± {se:.2g}" if se else ""),
            )
        title = f"{record['modification']} sweep" + (
            "" if s0 is not None else " (no phase transition)"
        )
    else:
        points = record["measurements"]
        xs, ys, broke = (
            [p["x"] for p in points],
            [_y(p["metric"]) for p in points],
            [p["broke"] for p in points],
        )
        increasing = record.get("increasing", True)
        passing, value = record["bracket"]
        if value is not None:
            ax.axvline(value, color="tab:red", ls="--", label=f"breaks at {param}={value:g}")
            if passing is not None:
                ax.axvspan(
                    min(passing, value),
                    max(passing, value),
                    color="tab:red",
                    alpha=0.12,
                    lw=0,
                    label=f"bracket ({passing:g}, {value:g}]",
                )
        title = f"{record['modification']} threshold ({record.get('method', '')})"
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        ax.plot([xs[i] for i in order], [ys[i] for i in order], color="0.8", lw=1, zorder=1)
    ax.scatter(
        [x for x, b in zip(xs, broke, strict=True) if not b],
        [y for y, b in zip(ys, broke, strict=True) if not b],
        color="tab:green",
        zorder=3,
        label="within budget",
    )
    ax.scatter(
        [x for x, b in zip(xs, broke, strict=True) if b],
        [y for y, b in zip(ys, broke, strict=True) if b],
        color="tab:red",
        marker="x",
        zorder=3,
        label="over budget",
    )
    limit = (budget or {}).get(metric)
    if limit is not None:
        ax.axhline(limit, color="black", lw=1, ls=":", label=f"budget {metric} ≤ {limit:g}")
    finite = [y for y in ys if math.isfinite(y)]
    if finite and max(finite) > 0 and max(finite) > 50 * max(min(abs(y) for y in finite), 1e-9):
        ax.set_yscale("symlog", linthresh=limit or 0.01)  # damage explodes past the PTP
        ax.set_ylim(bottom=min(0.0, min(finite)))
    if not increasing:
        ax.invert_xaxis()  # damage grows to the right
    ax.set_xlabel(param)
    ax.set_ylabel(metric)
    ax.set_title(f"{title}\n{record.get('nodeid', '')}", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _y(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _increasing(points: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the parameter grows with compression (sweep points carry both)."""
    a, b = points[0], points[-1]
    return (b["x"] - a["x"]) * (b["value"] - a["value"]) >= 0


def _fit_line(ax: Any, record: Mapping[str, Any], increasing: bool) -> None:
    """The fitted piecewise curve, drawn on the parameter axis."""
    fit = record.get("fit") or {}
    if record.get("s0") is None or fit.get("a") is None:
        return
    import numpy as np

    transition = PhaseTransition(**fit)
    xs = [p["x"] for p in record["points"] if p["x"] > 0]
    if not xs:
        return
    grid = np.linspace(min(xs), max(xs), 200)
    first = record["points"][0]
    origin = first["value"] - first["x"] if increasing else first["value"] + first["x"]
    values = origin + grid if increasing else origin - grid
    ax.plot(
        values,
        transition.predict(grid),
        color="tab:blue",
        lw=1.5,
        zorder=2,
        label="power law → exponential fit",
    )


def plot_positions(
    path: Path | str, record: Mapping[str, Any], chart: PositionChart | None = None
) -> Path:
    """A result's metrics along the window: one panel per metric, a point per position bucket
    with ± its standard error, a dashed line per budget over the positions it covers (a
    position range's in red), each bucket's positions and tokens under the axis.

    Args:
        path: the PNG to write.
        record: a result record (as in the JSON report) with two or more ``positions``.
        chart: what to draw, when the caller has it (:func:`.positions.position_chart`).

    Returns:
        ``path``.
    """
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    chart = chart or position_chart(record)
    if chart is None:
        raise ValueError("the result has fewer than two position buckets: nothing to draw")
    panels = len(chart.series)
    fig = Figure(figsize=(5.2 * panels, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    centers = [i + 0.5 for i in range(len(chart.buckets))]
    ticks = [
        f"{label}\n{tokens:,} tok" for label, tokens in zip(chart.labels, chart.tokens, strict=True)
    ]
    for ax, series in zip(axes, chart.series, strict=True):
        ax.errorbar(
            centers,
            [_y(v) for v in series.values],
            yerr=[0.0 if se is None else _y(se) for se in series.stderr],
            fmt="o",
            color="tab:blue",
            capsize=4,
            zorder=3,
            label=f"{series.metric} ± stderr",
        )
        for limit in series.limits:
            ax.plot(
                [chart.x(limit.lo), chart.x(limit.hi)],
                [limit.value, limit.value],
                color="tab:red" if limit.ranged else "black",
                ls="--",
                lw=1.2,
                label=f"budget {limit.key} ≤ {limit.value:g}",
            )
        ax.set_xlim(0, len(chart.buckets))
        ax.set_xticks(centers, ticks, fontsize=7)
        ax.set_xticks(range(len(chart.buckets) + 1), minor=True)
        ax.grid(axis="x", which="minor", alpha=0.3)
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]))
        ax.set_xlabel("positions (tokens of context)")
        ax.set_ylabel(series.metric)
        ax.legend(fontsize=7)
    what = describe_modification(record.get("modification", "?"), record.get("params") or {})
    fig.suptitle(f"{what} by position\n{record.get('nodeid', '')}", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_blame(path: Path | str, blame: Mapping[str, Any]) -> Path:
    """Bar chart of the drift per block (and the attribution, when measured).

    Args:
        path: the PNG to write.
        blame: a diagnosis as stored in ``result.details["blame"]``.

    Returns:
        ``path``.
    """
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    blocks = blame["blocks"]
    x = range(len(blocks))
    attribution = bool(blame.get("attribution"))
    panels = 2 if attribution else 1
    fig = Figure(figsize=(max(4, 0.4 * len(x) + 2), 2.6 * panels), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(panels, 1, squeeze=False)
    ax = axes[0][0]
    ax.bar(x, [b["drift_l2"] for b in blocks], color="tab:red")
    ax.axhline(
        blame["threshold"],
        color="gray",
        linestyle="--",
        linewidth=1,
        label=f"bleeding above {blame['threshold']:.3g}",
    )
    ax.set_ylabel("relative L2 drift")
    ax.set_title(f"{blame['modification']}: where the hemorrhage starts")
    ax.legend(loc="lower right", fontsize="small", framealpha=0.9)
    if attribution:
        axes[1][0].bar(x, [b.get("share") or 0.0 for b in blocks], color="tab:blue")
        axes[1][0].set_ylabel("share of kl_mean (in block order)")
    labels = [str(b["index"]) + ("'" if b.get("added") else "") for b in blocks]
    for row in axes:
        row[0].set_xticks(list(x), labels)
    axes[-1][0].set_xlabel("block")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
