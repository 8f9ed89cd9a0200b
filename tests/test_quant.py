"""Quantization modifications: against their definitions on small layers, by effect on the bundled
model, the SmoothQuant mitigation on a copy given outlier channels, and exact restoration."""

from __future__ import annotations

import math

import pytest
import torch
from bit_identity import snapshot
from torch import nn

from pytest_hemorrhage.errors import HemorrhageError
from pytest_hemorrhage.modifications import Patch, apply, make
from pytest_hemorrhage.modifications.quant.rtn import fp8_quantize, rtn_quantize
from pytest_hemorrhage.modifications.quant.w8a8 import W8A8Linear, int8_per_row, smooth_scales

# One setting per name: the figures of test (b), and every modification's restore check.
SETTINGS = {
    "rtn2": ("quant.rtn", {"bits": 2}),
    "rtn3": ("quant.rtn", {"bits": 3}),
    "rtn4": ("quant.rtn", {"bits": 4}),
    "rtn8": ("quant.rtn", {"bits": 8}),
    "hqq2": ("quant.hqq", {"bits": 2}),
    "hqq3": ("quant.hqq", {"bits": 3}),
    "hqq4": ("quant.hqq", {"bits": 4}),
    "hqq8": ("quant.hqq", {"bits": 8}),
    "int8": ("quant.bnb_int8", {}),
    "nf4": ("quant.bnb_4bit", {"quant_type": "nf4"}),
    "fp4-dq": ("quant.bnb_4bit", {"quant_type": "fp4", "double_quant": True}),
    "fp8-e4m3": ("quant.fp8", {"format": "e4m3"}),
    "fp8-e5m2": ("quant.fp8", {"format": "e5m2"}),
    "float16": ("quant.dtype", {"dtype": "float16"}),
    "bfloat16": ("quant.dtype", {"dtype": "bfloat16"}),
    "w8a8": ("quant.w8a8", {"smooth": False}),
    "w8a8-smooth": ("quant.w8a8", {"smooth": True, "alpha": 0.5}),
}


# --- helpers and fixtures ---------------------------------------------------------------------


def _differences(model, before) -> list[str]:
    after = model.state_dict()
    return [
        k
        for k, (t, ptr) in before.items()
        if k not in after or after[k].data_ptr() != ptr or not torch.equal(after[k], t)
    ]


class Toy(nn.Module):
    """One 'transformer block' holding one layer: the smallest model targets resolve in."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleDict({"proj": layer})])


def _layer(kind: str, in_features: int = 128, out_features: int = 96) -> nn.Module:
    """A float32 linear layer with a bias; ``conv1d`` is GPT-2's (in, out) Conv1D."""
    from transformers.pytorch_utils import Conv1D

    g = torch.Generator().manual_seed(1)
    layer = (
        nn.Linear(in_features, out_features)
        if kind == "linear"
        else Conv1D(out_features, in_features)
    )
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.05)
        layer.bias.copy_(torch.randn(out_features, generator=g) * 0.1)
    return layer.eval()


