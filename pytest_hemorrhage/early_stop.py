"""``--hemorrhage-early-stop``: score windows in a seeded order, stop once the verdict is settled.

The sequential test: interim looks after 1/8, 1/4 and 1/2 of the evaluation windows (each at
least ``MIN_WINDOWS`` windows; coinciding looks merge, their shares of alpha added, so 16
windows have one look, at 8). Look k spends a share a_k of alpha (``LOOKS``: 1/8, 3/4, 1/8,
renormalized over the looks an evaluation has): a budgeted metric is settled there when its
one-sided bound at level 1 - a_k lies wholly below or wholly above its budget: a lower bound
above it settles "over", an upper bound below it "under". The bounds are the calibrated ones
of every result (window-level standard errors, the studentized mean's quantile at that level
with its skewness and kurtosis terms: ``metrics.summarize(..., level=)``). The looks are
combined by the union bound (Bonferroni), which needs no assumption on how they correlate:
the shares sum to alpha, so for each budgeted metric the chance that early stopping ever
settles on the wrong side of its budget is at most alpha = 1 - confidence (the marker's, or
0.95). A measure stops when every budgeted token metric is settled; otherwise it scores every
window, and its verdict is the full evaluation's.

Why these looks: a clear verdict should stop by a quarter of the windows, so most of the error
is spent there, with a look at 1/8 for the very clear and one at 1/2 for verdicts closer to
the budget. On the bundled model (benchmarks/bench_early_stop.py), 3/4 of alpha at the look at
1/4 settled 75 of 84 clear verdicts by a quarter of the tokens, as many as all of alpha there
(the best any allocation can do), against 72 with equal thirds and 69 with six looks at
linearly spent shares. ``MIN_WINDOWS``: the skewness and
kurtosis terms of the bounds rest on the looks' window totals; below 8 windows the moments of
a handful of numbers make the bounds twice the plain window-level ones (at 4 windows), so a
look there would spend alpha for little.

The stated rate holds to the accuracy of those bounds: they assume window means near enough
to normal that a second-order correction for their skewness suffices. On 16 of the bundled
model's windows at level 0.9625 (the look at 1/4 at alpha = 0.05), resampled
(benchmarks/bench_coverage.py), upper bounds cover 0.9536-0.9856 (lower 0.9680-0.9898), on 8
at 0.99375 (the look at 1/8) 0.9924-0.9992: the upper bounds of right-skewed metrics fall
short by up to a quarter of their error (delta_p_mean under 50% magnitude pruning, windows of
skewness 1.0: 0.9536; kl_mean, skewness 0.3-0.6: 0.9614 at worst). On synthetic windows of
skewness 2 with the budget at the mean, early stopping settled "under" 8.8% of the time for a
stated 5% (skewness 0.7: 4.9%; benchmarks/bench_early_stop.py).

Per metric: ``ppl_increase`` is decided on the log scale (``nll_increase`` against
``log1p(budget)``, the same event); ``kl_p99`` with its Woodruff bound (its upper distance
serves the lower bound too, which only widens it: KL's quantiles spread upwards); ``kl_max``
only upwards (a running maximum over its budget stays over it; below, only the full set
tells); non-finite outputs settle the measure as failed. Metrics of their own passes
(generation, tasks, embeddings) are computed in full and do not hold the token evaluation
back.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from .metrics import position_range, token_metric
from .stats import DEFAULT_LEVEL, lower_bound, upper_bound

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
    "take_windows",
]

# Interim looks: (fraction of the evaluation windows, share of alpha spent there).
LOOKS = ((1 / 8, 1 / 8), (1 / 4, 3 / 4), (1 / 2, 1 / 8))
# Fewest windows at a look: fewer make the calibrated bounds too wide to settle (see above).
MIN_WINDOWS = 8
METHOD = (
    "one-sided bounds at looks after 1/8, 1/4 and 1/2 of the windows spending 1/8, 3/4 and "
    "1/8 of alpha (union bound), window-level calibrated standard errors"
)
NO_BUDGET = (
    "no budgeted token metric to decide on: early stopping needs a budget "
    "(@pytest.mark.hemorrhage or hemorrhage_budget); evaluated every window"
)


def look_schedule(windows: int) -> list[tuple[int, float]]:
    """The interim looks for ``windows`` evaluation windows (maybe none): their window counts
    and shares of alpha (summing to 1: a look too late for the windows gives its share to the
    others)."""
    looks: list[tuple[int, float]] = []
    for t, share in LOOKS:
        n = max(MIN_WINDOWS, round(windows * t))
        if n >= windows:
            continue
        if looks and n == looks[-1][0]:  # coinciding looks merge
            share += looks.pop()[1]
        looks.append((n, share))
    total = sum(share for _, share in looks)
    return [(n, share / total) for n, share in looks]


def decide(
    budget: Budget,
    metrics: dict[str, float],
    stderr: dict[str, float | None],
    alpha: float,
) -> dict[str, str]:
    """Per budgeted token metric: ``"under"``, ``"over"`` or ``"open"``, from the partial
    ``metrics`` and their standard errors calibrated at level ``1 - alpha`` (``summarize``'s
    ``level``): ``value -+ z * se`` are the one-sided bounds of this look."""
    level = 1 - alpha
    out: dict[str, str] = {}
    for metric, limit in budget.limits.items():
        if not token_metric(metric):
            continue  # computed on its own data, in full
        if metric not in metrics:  # a position range no token of this look reached
            out[metric] = "open"
            continue
        value, se = metrics[metric], stderr.get(metric)
        base = position_range(metric)[0]
        if base == "ppl_increase":  # the same event on the scale its SE is honest on
            nll = _nll_key(metric)
            value, se, limit = metrics[nll], stderr.get(nll), math.log1p(limit)
        if base == "kl_max":
            out[metric] = "over" if value > limit else "open"
        elif se is None or not math.isfinite(se) or not math.isfinite(value):
            out[metric] = "open"
        elif lower_bound(value, se, level) > limit:
            out[metric] = "over"
        elif upper_bound(value, se, level) < limit:
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


def _nll_key(key: str) -> str:
    """``ppl_increase`` (of a position range, or not) -> the same range's ``nll_increase``."""
    return "nll_increase" + key.removeprefix("ppl_increase")


