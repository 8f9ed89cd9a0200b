"""A decoding robustness suite for the bundled model: copy it and set your own budgets.

Run:  pytest examples/decoding --hemorrhage-model=hemorrhage-tiny

Every measurement compares with the baseline's own decoding: its raw next-token distribution
for kl_mean / top1_disagreement, its greedy continuations for gen_mismatch /
gen_first_divergence (computed here because a budget names them). A temperature, top-k or
top-p stage makes generation sample, with noise seeded by ``--hemorrhage-seed``, so every
figure reproduces. Truncation (top-k, top-p) is charged ln(1e6) = 13.8 nats per unit of
baseline probability it cuts away, so its kl_mean is bounded and comparable across settings.
"""

from __future__ import annotations

import pytest


@pytest.mark.hemorrhage(kl_mean=0.02, top1_disagreement=0.0)
def test_mild_temperature_never_changes_the_top_token(hemorrhage):
    hemorrhage.check(hemorrhage.measure("decode.temperature", value=1.1))


@pytest.mark.hemorrhage(kl_mean=0.6, top1_disagreement=0.0)
def test_top_p_cuts_at_most_five_percent_of_the_distribution(hemorrhage):
    hemorrhage.check(hemorrhage.measure("decode.top_p", p=0.95))


@pytest.mark.hemorrhage(kl_mean=1.2, top1_disagreement=0.15)
def test_4bit_model_decoded_with_top_p(hemorrhage):
    """Weights and decoding compose: a 4-bit model with top-p 0.9 against the full model."""
    result = hemorrhage.measure([("quant.rtn", {"bits": 4}), ("decode.top_p", {"p": 0.9})])
    hemorrhage.check(result)
    four_bit_alone = result.stages[0]
    assert four_bit_alone.metrics["kl_mean"] < result.metrics["kl_mean"]


@pytest.mark.hemorrhage(gen_mismatch=0.1, gen_first_divergence=0.1)
def test_8bit_model_keeps_the_greedy_generations(hemorrhage):
    hemorrhage.check(hemorrhage.measure("quant.rtn", bits=8, group_size=32))


@pytest.mark.hemorrhage(kl_mean=1.75)
def test_decoding_calibration_brings_a_2bit_model_within_budget(hemorrhage):
    """The seed paper's mitigation. The 2-bit model is over-confident relative to the
    baseline (its top token: 0.30 by itself, 0.19 by the baseline), so a temperature above 1,
    fitted on calibration windows disjoint from the evaluation ones, lowers kl_mean from about
    1.78 (over this budget) to about 1.69."""
    calibration = hemorrhage.calibrate_decoding(("quant.rtn", {"bits": 2, "group_size": 32}))
    assert calibration.temperature > 1
    assert calibration.kl_after < calibration.kl_before
    hemorrhage.check(calibration.after)
