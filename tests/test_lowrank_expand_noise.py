"""lowrank.svd, expand.layers, noise.gaussian and fault.bitflip: definitions, effects, restore."""

from __future__ import annotations

import pytest
import torch
from bit_identity import assert_restored, snapshot

from pytest_hemorrhage.errors import HemorrhageError
from pytest_hemorrhage.modifications import make
from pytest_hemorrhage.modifications.lowrank import kept_rank, rebuild, truncate

ZERO = {"kl_mean": 0.0, "kl_max": 0.0, "top1_disagreement": 0.0, "ppl_increase": 0.0}


def _kl(harness, name, **params):
    return harness.measure([(name, params)]).metrics["kl_mean"]


def _greedy_without_cache(model, ids, steps):
    for _ in range(steps):
        logits = model(input_ids=ids, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    return ids


# ---------------------------------------------------------------- lowrank.svd


@pytest.mark.parametrize("shape", [(48, 80), (80, 48), (64, 64)])
@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.9])
def test_lowrank_equals_the_truncated_svd_and_stores_at_most_a_quarter(shape, ratio):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(*shape, generator=g) * torch.linspace(0.1, 2, shape[1])
    k = kept_rank(ratio, shape)
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    exact = (u[:, :k] * s[:k]) @ vh[:k]
    space = truncate(w, k)
    got = rebuild(w, space)
    assert (got.double() - exact).norm() / exact.norm() < 1e-5
    assert torch.linalg.matrix_rank(got).item() == k
    p = min(shape)
    assert space.x.numel() <= p * p / 4  # graph coordinates: j * (p - j) numbers
    assert space.nbytes() <= w.numel() * w.element_size() / 4 + 4 * p  # + the row order


def test_lowrank_rank_ratio_one_changes_nothing(harness):
    before = snapshot(harness.model)
    result = harness.measure([("lowrank.svd", {"rank_ratio": 1.0})])
    assert {k: result.metrics[k] for k in ZERO} == ZERO
    assert_restored(harness.model, before)


def test_lowrank_damage_grows_as_the_kept_rank_shrinks(harness):
    kl = [_kl(harness, "lowrank.svd", rank_ratio=r) for r in (0.9, 0.6, 0.3)]
    assert 0 < kl[0] < kl[1] < kl[2]


def test_lowrank_targets_only_the_selected_layers(harness):
    with harness.modified(
        [
            (
                "lowrank.svd",
                {"rank_ratio": 0.25, "include": ("*.mlp.*",), "exclude": ("*.layers.0.*",)},
            )
        ]
    ):
        for name, module in harness.model.named_modules():
            if isinstance(module, torch.nn.Linear):
                chosen = ".mlp." in name and ".layers.0." not in name and "lm_head" not in name
                assert hasattr(module, "parametrizations") == chosen, name
        down = harness.model.model.layers[1].mlp.down_proj.weight
        assert torch.linalg.matrix_rank(down).item() == kept_rank(0.25, down.shape) == 32


# ---------------------------------------------------------------- expand.layers


def test_expand_inserts_copies_after_their_originals_sharing_weights(harness):
    model = harness.model
    layers = model.model.layers
    before = snapshot(model)
    with harness.modified([("expand.layers", {"positions": (1, -1, 1)})]):
        grown = model.model.layers
        assert len(grown) == len(layers) + 3 == model.config.num_hidden_layers
        sources = [0, 1, 1, 1, 2, 3, 3]
        for block, source in zip(grown, sources, strict=True):
            assert block.mlp.down_proj.weight is layers[source].mlp.down_proj.weight
        assert [b.self_attn.layer_idx for b in grown] == list(range(7))
        assert {t.data_ptr() for t in model.state_dict().values()} == {
            ptr for _, ptr in before.values()
        }  # the copies hold no tensor of their own
    assert model.model.layers is layers and model.config.num_hidden_layers == len(layers)
    assert [b.self_attn.layer_idx for b in layers] == list(range(len(layers)))
    assert_restored(model, before)


def test_expand_damages_the_bundled_model(harness):
    assert _kl(harness, "expand.layers", positions=(1,)) > 1e-4


@pytest.mark.parametrize("positions", [(0,), (1, 2, 2)])
def test_expanded_model_generates_with_the_kv_cache_as_without_it(harness, positions):
    ids = harness.windows.eval[:2, :10]
    with harness.modified([("expand.layers", {"positions": positions})]) as _, torch.no_grad():
        model = harness.model
        generated = model.generate(
            ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids)
        )
        assert torch.equal(generated, _greedy_without_cache(model, ids, 6))


def test_expand_filters_positions_with_include_and_exclude(harness):
    with harness.modified([("expand.layers", {"positions": (0, 2), "exclude": ("*.layers.0",)})]):
        assert len(harness.model.model.layers) == 5
    with pytest.raises(HemorrhageError, match=r"leave none of positions=\(0,\)"):
        harness.measure([("expand.layers", {"positions": (0,), "include": ("*.layers.3",)})])


# ---------------------------------------------------------------- noise.gaussian


def test_noise_grows_with_sigma_and_zero_changes_nothing(harness):
    assert {
        k: v
        for k, v in harness.measure([("noise.gaussian", {"sigma": 0.0})]).metrics.items()
        if k in ZERO
    } == ZERO
    kl = [_kl(harness, "noise.gaussian", sigma=s) for s in (0.02, 0.1, 0.5)]
    assert 0 < kl[0] < kl[1] < kl[2]


