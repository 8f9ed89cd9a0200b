"""Generation divergence: the decoding loop, the gen_* metrics, and when they are computed."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import pytest_hemorrhage.modifications.decode  # noqa: F401  # registers decode.*
from pytest_hemorrhage.extras.generation import generate, prompts
from pytest_hemorrhage.modifications.decode import Decoding

GEN = frozenset({"gen_mismatch", "gen_first_divergence"})


class _Logits(nn.Module):
    """The model as a plain module returning logits: generate() recomputes every prefix."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, use_cache=False).logits


@pytest.fixture(scope="module")
def prompt_ids(harness):
    return prompts(harness, 6, 16)


def test_prompts_are_evenly_spaced_slices_of_the_evaluation_text(harness):
    flat = harness.windows.eval.reshape(-1)
    ids = prompts(harness, 4, 32)
    stride = flat.numel() // 4
    assert ids.shape == (4, 32)
    assert all(torch.equal(ids[i], flat[i * stride : i * stride + 32]) for i in range(4))
    assert len(prompts(harness, 10_000, 32)) == flat.numel() // 32


def test_kv_cached_greedy_equals_recomputing_every_prefix(harness, prompt_ids):
    cached = generate(harness.model, prompt_ids, 12)
    recomputed = generate(_Logits(harness.model), prompt_ids, 12)
    assert torch.equal(cached, recomputed)


def test_generation_is_cache_safe_under_expanded_layers(harness, prompt_ids):
    with harness.modified([("expand.layers", {"positions": [1]})]):
        cached = generate(harness.model, prompt_ids, 8)
        recomputed = generate(_Logits(harness.model), prompt_ids, 8)
    assert torch.equal(cached, recomputed)
    assert not torch.equal(cached, generate(harness.model, prompt_ids, 8))


def test_greedy_with_repetition_penalty_equals_transformers_generate(harness, prompt_ids):
    from transformers import GenerationConfig

    with harness.modified([("decode.repetition_penalty", {"value": 1.3})]) as patch:
        ours = generate(harness.model, prompt_ids, 10, patch.logits_processors)
    config = GenerationConfig(
        do_sample=False,
        repetition_penalty=1.3,
        max_new_tokens=10,
        eos_token_id=None,
        pad_token_id=0,
    )
    theirs = harness.model.generate(prompt_ids, generation_config=config)[:, prompt_ids.shape[1] :]
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, generate(harness.model, prompt_ids, 10))


def test_sampling_reproduces_and_does_not_depend_on_batching(harness, prompt_ids):
    seeded = Decoding(sample=True, seed=4)
    one = generate(harness.model, prompt_ids, 10, decoding=seeded, batch_size=6)
    again = generate(harness.model, prompt_ids, 10, decoding=seeded, batch_size=4)
    other = generate(harness.model, prompt_ids, 10, decoding=Decoding(True, 5))
    assert torch.equal(one, again)
    assert not torch.equal(one, other)


def test_identical_decoding_generates_identically(harness):
    for stages in (
        [("decode.sampling", {"mode": "greedy"})],
        [("decode.repetition_penalty", {"value": 1.0})],
    ):
        r = harness.measure(stages, GEN)
        assert r.metrics["gen_mismatch"] == 0 and r.metrics["gen_first_divergence"] == 0
        assert r.stderr["gen_mismatch"] == 0
        assert r.details["generation"]["decoding"] == "greedy"


def test_damage_and_sampling_make_generations_diverge(harness):
    pruned = harness.measure([("prune.magnitude", {"sparsity": 0.6})], GEN)
    sampled = harness.measure([("decode.top_p", {"p": 0.9})], GEN)
    for r in (pruned, sampled):
        assert 0.5 < r.metrics["gen_first_divergence"] <= 1
        assert 0.5 < r.metrics["gen_mismatch"] <= 1
        assert 0 < r.stderr["gen_mismatch"] < 0.1
    assert sampled.details["generation"]["decoding"] == "sample(seed=0)"
    example = pruned.details["generation"]["example"]
    assert example["baseline"] != example["modified"]
    harness.check_pristine()


def test_same_seed_same_metrics_other_seed_other_draws(harness):
    stages = [("quant.rtn", {"bits": 4}), ("decode.sampling", {"seed": 7})]
    a, b = harness.measure(stages, GEN), harness.measure(stages, GEN)
    assert a.metrics == b.metrics
    c = harness.measure([stages[0], ("decode.sampling", {"seed": 8})], GEN)
    assert (
        c.details["generation"]["first_divergence"] != a.details["generation"]["first_divergence"]
    )


def test_gen_metrics_only_when_asked(harness):
    r = harness.measure([("quant.rtn", {"bits": 4})])
    assert "gen_mismatch" not in r.metrics and "generation" not in r.details


PLUGIN_TEST = """
import pytest

@pytest.mark.hemorrhage(gen_mismatch=1.0)
def test_named(hemorrhage):
    r = hemorrhage.measure("quant.rtn", bits=4)
    hemorrhage.check(r)
    assert "gen_first_divergence" in r.metrics

def test_unnamed(hemorrhage):
    r = hemorrhage.measure([("quant.rtn", {"bits": 4}), ("decode.top_p", {"p": 0.9})])
    assert ("gen_mismatch" in r.metrics) == GENERATE

@pytest.mark.hemorrhage(gen_mismatch=0.0)
def test_over_budget(hemorrhage):
    hemorrhage.check(hemorrhage.measure("decode.sampling", seed=1))
"""


@pytest.mark.parametrize("generate_flag", [False, True])
def test_plugin_computes_generation_when_a_budget_names_it_or_the_flag_asks(
    pytester, generate_flag
):
    pytester.makepyfile(PLUGIN_TEST.replace("GENERATE", str(generate_flag)))
    args = [
        "--hemorrhage-model=hemorrhage-tiny",
        "--hemorrhage-tokens=1024",
        "--hemorrhage-report=report.json",
        "-p",
        "no:cacheprovider",
    ]
    result = pytester.runpytest(*args, *(["--hemorrhage-generate"] if generate_flag else []))
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*gen_mismatch: * > 0.0000*"])
    report = json.loads((pytester.path / "report.json").read_text())
    by_test = {r["nodeid"].split("::")[-1]: r for r in report["results"]}
    assert by_test["test_named"]["details"]["generation"]["prompts"] == 16
    assert ("generation" in by_test["test_unnamed"]["details"]) == generate_flag