def _weight(layer: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a Linear or Conv1D (parametrized or not)."""
    from transformers.pytorch_utils import Conv1D

    return layer.weight.detach().t() if isinstance(layer, Conv1D) else layer.weight.detach()


def _swapped(name: str, params: dict, layer: nn.Module) -> tuple[nn.Module, nn.Module, Patch]:
    """Apply ``name`` to a Toy around ``layer``: (the layer now in place, the toy, its patch)."""
    toy = Toy(layer)
    patch = Patch(toy)
    apply(make(name, params), toy, patch, None)
    return toy.layers[0]["proj"], toy, patch


def _x(in_features: int = 128, seed: int = 2) -> torch.Tensor:
    return torch.randn(3, 7, in_features, generator=torch.Generator().manual_seed(seed))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def measured(harness):
    """Every setting measured once on the bundled model, with whether it restored exactly."""
    out = {}
    for key, (name, params) in SETTINGS.items():
        before = snapshot(harness.model)
        result = harness.measure([(name, params)])
        out[key] = (result, _differences(harness.model, before))
    return out


# --- (a) against the definitions --------------------------------------------------------------


def test_rtn_zero_point_and_binary_match_by_hand():
    w = torch.randn(3, 12, generator=torch.Generator().manual_seed(0))
    q = rtn_quantize(w, bits=2, group_size=6, symmetric=False)
    for row in range(3):
        for start in (0, 6):
            g = w[row, start : start + 6]
            scale = (g.max() - g.min()) / 3
            zero = (-g.min() / scale).round()
            expected = [(min(max(round(float(v / scale)) + zero, 0), 3) - zero) * scale for v in g]
            assert torch.allclose(q[row, start : start + 6], torch.stack(expected), atol=1e-6)
    binary = rtn_quantize(w, bits=1, group_size=0, symmetric=True)
    assert torch.allclose(binary, w.sign() * w.abs().mean(1, keepdim=True))


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_is_the_torch_round_trip_with_a_scale_per_output_row(kind, fmt):
    layer = _layer(kind)
    w = _weight(layer).clone()
    fp8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[fmt]
    scale = w.abs().amax(1, keepdim=True) / torch.finfo(fp8).max
    expected = (w / scale).to(fp8).float() * scale
    modified, _, patch = _swapped("quant.fp8", {"format": fmt}, layer)
    assert torch.equal(_weight(modified), expected)
    assert torch.equal(fp8_quantize(w, fmt), expected)
    assert _weight(modified).abs().amax(1).sub(w.abs().amax(1)).abs().max() < 1e-6  # row max kept
    patch.undo()
    assert torch.equal(_weight(layer), w)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dtype_is_the_torch_round_trip(dtype):
    layer = _layer("conv1d")
    w = _weight(layer).clone()
    modified, _, patch = _swapped("quant.dtype", {"dtype": dtype}, layer)
    expected = w.to(getattr(torch, dtype)).float()
    assert torch.equal(_weight(modified), expected) and not torch.equal(expected, w)
    patch.undo()


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_bnb_int8_is_llm_int8_computed_by_hand(kind):
    layer = _layer(kind)
    w, b, x = _weight(layer), layer.bias.detach(), _x()
    modified, _, patch = _swapped("quant.bnb_int8", {"threshold": 0.0}, layer)
    import bitsandbytes as bnb  # after the swap, which imports it quietly

    int8 = modified.layer
    assert isinstance(int8, bnb.nn.Linear8bitLt)
    cb, scb, _ = bnb.functional.int8_vectorwise_quant(w.half().contiguous())
    assert torch.equal(int8.weight.data, cb) and torch.equal(int8.weight.SCB, scb)
    with torch.inference_mode():
        y = modified(x)
    # vector-wise int8: rows of x and rows of W each scaled to [-127, 127], int32 products
    xh = x.half().float().reshape(-1, x.shape[-1])
    x_max = xh.abs().amax(1, keepdim=True)
    ca = (xh * 127 / x_max).round()
    ints = (ca.double() @ cb.double().t()).float()
    expected = (ints * (x_max * scb / 127**2) + b.half().float()).half().float()
    torch.testing.assert_close(y.reshape(-1, y.shape[-1]), expected, rtol=2e-3, atol=2e-3)
    assert _rel(y, layer(x)) < 0.02  # right orientation: close to the float layer
    patch.undo()


def test_bnb_int8_threshold_keeps_outlier_columns_in_float16():
    layer = _layer("linear")
    x = _x()
    x[..., 7] *= 200  # one input channel far above the 6.0 threshold
    float_y = layer(x)
    errors = {}
    for threshold in (0.0, 6.0):
        modified, _, patch = _swapped("quant.bnb_int8", {"threshold": threshold}, layer)
        with torch.inference_mode():
            errors[threshold] = _rel(modified(x), float_y)
        patch.undo()
    assert errors[6.0] < errors[0.0] / 3


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize(("quant_type", "double_quant"), [("nf4", False), ("fp4", True)])
def test_bnb_4bit_runs_on_the_library_dequantized_weight(kind, quant_type, double_quant):
    layer = _layer(kind)
    w, b, x = _weight(layer), layer.bias.detach(), _x()
    params = {"quant_type": quant_type, "double_quant": double_quant, "blocksize": 32}
    modified, _, patch = _swapped("quant.bnb_4bit", params, layer)
    import bitsandbytes as bnb

    assert isinstance(modified, bnb.nn.Linear4bit)
    deq = bnb.functional.dequantize_4bit(modified.weight.data, modified.weight.quant_state)
    packed, state = bnb.functional.quantize_4bit(
        w.contiguous(), blocksize=32, compress_statistics=double_quant, quant_type=quant_type
    )
    assert torch.equal(deq, bnb.functional.dequantize_4bit(packed, state))  # (out, in) of W
    with torch.inference_mode():
        y = modified(x)
    torch.testing.assert_close(y, nn.functional.linear(x, deq, b))
    assert 0.02 < _rel(deq, w) < 0.15
    patch.undo()


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize(("bits", "axis"), [(2, 1), (3, 0), (4, 1), (8, 0)])
def test_hqq_runs_on_the_library_dequantized_weight(kind, bits, axis):
    layer = _layer(kind)
    w, b, x = _weight(layer).clone(), layer.bias.detach(), _x()
    modified, _, patch = _swapped(
        "quant.hqq", {"bits": bits, "group_size": 32, "axis": axis}, layer
    )
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear  # imported quietly by the swap

    assert isinstance(modified, HQQLinear)
    own = HQQLinear.from_weights(
        w.clone(),
        None,
        BaseQuantizeConfig(bits, 32, axis=axis),
        compute_dtype=torch.float32,
        device="cpu",
    )
    with torch.inference_mode():
        deq = modified.dequantize()
        y = modified(x)
        assert torch.equal(deq, own.dequantize())
    torch.testing.assert_close(y, nn.functional.linear(x, deq, b))
    assert _rel(deq, w) < {2: 0.45, 3: 0.25, 4: 0.12, 8: 0.01}[bits]
    patch.undo()


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_w8a8_is_int8_times_int8_computed_by_hand(kind):
    layer = _layer(kind)
    w, b, x = _weight(layer), layer.bias.detach(), _x()
    modified, _, patch = _swapped("quant.w8a8", {"smooth": False}, layer)
    assert isinstance(modified, W8A8Linear)
    ws = w.abs().amax(1) / 127
    wq = (w / ws[:, None]).round().long()
    xs = x.abs().amax(-1, keepdim=True) / 127
    xq = (x / xs).round().long()
    expected = (xq @ wq.t()).double() * xs.double() * ws.double() + b.double()
    with torch.inference_mode():
        y = modified(x)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(modified.qweight.long(), wq)
    assert _rel(y, layer(x)) < 0.02
    patch.undo()


def test_w8a8_smoothing_moves_range_from_inputs_to_weights():
    w = torch.randn(16, 8, generator=torch.Generator().manual_seed(3))
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(4)) * torch.arange(1.0, 9.0)
    s = smooth_scales(x.abs().amax(0), w, alpha=0.5)
    by_hand = torch.tensor(
        [math.sqrt(float(x[:, j].abs().max()) / float(w[:, j].abs().max())) for j in range(8)]
    )
    torch.testing.assert_close(s, by_hand)
    smoothed = W8A8Linear(w, None, s)
    xq, xs = int8_per_row(x / s)
    wq, ws = int8_per_row(w * s)
    expected = (xq.double() @ wq.double().t()) * xs.double() * ws.double().t()
    torch.testing.assert_close(smoothed(x).double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(smooth_scales(x.abs().amax(0), w, 0.0), 1 / w.abs().amax(0))


def test_int8_kernels_in_token_chunks_compute_each_token_as_in_one_call():
    """Chunking bounds the kernels' temporaries; per-token quantization makes it invisible."""
    g = torch.Generator().manual_seed(5)
    layer = nn.Linear(24, 40)
    x = torch.randn(2, 37, 24, generator=g)
    whole, chunked = (
        W8A8Linear(layer.weight, layer.bias),
        W8A8Linear(layer.weight, layer.bias, rows=8),
    )
    assert torch.equal(chunked(x), whole(x)) and chunked(x).shape == (2, 37, 40)
    int8 = make("quant.bnb_int8", {"threshold": 0.0, "include": ("0",)})  # per token only
    model = nn.Sequential(nn.Linear(24, 40))
    outputs = []
    for rows in (1 << 20, 8):
        patch = Patch(model)
        apply(int8, model, patch, None)
        model[0].rows = rows
        outputs.append(model(x))
        patch.undo()
    assert torch.equal(outputs[0], outputs[1])


def _input_abs_max(harness, name: str) -> torch.Tensor:
    """max |x_j| per input channel of layer ``name`` over the calibration windows."""
    module = harness.model.get_submodule(name)
    seen = []
    handle = module.register_forward_pre_hook(
        lambda _, args: seen.append(args[0].detach().abs().reshape(-1, args[0].shape[-1]))
    )
    try:
        with torch.inference_mode():
            harness.model(harness.context.calibration_windows())
    finally:
        handle.remove()
    return torch.cat(seen).amax(0)


def test_smoothquant_factors_follow_the_formula_on_calibration_activations(harness):
    name = "model.layers.2.mlp.down_proj"
    act_max = _input_abs_max(harness, name)
    w_max = harness.model.get_submodule(name).weight.detach().abs().amax(0)
    with harness.modified([("quant.w8a8", {"alpha": 0.8})]):
        smoothed = harness.model.get_submodule(name)
        torch.testing.assert_close(smoothed.smooth, act_max**0.8 / w_max**0.2)


def test_smoothquant_shares_one_factor_per_input_as_the_fold_into_the_norm_does(harness):
    """q/k/v read one tensor, gate/up another: each group gets one factor from the largest
    weight of the group per input channel (the max over its stacked rows)."""
    attn = [f"model.layers.1.self_attn.{p}_proj" for p in "qkv"]
    mlp = [f"model.layers.1.mlp.{p}_proj" for p in ("gate", "up")]
    act_max = _input_abs_max(harness, attn[0])
    w_max = torch.stack(
        [harness.model.get_submodule(n).weight.detach().abs().amax(0) for n in attn]
    ).amax(0)
    with harness.modified([("quant.w8a8", {"alpha": 0.5})]):
        q, k, v, gate, up = (harness.model.get_submodule(n).smooth for n in attn + mlp)
        assert torch.equal(q, k) and torch.equal(k, v) and torch.equal(gate, up)
        assert not torch.equal(q, gate)
        torch.testing.assert_close(q, act_max**0.5 / w_max**0.5)


# --- (b) by effect on the bundled model -------------------------------------------------------


def _ppl(measured, key):
    return measured[key][0].metrics["ppl_increase"]


def test_eight_bit_formats_are_nearly_lossless(measured):
    for key in ("rtn8", "hqq8", "int8", "w8a8", "w8a8-smooth", "float16", "bfloat16"):
        result = measured[key][0]
        assert abs(result.metrics["ppl_increase"]) < 0.005, key
        assert result.metrics["kl_mean"] < 0.002, key
    fp8 = {key: measured[key][0].metrics["kl_mean"] for key in ("fp8-e4m3", "fp8-e5m2")}
    assert fp8["fp8-e4m3"] < fp8["fp8-e5m2"] < 0.02  # 3 mantissa bits beat 2


# (parameter, {choice: SETTINGS key}): each choice measured on the bundled model.
CHOICE_KEYS = {
    "dtype": {"float16": "float16", "bfloat16": "bfloat16"},
    "format": {"e4m3": "fp8-e4m3", "e5m2": "fp8-e5m2"},
}


@pytest.mark.parametrize("param", list(CHOICE_KEYS))
def test_strategies_shrink_toward_the_choice_that_measures_gentlest(measured, param):
    """CHOICES lists the gentlest first because shrinking goes there: the order must follow
    what the choices measure (float16's 10 mantissa bits beat bfloat16's 7)."""
    from hypothesis import find, settings

    from pytest_hemorrhage import strategies as hst
    from pytest_hemorrhage.explore.domains import CHOICES

    kl = {choice: measured[key][0].metrics["kl_mean"] for choice, key in CHOICE_KEYS[param].items()}
    assert set(CHOICES[param]) == set(kl)
    gentlest = min(kl, key=kl.get)
    assert CHOICES[param][0] == gentlest, kl
    name = SETTINGS[CHOICE_KEYS[param][gentlest]][0]
    shrunk = find(
        hst.modifications(names=[name]),
        lambda c: True,
        settings=settings(database=None, max_examples=50),
    )
    assert getattr(shrunk, param) == gentlest


@pytest.mark.parametrize("family", ["rtn", "hqq"])
def test_fewer_bits_more_damage(measured, family):
    ppl = {bits: _ppl(measured, f"{family}{bits}") for bits in (2, 3, 4, 8)}
    assert ppl[2] > ppl[3] > ppl[4] > ppl[8], ppl
    assert ppl[2] > 0.1


def test_four_bit_library_formats_cost_little(measured):
    for key in ("nf4", "fp4-dq"):
        assert 0 < _ppl(measured, key) < 0.1, key
    assert _ppl(measured, "nf4") < _ppl(measured, "rtn3")


# --- (c) the mitigation: SmoothQuant on a model with outlier activation channels ---------------


def test_outlier_copy_keeps_the_function_and_has_outlier_channels(harness, outliers):
    assert outliers.reference.ppl == pytest.approx(harness.reference.ppl, rel=1e-4)
    norm = "model.layers.1.input_layernorm"
    ratio = outliers.model.get_submodule(norm).weight / harness.model.get_submodule(norm).weight
    channels = torch.nonzero(ratio > 2).flatten().tolist()  # the conftest fixture's channels
    assert len(channels) == 4
    act_max = _input_abs_max(outliers, "model.layers.1.self_attn.q_proj")
    others = [j for j in range(act_max.numel()) if j not in channels]
    assert act_max[channels].min() > 10 * act_max[others].median()


def test_smoothing_rescues_w8a8_from_outlier_channels(outliers):
    plain = outliers.measure([("quant.w8a8", {"smooth": False})]).metrics
    smooth = outliers.measure([("quant.w8a8", {"smooth": True})]).metrics
    assert smooth["kl_mean"] < plain["kl_mean"] / 10  # measured: ~66x lower
    assert smooth["ppl_increase"] < plain["ppl_increase"]


def test_llm_int8_decomposition_rescues_int8_from_outlier_channels(outliers):
    int8 = outliers.measure([("quant.bnb_int8", {"threshold": 0.0})]).metrics
    mixed = outliers.measure([("quant.bnb_int8", {"threshold": 6.0})]).metrics
    assert mixed["kl_mean"] < int8["kl_mean"] / 5  # measured: ~13x lower


# --- restoration and targeting ----------------------------------------------------------------


@pytest.mark.parametrize("key", list(SETTINGS))
def test_measure_restores_the_model_bit_for_bit(measured, key):
    result, changed = measured[key]
    assert not changed
    assert result.nonfinite == 0 and math.isfinite(result.metrics["kl_mean"])


# NF4's 16 code values (QLoRA, appendix E): a block's weights over its absmax are these.
NF4_CODES = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ]
)


