"""quant.w8a8 on torch's int8 GEMM: the int32 accumulator is the exact integer dot product at
real layer widths (4096, 11008), where the float32 emulation it replaced rounds, and the output
is the float64 reference to float32 round-off; on Llama and GPT-2 (Conv1D) layouts."""

from __future__ import annotations

from importlib.util import find_spec

import pytest
import torch
from bit_identity import assert_restored, snapshot
from torch import nn

from pytest_hemorrhage.modifications import make
from pytest_hemorrhage.modifications.quant.w8a8 import W8A8Linear, int8_matmul, int8_per_row

EPS = torch.finfo(torch.float32).eps


def _same_sign(k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weight (64, k), bias, input (3, 11, k), all of one sign where it matters: the integer
    dot products reach 2.5e7 (k=4096) and 6.8e7 (k=11008), past float32's 2**24 (1.7e7)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.rand(64, k, generator=g) * 0.5 + 0.5
    bias = torch.randn(64, generator=g)
    x = torch.rand(3, 11, k, generator=g)
    return weight, bias, x


@pytest.mark.parametrize("k", [4096, 11008])
def test_int32_accumulator_is_the_exact_integer_dot_product(k):
    weight, _, x = _same_sign(k, seed=k)
    q, _ = int8_per_row(x.reshape(-1, k))
    qweight, _ = int8_per_row(weight)
    a, b = q.to(torch.int8), qweight.to(torch.int8)
    exact = a.long() @ b.long().t()
    assert exact.abs().max() > 2**24  # the width where float32 sums stop being exact
    acc = int8_matmul(a, b)
    assert acc.dtype == torch.int32
    assert torch.equal(acc.long(), exact)
    # the float32 emulation it replaced is not exact here: the test data reach that regime
    emulated = nn.functional.linear(q, qweight)
    assert not torch.equal(emulated.double(), exact.double())


@pytest.mark.parametrize(("k", "smooth"), [(4096, False), (11008, False), (4096, True)])
def test_w8a8_linear_is_the_float64_reference_to_float32_round_off(k, smooth):
    weight, bias, x = _same_sign(k, seed=k + 1)
    s = torch.rand(k, generator=torch.Generator().manual_seed(7)) + 0.5 if smooth else None
    layer = W8A8Linear(weight, bias, s, rows=16)  # 33 tokens: three chunks
    out = layer(x).reshape(-1, 64).double()
    h = x.reshape(-1, k) if s is None else x.reshape(-1, k) / s
    q, x_scale = int8_per_row(h)
    w_q, w_scale = int8_per_row(weight if s is None else weight * s)
    assert torch.equal(layer.qweight, w_q.to(torch.int8))
    scaled = (q.double() @ w_q.double().t()) * x_scale.double() * w_scale.double().t()
    reference = scaled + bias.double()
    # four float32 roundings (int32 -> float, two scales, the bias), each at most eps/2
    bound = 2 * EPS * (scaled.abs() + bias.double().abs())
    assert ((out - reference).abs() <= bound).all(), float(((out - reference).abs() / bound).max())


def test_small_layers_of_any_shape_are_exact():
    """Odd widths and a single token (generation): the int8 GEMM takes them as they are."""
    g = torch.Generator().manual_seed(3)
    for m, k, n in [(1, 13, 5), (17, 128, 384), (5, 384, 128)]:
        a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
        b = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        assert torch.equal(int8_matmul(a, b).long(), a.long() @ b.long().t())


@pytest.mark.parametrize("model", ["harness", "gpt2"])
@pytest.mark.parametrize("smooth", [False, True])
def test_w8a8_on_the_int8_gemm_restores_exactly_and_costs_little(request, model, smooth):
    """Llama (bundled) and GPT-2 (Conv1D, (in, out) weights): every target swapped for an int8
    layer whose int8 weight is the per-row quantized (out, in) weight; restored bit for bit.
    Measured kl_mean on the bundled model: 9.0e-4 (smooth=False), 8.4e-4 (smooth=True), the
    same as the float emulation gave (its widths, 128 and 384, are exact in float32)."""
    h = request.getfixturevalue(model)
    before = snapshot(h.model)
    targets = make("quant.w8a8", {"smooth": smooth}).targets(h.model)
    with h.modified([("quant.w8a8", {"smooth": smooth})]):
        for target in targets:
            swapped = h.model.get_submodule(target.name)
            assert isinstance(swapped, W8A8Linear), target.name
            weight = target.weight.detach().float()  # (out, in) for Conv1D too
            if smooth:
                weight = weight * swapped.smooth
            assert torch.equal(swapped.qweight, int8_per_row(weight)[0].to(torch.int8))
    assert_restored(h.model, before)
    result = h.measure([("quant.w8a8", {"smooth": smooth})])
    assert_restored(h.model, before)
    assert result.nonfinite == 0
    kl = result.metrics["kl_mean"]
    if model == "harness":
        assert 1e-5 < kl < 0.002, kl
    else:
        assert 0 < kl < 0.05, kl


def test_the_layer_is_its_integer_products_rescaled_bit_for_bit():
    """A small smoothed layer with a bias, computed by hand: the quantization written out
    (scale ``max|row| / 127``, round half to even, clamp to [-127, 127]), the products summed in
    int64, then float32 times the token's scale, times the row's scale, plus the bias: the
    layer's output equals it bit for bit (so its int32 products are these integers)."""
    g = torch.Generator().manual_seed(11)
    weight, bias = torch.randn(24, 40, generator=g), torch.randn(24, generator=g)
    x, s = torch.randn(5, 40, generator=g) * 3, torch.rand(40, generator=g) + 0.5

    def by_hand(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = rows.abs().amax(-1, keepdim=True) / 127
        return torch.round(rows / scale).clamp(-127, 127).long(), scale

    q, x_scale = by_hand(x / s)
    w_q, w_scale = by_hand(weight * s)
    products = q @ w_q.t()
    expected = products.float() * x_scale * w_scale.t() + bias
    layer = W8A8Linear(weight, bias, s)
    assert torch.equal(layer.qweight.long(), w_q)
    assert torch.equal(layer(x), expected)


@pytest.mark.skipif(find_spec("torchao") is None, reason="torchao is not installed")
def test_kl_mean_agrees_with_torchaos_int8_kernel_within_five_percent(harness):
    """torchao's Int8DynamicActivationInt8Weight (quant.torchao's
    ``int8_dynamic_activation_int8_weight``) is the same scheme computed by torch's int8 path
    with other roundings (scale ``max / 127.5``, weights reaching -128): its kl_mean is within
    5% of quant.w8a8's, the bar quant.gguf meets against llama.cpp. Measured by
    ``benchmarks.bench_w8a8_kernel``, where smoothing goes through torchao's kernel too."""
    ours = harness.measure([("quant.w8a8", {"smooth": False})]).metrics["kl_mean"]
    config = {"config": "int8_dynamic_activation_int8_weight"}
    theirs = harness.measure([("quant.torchao", config)]).metrics["kl_mean"]
    assert ours == pytest.approx(theirs, rel=0.05), (ours, theirs)
