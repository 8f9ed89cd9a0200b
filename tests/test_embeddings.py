"""Embedding metrics as pure functions of embeddings: 0 for the baseline, growing with damage,
standard errors that follow their sampling units; the text split rule; the kind check."""

from __future__ import annotations

import pytest
import torch

from pytest_hemorrhage.embeddings import (
    EMBEDDING_METRICS,
    RETRIEVAL_K,
    EmbeddingReference,
    check_kind,
    embedding_metrics,
    pool,
    split_texts,
)
from pytest_hemorrhage.errors import HemorrhageError
from pytest_hemorrhage.loading import CAUSAL, ENCODER, Pooling


def _embeddings(n: int = 60, dim: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g)


def _damaged(e: torch.Tensor, scale: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return e + scale * torch.randn(e.shape, generator=g)


def test_every_metric_is_exactly_zero_for_the_baseline_embeddings():
    e = _embeddings()
    metrics, stderr, nonfinite = embedding_metrics(EmbeddingReference.from_embeddings(e), e.clone())
    assert set(metrics) == set(EMBEDDING_METRICS)
    assert all(v == 0.0 for v in metrics.values()), metrics
    assert all(se == 0.0 for se in stderr.values()), stderr
    assert nonfinite == 0


def test_every_metric_grows_with_damage():
    e = _embeddings()
    ref = EmbeddingReference.from_embeddings(e)
    runs = [embedding_metrics(ref, _damaged(e, s))[0] for s in (0.05, 0.3, 1.5)]
    for metric in EMBEDDING_METRICS:
        values = [r[metric] for r in runs]
        assert 0 < values[0] < values[1] < values[2], (metric, values)


def test_drift_is_one_minus_cosine_and_its_se_is_by_text():
    e = _embeddings()
    m = _damaged(e, 0.5)
    metrics, stderr, _ = embedding_metrics(EmbeddingReference.from_embeddings(e), m)
    per_text = 1 - torch.nn.functional.cosine_similarity(e.double(), m.double())
    assert metrics["emb_cos_drift"] == pytest.approx(per_text.mean().item(), rel=1e-9)
    # by text: the same calibrated standard error as metrics.mean_se gives over the texts
    # (the plain one, std/sqrt(n), widened for the one-sided bound's level; see mean_se)
    from pytest_hemorrhage.metrics import mean_se

    assert stderr["emb_cos_drift"] == pytest.approx(mean_se(per_text)[1], rel=1e-6)
    plain = per_text.std().item() / len(e) ** 0.5
    assert 1.0 <= stderr["emb_cos_drift"] / plain < 1.5
    assert metrics["emb_cos_p99"] == pytest.approx(per_text.quantile(0.99).item(), rel=1e-9)


def test_retrieval_drop_counts_lost_neighbours():
    """Swapping two texts' modified embeddings moves only the neighbour lists that contain
    them: the drop is the share of (query, neighbour) slots lost, checked by brute force."""
    e = _embeddings()
    m = e.clone()
    m[[0, 1]] = m[[1, 0]]
    metrics, stderr, _ = embedding_metrics(EmbeddingReference.from_embeddings(e), m)

    def top(x: torch.Tensor) -> list[set[int]]:
        x = torch.nn.functional.normalize(x.double(), dim=1)
        s = x @ x.T
        s.fill_diagonal_(-2)
        return [set(row.tolist()) for row in s.topk(RETRIEVAL_K, dim=1).indices]

    kept = [len(a & b) / RETRIEVAL_K for a, b in zip(top(e), top(m), strict=True)]
    assert metrics["retrieval_drop"] == pytest.approx(1 - sum(kept) / len(kept))
    assert metrics["retrieval_drop"] > 0 and stderr["retrieval_drop"] > 0


def test_sim_rank_drop_is_one_minus_spearman_with_a_jackknife_se():
    from scipy.stats import spearmanr

    e = _embeddings(40)
    m = _damaged(e, 0.4)
    metrics, stderr, _ = embedding_metrics(EmbeddingReference.from_embeddings(e), m)

    def pairs(x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.normalize(x.double(), dim=1)
        i, j = torch.triu_indices(len(x), len(x), 1)
        return (x @ x.T)[i, j]

    rho = spearmanr(pairs(e).numpy(), pairs(m).numpy()).statistic
    assert metrics["sim_rank_drop"] == pytest.approx(1 - rho, abs=1e-6)
    # a jackknife over texts: more texts, smaller SE (same damage)
    big = _embeddings(160, seed=3)
    _, big_se, _ = embedding_metrics(EmbeddingReference.from_embeddings(big), _damaged(big, 0.4))
    assert 0 < big_se["sim_rank_drop"] < stderr["sim_rank_drop"]


def test_nonfinite_embeddings_are_counted():
    e = _embeddings()
    m = e.clone()
    m[3, 0] = float("nan")
    _, _, nonfinite = embedding_metrics(EmbeddingReference.from_embeddings(e), m)
    assert nonfinite == 1


def test_split_texts_lines_then_sentences_short_pieces_and_repeats_dropped():
    text = (
        "First sentence here. Second one follows!\nok\n\nA third line stays\nFirst sentence here."
    )
    assert split_texts(text) == [
        "First sentence here.",
        "Second one follows!",
        "A third line stays",
    ]


def test_mean_pooling_ignores_padding_and_normalizes():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert pool(hidden, mask, Pooling()).tolist() == [[2.0, 0.0]]
    assert pool(hidden, mask, Pooling(normalize=True)).tolist() == [[1.0, 0.0]]
    assert pool(hidden, mask, Pooling(mode="cls")).tolist() == [[1.0, 0.0]]
    assert pool(hidden, mask, Pooling(mode="max")).tolist() == [[3.0, 0.0]]


@pytest.mark.parametrize(
    ("kind", "metric", "named"),
    [(ENCODER, "kl_mean", "emb_cos_drift"), (CAUSAL, "retrieval_drop", "kl_mean")],
)
def test_a_metric_of_the_other_kind_is_refused_naming_those_that_apply(kind, metric, named):
    with pytest.raises(HemorrhageError, match=rf"{metric}.*is an? {kind}; .*{named}"):
        check_kind({metric: 0.1}, kind, "test_x")
    check_kind({named: 0.1}, kind, "test_x")  # the kind's own metrics pass
