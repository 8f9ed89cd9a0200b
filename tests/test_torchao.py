"""quant.torchao through torchao's own quantize_ and tensor subclasses: the swapped weights are
torchao's, quantize copies (never the baseline's modules), restore exactly, and cost little at
8 bits, on Llama and GPT-2 (Conv1D) layouts; CUDA-only configs and a missing torchao are refused
with one line naming the fix."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from bit_identity import assert_restored, snapshot
from hypothesis import given, settings
from torch import nn

from pytest_hemorrhage.errors import HemorrhageError
from pytest_hemorrhage.modifications import make
from pytest_hemorrhage.strategies import quant_configs

needs_torchao = pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None,
    reason="torchao is not installed (pip install 'pytest-hemorrhage[torchao]')",
)

CPU = {
    "intx_weight_only": {"bits": 4, "group_size": 32},
    "int8_weight_only": {},
    "int8_dynamic_activation_int8_weight": {},
    "float8_weight_only": {},
    "int8_dynamic_activation_intx_weight": {"bits": 4},
}


def _dequantization_error_is_within_half_a_step(weight: torch.Tensor, original: torch.Tensor):
    """torchao's quantized ``weight`` dequantizes to ``original`` within its format's rounding:
    half a quantization step for the integer formats (scale per block of ``block_size``), 2**-4
    relative (3 mantissa bits) or one subnormal step for float8 e4m3."""
    deq = weight.dequantize().float()
    error = (deq - original).abs()
    scale = weight.scale.float()
    if weight.qdata.dtype == torch.float8_e4m3fn:
        bound = original.abs() / 16 + scale.reshape(-1, 1) * 2**-9
    else:
        block = weight.block_size[-1]
        bound = scale.reshape(len(original), -1).repeat_interleave(block, dim=1) / 2
    assert (error <= bound * (1 + 1e-4) + 1e-8).all(), float((error / bound).max())


@needs_torchao
@pytest.mark.parametrize("model", ["harness", "gpt2"])
@pytest.mark.parametrize("config", list(CPU))
def test_torchao_quantizes_copies_with_its_own_subclasses_and_restores(request, model, config):
    from torchao.quantization import quantize_

    from pytest_hemorrhage.modifications.quant.torchao import TorchaoLinear, torchao_config

    h = request.getfixturevalue(model)
    params = {"config": config, **CPU[config]}
    before = snapshot(h.model)
    targets = make("quant.torchao", params).targets(h.model)
    x = torch.randn(2, 5, targets[-1].weight.shape[1], generator=torch.Generator().manual_seed(1))
    with h.modified([("quant.torchao", params)]), torch.inference_mode():
        for target in targets:
            swapped = h.model.get_submodule(target.name)
            assert isinstance(swapped, TorchaoLinear), target.name
            assert type(swapped.weight).__module__.startswith("torchao."), type(swapped.weight)
            # the baseline's own module is untouched: plain float weight, same storage
            assert type(target.module.weight) is nn.Parameter
            _dequantization_error_is_within_half_a_step(swapped.weight, target.weight.float())
        # the swapped layer computes what torchao computes on a Linear holding the same weight
        last = targets[-1]
        bias = last.module.bias
        reference = nn.Linear(*reversed(last.weight.shape), bias=bias is not None).eval()
        reference.weight = nn.Parameter(last.weight.detach().clone(), requires_grad=False)
        if bias is not None:
            reference.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        quantize_(reference, torchao_config(make("quant.torchao", params))[0])
        assert torch.equal(h.model.get_submodule(last.name)(x), reference(x))
    assert_restored(h.model, before)
    result = h.measure([("quant.torchao", params)])
    assert_restored(h.model, before)
    assert result.nonfinite == 0 and result.metrics["kl_mean"] > 0


@needs_torchao
def test_torchao_damage_on_the_bundled_model(harness):
    """Measured kl_mean: int8_weight_only 1.2e-4, int8_dynamic_activation_int8_weight 8.9e-4
    (quant.w8a8 smooth=False, the same scheme computed here: 9.0e-4), float8_weight_only 1.9e-3,
    intx_weight_only 8-bit (per row) 1.2e-4, 4-bit 2.5e-2, 2-bit 0.82 (groups of 32)."""
    kl = {}
    for key, params in [
        ("int8", {"config": "int8_weight_only"}),
        ("int8-dyn", {"config": "int8_dynamic_activation_int8_weight"}),
        ("fp8", {"config": "float8_weight_only"}),
        ("intx8", {"bits": 8}),  # the default config
        ("int4", {"config": "intx_weight_only", "bits": 4, "group_size": 32}),
        ("int2", {"config": "intx_weight_only", "bits": 2, "group_size": 32}),
    ]:
        kl[key] = harness.measure([("quant.torchao", params)]).metrics["kl_mean"]
    assert 0 < kl["int8"] < kl["int8-dyn"] < 0.002, kl
    assert kl["fp8"] < 0.005, kl
    assert kl["intx8"] < 0.002 and kl["int8-dyn"] < kl["int4"] < kl["int2"], kl
    w8a8 = harness.measure([("quant.w8a8", {"smooth": False})]).metrics["kl_mean"]
    assert kl["int8-dyn"] == pytest.approx(w8a8, rel=0.2)  # two implementations, one scheme


@pytest.mark.parametrize("config", ["int4_weight_only", "float8_dynamic_activation_float8_weight"])
def test_cuda_only_configs_are_refused_on_cpu_and_nothing_is_lost(harness, config):
    before = snapshot(harness.model)
    with pytest.raises(
        HemorrhageError,
        match=rf"config='{config}' needs CUDA .* on cpu; on CPU "
        r"use one of intx_weight_only, int8_weight_only, ",
    ):
        harness.measure([("quant.torchao", {"config": config})])
    assert_restored(harness.model, before)
    harness.check_pristine()


def test_missing_torchao_names_the_extra(harness, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "torchao", None)  # import torchao now fails
    monkeypatch.setitem(__import__("sys").modules, "torchao.quantization", None)
    before = snapshot(harness.model)
    with pytest.raises(
        HemorrhageError,
        match=r"torchao is not installed; install the extra: "
        r"pip install 'pytest-hemorrhage\[torchao\]'",
    ):
        harness.measure([("quant.torchao", {})])
    assert_restored(harness.model, before)


@needs_torchao
def test_a_group_size_that_does_not_divide_a_layer_is_refused_before_any_swap(gpt2):
    before = snapshot(gpt2.model)
    with pytest.raises(
        HemorrhageError,
        match=r"h\.0\.attn\.c_attn \(192x64\): group_size=48 "
        r"does not divide its 64 inputs",
    ):
        gpt2.measure([("quant.torchao", {"config": "intx_weight_only", "group_size": 48})])
    assert_restored(gpt2.model, before)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (
            {"config": "int3_magic"},
            r"config='int3_magic' is not valid; choose one of "
            r"'intx_weight_only', 'int8_weight_only'",
        ),
        (
            {"config": "int8_weight_only", "bits": 4},
            r"bits=4 does not fit config='int8_weight_only', which is 8-bit; for other widths "
            r"use config='intx_weight_only'",
        ),
        ({"config": "intx_weight_only", "bits": 9}, r"bits=9 is out of range"),
        (
            {"config": "float8_weight_only", "group_size": 32},
            r"group_size=32 does not apply to "
            r"float8_weight_only",
        ),
        ({"group_size": -1}, r"group_size=-1 is out of range"),
    ],
)
def test_bad_parameters_name_the_value_and_the_fix(params, message):
    with pytest.raises(HemorrhageError, match=message):
        make("quant.torchao", params)


@needs_torchao
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_int4_weight_only_runs_on_cuda(make_harness):
    from pytest_hemorrhage.loading import load_model

    gpu = make_harness(load_model("hemorrhage-tiny", device="cuda"), tokens=2048)
    before = snapshot(gpu.model)
    result = gpu.measure([("quant.torchao", {"config": "int4_weight_only", "group_size": 32})])
    assert_restored(gpu.model, before)
    assert result.nonfinite == 0 and 0 < result.metrics["kl_mean"] < 0.1


@settings(max_examples=15, deadline=None, database=None)
@given(config=quant_configs(names=["quant.torchao"], max_bits=4))
def test_exploration_draws_valid_torchao_configs_over_bits(config):
    """quant_configs() reads every quantizer's ``bits``: the default config takes them all."""
    assert config.name == "quant.torchao" and config.config == "intx_weight_only"
    assert 1 <= config.bits <= 4
    assert make("quant.torchao", config.params()) == config


@needs_torchao
@pytest.mark.parametrize("config", ["int8_dynamic_activation_int8_weight", "int8_weight_only"])
def test_token_chunks_compute_each_token_as_in_one_call(config):
    """Activations are quantized per token, so the chunks that bound memory change no bit of
    the int8 x int8 product; a float GEMM (weight-only) may round differently per batch shape."""
    from pytest_hemorrhage.modifications.quant.torchao import _quantized, torchao_config
    from pytest_hemorrhage.modifications.registry import Target

    g = torch.Generator().manual_seed(4)
    layer = nn.Linear(64, 48)
    x = torch.randn(2, 37, 64, generator=g)
    ao_config, dtype = torchao_config(make("quant.torchao", {"config": config}))
    target = Target("proj", layer, transposed=False)
    whole, chunked = (_quantized(target, ao_config, dtype, rows) for rows in (1 << 20, 8))
    with torch.inference_mode():
        assert chunked(x).shape == (2, 37, 48)
        if config == "int8_weight_only":
            torch.testing.assert_close(chunked(x), whole(x), rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(chunked(x), whole(x))
