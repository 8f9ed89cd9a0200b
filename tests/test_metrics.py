"""Metrics against their definitions, on synthetic logits; and per-token measures run once over
many batches give every token the bits it gets batch by batch (metrics.read_logits /
score_reads, as measure() uses them)."""

from __future__ import annotations

import math

import pytest
import torch

from pytest_hemorrhage.metrics import (
    MARKER_METRICS,
    METRICS,
    LogitReads,
    TokenStats,
    read_logits,
    score_reads,
    summarize,
    token_stats,
)
from pytest_hemorrhage.reference import Reference


def _reference(logits: torch.Tensor, targets: torch.Tensor, topk: int, **kwargs: int) -> Reference:
    return Reference.from_logprobs(torch.log_softmax(logits, -1), targets, topk, **kwargs)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(500, 50, generator=g) * 3
    return (
        base,
        base + torch.randn(500, 50, generator=g) * 0.5,
        torch.randint(0, 50, (500,), generator=g),
    )


def test_identical_model_scores_zero_on_every_metric(logits):
    base, _, targets = logits
    ref = _reference(base, targets, topk=50)
    metrics, stderr = summarize(token_stats(base, ref), ref)
    assert set(metrics) == set(METRICS) - MARKER_METRICS  # no marker positions given
    assert all(abs(v) < 1e-6 for v in metrics.values()), metrics


def test_metrics_match_their_definitions(logits):
    base, mod, targets = logits
    ref = _reference(base, targets, topk=50)
    metrics, stderr = summarize(token_stats(mod, ref), ref)
    p, q = torch.softmax(base.double(), -1), torch.softmax(mod.double(), -1)
    kl = (p * (p.log() - q.log())).sum(-1)
    nll_b = -p.log()[torch.arange(500), targets]
    nll_m = -q.log()[torch.arange(500), targets]
    assert metrics["kl_mean"] == pytest.approx(kl.mean().item(), rel=1e-4)
    assert metrics["kl_max"] == pytest.approx(kl.max().item(), rel=1e-4)
    assert metrics["kl_p99"] == pytest.approx(kl.quantile(0.99).item(), rel=1e-4)
    assert metrics["nll_increase"] == pytest.approx((nll_m - nll_b).mean().item(), abs=1e-5)
    ppl_ratio = math.exp(nll_m.mean().item()) / math.exp(nll_b.mean().item())
    assert metrics["ppl_increase"] == pytest.approx(ppl_ratio - 1, abs=1e-5)
    disagree = (base.argmax(-1) != mod.argmax(-1)).double().mean().item()
    assert metrics["top1_disagreement"] == pytest.approx(disagree)
    dp = (p[torch.arange(500), targets] - q[torch.arange(500), targets]).mean().item()
    assert metrics["delta_p_mean"] == pytest.approx(dp, abs=1e-6)
    # paired standard errors: every metric but the maximum has one, positive; 2-D logits make
    # each row its own sampling unit, which gives the textbook SE of independent values,
    # scaled by the calibrated 95% quantile over 1.645
    from pytest_hemorrhage.stats import studentized_quantile

    assert stderr.pop("kl_max") is None
    assert all(se > 0 for se in stderr.values()), stderr
    t95 = studentized_quantile(kl - kl.mean(), 500)
    textbook = kl.std().item() / math.sqrt(500)
    assert stderr["kl_mean"] == pytest.approx(textbook * t95 / 1.6448536269514722, rel=1e-3)


@pytest.mark.parametrize("topk", [50, 8])
def test_kl_of_an_unchanged_distribution_is_never_negative(logits, topk):
    """Logits shifted by a constant leave every softmax as it was; float32 round-off put
    tokens' KL below 0 (down to -7e-7) and, with exact storage, kl_mean at -2.2e-9."""
    base, _, targets = logits
    ref = _reference(base, targets, topk=topk)
    stats = token_stats(base + 10.0, ref)
    metrics, _ = summarize(stats, ref)
    assert stats.kl.min() >= 0
    assert 0 <= metrics["kl_mean"] < 1e-6 and 0 <= metrics["kl_p99"] <= metrics["kl_max"] < 1e-5
    nan_row = base.clone()
    nan_row[3, 0] = math.nan
    assert token_stats(nan_row, ref).kl[3].isnan()  # a non-finite row stays visible