def test_noise_is_reproducible_per_seed_and_regenerated_identically(harness):
    first = harness.measure([("noise.gaussian", {"sigma": 0.2})]).metrics
    assert harness.measure([("noise.gaussian", {"sigma": 0.2})]).metrics == first
    assert harness.measure([("noise.gaussian", {"sigma": 0.2, "seed": 7})]).metrics != first
    with harness.modified(
        [("noise.gaussian", {"sigma": 0.2, "include": ("*.layers.0.mlp.up_proj",)})]
    ):
        module = harness.model.model.layers[0].mlp.up_proj
        original = module.parametrizations.weight.original
        once, again = module.weight, module.weight
        assert torch.equal(once, again)  # drawn again from the layer's seed on every use
        relative = (once - original).std() / original.std()
        assert 0.15 < relative < 0.25


# ---------------------------------------------------------------- fault.bitflip


def _flipped_bits(harness):
    total = 0
    for module in harness.model.modules():
        if hasattr(module, "parametrizations"):
            original = module.parametrizations.weight.original
            diff = module.weight.view(torch.int32) ^ original.view(torch.int32)
            total += sum(bin(v & 0xFFFFFFFF).count("1") for v in diff[diff != 0].tolist())
    return total


def test_bitflip_flips_exactly_count_bits(harness):
    with harness.modified([("fault.bitflip", {"count": 300})]):
        assert _flipped_bits(harness) == 300


def test_bitflip_zero_is_a_no_op_and_many_flips_damage(harness):
    none = harness.measure([("fault.bitflip", {"count": 0})]).metrics
    assert {k: none[k] for k in ZERO} == ZERO
    many = harness.measure([("fault.bitflip", {"count": 2000})])
    assert many.nonfinite > 0 or many.metrics["kl_mean"] > 0.01


def test_bitflip_is_reproducible_per_seed(harness):
    def flipped(seed):
        with harness.modified([("fault.bitflip", {"count": 50, "seed": seed})]):
            return {
                n: m.weight.clone()
                for n, m in harness.model.named_modules()
                if hasattr(m, "parametrizations")
            }

    a, b, c = flipped(3), flipped(3), flipped(4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a.keys() != c.keys() or any(not torch.equal(a[k], c[k]) for k in a)


# ---------------------------------------------------------------- GPT-2 (Conv1D) and errors


@pytest.mark.parametrize(
    "name, params",
    [
        ("lowrank.svd", {"rank_ratio": 0.5}),
        ("expand.layers", {"positions": (0, 1)}),
        ("noise.gaussian", {"sigma": 0.3}),
        ("fault.bitflip", {"count": 20}),
    ],
)
def test_gpt2_conv1d_layers_are_modified_and_restored(gpt2, name, params):
    before = snapshot(gpt2.model)
    result = gpt2.measure([(name, params)])
    # changed: a flipped exponent bit may even make outputs non-finite
    assert result.metrics["kl_mean"] > 0 or result.nonfinite > 0
    assert_restored(gpt2.model, before)


def test_gpt2_lowrank_truncates_the_out_in_weight_and_expand_generates(gpt2):
    with gpt2.modified([("lowrank.svd", {"rank_ratio": 0.25, "include": ("*.mlp.c_fc",)})]):
        weight = gpt2.model.transformer.h[0].mlp.c_fc.weight  # Conv1D: (in=64, out=256)
        assert torch.linalg.matrix_rank(weight).item() == 16
    ids = gpt2.windows.eval[:1, :8]
    with gpt2.modified([("expand.layers", {"positions": (1,)})]), torch.no_grad():
        model = gpt2.model
        assert model.config.n_layer == 3
        generated = model.generate(
            ids,
            max_new_tokens=5,
            do_sample=False,
            pad_token_id=0,
            attention_mask=torch.ones_like(ids),
        )
        assert torch.equal(generated, _greedy_without_cache(model, ids, 5))
    assert gpt2.model.config.n_layer == 2


@pytest.mark.parametrize(
    "name, params, message",
    [
        (
            "lowrank.svd",
            {"rank_ratio": 0},
            "rank_ratio=0 is out of range; use a number in (0.0, 1.0]",
        ),
        ("lowrank.svd", {"rank_ratio": 1.5}, "rank_ratio=1.5 is out of range"),
        (
            "expand.layers",
            {"positions": ()},
            "positions=() must be block indices, e.g. positions=(2, 3)",
        ),
        ("expand.layers", {"positions": ("2",)}, "positions=('2',) must be block indices"),
        (
            "noise.gaussian",
            {"sigma": -0.1},
            "sigma=-0.1 is out of range; use a number in [0.0, inf)",
        ),
        ("noise.gaussian", {"seed": "x"}, "seed='x' is not valid; use an integer"),
        ("fault.bitflip", {"count": -1}, "count=-1 is out of range; use an integer >= 0"),
        ("fault.bitflip", {"count": 2.5}, "count=2.5 is out of range"),
    ],
)
def test_bad_parameters_name_the_value_and_the_fix(name, params, message):
    with pytest.raises(HemorrhageError) as info:
        make(name, params)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "name, params, message",
    [
        (
            "expand.layers",
            {"positions": (4,)},
            "positions [4] out of range for 4 blocks (model.layers); use indices in [-4, 3]",
        ),
        ("fault.bitflip", {"count": 10**12}, "count=1000000000000 exceeds the"),
        (
            "noise.gaussian",
            {"include": ("nothing*",)},
            "no linear layer matches include=('nothing*',)",
        ),
    ],
)
def test_model_dependent_errors_name_the_limit(harness, name, params, message):
    before = snapshot(harness.model)
    with pytest.raises(HemorrhageError) as info:
        harness.measure([(name, params)])
    assert message in str(info.value)
    assert_restored(harness.model, before)
