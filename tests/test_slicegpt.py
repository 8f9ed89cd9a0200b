"""prune.slicegpt: the rotation preserves the function (Gemma's ``(1 + w)`` norms and scaled
embeddings included), slicing shrinks every residual-stream shape, restore is exact, LayerNorm
models are refused untouched, and (the seed paper) deleting hidden dimensions hurts more than
unstructured pruning of the same share of the weights.

Measured on the bundled model (2048 evaluation tokens, 16 calibration windows), kl_mean:
fraction 0 -> 0.0000 (rotation only), 0.10 -> 0.134, 0.25 -> 0.509, 0.50 -> 2.20; Wanda at
sparsity 0.10 / 0.25 / 0.50 of the block linears: 0.0018 / 0.024 / 0.232, magnitude 0.0015 /
0.026 / 0.229. SliceGPT's net removal is below its fraction (its shortcut matrices add
kept^2 weights per block), so the comparison favours it, and it still loses by 10-75x.
"""

from __future__ import annotations

import pytest
import torch
from bit_identity import assert_restored, snapshot

from pytest_hemorrhage.errors import HemorrhageError
from pytest_hemorrhage.modifications import make


def _kl(harness, name, **params) -> float:
    return harness.measure([(name, params)]).metrics["kl_mean"]


@pytest.fixture(scope="module")
def gemma(tiny, make_harness):
    """A Harness on a random-init Gemma whose RMSNorms multiply by ``1 + w``, w drawn around
    0.2 (far from what folding ``w`` alone would give), and whose embedding module scales its
    output by sqrt(hidden)."""
    from architectures import build

    model = build("gemma", len(tiny.tokenizer))
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(0)
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.2, 0.3)
    return make_harness(model, tiny.tokenizer, spec="gemma-random", tokens=256)


@pytest.mark.parametrize("model", ["harness", "gemma"])
def test_rotation_alone_preserves_the_function(request, model):
    harness = request.getfixturevalue(model)
    ids = harness.context.calibration_windows(2)
    with torch.no_grad():
        baseline = harness.context.logits(ids).clone()
        with harness.modified([("prune.slicegpt", {"fraction": 0.0})]):
            rotated = harness.context.logits(ids)
    torch.testing.assert_close(rotated, baseline, rtol=0, atol=1e-4)


def test_slicing_shrinks_every_residual_stream_shape_and_restores_exactly(harness):
    before = snapshot(harness.model)
    model = harness.model
    with harness.modified([("prune.slicegpt", {"fraction": 0.25})]):
        assert model.model.embed_tokens.weight.shape == (512, 96)
        assert model.lm_head.weight.shape == (512, 96)
        for layer in model.model.layers:
            for reader in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.mlp.up_proj):
                assert reader.in_features == 96
            assert layer.self_attn.o_proj.out_features == 96
            assert layer.mlp.down_proj.out_features == 96
        with torch.no_grad():
            logits = harness.context.logits(harness.context.calibration_windows(1))
        assert torch.isfinite(logits).all()
    assert_restored(model, before)
    assert model.model.embed_tokens.weight.shape == (512, 128)
    assert len(model.model.layers[1]._forward_pre_hooks) == 0  # the shortcut hook is gone


def test_layernorm_models_are_refused_untouched(gpt2):
    before = snapshot(gpt2.model)
    with pytest.raises(HemorrhageError, match="LayerNorm"):
        gpt2.measure([("prune.slicegpt", {"fraction": 0.25})])
    assert_restored(gpt2.model, before)


@pytest.mark.parametrize(
    "params", [{"fraction": 1.0}, {"fraction": -0.1}, {"include": ("*.mlp.*",)}]
)
def test_bad_parameters_are_refused(params):
    with pytest.raises(HemorrhageError, match="prune.slicegpt"):
        make("prune.slicegpt", params)


def test_damage_grows_with_the_sliced_fraction(harness):
    damage = [_kl(harness, "prune.slicegpt", fraction=f) for f in (0.1, 0.25, 0.5)]
    assert damage == sorted(damage) and damage[0] > 0.01, damage


def test_residual_covariances_are_memoized(harness):
    harness.measure([("prune.slicegpt", {"fraction": 0.1})])
    key = ("prune.slicegpt", ())
    first = harness.memo[key]
    harness.measure([("prune.slicegpt", {"fraction": 0.2})])
    assert harness.memo[key] is first


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_slicing_hurts_more_than_unstructured_pruning_of_the_same_share(harness, fraction):
    sliced = _kl(harness, "prune.slicegpt", fraction=fraction)
    for name in ("prune.wanda", "prune.magnitude"):
        unstructured = _kl(harness, name, sparsity=fraction)
        assert sliced > 3 * unstructured, (name, sliced, unstructured)


@pytest.mark.parametrize(
    "earlier, message",
    [
        (("quant.bnb_int8", {}), "is a ComputeIn .*put prune.slicegpt before quantization"),
        (("quant.w8a8", {}), "is a W8A8Linear .*put prune.slicegpt before quantization"),
        (("prune.slicegpt", {"fraction": 0.1}), "after prune.slicegpt: the rotation"),
        (("expand.layers", {}), "after expand.layers: the rotation"),
    ],
)
def test_after_a_swap_or_a_structural_stage_it_refuses_and_restores(harness, earlier, message):
    before = snapshot(harness.model)
    with pytest.raises(HemorrhageError, match=message):
        harness.measure([earlier, ("prune.slicegpt", {"fraction": 0.25})])
    assert_restored(harness.model, before)
