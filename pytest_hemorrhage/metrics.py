"""Hemorrhage measures: pure functions of the modified model's logits and the baseline reference.

Every metric is 0 for a model identical to the baseline and grows with damage, so every budget
is a maximum. Standard errors are paired (both models are scored on the same tokens) and
cluster-robust: the sampling unit is the evaluation window, not the token, because the tokens of
one window share their context and their errors are correlated (on the bundled model the
window-level standard error of ``kl_mean`` is ~1.7x the token-level one). ``kl_max`` has none: the
largest value of one sample says nothing about the largest of another, so no bound on it holds
its level (a budget refuses ``confidence`` with ``kl_max``). The per-token KL is clamped at 0
where it is computed (:func:`score_reads`), so round-off never makes a KL metric negative. The
statistics (standard errors, quantiles, bounds) live in :mod:`pytest_hemorrhage.stats`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Protocol

# the statistics live in .stats; mean_se, quantile_se and DEFAULT_LEVEL stay public here too
from .stats import DEFAULT_LEVEL, mean_se, normal_quantile, quantile_se

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    import torch

    from .reference import Reference

__all__ = [
    "DEFAULT_LEVEL",
    "EXTRA_METRICS",
    "METRICS",
    "SKEW",
    "MARKER_METRICS",
    "LogitReads",
    "Result",
    "TokenStats",
    "NO_STDERR",
    "by_position",
    "position_buckets",
    "position_range",
    "token_metric",
    "jsonable",
    "mean_se",
    "quantile_se",
    "read_logits",
    "score_reads",
    "scored_tokens",
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
    "special_top1_flip": "share of the tokens where the baseline's top-1 is a marker (special "
    "or added token, a chat template's end-of-turn) whose top-1 the modified model changed",
}
# Measured only where the baseline's top-1 is a marker: left out of a result (and "not
# measured" for a budget) when no scored token has one, e.g. raw text without special tokens.
MARKER_METRICS = frozenset({"special_top1_flip"})
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
    "routing_flip": "share of (token, MoE layer) pairs routed to another set of experts",
}


@dataclass
class TokenStats:
    """Per-token measures of one batch (or of all batches, concatenated).

    ``window`` numbers the sampling unit of each token (its evaluation window, 0, 1, ... in
    order); standard errors treat windows, not tokens, as the independent draws.

    ``scored`` marks the tokens the summaries count (chat data: the assistant's; None: every
    token), the others being context only: a mask over the same forward passes.
    ``special`` marks the tokens whose baseline top-1 is a marker, where
    ``special_top1_flip`` is measured (None: not known, and not measured).
    ``position`` is each token's position in its window, 1 to the window's length - 1: the
    number of tokens of context its prediction had (None: tokens that are not in windows).
    """

    kl: torch.Tensor
    nll: torch.Tensor
    disagree: torch.Tensor
    p_target: torch.Tensor
    finite: torch.Tensor
    window: torch.Tensor
    scored: torch.Tensor | None = None
    special: torch.Tensor | None = None
    position: torch.Tensor | None = None

    def take(self, index: torch.Tensor) -> TokenStats:
        """The tokens at ``index`` (a bool mask or positions), every per-token field with
        them; their window labels as they were."""
        return TokenStats(
            **{
                f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                for f in fields(self)
            }
        )

    @staticmethod
    def cat(parts: list[TokenStats]) -> TokenStats:
        """The parts in order; each part's windows are numbered after the previous parts'."""
        import torch

        return TokenStats(
            *(
                torch.cat([getattr(p, f) for p in parts])
                for f in ("kl", "nll", "disagree", "p_target", "finite")
            ),
            window=_numbered_on([p.window for p in parts]),
            **{
                f: None
                if getattr(parts[0], f) is None
                else torch.cat([getattr(p, f) for p in parts])
                for f in ("scored", "special", "position")
            },
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

    The same as :func:`score_reads` of :func:`read_logits`, which a caller scoring many
    batches runs once over all of them (the same bits).
    """
    return score_reads(read_logits(logits, ref), ref)


