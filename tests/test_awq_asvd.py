"""AWQ (quant.awq) and ASVD (lowrank.asvd): against their definitions, on both architectures,
exact restoration, and the seed paper's comparisons on the bundled model (judged on kl_mean).

Figures measured on the bundled model (2048 evaluation tokens, 16 calibration windows):

- AWQ / RTN kl_mean, zero point, group 128 (AWQ's official setting): 1.00x at 3 bits, 0.98x at
  4 bits; on the outlier copy of test_quant (4 residual channels x40, same function): 0.64x at
  3 bits, 0.29x at 4 bits. Symmetric: 1.03x / 0.99x plain, 0.76x / 0.34x with outliers.
- ASVD (alpha 0.5) / SVD kl_mean at rank ratio 0.5: 0.96x (0.550 vs 0.571); the tiny model's
  activations are nearly flat (mean |x| varies 1.6-6x across channels), so the gain is small.
  On the outlier copy the gain stays small (0.977x; SVD itself only loses 0.614 vs 0.571 there:
  4 of 128 channels) and grows with alpha (0.94x at alpha 1), so no outlier test is stated.
"""

from __future__ import annotations

import pytest
import torch
from bit_identity import assert_restored, snapshot

from pytest_hemorrhage.errors import HemorrhageError
from pytest_hemorrhage.modifications import make
from pytest_hemorrhage.modifications.calibration import input_stats
from pytest_hemorrhage.modifications.lowrank import asvd_scale, kept_rank
from pytest_hemorrhage.modifications.quant.awq import awq_scales, input_grams
from pytest_hemorrhage.modifications.quant.rtn import rtn_quantize

BLOCK0 = "model.layers.0"


def _weights(harness, stage) -> dict[str, torch.Tensor]:
    """Every target's effective (out, in) weight under ``stage``."""
    with harness.modified([stage]):
        return {t.name: t.weight.detach().clone() for t in make(*stage).targets(harness.model)}


def _kl(harness, name, **params) -> float:
    return harness.measure([(name, params)]).metrics["kl_mean"]