def test_topk_storage_is_exact_without_a_tail_and_a_close_lower_bound_with_one(logits):
    """The tail as one outcome (no tail samples): a lower bound, short by the documented
    amount."""
    base, mod, targets = logits
    exact_ref = _reference(base, targets, topk=50)
    exact = token_stats(mod, exact_ref).kl
    assert torch.allclose(token_stats(mod, _reference(base, targets, topk=49)).kl, exact, atol=1e-2)
    approx = token_stats(mod, _reference(base, targets, topk=8, tail_samples=0)).kl
    assert (approx <= exact + 1e-5).all()  # grouping the tail can only lower KL
    # the documented error: p_tail * KL of the tail-conditional distributions
    p, q = torch.softmax(base.double(), -1), torch.softmax(mod.double(), -1)
    idx = base.topk(8, -1).indices
    tail = torch.ones_like(p, dtype=torch.bool).scatter(-1, idx, False)
    p_t, q_t = p * tail, q * tail
    p_tail, q_tail = p_t.sum(-1), q_t.sum(-1)
    cond = (p_t / p_tail[:, None]) * (
        (p_t / p_tail[:, None]).clamp_min(1e-300).log()
        - (q_t / q_tail[:, None]).clamp_min(1e-300).log()
    )
    missing = p_tail * torch.where(tail, cond, 0).sum(-1)
    # float16 log-probs add a rounding error of ~1e-4 nats per token, which averages out
    assert torch.allclose(exact.double() - approx.double(), missing, atol=1e-3)
    mean_gap = exact.double().mean() - approx.double().mean()
    assert mean_gap.item() == pytest.approx(missing.mean().item(), abs=2e-3 * exact.mean().item())
    # all other metrics are exact in top-K form
    m_exact, _ = summarize(token_stats(mod, exact_ref), exact_ref)
    ref8 = _reference(base, targets, topk=8, tail_samples=0)
    m_topk, _ = summarize(token_stats(mod, ref8), ref8)
    for name in ("ppl_increase", "nll_increase", "top1_disagreement", "delta_p_mean"):
        assert m_topk[name] == pytest.approx(m_exact[name], abs=1e-6)


def test_tail_samples_estimate_what_grouping_the_tail_leaves_out(logits):
    """Top-8 of 50 tokens with 32 draws from the baseline's tail: each token's KL is the
    grouped lower bound plus a non-negative term, 0 bit for bit for an unmodified model, and
    unbiased: over seeds the mean lands on the exact kl_mean, where grouping alone falls short
    by ~10%."""
    base, mod, targets = logits
    exact = token_stats(mod, _reference(base, targets, topk=50)).kl.double().mean().item()
    grouped = token_stats(mod, _reference(base, targets, topk=8, tail_samples=0)).kl
    assert exact - grouped.double().mean().item() > 0.08 * exact
    ref = _reference(base, targets, topk=8)
    assert ref.tail_idx.shape == (500, 32) and ref.tail_logp.dtype == torch.float32
    head = torch.log_softmax(base, -1).topk(8, -1).indices
    assert not (ref.tail_idx[:, :, None] == head[:, None, :]).any()  # drawn outside the top K
    same = token_stats(base, ref).kl
    assert torch.equal(same, token_stats(base, _reference(base, targets, 8, tail_samples=0)).kl)
    sampled = token_stats(mod, ref).kl
    assert (sampled >= grouped).all()
    means = [
        token_stats(mod, _reference(base, targets, 8, seed=seed)).kl.double().mean().item()
        for seed in range(8)
    ]
    assert sum(means) / len(means) == pytest.approx(exact, rel=0.01)
    assert all(m == pytest.approx(exact, rel=0.03) for m in means), (means, exact)


def test_nonfinite_logits_are_counted_not_raised(logits):
    base, mod, targets = logits
    mod = mod.clone()
    mod[3, 7] = float("nan")
    mod[10] = float("inf")
    stats = token_stats(mod, _reference(base, targets, topk=50))
    assert int((~stats.finite).sum()) == 2


