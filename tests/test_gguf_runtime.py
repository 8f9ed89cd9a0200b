"""quant.gguf as llama.cpp runs a file (modifications/quant/gguf/runtime.py, export.py): the
activation rounding of ggml's CPU dot products, the head and embeddings quantized by default as
llama-quantize does, and the file quant.gguf simulates written for llama.cpp to run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pytest_hemorrhage.modifications.quant.gguf import Gguf, plan
from pytest_hemorrhage.modifications.quant.gguf.runtime import round_activations


def _activations(width: int, rows: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=g)
    x[:, 3] *= 30  # an outlier channel, as real activations have
    return x


def test_q8_0_activations_are_ggufs_own_q8_0_round_trip():
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    x = _activations(128)
    theirs = dequantize(quantize(x.numpy(), GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0)
    ours = round_activations(x, "Q4_0").numpy()
    assert np.array_equal(ours, theirs)
    assert np.array_equal(round_activations(x, "Q5_1").numpy(), theirs)  # Q8_1: the same values


def test_q8_k_activations_follow_quantize_row_q8_k_ref():
    """Written out from the C reference: per block of 256, iscale = -127 / (the value of largest
    magnitude), codes nearest(iscale * x) capped at 127, d = 1 / iscale in float32."""
    x = _activations(512).double()
    expected = torch.empty_like(x)
    for r in range(len(x)):
        for b in range(0, x.shape[1], 256):
            block = x[r, b : b + 256].float()
            peak = block[block.abs().argmax()]
            iscale = torch.tensor(-127.0) / peak
            codes = torch.round(iscale * block).clamp(max=127)
            expected[r, b : b + 256] = (codes * (1 / iscale)).double()
    ours = round_activations(x.float(), "Q6_K")
    assert torch.equal(ours.double(), expected)
    assert ours.abs().amax() > 0 and not torch.equal(ours, x.float())  # it did round


def test_f16_tensors_read_half_precision_activations():
    x = _activations(64)
    assert torch.equal(round_activations(x, "F16"), x.half().float())


def test_the_head_and_embeddings_are_quantized_by_default_as_llama_quantize_does(tiny):
    names = {p.name: (p.category, p.type) for p in plan(Gguf(type="Q4_0"), tiny.model)}
    assert names["lm_head"] == ("output", "Q8_0")  # a 128-wide head: Q6_K falls back
    assert names["model.embed_tokens"] == ("token_embd", "Q4_0")
    off = {p.name for p in plan(Gguf(type="Q4_0", head=False, embeddings=False), tiny.model)}
    assert "lm_head" not in off and "model.embed_tokens" not in off
    excluded = {p.name for p in plan(Gguf(type="Q4_0", exclude=("lm_head",)), tiny.model)}
    assert "lm_head" not in excluded and "model.embed_tokens" in excluded


def test_activation_rounding_adds_damage_and_is_undone(harness):
    weights = harness.measure([("quant.gguf", {"type": "Q8_0", "activations": False})])
    as_run = harness.measure([("quant.gguf", {"type": "Q8_0"})])
    assert as_run.metrics["kl_mean"] > 1.3 * weights.metrics["kl_mean"]
    assert (
        harness.measure([("quant.rtn", {"bits": 8, "group_size": 32})]).metrics["kl_mean"]
        < (as_run.metrics["kl_mean"])
    )
    # no hook is left behind: the baseline measures exactly 0
    for module in harness.model.modules():
        assert not module._forward_pre_hooks


@pytest.mark.parametrize("flag", ["activations", "head", "embeddings"])
def test_flags_must_be_booleans(flag):
    from pytest_hemorrhage.errors import HemorrhageError

    with pytest.raises(HemorrhageError, match=f"{flag}=1"):
        Gguf(**{flag: 1})
