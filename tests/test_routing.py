"""routing_flip (extras/routing.py): how often a modified mixture-of-experts model routes a token
to another set of experts, on tiny random-init MoE models (tests/architectures.py)."""

from __future__ import annotations

import pytest
import torch
from architectures import build

from pytest_hemorrhage.budget import Budget

WANT = frozenset({"routing_flip"})


@pytest.fixture(scope="module")
def moe(tiny, make_harness):
    built = {}

    def harness(arch):
        if arch not in built:
            torch.manual_seed(0)
            model = build(arch, len(tiny.tokenizer)).eval()
            built[arch] = make_harness(model, tiny.tokenizer, spec=arch, tokens=1024)
        return built[arch]

    return harness


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_routes_stay_for_the_baseline_and_move_with_damage(moe, arch):
    """Measured: 0 unmodified; 8-bit RTN 0.001-0.004; 2-bit RTN 0.18-0.33."""
    h = moe(arch)
    same = h.measure([("noise.gaussian", {"sigma": 0.0})], want=WANT)
    eight = h.measure([("quant.rtn", {"bits": 8})], want=WANT)
    two = h.measure([("quant.rtn", {"bits": 2})], want=WANT)
    assert same.metrics["routing_flip"] == 0
    assert 0 < eight.metrics["routing_flip"] < 0.02
    assert two.metrics["routing_flip"] > 0.1 > eight.metrics["routing_flip"]
    assert two.stderr["routing_flip"] > 0
    routing = two.details["routing"]
    assert set(routing["layers"]) == {
        n for n in routing["layers"] if n.endswith((".gate", ".router"))
    }
    assert routing["drift_begins"] == next(iter(routing["layers"]))


def test_a_dense_model_says_routing_does_not_apply(harness):
    result = harness.measure([("quant.rtn", {"bits": 4})], want=WANT)
    assert "routing_flip" not in result.metrics
    assert "does not apply" in result.details["routing"]


def test_a_router_that_returns_no_indices_is_named_and_the_rest_still_measures(
    moe, make_harness, tiny
):
    torch.manual_seed(0)
    model = build("mixtral", len(tiny.tokenizer)).eval()
    gate = model.model.layers[0].mlp.gate
    real = gate.forward
    gate.forward = lambda x: tuple(t.float() for t in real(x))  # custom code: no index tensor
    h = make_harness(model, tiny.tokenizer, spec="custom-router", tokens=512)
    result = h.measure([("quant.rtn", {"bits": 4})], want=WANT)
    assert "routing_flip" not in result.metrics and result.metrics["kl_mean"] > 0
    assert result.details["routing"].startswith("model.layers.0.mlp.gate returns no expert indices")


def test_the_marker_budgets_it():
    budget = Budget.parse({"routing_flip": 0.05}, where="test")
    assert budget.limits == {"routing_flip": 0.05}


def tiny_mixtral():
    """``--hemorrhage-model=test_routing:tiny_mixtral``: a seeded random-init Mixtral with the
    bundled tokenizer."""
    from pytest_hemorrhage.loading import load_model

    tokenizer = load_model("hemorrhage-tiny", device="cpu").tokenizer
    torch.manual_seed(0)
    return build("mixtral", len(tokenizer)).eval(), tokenizer


def test_every_measure_of_a_moe_model_reports_it_and_the_marker_gates_it(pytester):
    pytester.makepyfile(
        """
        import pytest

        def test_unbudgeted(hemorrhage):
            assert hemorrhage.measure("quant.rtn", bits=8).metrics["routing_flip"] < 0.02

        @pytest.mark.hemorrhage(routing_flip=0.01, kl_mean=10)
        def test_two_bits(hemorrhage):
            hemorrhage.check(hemorrhage.measure("quant.rtn", bits=2))
        """
    )
    result = pytester.runpytest(
        "--hemorrhage-model=test_routing:tiny_mixtral",
        "--hemorrhage-tokens=512",
        "-p",
        "no:randomly",
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*routing_flip: 0.* > 0.0100*"])
