"""decode.* against their definitions, the effective-distribution metrics, and composition."""

from __future__ import annotations

import math

import pytest
import torch

import pytest_hemorrhage.modifications.decode  # noqa: F401  # registers decode.*
from pytest_hemorrhage.errors import HemorrhageError
from pytest_hemorrhage.metrics import SKEW
from pytest_hemorrhage.modifications import make
from pytest_hemorrhage.modifications.decode import Decoding, decoding_of


def _processed(harness, stages, ids, logits):
    """``logits`` (B, T, V) after the processors that ``stages`` add."""
    with harness.modified(stages) as patch:
        for process in patch.logits_processors:
            logits = process(ids, logits)
        count = len(patch.logits_processors)
    return logits, count


@pytest.fixture(scope="module")
def logits():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, 5, 512, generator=gen) * 3


@pytest.fixture(scope="module")
def ids():
    return torch.tensor([[1, 2, 3, 2, 1], [7, 7, 9, 0, 511]])


def test_temperature_divides_the_logits(harness, ids, logits):
    out, count = _processed(harness, [("decode.temperature", {"value": 0.5})], ids, logits)
    assert count == 1
    torch.testing.assert_close(out, logits / 0.5)
    # 1 changes no bit, so it costs no pass over the logits (nor does a repetition penalty of 1)
    for neutral in ("decode.temperature", "decode.repetition_penalty"):
        out, count = _processed(harness, [(neutral, {"value": 1.0})], ids, logits)
        assert count == 0 and torch.equal(out, logits), neutral


def test_top_k_keeps_the_k_largest_and_masks_the_rest(harness, ids, logits):
    out, _ = _processed(harness, [("decode.top_k", {"k": 7})], ids, logits)
    for row, new in zip(logits.reshape(-1, 512), out.reshape(-1, 512), strict=True):
        kept = row.topk(7).indices
        assert torch.equal(new[kept], row[kept])
        assert int(new.isneginf().sum()) == 512 - 7


def test_top_p_keeps_the_smallest_nucleus_reaching_p(harness, ids, logits):
    out, _ = _processed(harness, [("decode.top_p", {"p": 0.8})], ids, logits)
    for row, new in zip(logits.reshape(-1, 512), out.reshape(-1, 512), strict=True):
        probs, order = row.softmax(-1).sort(descending=True)
        size = int((probs.cumsum(0) < 0.8).sum()) + 1  # first prefix whose mass reaches p
        assert torch.equal(new[order[:size]], row[order[:size]])
        assert bool(new[order[size:]].isneginf().all())


def test_repetition_penalty_at_every_position_uses_the_tokens_seen_so_far(harness, ids, logits):
    out, _ = _processed(harness, [("decode.repetition_penalty", {"value": 1.5})], ids, logits)
    for b in range(2):
        for t in range(5):
            expected = logits[b, t].clone()
            for token in set(ids[b, : t + 1].tolist()):
                x = expected[token]
                expected[token] = x / 1.5 if x > 0 else x * 1.5
            torch.testing.assert_close(out[b, t], expected)


def test_repetition_penalty_one_step_equals_transformers(harness, ids, logits):
    from transformers import RepetitionPenaltyLogitsProcessor

    last = logits[:, -1:]
    out, _ = _processed(harness, [("decode.repetition_penalty", {"value": 1.3})], ids, last)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(ids, last[:, 0].clone())
    torch.testing.assert_close(out[:, 0], expected)


def test_measure_penalizes_the_tokens_each_position_has_seen_in_its_window(harness):
    """Through measure(): the harness hands every processor the window's tokens."""
    from pytest_hemorrhage.loading import model_logits

    r = harness.measure([("decode.repetition_penalty", {"value": 1.5})])
    ids = harness.windows.eval
    with torch.inference_mode():
        logits = model_logits(harness.model, ids)[:, :-1].float()
    seen = torch.nn.functional.one_hot(ids[:, :-1], logits.shape[-1]).cummax(1).values.bool()
    penalized = torch.where(seen, torch.where(logits < 0, logits * 1.5, logits / 1.5), logits)
    logq = torch.log_softmax(penalized, -1).reshape(-1, logits.shape[-1])
    lp = harness.reference.logp
    kl = (lp.exp() * (lp - logq)).sum(-1).mean().item()
    assert r.metrics["kl_mean"] == pytest.approx(kl, rel=1e-4)


