"""Damage along the context: a quantized KV cache and context extension hurt late positions
first, and a gate can budget them there.

Run: pytest examples/long_context --hemorrhage-model=hemorrhage-tiny
(with your model, raise --hemorrhage-seq-len to the window your users run, e.g. 16384, and move
the ranges with it: positions={"8192:": {...}}).
"""

import pytest


@pytest.mark.hemorrhage(kl_mean=0.002, positions={"64:": {"kl_mean": 0.002}})
def test_a_4bit_kv_cache_holds_at_late_positions(hemorrhage):
    hemorrhage.check(hemorrhage.measure("quant.kv_cache", bits=4))


@pytest.mark.xfail(strict=True, reason="a 2-bit cache holds on average, not where it is read")
@pytest.mark.hemorrhage(kl_mean=0.02, positions={"64:": {"kl_mean": 0.02}})
def test_a_2bit_kv_cache_fails_at_late_positions_only(hemorrhage):
    result = hemorrhage.measure("quant.kv_cache", bits=2)
    assert result.metrics["kl_mean"] <= 0.02  # the whole window is within its budget
    hemorrhage.check(result)  # kl_mean[64:] is not


@pytest.mark.hemorrhage(kl_mean=1e-6)
def test_dynamic_ntk_changes_nothing_inside_the_original_context(hemorrhage):
    hemorrhage.check(hemorrhage.measure("context.rope_scaling", type="dynamic", factor=2.0))


@pytest.mark.hemorrhage(kl_mean=0.05, positions={":16": {"kl_mean": 0.03}})
def test_yarn_costs_little_inside_the_original_context(hemorrhage):
    result = hemorrhage.measure("context.rope_scaling", type="yarn", factor=2.0)
    hemorrhage.check(result)
    early, *_, late = result.positions  # the damage grows along the window
    assert late["metrics"]["kl_mean"] > early["metrics"]["kl_mean"]