def _on_grid(key: str, layer: nn.Module, w: torch.Tensor) -> None:
    """Assert that ``layer`` (the module now in place of a Conv1D whose weight, transposed, is
    the (out, in) ``w``) holds ``w`` rounded onto ``key``'s grid, laid out (out, in): rows of the
    (out, in) weight share a scale, not columns."""
    step = w.abs().amax(1, keepdim=True)  # per output row
    if key == "int8":  # LLM.int8: int8 codes, one absmax per output row
        cb, scb = layer.layer.weight.CB, layer.layer.weight.SCB
        assert cb.shape == w.shape and cb.dtype == torch.int8
        assert (cb.abs().amax(1) == 127).all()  # each row's absmax maps to 127
        deq = cb.float() * scb.float()[:, None] / 127
        assert ((deq - w).abs() <= step / 254 * 1.01 + step * 1e-3).all()  # half a step + fp16
    elif key == "nf4":  # blocks of 64 consecutive weights, row-major over (out, in)
        import bitsandbytes as bnb

        deq = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        assert deq.shape == w.shape
        blocks = deq.reshape(-1, 64)
        ratio = blocks / blocks.abs().amax(1, keepdim=True)
        assert (ratio[..., None] - NF4_CODES).abs().amin(-1).max() < 1e-3
        absmax = w.reshape(-1, 64).abs().amax(1, keepdim=True)
        assert ((blocks - w.reshape(-1, 64)).abs() <= 0.16 * absmax).all()  # half the widest gap
    elif key == "hqq4":  # groups of 64 along a row of (out, in): at most 16 levels each
        deq = layer.dequantize().float()
        assert deq.shape == w.shape
        groups, original = deq.reshape(-1, 64), w.reshape(-1, 64)
        assert max(len(torch.unique(g)) for g in groups) <= 16
        spread = original.amax(1, keepdim=True) - original.amin(1, keepdim=True)
        assert ((groups - original).abs() <= spread / 15).all()  # one step, zero points moved
    elif key == "fp8-e4m3":  # float8 values times one scale per output row
        deq = layer.weight.detach().t()
        scaled = deq / (deq.abs().amax(1, keepdim=True) / torch.finfo(torch.float8_e4m3fn).max)
        assert torch.allclose(scaled, scaled.to(torch.float8_e4m3fn).float(), rtol=1e-5, atol=1e-4)
        assert ((deq - w).abs() <= w.abs() / 16 + step * 2**-9 / 448 * 2).all()
    elif key == "float16":
        deq = layer.weight.detach().t()
        assert torch.equal(deq, deq.half().float()) and torch.equal(deq, w.half().float())
    elif key == "w8a8-smooth":  # int8 codes of W diag(s), one scale per output row
        q, scale, smooth = layer.qweight, layer.weight_scale, layer.smooth
        assert q.shape == w.shape and q.dtype == torch.int8 and smooth.shape == (w.shape[1],)
        assert (q.abs().amax(1) == 127).all()
        smoothed = w * smooth
        half = smoothed.abs().amax(1, keepdim=True) / 254 * 1.01
        assert ((q.float() * scale[:, None] - smoothed).abs() <= half).all()
    else:
        raise AssertionError(f"no grid check for {key}")


