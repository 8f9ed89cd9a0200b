"""context.rope_scaling (modifications/context.py): RoPE scaling applied reversibly, measured
inside the original context, against transformers' own scaled rotary embeddings."""

from __future__ import annotations

import pytest
import torch
from bit_identity import assert_restored, snapshot

from pytest_hemorrhage.errors import HemorrhageError
from pytest_hemorrhage.modifications import make


def _kl(harness, **params):
    return harness.measure([("context.rope_scaling", params)]).metrics["kl_mean"]


def test_the_rotary_embedding_is_transformers_own_scaled_one_and_comes_back(harness):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from pytest_hemorrhage.modifications.context import scaled_config

    model = harness.model
    before, original = snapshot(model), model.model.rotary_emb
    config = make("context.rope_scaling", {"type": "yarn", "factor": 4.0})
    with harness.modified([config]):
        swapped = model.model.rotary_emb
        expected, factor = ROPE_INIT_FUNCTIONS["yarn"](scaled_config(config, model.config))
        assert swapped is not original and torch.equal(swapped.inv_freq, expected)
        assert swapped.attention_scaling == factor > 1  # YaRN's attention temperature
    assert model.model.rotary_emb is original
    assert_restored(model, before)
    harness.check_pristine()


def test_linear_interpolation_costs_inside_the_context_and_grows_with_the_factor(harness):
    """Measured on the bundled model's 128-token windows: linear 2x kl_mean 0.70, 4x 1.41;
    YaRN 2x 0.027 (it keeps the high frequencies); factor 1 is the model itself."""
    assert _kl(harness, type="linear", factor=1.0) == 0
    linear2, linear4 = (
        _kl(harness, type="linear", factor=2.0),
        _kl(harness, type="linear", factor=4.0),
    )
    yarn2 = _kl(harness, type="yarn", factor=2.0)
    assert 0 < yarn2 < linear2 / 5 and linear2 < linear4


def test_dynamic_ntk_changes_nothing_until_the_window_passes_the_original_length(harness):
    """Dynamic NTK rescales only past the original context: 512 > the 128-token windows; with
    an original length of 64 the windows pass it and the model changes."""
    assert _kl(harness, type="dynamic", factor=4.0) == 0
    assert _kl(harness, type="dynamic", factor=4.0, original_max_position_embeddings=64) > 1e-3


def test_every_result_says_what_changed(harness):
    touched = harness.measure([("context.rope_scaling", {})]).details["touched"]
    assert touched["changes"] == ["the rotary position embedding"]


def test_a_model_without_rotary_positions_is_refused_in_one_line(gpt2):
    with pytest.raises(
        HemorrhageError, match=r"^context.rope_scaling: GPT2LMHeadModel has no rotary"
    ) as info:
        gpt2.measure([("context.rope_scaling", {})])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"type": "ntk"}, r"type='ntk' is not valid; choose one of 'linear', 'dynamic', 'yarn'"),
        ({"factor": 0.5}, r"factor=0.5"),
        ({"original_max_position_embeddings": 0}, r"original_max_position_embeddings=0"),
    ],
)
def test_bad_parameters_name_the_value(params, message):
    with pytest.raises(HemorrhageError, match=message):
        make("context.rope_scaling", params)
