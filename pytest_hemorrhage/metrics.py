"""Hemorrhage measures: pure functions of the modified model's logits and the baseline reference.

Every metric is 0 for a model identical to the baseline and grows with damage, so every budget
is a maximum. Standard errors are paired: both models are scored on the same tokens.
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
    "jsonable",
    "mean_se",
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
    """Per-token measures of one batch (or of all batches, concatenated)."""

    kl: torch.Tensor
    nll: torch.Tensor
    disagree: torch.Tensor
    p_target: torch.Tensor
    finite: torch.Tensor

    @staticmethod
    def cat(parts: list[TokenStats]) -> TokenStats:
        import torch

        return TokenStats(
            *(
                torch.cat([getattr(p, f) for p in parts])
                for f in ("kl", "nll", "disagree", "p_target", "finite")
            )
        )


def token_stats(logits: torch.Tensor, ref: Reference) -> TokenStats:
    """Compare modified ``logits`` (..., vocab) with the reference rows for those tokens
    (in row-major order; a strided view such as ``logits[:, :-1]`` is read without a copy).

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
    against = ref.p if exact else ref.topk_idx
    picked, best, versus, start = [], [], [], 0
    for block in _row_blocks(logits, rows):
        span = slice(start, start + len(block))
        start += len(block)
        logq = torch.log_softmax(block.float(), -1)
        picked.append(logq.gather(-1, picks[span]))
        best.append(logq.amax(-1))
        chunk = against[span].to(device)
        versus.append(torch.linalg.vecdot(chunk, logq) if exact else logq.gather(-1, chunk))
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
        topk_logp = ref.topk_logp.to(device)
        lq = torch.cat(versus)
        q_tail = (1 - lq.double().exp().sum(-1)).clamp_min(0)
        p_tail = (1 - topk_logp.double().exp().sum(-1)).clamp_min(0)
        cut = lq.isneginf().any(-1) | target_logq.isneginf() | ((q_tail <= 0) & (p_tail > 1e-6))
        lq = torch.where(cut[:, None], _mix(lq, topk_logp), lq)
        q_tail = torch.where(cut, (1 - SKEW) * q_tail + SKEW * p_tail, q_tail)
        kl = _topk_kl(lq, topk_logp, q_tail, p_tail)
    target_logq = torch.where(cut, _mix(target_logq, ref.target_logp.to(device)), target_logq)
    return TokenStats(
        kl=kl.cpu(),
        nll=(-target_logq).cpu(),
        disagree=disagree.cpu(),
        p_target=target_logq.exp().cpu(),
        finite=finite.cpu(),
    )


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


def mean_se(x: torch.Tensor) -> tuple[float, float]:
    """Mean and its standard error, treating the values as independent draws."""
    x = x.double()
    n = x.numel()
    return x.mean().item(), (x.std().item() / math.sqrt(n)) if n > 1 else 0.0


def _quantile_se(x: torch.Tensor, q: float) -> tuple[float, float]:
    """Quantile and the half-width of its binomial order-statistic interval (~1 SE)."""
    s = x.double().sort().values
    n = s.numel()
    spread = math.sqrt(n * q * (1 - q))
    lo, hi = max(0, math.floor(n * q - spread)), min(n - 1, math.ceil(n * q + spread))
    return s.quantile(q).item(), (s[hi] - s[lo]).item() / 2


def _max_se(x: torch.Tensor) -> tuple[float, float]:
    """Maximum and its bootstrap standard error, in closed form (no resampling).

    The maximum of a bootstrap resample of n values is the j-th largest value with probability
    ((n - j) / n)^n - ((n - j - 1) / n)^n, about e^-j (1 - 1/e): the top few dozen values carry
    all but e^-64 of it.
    """
    import torch

    n = x.numel()
    top = x.double().topk(min(n, 64)).values
    below = ((n - torch.arange(len(top) + 1, dtype=torch.float64)) / n) ** n
    weight = below[:-1] - below[1:]
    weight[-1] += below[-1]  # whatever is left, on the last value kept
    mean = (weight * top).sum()
    return top[0].item(), (weight * (top - mean) ** 2).sum().sqrt().item()


def summarize(
    stats: TokenStats, ref: Reference
) -> tuple[dict[str, float], dict[str, float | None]]:
    """Aggregate per-token measures into the metrics and their standard errors."""
    d = stats.nll.double() - ref.targets_nll.double()
    nll_increase, nll_se = mean_se(d)
    ratio = math.exp(nll_increase)
    values = {
        "ppl_increase": (ratio - 1, ratio * nll_se),
        "nll_increase": (nll_increase, nll_se),
        "kl_mean": mean_se(stats.kl),
        "kl_p99": _quantile_se(stats.kl, 0.99),
        "kl_max": _max_se(stats.kl),
        "top1_disagreement": mean_se(stats.disagree),
        "delta_p_mean": mean_se(ref.target_logp.exp().double() - stats.p_target.double()),
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
