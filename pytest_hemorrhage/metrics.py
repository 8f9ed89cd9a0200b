"""Hemorrhage measures: pure functions of the modified model's logits and the baseline reference.

Every metric is 0 for a model identical to the baseline and grows with damage, so every budget
is a maximum. Standard errors are paired (both models are scored on the same tokens) and
cluster-robust: the sampling unit is the evaluation window, not the token, because the tokens of
one window share their context and their errors are correlated (on the bundled model the
window-level standard error of ``kl_mean`` is ~1.7x the token-level one). ``kl_max`` has none: the
largest value of one sample says nothing about the largest of another, so no bound on it holds
its level (a budget refuses ``confidence`` with ``kl_max``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch

    from .budget import Budget
    from .reference import Reference

__all__ = [
    "EXTRA_METRICS",
    "METRICS",
    "SKEW",
    "Result",
    "TokenStats",
    "NO_STDERR",
    "jsonable",
    "mean_se",
    "quantile_se",
    "summarize",
    "token_stats",
]

METRICS: dict[str, str] = {
    "ppl_increase": "perplexity ratio minus 1: ppl_modified / ppl_baseline - 1",
    "nll_increase": "mean increase of the correct token's negative log-likelihood (nats)",
    "kl_mean": "mean KL(baseline || modified) of the next-token distribution, per token (nats)",
    "kl_p99": "99th percentile of the per-token KL",
    "kl_max": "largest per-token KL",
    "top1_disagreement": "share of tokens whose baseline top-1 token lost first place",
    "delta_p_mean": "mean drop of the probability given to the correct token",
}
# Metrics with no standard error, ever (see the module docstring).
NO_STDERR = frozenset({"kl_max"})
# Baseline mass mixed into a modified distribution that gives zero probability to tokens the
# baseline can emit (decoding truncation): KL(p || (1 - SKEW) q + SKEW p) is the skew divergence
# (Lee 1999). It is at most ln(1/SKEW) = 13.8 nats per token, charges about that much per unit
# of baseline mass cut, and leaves the kept tokens' terms within O(SKEW). Rows without cut
# mass use q itself.
SKEW = 1e-6
# Computed only when a budget names them or an option asks (they cost passes of their own; see
# pytest_hemorrhage.extras).
EXTRA_METRICS: dict[str, str] = {
    "gen_mismatch": "share of generated tokens that differ from the baseline's continuation",
    "gen_first_divergence": "mean of 1 - (first differing generated position) / length",
    "accuracy_drop": "drop of multiple-choice accuracy on the task items",
    "flip_rate": "share of task items whose correctness changed, either way",
}


@dataclass
class TokenStats:
    """Per-token measures of one batch (or of all batches, concatenated).

    ``window`` numbers the sampling unit of each token (its evaluation window, 0, 1, ... in
    order); standard errors treat windows, not tokens, as the independent draws.
    """

    kl: torch.Tensor
    nll: torch.Tensor
    disagree: torch.Tensor
    p_target: torch.Tensor
    finite: torch.Tensor
    window: torch.Tensor

    @staticmethod
    def cat(parts: list[TokenStats]) -> TokenStats:
        """The parts in order; each part's windows are numbered after the previous parts'."""
        import torch

        windows, offset = [], 0
        for p in parts:
            windows.append(p.window + offset)
            offset += int(p.window.max()) + 1 if p.window.numel() else 0
        return TokenStats(
            *(
                torch.cat([getattr(p, f) for p in parts])
                for f in ("kl", "nll", "disagree", "p_target", "finite")
            ),
            window=torch.cat(windows),
        )


def token_stats(logits: torch.Tensor, ref: Reference) -> TokenStats:
    """Compare modified ``logits`` (..., vocab) with the reference rows for those tokens
    (in row-major order; a strided view such as ``logits[:, :-1]`` is read without a copy).

    The first dimension of (windows, positions, vocab) logits is the sampling unit of the
    standard errors; each row of (tokens, vocab) logits is a unit of its own.

    A ``-inf`` logit is a token the modified decoding cannot emit (top-k, top-p); on the rows
    where that removes mass the baseline gives, every measure uses the skew-smoothed
    distribution ``(1 - SKEW) q + SKEW p`` (see ``SKEW``). NaN or ``+inf`` logits, or a row
    with no finite logit, count as non-finite outputs.
    """
    import torch

    device = logits.device
    exact = ref.p is not None
    # The full-vocabulary passes (log_softmax, one reduction against the baseline, argmax
    # test) run on row chunks that stay in cache: faster than whole batches, and the extra
    # memory of a measure stays a few vocab-sized rows whatever the batch. Per-token work
    # runs once, on the whole batch.
    rows = max(64, _CHUNK // logits.shape[-1])
    picks = torch.stack([ref.targets, ref.top1], -1).to(device)
    sampled = not exact and ref.tail_idx is not None
    against = ref.p if exact else ref.topk_idx
    if sampled:  # the tail samples' log-probs come with the same gather
        against = torch.cat([ref.topk_idx, ref.tail_idx], -1)
    picked, best, versus, start = [], [], [], 0
    for block in _row_blocks(logits, rows):
        span = slice(start, start + len(block))
        start += len(block)
        logq = torch.log_softmax(block.float(), -1)
        picked.append(logq.gather(-1, picks[span]))
        best.append(logq.amax(-1))
        chunk = against[span].to(device)
        versus.append(torch.linalg.vecdot(chunk, logq) if exact else logq.gather(-1, chunk.long()))
    target_logq, top1_logq = torch.cat(picked).unbind(-1)
    finite = ~target_logq.isnan()  # NaN, +inf, or no finite logit poison the whole row
    disagree = top1_logq < torch.cat(best)  # the baseline's top token lost first place
    if exact:
        kl = ref.neg_entropy.to(device) - torch.cat(versus)
        cut = finite & ~kl.isfinite()  # a -inf logit where the baseline has mass
        if cut.any():  # rare (decoding truncation): redo those rows with q skew-smoothed
            p = ref.p[cut].to(device)
            lp = p.log()
            logq = torch.log_softmax(logits.flatten(0, -2)[cut].float(), -1)
            kl[cut] = torch.linalg.vecdot(p, lp - _mix(logq, lp))
    else:
        topk_logp = ref.head_logp().to(device)
        lq = torch.cat(versus)
        k = topk_logp.shape[-1]
        lq, lq_s = lq[:, :k], lq[:, k:]
        # computed as the reference computes the kept mass: bit-equal for an unmodified model
        q_tail = (-torch.expm1(lq.double().logsumexp(-1))).clamp_min(0).float().double()
        p_tail = ref.tail_mass.to(device).double()
        if sampled:
            # 1 - head mass cancels to nothing when the tail is tiny; a drawn tail token's
            # own probability bounds the tail's from below (the same operation on both sides
            # keeps an unmodified model's ratios at 1 bit for bit)
            lp_s = ref.tail_logp.to(device)
            p_tail = torch.maximum(p_tail, lp_s.double().exp().amax(-1))
            q_tail = torch.maximum(q_tail, lq_s.double().exp().amax(-1))
        cut = lq.isneginf().any(-1) | target_logq.isneginf() | ((q_tail <= 0) & (p_tail > 1e-6))
        if sampled:
            cut |= lq_s.isneginf().any(-1)
            lq_s = torch.where(cut[:, None], _mix(lq_s, lp_s), lq_s)
        lq = torch.where(cut[:, None], _mix(lq, topk_logp), lq)
        q_tail = torch.where(cut, (1 - SKEW) * q_tail + SKEW * p_tail, q_tail)
        kl = _topk_kl(lq, topk_logp, q_tail, p_tail)
        if sampled:
            kl = kl + _tail_kl(lq_s, lp_s, q_tail, p_tail)
    target_logq = torch.where(cut, _mix(target_logq, ref.target_logp.to(device)), target_logq)
    return TokenStats(
        kl=kl.cpu(),
        nll=(-target_logq).cpu(),
        disagree=disagree.cpu(),
        p_target=target_logq.exp().cpu(),
        finite=finite.cpu(),
        window=_windows(logits.shape),
    )


def _windows(shape: torch.Size) -> torch.Tensor:
    """The window number of each token of (windows, ..., vocab) logits, or one per row."""
    import torch

    if len(shape) < 3:
        return torch.arange(math.prod(shape[:-1]))
    return torch.arange(shape[0]).repeat_interleave(math.prod(shape[1:-1]))


_CHUNK = 1 << 16  # elements per chunk of logits


def _row_blocks(logits: torch.Tensor, rows: int) -> Iterator[torch.Tensor]:
    """Blocks of at most ``rows`` rows of (..., vocab) ``logits``, in order, as views."""
    if logits.dim() > 2:
        for part in logits:
            yield from _row_blocks(part, rows)
        return
    for i in range(0, len(logits), rows):
        yield logits[i : i + rows]


def _mix(logq: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """``log((1 - SKEW) q + SKEW p)``."""
    import torch

    return torch.logaddexp(logq + math.log1p(-SKEW), logp + math.log(SKEW))


def _topk_kl(
    lq: torch.Tensor, topk_logp: torch.Tensor, q_tail: torch.Tensor, p_tail: torch.Tensor
) -> torch.Tensor:
    """KL over the baseline's top-K tokens plus one bucket for the rest of the vocabulary.

    ``lq`` are the modified log-probs of the top-K tokens, ``q_tail``/``p_tail`` the mass of
    the rest. Grouping the tail into one outcome can only lower KL (log-sum inequality): the
    result is exact when the tail is empty and otherwise short by p_tail * KL(tail-conditionals).
    """
    import torch

    p = topk_logp.exp()
    head = (p * (topk_logp - lq)).sum(-1)
    q_tail = q_tail.clamp_min(1e-300)
    tail = torch.where(p_tail > 0, p_tail * (p_tail.clamp_min(1e-300).log() - q_tail.log()), 0)
    return head + tail.float()


def _tail_kl(
    lq_s: torch.Tensor, lp_s: torch.Tensor, q_tail: torch.Tensor, p_tail: torch.Tensor
) -> torch.Tensor:
    """Unbiased estimate of what grouping the tail leaves out, p_tail * KL(p_c || q_c) with
    p_c, q_c the distributions conditional on the tail, from S tokens drawn from p_c.

    With r = q_c / p_c at each draw, E_pc[r - 1 - log r] = KL(p_c || q_c) because
    E_pc[r] = 1 (both conditionals sum to 1 over the same tokens); every term r - 1 - log r is
    >= 0, so the estimate never makes KL negative, and it is exactly 0 where q = p bit for bit.
    """
    import torch

    log_r = (lq_s.double() - lp_s.double()) + (p_tail.log() - q_tail.clamp_min(1e-300).log())[
        :, None
    ]
    term = (torch.expm1(log_r) - log_r).mean(-1)
    return torch.where(p_tail > 0, p_tail * term, 0).float()


def mean_se(x: torch.Tensor, unit: torch.Tensor | None = None) -> tuple[float, float | None]:
    """Mean of ``x`` and its standard error, with ``unit`` (one label per value, e.g. the
    window of each token) naming the independent draws; None: every value is one.

    Cluster-robust: the mean over values is a ratio estimator sum(Y_u) / sum(N_u) over the
    units' totals, whose variance is G / (G - 1) * sum((Y_u - mean * N_u)^2) / N^2 for G
    units (Cochran 1977, 6.9; the CR1 sandwich). The SE is None with fewer than 2 units.

    The SE returned is calibrated for the one-sided 95% bounds: ``mean +- 1.645 * se`` is
    ``mean +- t95 * s`` with ``s`` the CR1 standard error and ``t95`` the studentized mean's
    95% quantile corrected for the units' skewness and kurtosis (see :func:`_t95`), so that
    the bounds hold their level with tens of units (other confidences scale it linearly).
    """
    mean, se, t95 = _cluster(x, unit)
    return mean, None if se is None else se * t95 / _Z95


def _cluster(x: torch.Tensor, unit: torch.Tensor | None) -> tuple[float, float | None, float]:
    """(mean, CR1 standard error, calibrated one-sided 95% quantile) of ``x`` over ``unit``."""
    import torch

    x = x.double().reshape(-1)
    n = x.numel()
    mean = x.mean().item() if n else math.nan
    if unit is None:
        groups, totals = n, x - mean
    else:
        labels = unit.reshape(-1).unique(return_inverse=True)[1]
        groups = int(labels.max()) + 1 if n else 0
        totals = torch.zeros(groups, dtype=torch.float64).index_add_(0, labels, x - mean)
    if groups < 2:
        return mean, None, _Z95
    square = (totals**2).sum().item()
    return mean, math.sqrt(groups / (groups - 1) * square) / n, _t95(totals, groups)


# One-sided 95% normal quantile: the level at which the bounds' standard errors are calibrated.
_Z95 = 1.6448536269514722


def _t95(totals: torch.Tensor, groups: int) -> float:
    """The one-sided 95% quantile of a studentized mean of ``groups`` units whose centred
    totals (influence values) are ``totals``, in place of the normal 1.645.

    Measured over disjoint evaluation sets of 64 windows (benchmarks/bench_coverage.py), the
    normal bound covered 0.936-0.962: window totals are skewed (0.3-1.0) and heavy-tailed
    (kurtosis 3-5). Two corrections, each first order: Student's t with the degrees of freedom
    of a variance estimate under kurtosis k (2 G / (k - 1), Satterthwaite's moment match, at
    most G - 1), and Hall's (1992, 3.5) Edgeworth term |skew| (2 z^2 + 1) / (6 sqrt(G)) for
    the skewness of the studentized mean. The skew term is taken by its magnitude: it widens
    the bound on the side the skew shortens, and the same SE also serves lower bounds (early
    stopping), whose correction is the mirror image; so both one-sided bounds hold.
    """
    m2 = (totals**2).mean().item()
    if m2 <= 0:
        return _Z95
    skew = (totals**3).mean().item() / m2**1.5
    kurtosis = (totals**4).mean().item() / m2**2
    dof = min(groups - 1, 2 * groups / max(kurtosis - 1, 1e-12))
    return _student95(dof) + abs(skew) * (2 * _Z95**2 + 1) / (6 * math.sqrt(groups))


def _student95(dof: float) -> float:
    """Student's t one-sided 95% quantile (Cornish-Fisher in 1/dof; within 0.5% for dof >= 3,
    12% low at dof = 1)."""
    z, v = _Z95, dof
    return (
        z
        + (z**3 + z) / (4 * v)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)
    )


def quantile_se(
    x: torch.Tensor, q: float, unit: torch.Tensor | None = None
) -> tuple[float, float | None]:
    """Quantile ``q`` of ``x`` and a standard error calibrated for its one-sided upper bound.

    Woodruff (1952): the sample CDF at the quantile is a mean of indicators, with a
    cluster-robust SE ``s_F`` and calibrated quantile ``t95`` (see :func:`mean_se`); the upper
    95% bound is the sample quantile at ``q + t95 * s_F``, and the SE returned is its distance
    from the quantile over 1.645, so that ``value + 1.645 * se`` is that bound exactly (other
    confidences scale it linearly). Infinite when the bound lies beyond the largest value (too
    few tokens).
    """
    x = x.double().reshape(-1)
    if x.numel() == 0:
        return math.nan, None
    value = x.quantile(q).item()
    _, s_f, t95 = _cluster((x <= value).double(), unit)
    if s_f is None:
        return value, None
    top = q + t95 * s_f
    if top > 1:
        return value, math.inf
    return value, (x.quantile(top).item() - value) / _Z95


def summarize(
    stats: TokenStats, ref: Reference
) -> tuple[dict[str, float], dict[str, float | None]]:
    """Aggregate per-token measures into the metrics and their window-level standard errors."""
    unit = stats.window
    d = stats.nll.double() - ref.targets_nll.double()
    nll_increase, nll_se = mean_se(d, unit)
    ratio = math.exp(nll_increase)
    values = {
        # the bound exp(nll + z se) - 1 with z = 1.645, as value + 1.645 * se (exp is convex:
        # the delta method's ratio * se would fall short of it)
        "ppl_increase": (
            ratio - 1,
            None if nll_se is None else ratio * math.expm1(_Z95 * nll_se) / _Z95,
        ),
        "nll_increase": (nll_increase, nll_se),
        "kl_mean": mean_se(stats.kl, unit),
        "kl_p99": quantile_se(stats.kl, 0.99, unit),
        "kl_max": (stats.kl.max().item(), None),
        "top1_disagreement": mean_se(stats.disagree, unit),
        "delta_p_mean": mean_se(ref.target_logp.exp().double() - stats.p_target.double(), unit),
    }
    return {k: v for k, (v, _) in values.items()}, {k: se for k, (_, se) in values.items()}


@dataclass
class Result:
    """One measurement of a modified model against the baseline.

    ``stages`` holds the cumulative measurement after each stage of a composition.
    """

    modification: str
    params: dict[str, Any]
    metrics: dict[str, float]
    stderr: dict[str, float | None]
    baseline_ppl: float
    modified_ppl: float
    tokens: int
    nonfinite: int = 0
    stages: list[Result] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    configs: list[Any] = field(default_factory=list, repr=False)  # to re-apply (diagnostics)

    def violations(self, budget: Budget) -> list[str]:
        """One line per metric over ``budget``; empty when within it."""
        return budget.violations(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "modification": self.modification,
            "params": self.params,
            "metrics": self.metrics,
            "stderr": self.stderr,
            "baseline_ppl": self.baseline_ppl,
            "modified_ppl": self.modified_ppl,
            "tokens": self.tokens,
            "nonfinite_tokens": self.nonfinite,
            "stages": [s.to_dict() for s in self.stages],
            "details": self.details,
        }


def jsonable(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN or infinity: a
    collapsed model's metric becomes null), recursively through dicts, lists and tuples."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value