@dataclass
class LogitReads:
    """What :func:`read_logits` takes from one batch of modified logits (or from several,
    concatenated): per scored token, the few log-probs the measures need, in its device.

    ``logq`` holds the modified log-probs of the target, of the baseline's top-1 and, for
    top-K storage, of the baseline's top-K and tail-sample tokens, in that column order;
    ``best`` the largest modified log-prob. Exact storage reads its KL (and the rows whose KL
    is skew-smoothed, ``cut``) in the full-vocabulary pass already. ``window`` and
    ``position`` label the tokens as in :class:`TokenStats`; the caller numbers the windows
    (a window scored in several chunks of positions is one sampling unit).
    """

    logq: torch.Tensor
    best: torch.Tensor
    window: torch.Tensor
    kl: torch.Tensor | None = None
    cut: torch.Tensor | None = None
    position: torch.Tensor | None = None

    @staticmethod
    def cat(parts: list[LogitReads]) -> LogitReads:
        """The parts in order, their labels as they are."""
        import torch

        def joined(name: str) -> torch.Tensor | None:
            if getattr(parts[0], name) is None:
                return None
            return torch.cat([getattr(p, name) for p in parts])

        return LogitReads(**{f.name: joined(f.name) for f in fields(LogitReads)})


def read_logits(
    logits: torch.Tensor, ref: Reference, window: int = 0, position: int = 1
) -> LogitReads:
    """The full-vocabulary pass of :func:`token_stats` over one chunk of ``logits``, against
    the reference rows ``ref`` of its tokens: what the per-token measures need from it.

    Logits (windows, positions, vocab) are labelled with their windows, numbered from
    ``window``, and their positions, from ``position``; each row of (tokens, vocab) logits is
    a window of its own, without a position."""
    import torch

    device = logits.device
    exact = ref.p is not None
    # The full-vocabulary passes (log_softmax, the argmax test, the gather or reduction
    # against the baseline) run on blocks of 64 rows (more for small vocabularies): the extra
    # memory of a measure stays one block whatever the batch. Smaller blocks saved ~1% of a
    # measure on two idle cores but cost far more on busy ones (each block's log_softmax and
    # amax is a parallel region that waits for every thread).
    rows = max(64, _CHUNK // logits.shape[-1])
    # every column read from the log-probs, in one gather per block: the target and the
    # baseline's top-1 (and, for top-K storage, its top-K and tail-sample tokens)
    cols = [ref.targets[:, None], ref.top1[:, None]]
    if not exact:
        cols.append(ref.topk_idx.long())
        if ref.tail_idx is not None:
            cols.append(ref.tail_idx.long())
    cols = torch.cat(cols, -1).to(device)
    p = ref.p.to(device) if exact else None
    picked, best, versus, start = [], [], [], 0
    for block in _row_blocks(logits, rows):
        span = slice(start, start + len(block))
        start += len(block)
        logq = torch.log_softmax(block.float(), -1)
        picked.append(logq.gather(-1, cols[span]))
        best.append(logq.amax(-1))
        if exact:
            versus.append(torch.linalg.vecdot(p[span], logq))
    labels, positions = _labels(logits.shape, window, position)
    reads = LogitReads(torch.cat(picked), torch.cat(best), labels, position=positions)
    if exact:
        kl = ref.neg_entropy.to(device) - torch.cat(versus)
        # a -inf logit where the baseline has mass (NaN rows are non-finite, not cut)
        cut = ~reads.logq[:, 0].isnan() & ~kl.isfinite()
        if cut.any():  # rare (decoding truncation): redo those rows with q skew-smoothed
            p = p[cut]
            lp = p.log()
            logq = torch.log_softmax(logits.flatten(0, -2)[cut].float(), -1)
            kl[cut] = torch.linalg.vecdot(p, lp - _mix(logq, lp))
        reads.kl, reads.cut = kl, cut
    return reads


def score_reads(reads: LogitReads, ref: Reference) -> TokenStats:
    """The per-token measures of :func:`token_stats` from what :func:`read_logits` took from
    the logits, against the reference rows ``ref`` of the same tokens.

    Elementwise work and reductions within a token's own values only, so running it once
    over many batches gives each token the bits it gets batch by batch, with one pass of each
    operation instead of one per batch (a parallel region each, on the CPU; a kernel launch
    on an accelerator). The per-token KL is clamped at 0 here, where both storages' KL is
    final: round-off otherwise leaves an unchanged distribution slightly below 0.
    """
    import torch

    device = reads.logq.device
    target_logq, top1_logq = reads.logq[:, 0], reads.logq[:, 1]
    finite = ~target_logq.isnan()  # NaN, +inf, or no finite logit poison the whole row
    disagree = top1_logq < reads.best  # the baseline's top token lost first place
    if reads.kl is not None:
        kl, cut = reads.kl, reads.cut
    else:
        sampled = ref.tail_idx is not None
        topk_logp = ref.head_logp().to(device)
        lq = reads.logq[:, 2:]
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
    # KL is never negative, but its float32 terms round: a distribution that did not change
    # (logits shifted by a constant, a fault that hit nothing that matters) scores tokens
    # slightly below 0 and a kl_mean of about -1e-9. Clamped per token, so kl_mean, kl_p99,
    # kl_max and every part or sum of them are >= 0 (NaN stays NaN: a non-finite row).
    kl = kl.clamp_min(0)
    return TokenStats(
        kl=kl.cpu(),
        nll=(-target_logq).cpu(),
        disagree=disagree.cpu(),
        p_target=target_logq.exp().cpu(),
        finite=finite.cpu(),
        window=reads.window,
        position=reads.position,
    )


def _numbered_on(windows: list[torch.Tensor]) -> torch.Tensor:
    """The window numbers of concatenated parts, each part's numbered after the previous
    parts' (the sampling units of one part are never those of another)."""
    import torch

    shifted, offset = [], 0
    for window in windows:
        shifted.append(window + offset)
        offset += int(window.max()) + 1 if window.numel() else 0
    return torch.cat(shifted)


def _labels(
    shape: torch.Size, window: int, position: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The window of each token of (windows, positions, vocab) logits, numbered from
    ``window``, and its position, from ``position``; of (tokens, vocab) logits, a window per
    row and no position."""
    import torch

    if len(shape) < 3:
        return torch.arange(window, window + shape[0]), None
    windows, positions = shape[0], math.prod(shape[1:-1])
    labels = torch.arange(window, window + windows).repeat_interleave(positions)
    at = torch.arange(position, position + positions, dtype=torch.int32).repeat(windows)
    return labels, at


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


def summarize(
    stats: TokenStats, ref: Reference, level: float = DEFAULT_LEVEL, within: Iterable[str] = ()
) -> tuple[dict[str, float], dict[str, float | None]]:
    """Aggregate per-token measures into the metrics and their window-level standard errors,
    calibrated for one-sided bounds at ``level`` (95% unless told; see :func:`mean_se`).

    Over the tokens ``stats.scored`` marks (all without it); ``special_top1_flip`` where
    ``stats.special`` marks any of them (else it is not measured, and left out). ``within``
    names position-restricted metrics (``"kl_mean[8192:]"``, see :func:`position_range`):
    each is its metric over the tokens at those positions, with the same standard error
    (windows are still the sampling units), under its own name."""
    stats, base_logp = scored_tokens(stats, ref)
    metrics, stderr = _summary(stats, base_logp, level)
    ranges: dict[tuple[int, int | None], list[str]] = {}
    for key in within:
        metric, lo, hi = position_range(key)
        ranges.setdefault((lo, hi), []).append(key)
    for (lo, hi), keys in ranges.items():
        at = _at_positions(stats, lo, hi)
        part, part_se = _summary(stats.take(at), base_logp[at], level)
        for key in keys:
            metric = position_range(key)[0]
            # no token there (an empty range): not measured, as a budget will say
            if metric in part and at.any():
                metrics[key], stderr[key] = part[metric], part_se[metric]
    return metrics, stderr


def by_position(
    stats: TokenStats, ref: Reference, length: int, level: float = DEFAULT_LEVEL
) -> list[dict[str, Any]]:
    """Every metric of :func:`summarize` per position bucket of windows of ``length`` tokens
    (:func:`position_buckets`), with its standard error: where along the context the damage
    is. Empty for tokens without positions."""
    if stats.position is None:
        return []
    stats, base_logp = scored_tokens(stats, ref)
    buckets = []
    for lo, hi in position_buckets(length):
        at = _at_positions(stats, lo, hi)
        if not at.any():
            continue
        metrics, stderr = _summary(stats.take(at), base_logp[at], level)
        buckets.append(
            {"positions": [lo, hi], "tokens": int(at.sum()), "metrics": metrics, "stderr": stderr}
        )
    return buckets


def position_buckets(length: int) -> list[tuple[int, int]]:
    """Log-spaced ranges ``[lo, hi)`` of the positions of windows of ``length`` tokens (1 to
    ``length - 1``, the tokens of context a prediction had): 1-15, 16-63, 64-255, ...,
    growing 4x, the last one ending at the window's end."""
    edges, edge = [1], 16
    while edge < length:
        edges.append(edge)
        edge *= 4
    edges.append(length)
    return list(zip(edges, edges[1:], strict=False))


def position_range(key: str) -> tuple[str, int, int | None]:
    """``"kl_mean[8192:]"`` -> ``("kl_mean", 8192, None)``: a metric restricted to positions
    ``lo <= position < hi`` (Python's slice, hi open when left out); a plain metric name ->
    ``(name, 1, None)``, every position."""
    match = _RANGE.fullmatch(key)
    if match is None:
        return key, 1, None
    metric, lo, hi = match.groups()
    return metric, int(lo or 1), int(hi) if hi else None


_RANGE = re.compile(r"(\w+)\[(\d*):(\d*)\]")


def token_metric(key: str) -> bool:
    """Whether ``key`` is a metric of the tokens (:data:`METRICS`), of every position or of
    a range of them."""
    return position_range(key)[0] in METRICS


def _at_positions(stats: TokenStats, lo: int, hi: int | None) -> torch.Tensor:
    """Which tokens of ``stats`` sit at positions ``lo <= position < hi``."""
    if stats.position is None:
        raise ValueError("tokens without positions")  # the harness always labels them
    at = stats.position >= lo
    return at if hi is None else at & (stats.position < hi)


def _summary(
    stats: TokenStats, base_logp: torch.Tensor, level: float
) -> tuple[dict[str, float], dict[str, float | None]]:
    """:func:`summarize` of tokens already selected, against their baseline log-probs."""
    unit = stats.window
    d = stats.nll.double() - (-base_logp).double()
    nll_increase, nll_se = mean_se(d, unit, level)
    ratio = math.exp(nll_increase)
    z = normal_quantile(level)
    values = {
        # the bound exp(nll + z se) - 1, as value + z * se (exp is convex: the delta method's
        # ratio * se would fall short of it)
        "ppl_increase": (ratio - 1, None if nll_se is None else ratio * math.expm1(z * nll_se) / z),
        "nll_increase": (nll_increase, nll_se),
        "kl_mean": mean_se(stats.kl, unit, level),
        "kl_p99": quantile_se(stats.kl, 0.99, unit, level),
        "kl_max": (stats.kl.max().item() if stats.kl.numel() else math.nan, None),
        "top1_disagreement": mean_se(stats.disagree, unit, level),
        "delta_p_mean": mean_se(base_logp.exp().double() - stats.p_target.double(), unit, level),
    }
    if stats.special is not None and bool(stats.special.any()):
        at = stats.special
        values["special_top1_flip"] = mean_se(stats.disagree[at], unit[at], level)
    return {k: v for k, (v, _) in values.items()}, {k: se for k, (_, se) in values.items()}


def scored_tokens(stats: TokenStats, ref: Reference) -> tuple[TokenStats, torch.Tensor]:
    """The tokens the summaries count, those ``stats.scored`` marks (every token without a
    mask), and the baseline's log-probs of their targets: a mask over rows already scored,
    never a copy of the reference's distributions."""
    if stats.scored is None:
        return stats, ref.target_logp
    return stats.take(stats.scored), ref.target_logp[stats.scored]


@dataclass
class Result:
    """One measurement of a modified model against the baseline.

    ``stages`` holds the cumulative measurement after each stage of a composition. ``level``
    is the one-sided level the standard errors are calibrated at (``summarize``'s): the
    budget's ``confidence`` when the measure had one, else 0.95. ``metrics`` holds the
    position-restricted metrics a budget names too (``"kl_mean[8192:]"``); ``positions``
    every metric per position bucket.
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
    level: float = DEFAULT_LEVEL
    # the metrics per position bucket (metrics.by_position): where along the window damage is
    positions: list[dict[str, Any]] = field(default_factory=list)

    def violations(self, budget: BudgetCheck) -> list[str]:
        """One line per metric over ``budget``; empty when within it."""
        return budget.violations(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "modification": self.modification,
            "params": self.params,
            "metrics": self.metrics,
            "stderr": self.stderr,
            "stderr_level": self.level,
            "baseline_ppl": self.baseline_ppl,
            "modified_ppl": self.modified_ppl,
            "tokens": self.tokens,
            "nonfinite_tokens": self.nonfinite,
            "stages": [s.to_dict() for s in self.stages],
            "details": self.details,
            "positions": self.positions,
        }


class BudgetCheck(Protocol):
    """What :meth:`Result.violations` checks a result against: a
    :class:`~pytest_hemorrhage.budget.Budget`, which sits above the measures it names."""

    def violations(self, result: Result) -> list[str]: ...


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