def _output_error(w: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    d = (w - approx).double()
    return float(((d @ gram.double()) * d).sum())


# --- (a) AWQ against its definition --------------------------------------------------------------


def test_layers_reading_one_input_share_a_group(harness):
    targets = make("quant.awq", {}).targets(harness.model)
    groups = {g.members for g in input_grams(harness.model, harness.context, targets)}
    attn, mlp = f"{BLOCK0}.self_attn", f"{BLOCK0}.mlp"
    assert (f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj") in groups
    assert (f"{attn}.o_proj",) in groups
    assert (f"{mlp}.gate_proj", f"{mlp}.up_proj") in groups
    assert (f"{mlp}.down_proj",) in groups
    assert len(groups) == 4 * len(harness.model.model.layers)


def test_awq_with_alpha_zero_only_is_rtn_bit_for_bit(harness):
    """grid=1 tries alpha = 0 alone: s = 1, so AWQ reduces to quant.rtn exactly."""
    params = {"bits": 3, "group_size": 64, "symmetric": False}
    awq = _weights(harness, ("quant.awq", {**params, "grid": 1}))
    rtn = _weights(harness, ("quant.rtn", params))
    for name, w in rtn.items():
        assert torch.equal(awq[name], w), name


def test_awq_weight_is_quantized_scaled_weight_unscaled_and_search_beats_rtn(harness):
    """W_eff = Q(W diag(s)) diag(1/s) with one s per group, s = mean|x|^alpha normalized; the
    chosen s never has a larger calibration output error than s = 1 (RTN), and a smaller one
    on most groups."""
    config = make("quant.awq", {"bits": 3})
    targets = config.targets(harness.model)
    scales = awq_scales(harness.model, harness.context, config, targets)
    effective = _weights(harness, ("quant.awq", {"bits": 3}))
    stats = input_stats(harness.model, harness.context)
    better = 0
    for group in input_grams(harness.model, harness.context, targets):
        s = scales[group.members[0]]
        mean = stats[group.members[0]].abs_mean
        candidates = [mean.pow(i / 20) for i in range(20)]  # the grid, normalized below
        candidates = [c / (c.max() * c.min()).sqrt() for c in candidates]
        assert any(torch.allclose(s, c, rtol=1e-6) for c in candidates), group.members
        awq_error = rtn_error = 0.0
        for name in group.members:
            assert torch.equal(scales[name], s), name  # one scale per input
            w = dict((t.name, t.weight.detach()) for t in targets)[name]
            expected = rtn_quantize(w * s, 3, 128, True) / s
            torch.testing.assert_close(effective[name], expected, rtol=0, atol=1e-6)
            awq_error += _output_error(w, effective[name], group.gram)
            rtn_error += _output_error(w, rtn_quantize(w, 3, 128, True), group.gram)
        assert awq_error <= rtn_error * (1 + 1e-9), group.members
        better += awq_error < 0.99 * rtn_error
    assert better >= len(scales) // 4, better


def test_awq_scales_are_memoized_and_cached_on_disk(tiny, make_harness, tmp_path, monkeypatch):
    """A second apply in the session and a second session (new harness, same cache directory)
    both apply AWQ without calibrating, to the same weights, and restore exactly."""
    from pytest_hemorrhage.modifications.quant import awq

    def fresh():
        return make_harness(tiny, tokens=1024, cache_dir=tmp_path)

    stage = ("quant.awq", {"bits": 3, "grid": 5, "include": ("*.layers.0.*",)})
    first = fresh()
    applied = _weights(first, stage)
    assert len(list(tmp_path.glob("awq-*.pt"))) == 1

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibrated again")

    monkeypatch.setattr(awq, "calibrated_inputs", no_calibration)
    monkeypatch.setattr(awq, "input_grams", no_calibration)
    for h in (first, fresh()):  # the session memo, then the disk cache
        before = snapshot(h.model)
        again = _weights(h, stage)
        assert_restored(h.model, before)
        assert again.keys() == applied.keys()
        for name, w in applied.items():
            assert torch.equal(again[name], w), name


@pytest.mark.parametrize(
    "params", [{"bits": 9}, {"bits": 0}, {"group_size": -1}, {"grid": 0}, {"symmetric": "yes"}]
)
def test_awq_rejects_bad_parameters(params):
    with pytest.raises(HemorrhageError, match="quant.awq"):
        make("quant.awq", params)


# --- (b) ASVD against its definition -------------------------------------------------------------


def test_asvd_with_alpha_zero_is_plain_svd(harness):
    svd = _weights(harness, ("lowrank.svd", {"rank_ratio": 0.5}))
    asvd = _weights(harness, ("lowrank.asvd", {"rank_ratio": 0.5, "alpha": 0.0}))
    for name, w in svd.items():
        assert torch.equal(asvd[name], w), name


def test_asvd_is_the_truncated_svd_of_the_scaled_weight(harness):
    """W_eff = [W S]_k S^-1, S = diag(mean|x|^alpha): rank k, and equal to that product."""
    stage = ("lowrank.asvd", {"rank_ratio": 0.5, "alpha": 0.5})
    effective = _weights(harness, stage)
    stats = input_stats(harness.model, harness.context)
    for target in make(*stage).targets(harness.model)[:7]:  # block 0: every layer shape
        w = target.weight.detach().double()
        s = asvd_scale(stats[target.name].abs_mean, 0.5).double()
        k = kept_rank(0.5, w.shape)
        u, sv, vh = torch.linalg.svd(w * s, full_matrices=False)
        expected = (u[:, :k] * sv[:k]) @ vh[:k] / s
        torch.testing.assert_close(effective[target.name].double(), expected, rtol=0, atol=1e-5)
        assert torch.linalg.matrix_rank(effective[target.name], rtol=1e-5) == k


def test_asvd_lowers_the_calibration_output_error(harness):
    """What the scaling is for: ||X (W - W_k)^T||^2 on calibration inputs, smaller than plain
    SVD's in total and on most layers. The diagonal scaling is a heuristic, not the optimum, so
    not on every layer: measured at rank ratio 0.5, 27 of 28 layers, total 122.2 vs 125.9."""
    svd = _weights(harness, ("lowrank.svd", {"rank_ratio": 0.5}))
    asvd = _weights(harness, ("lowrank.asvd", {"rank_ratio": 0.5}))
    targets = make("lowrank.svd", {}).targets(harness.model)
    weights = {t.name: t.weight.detach() for t in targets}
    errors = []
    for group in input_grams(harness.model, harness.context, targets):
        for name in group.members:
            errors.append(
                (
                    _output_error(weights[name], svd[name], group.gram),
                    _output_error(weights[name], asvd[name], group.gram),
                )
            )
    assert sum(e[1] for e in errors) < sum(e[0] for e in errors)
    assert sum(scaled < plain for plain, scaled in errors) >= 0.75 * len(errors)


@pytest.mark.parametrize("params", [{"alpha": -0.1}, {"alpha": 1.5}, {"rank_ratio": 0.0}])
def test_asvd_rejects_bad_parameters(params):
    with pytest.raises(HemorrhageError, match="lowrank.asvd"):
        make("lowrank.asvd", params)


# --- (c) contract: both architectures, include/exclude, exact restore ----------------------------

STAGES = [
    ("quant.awq", {"bits": 3, "group_size": 32}),
    ("lowrank.asvd", {"rank_ratio": 0.5}),
]


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s[0])
@pytest.mark.parametrize("model", ["harness", "gpt2"])
def test_restores_exactly_and_honours_include(request, model, stage):
    h = request.getfixturevalue(model)
    name, params = stage
    every = make("quant.rtn", {}).targets(h.model)  # the block linears, as (out, in)
    plain = {t.name: t.weight.detach().clone() for t in every}
    before = snapshot(h.model)
    with h.modified([(name, {**params, "include": ("*.0.mlp.*",)})]):
        changed = {t.name for t in every if not torch.equal(t.weight, plain[t.name])}
    assert changed and all(".0.mlp." in n for n in changed), changed
    h.measure([stage])
    assert_restored(h.model, before)


def test_awq_on_gpt2_conv1d_uses_the_out_in_layout(gpt2):
    """Conv1D stores (in, out): the scale must multiply input channels, i.e. weight rows."""
    config = make("quant.awq", {"bits": 3, "group_size": 32})
    targets = config.targets(gpt2.model)
    scales = awq_scales(gpt2.model, gpt2.context, config, targets)
    with gpt2.modified([config]):
        for target in targets:
            s = scales[target.name]
            assert s.shape == (target.weight.shape[1],)
            w = target.module.parametrizations.weight.original.detach().t()
            expected = rtn_quantize(w * s, 3, 32, True) / s
            torch.testing.assert_close(target.weight.detach(), expected, rtol=0, atol=1e-6)


# --- (d) the paper on the bundled model ----------------------------------------------------------


@pytest.mark.parametrize("bits", [3, 4])
def test_awq_matches_rtn_without_outliers(harness, bits):
    """Measured (zero point, group 128): AWQ/RTN kl_mean 1.00x at 3 bits, 0.98x at 4 bits."""
    params = {"bits": bits, "symmetric": False}
    rtn, awq = _kl(harness, "quant.rtn", **params), _kl(harness, "quant.awq", **params)
    assert awq <= 1.05 * rtn, (awq, rtn)


@pytest.mark.parametrize(("bits", "ratio"), [(3, 0.8), (4, 0.5)])
def test_awq_beats_rtn_clearly_with_outlier_channels(outliers, bits, ratio):
    """Measured (zero point, group 128): AWQ/RTN kl_mean 0.64x at 3 bits, 0.29x at 4 bits."""
    params = {"bits": bits, "symmetric": False}
    rtn, awq = _kl(outliers, "quant.rtn", **params), _kl(outliers, "quant.awq", **params)
    assert awq < ratio * rtn, (awq, rtn)


def test_asvd_beats_plain_svd_at_the_same_rank(harness):
    """Measured at rank ratio 0.5: ASVD 0.550 vs SVD 0.571 kl_mean (0.96x)."""
    svd = _kl(harness, "lowrank.svd", rank_ratio=0.5)
    asvd = _kl(harness, "lowrank.asvd", rank_ratio=0.5, alpha=0.5)
    assert asvd < svd, (asvd, svd)


@pytest.mark.parametrize(
    "stage", [("lowrank.svd", {"rank_ratio": 0.3}), ("lowrank.asvd", {"rank_ratio": 0.3})]
)
def test_a_repeated_low_rank_apply_does_no_svd(harness, monkeypatch, stage):
    """The session keeps each config's subspaces: a second apply computes no SVD and gives
    the same weights; a different rank computes its own."""
    from pytest_hemorrhage.modifications import lowrank

    first = _weights(harness, stage)

    def no_svd(*args, **kwargs):
        raise AssertionError("SVD computed again")

    monkeypatch.setattr(lowrank, "truncate", no_svd)
    again = _weights(harness, stage)
    for name, w in first.items():
        assert torch.equal(again[name], w), name
    with pytest.raises(AssertionError, match="SVD computed again"):
        _weights(harness, (stage[0], {**stage[1], "rank_ratio": 0.35}))