def test_processors_apply_in_stage_order(harness, ids, logits):
    stages = [("decode.top_k", {"k": 3}), ("decode.temperature", {"value": 2.0})]
    out, count = _processed(harness, stages, ids, logits)
    assert count == 2
    top = logits.topk(3, -1).values
    torch.testing.assert_close(out.topk(3, -1).values, top / 2)


def test_sampling_changes_no_distribution_and_sets_the_generation_mode(harness, ids, logits):
    out, count = _processed(harness, [("decode.sampling", {"seed": 3})], ids, logits)
    assert count == 0 and torch.equal(out, logits)
    assert decoding_of([], 0) == Decoding(sample=False, seed=0)
    assert decoding_of([make("decode.top_p", {"p": 0.9})], 5) == Decoding(True, 5)
    assert decoding_of([make("decode.repetition_penalty")], 5) == Decoding(False, 5)
    greedy = [make("decode.temperature"), make("decode.sampling", {"mode": "greedy"})]
    assert decoding_of(greedy, 5) == Decoding(False, 5)
    assert decoding_of([make("decode.sampling", {"seed": 9})], 5) == Decoding(True, 9)


@pytest.mark.parametrize(
    "stage",
    [
        ("decode.temperature", {"value": 1.0}),
        ("decode.top_k", {"k": 512}),
        ("decode.top_p", {"p": 1.0}),
        ("decode.repetition_penalty", {"value": 1.0}),
        ("decode.sampling", {"seed": 1}),
    ],
)
def test_neutral_settings_measure_no_hemorrhage(harness, stage):
    r = harness.measure([stage])
    assert r.metrics["kl_mean"] < 1e-6
    assert r.metrics["top1_disagreement"] == 0
    assert abs(r.metrics["ppl_increase"]) < 1e-5
    assert r.nonfinite == 0


def test_damage_grows_with_the_temperature_distance_from_one(harness):
    kl = {
        t: harness.measure([("decode.temperature", {"value": t})]).metrics["kl_mean"]
        for t in (0.4, 0.7, 1.0, 1.4, 2.5)
    }
    assert kl[0.4] > kl[0.7] > kl[1.0] < kl[1.4] < kl[2.5]
    assert kl[1.0] < 1e-6


def test_truncation_is_finite_monotone_and_keeps_the_top_token(harness):
    results = {p: harness.measure([("decode.top_p", {"p": p})]) for p in (0.5, 0.8, 0.95)}
    kls = [results[p].metrics["kl_mean"] for p in (0.5, 0.8, 0.95)]
    assert all(math.isfinite(k) for k in kls) and kls[0] > kls[1] > kls[2] > 0
    for r in results.values():
        assert r.metrics["top1_disagreement"] == 0
        assert r.nonfinite == 0
        assert max(r.metrics["kl_max"], 0) <= math.log(1 / SKEW) + 1e-3


def test_greedy_truncation_kl_is_the_skew_divergence_by_hand(harness):
    """top_k=1 keeps only the baseline's argmax: KL(p || (1-e) onehot + e p) per token."""
    r = harness.measure([("decode.top_k", {"k": 1})])
    logp = harness.reference.logp.double()
    p = logp.exp()
    top = p.max(-1).values
    # kept token: p_top * ln(p_top / ((1-e) + e p_top)); each cut token: p_i * ln(1/e)
    kept = top * (top.log() - torch.log((1 - SKEW) + SKEW * top))
    per_token = kept + (1 - top) * math.log(1 / SKEW)
    assert r.metrics["kl_mean"] == pytest.approx(per_token.mean().item(), rel=1e-4)


def test_truncation_with_top_k_reference_storage_stays_finite_and_close(harness, tiny):
    """Large vocabularies keep the baseline's top-K log-probs only: the skew applies there too."""
    import dataclasses

    from pytest_hemorrhage.harness import Harness

    # a second harness on the shared model: fine for decode stages, which touch no tensor
    stored = Harness(tiny, dataclasses.replace(harness.settings, topk=64))
    assert stored.reference.logp is None
    for stage in (("decode.top_p", {"p": 0.9}), ("decode.top_k", {"k": 3})):
        exact, approx = harness.measure([stage]), stored.measure([stage])
        assert approx.nonfinite == 0 and math.isfinite(approx.metrics["kl_max"])
        assert approx.metrics["kl_mean"] == pytest.approx(exact.metrics["kl_mean"], rel=0.05)
        assert approx.metrics["nll_increase"] == pytest.approx(exact.metrics["nll_increase"])


