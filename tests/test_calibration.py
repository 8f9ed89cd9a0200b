"""Calibration statistics for data-aware modifications: a layer they never reach."""

from __future__ import annotations

import copy

import pytest
import torch

from pytest_hemorrhage.errors import HemorrhageError


@pytest.fixture(scope="module")
def idle(tiny, make_harness):
    """A Harness on the bundled model with one linear layer that never runs (an unused
    module in block 0's MLP), so the calibration windows never reach it."""
    model = copy.deepcopy(tiny.model)
    width = model.config.hidden_size
    model.model.layers[0].mlp.idle = torch.nn.Linear(width, width, bias=False)
    return make_harness(model, tiny.tokenizer, spec="tiny+idle", tokens=256, calibration_windows=2)


@pytest.mark.parametrize(
    ("name", "params", "instead"),
    [
        ("prune.wanda", {"sparsity": 0.5}, "use a magnitude score"),
        ("lowrank.asvd", {}, "use lowrank.svd"),
        ("quant.awq", {}, "use quant.rtn"),
        ("quant.w8a8", {}, "use smooth=False"),
    ],
)
def test_every_calibrated_modification_names_the_layer_no_calibration_reached(
    idle, name, params, instead
):
    """One check, one wording, for all of them: the layer, why it matters, both ways out."""
    with pytest.raises(HemorrhageError) as raised:
        idle.measure([(name, params)])
    assert str(raised.value) == (
        f"{name}: layer 'model.layers.0.mlp.idle' saw no calibration input, so it has no "
        f"activation statistics; exclude it with exclude=(...) or {instead}"
    )


def test_excluding_the_layer_no_calibration_reached_is_the_way_out(idle):
    result = idle.measure([("quant.w8a8", {"exclude": ("*.idle",)})])
    assert result.metrics["kl_mean"] > 0