def test_token_stats_concatenate_in_order(logits):
    base, mod, targets = logits
    ref = _reference(base, targets, topk=50)
    whole = token_stats(mod, ref)
    parts = TokenStats.cat(
        [token_stats(mod[:200], ref.rows(0, 200)), token_stats(mod[200:], ref.rows(200, 500))]
    )
    assert torch.equal(whole.kl, parts.kl) and torch.equal(whole.nll, parts.nll)


def test_token_stats_number_windows_across_batches(logits):
    """(windows, positions, vocab) logits: the first dimension is the window; concatenated
    batches number their windows on."""
    base, mod, targets = logits
    ref = _reference(base, targets, topk=50)
    first = token_stats(mod[:200].view(4, 50, 50), ref.rows(0, 200))
    rest = token_stats(mod[200:].view(6, 50, 50), ref.rows(200, 500))
    assert torch.equal(TokenStats.cat([first, rest]).window, torch.arange(10).repeat_interleave(50))


@pytest.mark.parametrize("topk", [50, 8])
def test_row_chunks_give_the_same_bits_as_one_pass(logits, monkeypatch, topk):
    import pytest_hemorrhage.metrics as metrics

    base, mod, targets = logits
    mod = mod.clone()
    mod[[5, 300], :10] = float("-inf")  # truncated rows take the skew path inside a chunk
    ref = _reference(base, targets, topk=topk)
    whole = token_stats(mod, ref)
    monkeypatch.setattr(metrics, "_CHUNK", 1)  # 64-row chunks
    chunked = token_stats(mod, ref)
    for field in ("kl", "nll", "disagree", "p_target", "finite"):
        assert torch.equal(getattr(whole, field), getattr(chunked, field)), field
    assert whole.kl[[5, 300]].isfinite().all() and (whole.kl[[5, 300]] > 0).all()


# -- scoring once over many batches -----------------------------------------------------------

FIELDS = ("kl", "nll", "disagree", "p_target", "finite", "window")


@pytest.mark.parametrize(
    ("topk", "tail_samples"), [(None, 0), (50, 0), (50, 8)], ids=["exact", "topk", "topk+tail"]
)
def test_scoring_once_equals_scoring_batch_by_batch(harness, topk, tail_samples):
    base = torch.cat([logits.clone() for logits, *_ in harness.chunks()])
    targets = torch.cat([t for _, t, *_ in harness.chunks()])
    vocab = base.shape[-1]
    logp = torch.log_softmax(base, -1).flatten(0, 1)
    ref = Reference.from_logprobs(logp, targets, topk or vocab, tail_samples=tail_samples)
    with harness.modified([("quant.rtn", {"bits": 3})]):
        modified = torch.cat([logits.clone() for logits, *_ in harness.chunks()])
    # truncated rows (skew-smoothed), a NaN row and a row with no finite logit (non-finite),
    # an unmodified window; scored in batches of 3, 7 and the rest of the windows
    modified[0, 5, : vocab // 2] = float("-inf")
    modified[4, 7, 3] = float("nan")
    modified[5, 9] = float("-inf")
    modified[-1] = base[-1]
    modified = [modified[:3], modified[3:10], modified[10:]]
    parts, reads, row, window = [], [], 0, 0
    for logits in modified:
        rows = ref.rows(row, row + logits.shape[0] * logits.shape[1])
        row += logits.shape[0] * logits.shape[1]
        parts.append(token_stats(logits, rows))
        reads.append(read_logits(logits, rows, window))  # the caller numbers the windows
        window += len(logits)
    by_batch = TokenStats.cat(parts)
    once = score_reads(LogitReads.cat(reads), ref)
    for field in FIELDS:
        a, b = getattr(by_batch, field), getattr(once, field)
        assert a.dtype == b.dtype and torch.equal(a.nan_to_num(), b.nan_to_num()), field
        assert torch.equal(a.isnan(), b.isnan()), field
    # the cases above are there: smoothed rows, non-finite rows, zero KL on the unmodified one
    assert not once.finite[4 * 127 + 7].item() and not once.finite[5 * 127 + 9].item()
    assert once.kl[5].isfinite() and once.kl[5] > 0  # infinite without the smoothing
    assert (once.kl[-127:] == 0).all() if topk is None else (once.kl[-127:].abs() < 1e-5).all()
    assert once.window.unique().tolist() == list(range(len(once.window) // 127))
