"""What the by-position charts show, on the HTML page (inline SVG) and in ``--hemorrhage-plot``
(PNG): a result's metrics per bucket of token positions (the record's ``positions``, from
:func:`~pytest_hemorrhage.metrics.by_position`) with their standard errors, and the budgets
that apply along the window, the whole window's across it and a position range's
(``kl_mean[8192:]``) over that range only.

Each renderer draws the same :class:`PositionChart`, so both show the same metrics, points and
budget lines. The horizontal axis is in bucket units: bucket ``i`` spans ``[i, i + 1)``, its
point sits at ``i + 0.5`` and a position inside it is placed on a log scale
(:meth:`PositionChart.x`), so that every bucket gets the same width though each holds 4x the
positions of the one before.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..metrics import position_range

__all__ = ["Limit", "PositionChart", "Series", "bucket_label", "position_chart"]


@dataclass(frozen=True)
class Limit:
    """One budget line: ``key`` (``kl_mean`` or ``kl_mean[8192:]``) ``<= value`` over the
    positions ``lo <= position < hi`` (a range open at the top ends at the window's end)."""

    key: str
    value: float
    lo: int
    hi: int

    @property
    def ranged(self) -> bool:
        """Whether the budget names a range of positions rather than the whole window."""
        return position_range(self.key)[1:] != (1, None)


@dataclass(frozen=True)
class Series:
    """One metric per bucket (None where the bucket did not measure it) and its budgets."""

    metric: str
    values: tuple[float | None, ...]
    stderr: tuple[float | None, ...]
    limits: tuple[Limit, ...]


@dataclass(frozen=True)
class PositionChart:
    """A result's buckets (``[lo, hi)`` position ranges), the tokens scored in each, and one
    series per metric drawn."""

    buckets: tuple[tuple[int, int], ...]
    tokens: tuple[int, ...]
    series: tuple[Series, ...]

    @property
    def labels(self) -> list[str]:
        return [bucket_label(lo, hi) for lo, hi in self.buckets]

    def x(self, position: int) -> float:
        """Where ``position`` sits on the horizontal axis (bucket units, log within a bucket);
        a bucket's end (its next bucket's first position) is the next bucket's start."""
        for i, (lo, hi) in enumerate(self.buckets):
            if position < hi or i == len(self.buckets) - 1:
                position = min(max(position, lo), hi)
                return i + math.log(position / lo) / math.log(hi / lo)
        return float(len(self.buckets))  # no buckets: never drawn


def bucket_label(lo: int, hi: int) -> str:
    """``[64, 256)`` -> ``"64-255"``: the positions a bucket holds, both ends included."""
    return f"{lo}-{hi - 1}"


def position_chart(record: Mapping[str, Any]) -> PositionChart | None:
    """What to draw for a result record: each budgeted token metric (``kl_mean`` when none
    is budgeted) per position bucket, with the budget lines that apply to it. None when the
    record has fewer than two buckets (nothing to compare along the window), or none of them
    measured a metric to draw."""
    buckets = [b for b in record.get("positions") or () if isinstance(b, Mapping)]
    if len(buckets) < 2:
        return None
    measured: set[str] = set()
    for bucket in buckets:
        measured.update(bucket.get("metrics") or {})
    budget = {k: v for k, v in (record.get("budget") or {}).items() if k != "confidence"}
    names = [m for m in dict.fromkeys(position_range(k)[0] for k in budget) if m in measured]
    if not names:
        names = ["kl_mean"] if "kl_mean" in measured else []
    if not names:
        return None
    spans = tuple((int(b["positions"][0]), int(b["positions"][1])) for b in buckets)
    end = spans[-1][1]
    series = []
    for metric in names:
        limits = []
        for key, limit in budget.items():
            name, lo, hi = position_range(key)
            hi = end if hi is None else min(hi, end)
            # a range past the window's end has no line: no token there was measured
            if name == metric and _is_number(limit) and math.isfinite(limit) and lo < hi:
                limits.append(Limit(key, float(limit), lo, hi))
        series.append(
            Series(
                metric,
                tuple((b.get("metrics") or {}).get(metric) for b in buckets),
                tuple((b.get("stderr") or {}).get(metric) for b in buckets),
                tuple(limits),
            )
        )
    return PositionChart(spans, tuple(int(b.get("tokens", 0)) for b in buckets), tuple(series))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