@pytest.mark.parametrize("key", ["int8", "nf4", "hqq4", "fp8-e4m3", "float16", "w8a8-smooth"])
def test_gpt2_conv1d_layers_quantize_and_restore(gpt2, key):
    """Every Conv1D of GPT-2 ends up on the format's grid in the (out, in) layout, the logits
    move, and the model comes back bit for bit."""
    from transformers.pytorch_utils import Conv1D

    name, params = SETTINGS[key]
    model = gpt2.model
    conv = {
        n: m.weight.detach().t().clone()
        for n, m in model.named_modules()
        if isinstance(m, Conv1D) and n.startswith("transformer.h.")
    }
    assert len(conv) == 8 and any(w.shape[0] != w.shape[1] for w in conv.values())
    ids = gpt2.windows.eval[:2]
    before = snapshot(model)
    with torch.no_grad():
        base = gpt2.context.logits(ids)
        with gpt2.modified([(name, params)]):
            for layer_name, w in conv.items():
                _on_grid(key, model.get_submodule(layer_name), w)
            moved = (gpt2.context.logits(ids) - base).abs().max().item()
    # measurable damage: float16 rounding, the gentlest, moves logits of size ~0.5 by 2.4e-5
    # (int8 1e-3, 4-bit 1e-2); float32 rounding alone would move them by ~1e-7
    assert moved > 1e-5, moved
    result = gpt2.measure([(name, params)])
    assert not _differences(model, before)
    assert result.nonfinite == 0
    assert abs(result.metrics["kl_mean"]) < 0.05