@dataclass
class EarlyStop:
    """One measure's sequential evaluation plan and outcome.

    ``order`` is the seeded permutation of the windows, ``looks`` the window counts at which
    the verdict is checked, ``shares`` their shares of alpha; :meth:`check` returns True when
    the measure may stop.
    """

    budget: Budget | None
    windows: int
    per_window: int
    seed: int
    order: torch.Tensor = field(init=False)
    looks: list[int] = field(init=False)
    shares: list[float] = field(init=False)
    alpha: float = field(init=False)
    verdicts: dict[str, str] = field(default_factory=dict)
    reason: str = ""
    stopped_at: int = 0
    budgeted: bool = field(init=False)  # a budgeted token metric to decide on

    def __post_init__(self) -> None:
        import torch

        generator = torch.Generator().manual_seed(self.seed)
        self.order = torch.randperm(self.windows, generator=generator)
        confidence = (self.budget.confidence if self.budget else None) or DEFAULT_LEVEL
        self.alpha = 1 - confidence
        self.budgeted = self.budget is not None and any(map(token_metric, self.budget.limits))
        schedule = look_schedule(self.windows) if self.budgeted else []
        self.looks = [n for n, _ in schedule]
        self.shares = [share for _, share in schedule]
        if not self.budgeted:
            self.reason = NO_BUDGET

    def spend(self, look: int) -> float:
        """The one-sided error spent at interim look ``look`` (an index into ``looks``): its
        share of alpha (the shares sum to 1: the union bound)."""
        return self.alpha * self.shares[look]

    def check(self, look: int, stats: TokenStats, reference: Reference) -> bool:
        """At interim look ``look``, with ``stats`` of the windows scored so far and their
        ``reference`` rows: whether every budgeted token metric is settled."""
        from .metrics import scored_tokens, summarize

        assert self.budget is not None
        n = self.looks[look]
        # as the full evaluation counts them: over the scored tokens (chat data: a mask)
        if int((~scored_tokens(stats, reference)[0].finite).sum()):
            self.verdicts = {m: "over" for m in self.budget.limits if token_metric(m)}
            self.reason = f"non-finite outputs after {n} windows: the verdict is failed"
            self.stopped_at = n
            return True
        alpha = self.spend(look)
        # the position-restricted metrics budgeted (ppl_increase's decided on nll_increase)
        within = [k for k in self.budget.limits if token_metric(k) and k != position_range(k)[0]]
        within += [_nll_key(k) for k in within if position_range(k)[0] == "ppl_increase"]
        metrics, stderr = summarize(stats, reference, level=1 - alpha, within=within)
        self.verdicts = decide(self.budget, metrics, stderr, alpha)
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
        # every per-token field (a chat mask, the marker positions) follows its token
        stats = replace(
            stats.take(token), window=torch.arange(done).repeat_interleave(self.per_window)
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
