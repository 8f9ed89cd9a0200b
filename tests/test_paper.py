"""The seed paper's "ordering at 50% compression" row, reproduced on the bundled model.

Ma et al. 2025 (../shared/PAPER.md), LLaMA-2-7B: quantization > unstructured > semi-structured
(4:8 > 2:4) > structured ≈ low-rank, i.e. at half the parameters quantization loses least and
low-rank or structured pruning most. Here every method removes half of the blocks' linear
weights (checked: the nonzero share of the block weights while applied, 0.49-0.51), except
quantization (8 bits: half of a 16-bit deployment's bytes) and low-rank (the rank at which the
factors ``k (out + in)`` hold half the weights' numbers). Judged on kl_mean.

Measured (2048 evaluation tokens, 16 calibration windows of 128 tokens), kl_mean:
  quant.rtn 8 bits 0.0001 | magnitude 0.229, wanda 0.232, sparsegpt 0.204 (50%) | prune.nm
  4:8 0.389, 2:4 0.520; sparsegpt 2:4 0.375 | channels + heads 50% (LLM-Pruner's Taylor
  importance) 1.353, slicegpt 50% 2.200 | lowrank.asvd at 50% of the numbers 1.954.

Where it agrees (asserted): quantization < unstructured < 4:8 < 2:4 < structured, for both the
magnitude-scored and the SparseGPT series; low-rank loses more than every semi-structured
method. Where it does not (stated, printed, not asserted): Wanda does not beat magnitude here
(0.232 vs 0.229: the tiny model has none of the outlier features that make Wanda's activation
term matter; the paper's 6.31 vs 14.90); and SliceGPT loses more than LLM-Pruner-style channel
and head pruning (2.20 vs 1.35), where the paper has SliceGPT far ahead at 50% (19.5 vs 317
ppl): this SliceGPT takes one basis per block from the unsliced model's stream (see
modifications/prune/slicegpt.py), and on a 128-wide residual stream half the principal components
carry more than half the signal. Low-rank ≈ structured: ASVD (1.95) falls between the two
structured methods (1.35, 2.20).
"""

from __future__ import annotations

import pytest
import torch

from pytest_hemorrhage.modifications import make
from pytest_hemorrhage.modifications.lowrank import kept_rank

QUANT = "quant.rtn 8 bits"
UNSTRUCTURED = {
    "magnitude 50%": [("prune.magnitude", {"sparsity": 0.5})],
    "wanda 50%": [("prune.wanda", {"sparsity": 0.5})],
    "sparsegpt 50%": [("prune.sparsegpt", {"sparsity": 0.5})],
}
SEMI = {
    "nm 4:8": [("prune.nm", {"n": 4, "m": 8})],
    "nm 2:4": [("prune.nm", {"n": 2, "m": 4})],
    "sparsegpt 2:4": [("prune.sparsegpt", {"n": 2, "m": 4})],
}
STRUCTURED = {
    "channels+heads taylor 50%": [
        ("prune.channels", {"fraction": 0.5, "importance": "taylor"}),
        ("prune.heads", {"fraction": 0.5, "importance": "taylor"}),
    ],
    "slicegpt 50%": [("prune.slicegpt", {"fraction": 0.5})],
}
LOWRANK = "lowrank.asvd 50%"


def _block_weights(model) -> int:
    """Nonzero numbers in the blocks' linear weights (sliced modules are smaller)."""
    return sum(
        int(torch.count_nonzero(m.weight))
        for m in model.model.layers.modules()
        if isinstance(m, torch.nn.Linear)
    )


def _half_the_numbers(model) -> float:
    """The rank ratio at which the factors ``k (out + in)`` of every target hold half its
    weights' numbers (bisection: ``kept_rank`` rounds per layer)."""
    shapes = [tuple(t.weight.shape) for t in make("lowrank.asvd", {}).targets(model)]
    full = sum(o * i for o, i in shapes)
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        factors = sum(kept_rank(mid, (o, i)) * (o + i) for o, i in shapes)
        lo, hi = (mid, hi) if factors < full / 2 else (lo, mid)
    return lo


@pytest.fixture(scope="module")
def row(harness):
    """{method: (kl_mean, nonzero share of the block weights while applied)}."""
    stages = {
        QUANT: [("quant.rtn", {"bits": 8})],
        **UNSTRUCTURED,
        **SEMI,
        **STRUCTURED,
        LOWRANK: [("lowrank.asvd", {"rank_ratio": _half_the_numbers(harness.model)})],
    }
    base = _block_weights(harness.model)
    out = {}
    for label, stage in stages.items():
        with harness.modified(stage):
            kept = _block_weights(harness.model) / base
        out[label] = (harness.measure(stage).metrics["kl_mean"], kept)
    print("\nordering at 50% compression, kl_mean (nonzero share of the block weights):")
    for label, (kl, kept) in out.items():
        print(f"  {label:28s} {kl:7.4f}  ({kept:.3f})")
    return out


def _kl(row, labels) -> list[float]:
    return [row[label][0] for label in labels]


def test_every_pruning_method_removes_half_the_block_weights(row):
    for label in [*UNSTRUCTURED, *SEMI, *STRUCTURED]:
        assert 0.49 <= row[label][1] <= 0.51, (label, row[label][1])


def test_quantization_loses_least(row):
    others = [label for label in row if label != QUANT]
    assert row[QUANT][0] < min(_kl(row, others)), row


def test_unstructured_beats_semi_structured_and_4_8_beats_2_4(row):
    # magnitude-scored series (the paper's magnitude row: 14.90 < 16.53 < 54.39)
    assert row["magnitude 50%"][0] < row["nm 4:8"][0] < row["nm 2:4"][0], row
    # every unstructured method beats magnitude 4:8
    assert max(_kl(row, UNSTRUCTURED)) < row["nm 4:8"][0], row
    # SparseGPT series (the paper's 6.09 < 8.11)
    assert row["sparsegpt 50%"][0] < row["sparsegpt 2:4"][0], row


def test_semi_structured_beats_structured_and_low_rank(row):
    worst_semi = max(_kl(row, SEMI))
    assert worst_semi < min(_kl(row, STRUCTURED)), row
    assert worst_semi < row[LOWRANK][0], row


def test_where_this_model_departs_from_the_paper_is_stated(row):
    """Not the paper's order, and stated in the module docstring: Wanda does not beat magnitude
    and SliceGPT does not beat channel + head pruning. Asserted as measured, so a change that
    makes either agree with the paper fails here and gets its docstring updated."""
    wanda, magnitude = row["wanda 50%"][0], row["magnitude 50%"][0]
    slicegpt, llm_pruner = row["slicegpt 50%"][0], row["channels+heads taylor 50%"][0]
    print(
        f"\nwanda / magnitude {wanda / magnitude:.3f}; slicegpt / channels+heads "
        f"{slicegpt / llm_pruner:.3f}; low-rank / slicegpt {row[LOWRANK][0] / slicegpt:.3f}"
    )
    assert wanda >= 0.95 * magnitude, (wanda, magnitude)
    assert slicegpt > llm_pruner, (slicegpt, llm_pruner)