def test_a_composition_failing_halfway_restores_every_stage(harness):
    before = snapshot(harness.model)
    stages = [
        ("quant.bnb_4bit", {"include": ("*.mlp.*",)}),
        ("quant.w8a8", {"include": ("*.o_proj",), "smooth": False}),
        ("quant.hqq", {"include": ("*.k_proj",), "group_size": 16384}),
    ]
    with pytest.raises(HemorrhageError, match=r"layers\.0\.self_attn\.k_proj \(64x128\)"):
        harness.measure(stages)
    assert not _differences(harness.model, before)
    harness.check_pristine()


def test_include_and_exclude_choose_the_swapped_layers(harness):
    with harness.modified([("quant.hqq", {"include": ("*.mlp.*",), "exclude": ("*.layers.0.*",)})]):
        swapped = {n for n, m in harness.model.named_modules() if type(m).__name__ == "HQQLinear"}
    assert swapped == {
        f"model.layers.{i}.mlp.{p}"
        for i in (1, 2, 3)
        for p in ("gate_proj", "up_proj", "down_proj")
    }


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("quant.bnb_int8", {"threshold": -1.0}, r"threshold=-1.0 is out of range; use a number"),
        ("quant.bnb_4bit", {"blocksize": 100}, r"blocksize=100 is not valid; choose one of 32, 64"),
        ("quant.bnb_4bit", {"quant_type": "int4"}, r"quant_type='int4' .* 'nf4', 'fp4'"),
        ("quant.bnb_4bit", {"double_quant": "yes"}, r"double_quant='yes' .* True, False"),
        ("quant.hqq", {"bits": 7}, r"bits=7 is not a width hqq supports; use one of 1, 2, 3, 4, 5"),
        ("quant.hqq", {"group_size": 12}, r"group_size=12 is not a multiple of 8.*group_size=8"),
        ("quant.hqq", {"axis": 2}, r"axis=2 is not valid; choose one of 0, 1"),
        ("quant.fp8", {"format": "e3m4"}, r"format='e3m4' .* 'e4m3', 'e5m2'"),
        ("quant.dtype", {"dtype": "float64"}, r"dtype='float64' .* 'float16', 'bfloat16'"),
        ("quant.w8a8", {"alpha": 1.5}, r"alpha=1.5 is out of range; use a number in \[0.0, 1.0\]"),
        ("quant.rtn", {"bits": 9}, r"bits=9 is out of range; use an integer in \[1, 8\]"),
    ],
)
def test_bad_parameters_name_the_value_and_the_fix(name, params, message):
    with pytest.raises(HemorrhageError, match=message):
        make(name, params)


# --- CUDA: the same kernels on a GPU ----------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_library_kernels_on_cuda(measured, make_harness):
    from pytest_hemorrhage.loading import load_model

    gpu = make_harness(load_model("hemorrhage-tiny", device="cuda"), tokens=2048)
    before = snapshot(gpu.model)
    for key in ("int8", "nf4", "hqq4", "w8a8-smooth"):
        name, params = SETTINGS[key]
        result = gpu.measure([(name, params)])
        assert not _differences(gpu.model, before), key
        assert result.nonfinite == 0, key
        cpu = _ppl(measured, key)
        assert abs(result.metrics["ppl_increase"] - cpu) < 0.01 + 0.5 * abs(cpu), (key, cpu)
