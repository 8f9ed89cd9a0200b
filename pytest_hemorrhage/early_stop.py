"""``--hemorrhage-early-stop``: score windows in a seeded order, stop once the verdict is settled.

The sequential test: interim looks after 1/8, 3/16, 1/4, 3/8, 1/2 and 3/4 of the evaluation
windows (at least ``MIN_WINDOWS`` windows each). At look k a budgeted metric is settled when its
two-sided interval, built from the window-level (cluster) standard error with a Student t
quantile on windows - 1 degrees of freedom, lies wholly below or wholly above its budget. The
error is spent linearly (Lan-DeMets, alpha(t) = alpha * t over the fraction t of windows seen),
look k using alpha * (t_k - t_{k-1}) on each side, and the looks are combined by the union
bound, which needs no assumption on how the looks correlate. So, for each budgeted metric, the
chance that early stopping ever settles on the wrong side of its budget is at most
alpha = 1 - confidence (the marker's, or 0.95): the stated rate, to the normal approximation of
window means. A measure stops when every budgeted token metric is settled; otherwise it scores
every window, and its verdict is the full evaluation's.

Per metric: ``ppl_increase`` is decided on the log scale (``nll_increase`` against
``log1p(budget)``, the same event); ``kl_p99`` with its Woodruff standard error; ``kl_max`` only
upwards (a running maximum over its budget stays over it; below, only the full set tells);
non-finite outputs settle the measure as failed. Metrics of their own passes (generation,
tasks, embeddings) are computed in full and do not hold the token evaluation back.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

from .metrics import METRICS

if TYPE_CHECKING:
    import torch

    from .budget import Budget
    from .metrics import TokenStats
    from .reference import Reference

__all__ = [
    "LOOKS",
    "METHOD",
    "MIN_WINDOWS",
    "EarlyStop",
    "decide",
    "look_schedule",
    "t_quantile",
    "take_windows",
]

# Interim looks, as fractions of the evaluation windows.
LOOKS = (1 / 8, 3 / 16, 1 / 4, 3 / 8, 1 / 2, 3 / 4)
# Fewest windows at a look: the cluster standard error needs a few units to mean anything.
MIN_WINDOWS = 8
METHOD = (
    "linear alpha spending over looks at 1/8..3/4 of the windows (union bound), "
    "window-level t intervals"
)
DEFAULT_CONFIDENCE = 0.95
NO_BUDGET = (
    "no budgeted token metric to decide on: early stopping needs a budget "
    "(@pytest.mark.hemorrhage or hemorrhage_budget); evaluated every window"
)


def look_schedule(windows: int) -> list[int]:
    """Window counts of the interim looks for ``windows`` evaluation windows (maybe none)."""
    looks: list[int] = []
    for t in LOOKS:
        n = max(MIN_WINDOWS, round(windows * t))
        if n < windows and (not looks or n > looks[-1]):
            looks.append(n)
    return looks


def t_quantile(p: float, df: int) -> float:
    """Student t quantile (Cornish-Fisher expansion in 1/df, Abramowitz & Stegun 26.7.5):
    within 1% of the exact value for df >= 7 and p <= 0.9999."""
    z = NormalDist().inv_cdf(p)
    terms = (
        (z**3 + z) / 4,
        (5 * z**5 + 16 * z**3 + 3 * z) / 96,
        (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
        (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160,
    )
    return z + sum(term / df ** (i + 1) for i, term in enumerate(terms))


def decide(
    budget: Budget,
    metrics: dict[str, float],
    stderr: dict[str, float | None],
    windows: int,
    alpha: float,
) -> dict[str, str]:
    """Per budgeted token metric: ``"under"``, ``"over"`` or ``"open"``, from the partial
    ``metrics`` (with their window-level ``stderr``) of ``windows`` windows, at one-sided error
    ``alpha`` for this look."""
    z = t_quantile(1 - alpha, max(1, windows - 1))
    out: dict[str, str] = {}
    for metric, limit in budget.limits.items():
        if metric not in METRICS:
            continue  # computed on its own data, in full
        value, se = metrics[metric], stderr.get(metric)
        if metric == "ppl_increase":  # the same event on the scale its SE is honest on
            value, se, limit = (
                metrics["nll_increase"],
                stderr.get("nll_increase"),
                math.log1p(limit),
            )
        if metric == "kl_max":
            out[metric] = "over" if value > limit else "open"
        elif se is None or not math.isfinite(se) or not math.isfinite(value):
            out[metric] = "open"
        elif value - z * se > limit:
            out[metric] = "over"
        elif value + z * se < limit:
            out[metric] = "under"
        else:
            out[metric] = "open"
    return out


def take_windows(reference: Reference, windows: torch.Tensor, per_window: int) -> Reference:
    """The reference rows of the scored tokens of ``windows`` (indices of evaluation windows,
    ``per_window`` scored tokens each), in that order."""
    import torch

    rows = (windows[:, None] * per_window + torch.arange(per_window)).reshape(-1)
    return type(reference)(
        **{
            f.name: None if getattr(reference, f.name) is None else getattr(reference, f.name)[rows]
            for f in fields(reference)
        }
    )


@dataclass
class EarlyStop:
    """One measure's sequential evaluation plan and outcome.

    ``order`` is the seeded permutation of the windows, ``looks`` the window counts at which
    the verdict is checked; :meth:`check` returns True when the measure may stop.
    """

    budget: Budget | None
    windows: int
    per_window: int
    seed: int
    order: torch.Tensor = field(init=False)
    looks: list[int] = field(init=False)
    alpha: float = field(init=False)
    verdicts: dict[str, str] = field(default_factory=dict)
    reason: str = ""
    stopped_at: int = 0
    budgeted: bool = field(init=False)  # a budgeted token metric to decide on

    def __post_init__(self) -> None:
        import torch

        generator = torch.Generator().manual_seed(self.seed)
        self.order = torch.randperm(self.windows, generator=generator)
        confidence = (self.budget.confidence if self.budget else None) or DEFAULT_CONFIDENCE
        self.alpha = 1 - confidence
        self.budgeted = self.budget is not None and any(m in METRICS for m in self.budget.limits)
        self.looks = look_schedule(self.windows) if self.budgeted else []
        if not self.budgeted:
            self.reason = NO_BUDGET

    def spend(self, look: int) -> float:
        """The one-sided error spent at interim look ``look`` (an index into ``looks``)."""
        before = self.looks[look - 1] / self.windows if look else 0.0
        return self.alpha * (self.looks[look] / self.windows - before)

    def check(self, look: int, stats: TokenStats, reference: Reference) -> bool:
        """At interim look ``look``, with ``stats`` of the windows scored so far and their
        ``reference`` rows: whether every budgeted token metric is settled."""
        from .metrics import summarize

        assert self.budget is not None
        n = self.looks[look]
        if int((~stats.finite).sum()):
            self.verdicts = {m: "over" for m in self.budget.limits if m in METRICS}
            self.reason = f"non-finite outputs after {n} windows: the verdict is failed"
            self.stopped_at = n
            return True
        metrics, stderr = summarize(stats, reference)
        self.verdicts = decide(self.budget, metrics, stderr, n, self.spend(look))
        if "open" in self.verdicts.values():
            return False
        self.stopped_at = n
        self.reason = f"settled after {n} of {self.windows} windows: " + ", ".join(
            f"{m} {v} budget" for m, v in self.verdicts.items()
        )
        return True

    def run(
        self, score: Callable[[torch.Tensor], list[TokenStats]], reference: Reference
    ) -> tuple[TokenStats, Reference]:
        """Score windows in ``order`` (``score(windows)``: their stats, in that order) up to
        each look, stopping at the first look that settles the verdict. Returns the stats and
        reference rows of the windows scored, in window order, as a full evaluation sums them
        (so a measure that never stops gives the full evaluation's result)."""
        import torch

        from .metrics import TokenStats

        parts: list[TokenStats] = []
        done = 0
        for look, end in enumerate([*self.looks, self.windows]):
            parts += score(self.order[done:end])
            done = end
            if look < len(self.looks):
                scored = take_windows(reference, self.order[:done], self.per_window)
                if self.check(look, TokenStats.cat(parts), scored):
                    break
        windows, position = self.order[:done].sort()
        stats = TokenStats.cat(parts)
        token = (position[:, None] * self.per_window + torch.arange(self.per_window)).reshape(-1)
        stats = TokenStats(
            *(getattr(stats, f)[token] for f in ("kl", "nll", "disagree", "p_target", "finite")),
            window=torch.arange(done).repeat_interleave(self.per_window),
        )
        return stats, take_windows(reference, windows, self.per_window)

    def details(self, tokens: int) -> dict[str, Any]:
        """What ``Result.details["early_stop"]`` records."""
        stopped = self.stopped_at > 0
        if not stopped and not self.reason:
            open_ = [m for m, v in self.verdicts.items() if v == "open"] or list(self.verdicts)
            self.reason = (
                f"too close to call ({', '.join(open_)}): scored every window"
                if self.looks
                else f"too few windows ({self.windows}) for an interim look: scored every window"
            )
        return {
            "stopped": stopped,
            "budgeted": self.budgeted,
            "reason": self.reason,
            "windows": self.stopped_at or self.windows,
            "windows_max": self.windows,
            "tokens": tokens,
            "tokens_max": self.windows * self.per_window,
            "verdicts": dict(self.verdicts),
            "alpha": self.alpha,
            "method": METHOD,
        }
