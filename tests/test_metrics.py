"""Metrics against their definitions, on synthetic logits."""

from __future__ import annotations

import math

import pytest
import torch

from pytest_hemorrhage.metrics import METRICS, TokenStats, summarize, token_stats
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
    assert set(metrics) == set(METRICS)
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
    from pytest_hemorrhage.metrics import _t95

    assert stderr.pop("kl_max") is None
    assert all(se > 0 for se in stderr.values()), stderr
    t95 = _t95(kl - kl.mean(), 500)
    textbook = kl.std().item() / math.sqrt(500)
    assert stderr["kl_mean"] == pytest.approx(textbook * t95 / 1.6448536269514722, rel=1e-3)


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


def test_standard_errors_count_windows_not_tokens():
    """Windows whose tokens all share one value: the window-level SE is that of 20 draws,
    where the token-level one would claim 20 x 50 independent draws."""
    from pytest_hemorrhage.metrics import _cluster, _t95, mean_se

    g = torch.Generator().manual_seed(2)
    per_window = torch.randn(20, generator=g, dtype=torch.float64)
    x = per_window.repeat_interleave(50)
    window = torch.arange(20).repeat_interleave(50)
    mean, se, t95 = _cluster(x, window)
    assert mean == pytest.approx(per_window.mean().item())
    assert se == pytest.approx(per_window.double().std().item() / math.sqrt(20), rel=1e-9)
    assert t95 == pytest.approx(_t95(50 * (per_window - per_window.mean()), 20))  # totals
    assert mean_se(x, window) == (mean, pytest.approx(se * t95 / 1.6448536269514722))
    assert _cluster(x, None)[1] == pytest.approx(x.double().std().item() / math.sqrt(1000))
    assert mean_se(x, torch.zeros(1000))[1] is None  # one window: no spread to measure


def test_calibrated_quantile_is_students_t_plus_the_second_order_terms():
    """Symmetric two-point totals (kurtosis 1, no skew) give Student's t with G - 1 degrees of
    freedom; heavy tails lower the degrees of freedom and add the plug-in term; skew either way
    adds Hall's term and its second-order companion, all with bias-adjusted moments; any level."""
    from pytest_hemorrhage.metrics import _student95, _t95

    exact = {(3, 0.95): 2.353363, (10, 0.95): 1.812461, (30, 0.95): 1.697261,
             (63, 0.95): 1.669402, (10, 0.99): 2.763769, (7, 0.99833): 4.353637,
             (4, 0.9999): 13.033672, (2.5, 0.95): 2.558219, (1, 0.95): 6.313752}  # fmt: skip
    for (dof, level), value in exact.items():
        assert _student95(dof, level) == pytest.approx(value, rel=3e-4), (dof, level)
    z, g = 1.6448536269514722, 64
    a = (2 * z * z + 1) / 6
    flat = torch.tensor([-1.0, 1.0]).repeat(32).double()
    assert _t95(flat, g) == pytest.approx(_student95(63))
    assert _t95(flat, g, 0.99) == pytest.approx(_student95(63, 0.99))
    heavy = torch.tensor([-3.0] + [0.0] * 30 + [3.0]).repeat(2).double()  # kurtosis 16
    excess = (65 * 13 + 6) * 63 / (62 * 61)  # Joanes & Gill's G2
    plug_in = z * a * excess / g
    assert _t95(heavy, g) == pytest.approx(_student95(2 * g / (excess + 2)) + plug_in)
    right = torch.tensor([-1.0] * 48 + [3.0] * 16).double()  # skewness 1.1547, kurtosis 2.33
    skew = 1.1547005 * math.sqrt(64 * 63) / 62  # G1
    hall = skew * a / 8 + z * 5 / 72 * skew**2 * (4 * z * z - 1) / g
    assert _t95(right, g) == pytest.approx(_student95(63) + hall, rel=1e-6)
    assert _t95(-right, g) == _t95(right, g)  # by magnitude: both one-sided bounds widen


def test_standard_errors_are_calibrated_at_the_level_asked():
    """``value + z * se`` is the one-sided bound at ``level``: the same raw SE times the
    calibrated quantile of that level."""
    from statistics import NormalDist

    from pytest_hemorrhage.metrics import _cluster, mean_se

    g = torch.Generator().manual_seed(4)
    x = torch.rand(30, 20, generator=g, dtype=torch.float64).pow(3).flatten()
    window = torch.arange(30).repeat_interleave(20)
    for level in (0.95, 0.99, 0.9983):
        mean, se, t = _cluster(x, window, level)
        z = NormalDist().inv_cdf(level)
        assert mean_se(x, window, level) == (mean, pytest.approx(se * t / z))
    assert _cluster(x, window, 0.99)[2] > _cluster(x, window)[2]


def test_token_stats_number_windows_across_batches(logits):
    """(windows, positions, vocab) logits: the first dimension is the window; concatenated
    batches number their windows on."""
    base, mod, targets = logits
    ref = _reference(base, targets, topk=50)
    first = token_stats(mod[:200].view(4, 50, 50), ref.rows(0, 200))
    rest = token_stats(mod[200:].view(6, 50, 50), ref.rows(200, 500))
    assert torch.equal(TokenStats.cat([first, rest]).window, torch.arange(10).repeat_interleave(50))


def test_quantile_bound_is_woodruffs_cluster_interval():
    """kl_p99's SE puts value + 1.645 SE at the sample quantile of q + 1.645 s_F, where s_F is
    the window-level SE of the share of values at or below the quantile (calibrated: see
    mean_se)."""
    from pytest_hemorrhage.metrics import mean_se, quantile_se

    g = torch.Generator().manual_seed(3)
    # windows of their own scale: correlated tokens (a scale near 0 would leave the upper
    # bound past the largest value)
    x = torch.rand(40, 100, generator=g) ** 3 * (0.5 + torch.rand(40, 1, generator=g))
    window = torch.arange(40).repeat_interleave(100)
    value, se = quantile_se(x.flatten(), 0.99, window)
    _, s_f = mean_se((x.flatten().double() <= value).double(), window)
    z = 1.6448536269514722
    assert value + z * se == pytest.approx(x.flatten().double().quantile(0.99 + z * s_f).item())
    assert se > quantile_se(x.flatten(), 0.99)[1]  # correlated windows: wider than per token
    few = torch.arange(2).repeat_interleave(10)
    assert quantile_se(x[:2, :10].flatten(), 0.99, few)[1] == math.inf  # bound past the max


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
