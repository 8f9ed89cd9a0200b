"""The modification registry (modifications/registry.py): make, targeting, restore and the errors
it raises; with quant.rtn and prune.magnitude, the simplest handlers, against their definitions."""

from __future__ import annotations

import pytest
import torch
from bit_identity import assert_restored, snapshot

from pytest_hemorrhage.errors import HemorrhageError
from pytest_hemorrhage.modifications import make, names
from pytest_hemorrhage.modifications.prune.unstructured import global_threshold
from pytest_hemorrhage.modifications.quant.rtn import rtn_quantize


def test_rtn_matches_round_to_nearest_by_hand():
    w = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    q = rtn_quantize(w, bits=4, group_size=8, symmetric=True)
    for row in range(4):
        for g in range(2):
            block = w[row, g * 8 : (g + 1) * 8]
            scale = block.abs().max() / 7
            expected = (block / scale).round().clamp(-8, 7) * scale
            assert torch.allclose(q[row, g * 8 : (g + 1) * 8], expected)
    assert len(q.unique()) <= 4 * 2 * 16  # at most 2^4 levels per group
    asym = rtn_quantize(w, bits=2, group_size=0, symmetric=False)
    assert all(len(r.unique()) <= 4 for r in asym)
    assert torch.equal(
        rtn_quantize(w, 8, 16, True).sign() * (w.abs() > 0.05), w.sign() * (w.abs() > 0.05)
    )


def test_rtn_handles_group_sizes_that_do_not_divide_the_row():
    w = torch.randn(3, 10)
    assert rtn_quantize(w, 4, 4, True).shape == w.shape


def test_magnitude_pruning_masks_exactly_the_smallest(harness):
    with harness.modified([("prune.magnitude", {"sparsity": 0.5})]):
        for name, module in harness.model.named_modules():
            if name.endswith("mlp.down_proj"):
                w = module.weight
                original = module.parametrizations.weight.original
                k = w.numel() // 2
                assert int((w == 0).sum()) == k
                kept = original.abs()[w != 0]
                dropped = original.abs()[w == 0]
                assert kept.min() > dropped.max()


def test_global_threshold_equals_the_kth_magnitude_of_all_weights():
    ws = [torch.randn(30, 40), torch.randn(20, 10) * 3]
    t = global_threshold(ws, 0.3)
    everything = torch.cat([w.abs().flatten() for w in ws])
    assert int((everything <= t).sum()) == round(0.3 * everything.numel())


def test_measure_restores_the_model_bit_for_bit(harness):
    before = snapshot(harness.model)
    harness.measure(
        [("prune.magnitude", {"sparsity": 0.5, "scope": "global"}), ("quant.rtn", {"bits": 3})]
    )
    assert_restored(harness.model, before)


def test_restore_after_a_handler_that_raises_halfway(harness, monkeypatch):
    from pytest_hemorrhage.modifications import register_modification, registry
    from pytest_hemorrhage.modifications.quant.rtn import RTN

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # keep it test-local

    class Broken(RTN):
        pass

    @register_modification("test.broken", Broken)
    def broken(config, model, patch, context):
        targets = config.targets(model)
        patch.parametrize(targets[0], lambda w: w * 0)
        patch.swap_module(targets[1].name, torch.nn.Identity())
        raise RuntimeError("halfway")

    before = snapshot(harness.model)
    with pytest.raises(RuntimeError, match="halfway"):
        harness.measure("test.broken")
    assert_restored(harness.model, before)


def test_default_targets_skip_embeddings_and_head_and_patterns_select(harness):
    targets = make("quant.rtn").targets(harness.model)
    assert targets and all(".layers." in t.name for t in targets)
    mlp = make("quant.rtn", {"include": ("*.mlp.*",), "exclude": ("*.layers.0.*",)})
    chosen = [t.name for t in mlp.targets(harness.model)]
    assert chosen and all(".mlp." in n and ".layers.0." not in n for n in chosen)
    head = make("quant.rtn", {"include": ("lm_head",)}).targets(harness.model)
    assert [t.name for t in head] == ["lm_head"]


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("quant.rtn", {"bits": 9}, "quant.rtn: bits=9 is out of range; use an integer in [1, 8]"),
        ("quant.rtn", {"bitz": 4}, "quant.rtn: unknown parameter(s) bitz; valid: "),
        (
            "prune.magnitude",
            {"sparsity": 1.5},
            "sparsity=1.5 is out of range; use a number in [0.0, 1.0]",
        ),
        (
            "prune.magnitude",
            {"scope": "row"},
            "scope='row' is not valid; choose one of 'layer', 'global'",
        ),
        ("quant.rtn", {"include": ("nothing*",)}, "no linear layer matches include=('nothing*',)"),
    ],
)
def test_bad_parameters_name_the_value_and_the_fix(harness, name, params, message):
    with pytest.raises(HemorrhageError) as info:
        harness.measure([(name, params)])
    assert message in str(info.value)


def test_unknown_modification_lists_the_registered_ones():
    with pytest.raises(
        HemorrhageError, match="unknown modification 'quant.nope'; registered: .*quant.rtn"
    ):
        make("quant.nope")
    assert {"quant.rtn", "prune.magnitude"} <= set(names())


def test_graded_damage_on_the_bundled_model(harness):
    ppl = {
        bits: harness.measure([("quant.rtn", {"bits": bits, "group_size": 64})]).metrics[
            "ppl_increase"
        ]
        for bits in (8, 4, 2)
    }
    assert abs(ppl[8]) < 0.005
    assert ppl[2] > ppl[4] > ppl[8]
    pruned = {
        s: harness.measure([("prune.magnitude", {"sparsity": s})]).metrics["ppl_increase"]
        for s in (0.5, 0.8)
    }
    assert pruned[0.8] > 0.5 > pruned[0.5] > 0


@pytest.mark.parametrize("stage", [("prune.magnitude", 0.5), ("prune.magnitude", 0.5, 1), 3])
def test_a_malformed_stage_names_itself_and_the_expected_form(stage):
    from pytest_hemorrhage.modifications.registry import iter_configs

    with pytest.raises(HemorrhageError, match=r"is not \(name, \{params\}\): write e\.g\. "):
        list(iter_configs([stage]))
