"""Per-token measures run once over many batches give every token the bits it gets batch by
batch (metrics.read_logits / score_reads, as measure() uses them)."""

from __future__ import annotations

import pytest
import torch

from pytest_hemorrhage.metrics import (
    LogitReads,
    TokenStats,
    read_logits,
    score_reads,
    token_stats,
)
from pytest_hemorrhage.reference import Reference

FIELDS = ("kl", "nll", "disagree", "p_target", "finite", "window")


@pytest.mark.parametrize(
    ("topk", "tail_samples"), [(None, 0), (50, 0), (50, 8)], ids=["exact", "topk", "topk+tail"]
)
def test_scoring_once_equals_scoring_batch_by_batch(harness, topk, tail_samples):
    base = torch.cat([logits.clone() for logits, _ in harness.batches()])
    targets = torch.cat([t for _, t in harness.batches()])
    vocab = base.shape[-1]
    logp = torch.log_softmax(base, -1).flatten(0, 1)
    ref = Reference.from_logprobs(logp, targets, topk or vocab, tail_samples=tail_samples)
    with harness.modified([("quant.rtn", {"bits": 3})]):
        modified = torch.cat([logits.clone() for logits, _ in harness.batches()])
    # truncated rows (skew-smoothed), a NaN row and a row with no finite logit (non-finite),
    # an unmodified window; scored in batches of 3, 7 and the rest of the windows
    modified[0, 5, : vocab // 2] = float("-inf")
    modified[4, 7, 3] = float("nan")
    modified[5, 9] = float("-inf")
    modified[-1] = base[-1]
    modified = [modified[:3], modified[3:10], modified[10:]]
    parts, reads, row = [], [], 0
    for logits in modified:
        rows = ref.rows(row, row + logits.shape[0] * logits.shape[1])
        row += logits.shape[0] * logits.shape[1]
        parts.append(token_stats(logits, rows))
        reads.append(read_logits(logits, rows))
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