def test_decoding_composes_with_weight_modifications(harness):
    quant = harness.measure([("quant.rtn", {"bits": 4})])
    both = harness.measure([("quant.rtn", {"bits": 4}), ("decode.top_p", {"p": 0.9})])
    assert both.modification == "quant.rtn+decode.top_p"
    assert both.stages[0].metrics == quant.metrics
    assert both.metrics["kl_mean"] > quant.metrics["kl_mean"]
    assert both.metrics["top1_disagreement"] == quant.metrics["top1_disagreement"]
    assert [c.name for c in both.configs] == ["quant.rtn", "decode.top_p"]


def test_restore_is_exact_and_processors_are_dropped(harness):
    before = {k: v.clone() for k, v in harness.model.state_dict().items()}
    with harness.modified(
        [
            ("quant.rtn", {"bits": 4}),
            ("decode.top_k", {"k": 5}),
            ("decode.repetition_penalty", {"value": 1.3}),
        ]
    ) as patch:
        assert len(patch.logits_processors) == 2
    assert patch.logits_processors == []
    harness.check_pristine()
    after = harness.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize(
    "name, params, fragment",
    [
        ("decode.temperature", {"value": 0}, "value=0"),
        ("decode.temperature", {"value": float("inf")}, "value=inf"),
        ("decode.top_k", {"k": 0}, "k=0"),
        ("decode.top_p", {"p": 0.0}, "p=0.0"),
        ("decode.top_p", {"p": 1.5}, "p=1.5"),
        ("decode.repetition_penalty", {"value": -1.0}, "value=-1.0"),
        ("decode.sampling", {"mode": "beam"}, "mode='beam'"),
        ("decode.sampling", {"seed": -1}, "seed=-1"),
        ("decode.top_p", {"include": ("*.mlp.*",)}, "include/exclude do not apply"),
    ],
)
def test_bad_parameters_name_the_value_and_the_fix(name, params, fragment):
    with pytest.raises(HemorrhageError, match=r"use |choose |drop them") as info:
        make(name, params)
    assert fragment in str(info.value) and name in str(info.value)


def test_calibration_recovers_a_pure_temperature_change_exactly(harness):
    from pytest_hemorrhage.decoding_calibration import calibrate_decoding

    calibration = calibrate_decoding(harness, [("decode.temperature", {"value": 0.5})])
    assert calibration.temperature == pytest.approx(2.0, rel=1e-3)
    assert calibration.kl_before > 0.3 and calibration.kl_after < 1e-5
    assert calibration.calibration_kl[1] < 1e-5


def test_calibration_lowers_the_kl_of_an_overconfident_quantized_model(harness):
    """2-bit RTN: its top token gets more probability from itself than from the baseline, so
    the KL-optimal temperature is above 1, fitted on calibration windows, lowering kl_mean on
    the evaluation windows."""
    from pytest_hemorrhage.decoding_calibration import calibrate_decoding

    target = harness.measure([("quant.rtn", {"bits": 2, "group_size": 32})])
    calibration = calibrate_decoding(harness, target)
    assert calibration.before is target
    assert calibration.temperature > 1.1
    assert calibration.calibration_kl[1] < calibration.calibration_kl[0]
    assert calibration.kl_after < calibration.kl_before - 0.05
    assert calibration.after.metrics["ppl_increase"] < target.metrics["ppl_increase"]
    names = [c.name for c in calibration.modification]
    assert names == ["quant.rtn", "decode.temperature"]
    again = harness.measure(calibration.modification)
    assert again.metrics == calibration.after.metrics


def test_calibration_with_top_p_is_never_worse_on_the_calibration_windows(harness):
    from pytest_hemorrhage.decoding_calibration import TOP_P_GRID, calibrate_decoding

    stages = [("prune.magnitude", {"sparsity": 0.7})]
    plain = calibrate_decoding(harness, stages, windows=4)
    joint = calibrate_decoding(harness, stages, top_p=True, windows=4)
    assert joint.top_p in TOP_P_GRID and plain.top_p is None
    assert joint.calibration_kl[1] <= plain.calibration_kl[1] + 1e-6


@pytest.mark.parametrize(
    "target, options, fragment",
    [
        (None, {}, "is not a modification"),
        ([], {}, "is not a modification"),
        ("quant.rtn", {"temperatures": (2.0, 1.0)}, "temperatures=(2.0, 1.0)"),
    ],
)
def test_calibration_bad_input_says_what_to_pass(harness, target, options, fragment):
    from pytest_hemorrhage.decoding_calibration import calibrate_decoding

    with pytest.raises(HemorrhageError, match="calibrate_decoding") as info:
        calibrate_decoding(harness, target, **options)
    assert fragment in str(info.value)
