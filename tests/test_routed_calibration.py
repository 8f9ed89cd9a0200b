"""Calibration that follows the router: on mixture-of-experts models stored fused, the
activation-aware methods calibrate each expert's matrices on the tokens the router sent that
expert, experts sent too few fall back to a named data-free method, and every result reports
the coverage per MoE module.

The five MoE architectures of ``architectures.py`` (2 blocks, hidden 64, 4 experts of which 2
are routed per token, random init).
"""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from architectures import build
from bit_identity import assert_restored, snapshot

from pytest_hemorrhage.modifications import make
from pytest_hemorrhage.modifications.experts import expert_stacks, routed_hooks
from pytest_hemorrhage.modifications.registry import Patch, apply

MOE = ("mixtral", "qwen3_moe", "qwen2_moe", "gpt_oss", "deepseek_v3")  # in architectures.py
EXPERTS = "model.layers.{}.mlp.experts"


def _router(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    mlp = model.model.layers[layer].mlp
    return mlp.router if hasattr(mlp, "router") else mlp.gate


def _routing(model: torch.nn.Module, layer: int, run) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's own view of what ``run()`` sends through ``layer``: its input tokens
    (tokens, hidden) and the top-k expert indices it returns (tokens, k), over every call."""
    inputs, indices = [], []

    def seen(module, args, output):
        inputs.append(args[0].detach().reshape(-1, args[0].shape[-1]))
        indices.append(output[-1].detach().reshape(len(inputs[-1]), -1))

    handle = _router(model, layer).register_forward_hook(seen)
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    return torch.cat(inputs), torch.cat(indices)


def _unreachable(model: torch.nn.Module, expert: int) -> None:
    """Bias GPT-OSS's routers against ``expert``: -inf in all but name, never in a top-k."""
    for layer in model.model.layers:
        layer.mlp.router.bias.data[expert] = -1e4


@pytest.fixture(scope="module")
def moe(tiny, make_harness):
    """``moe(architecture, unreached=None)``: a Harness (2 windows of 128 tokens, 2 calibration
    windows) on the tiny model; with ``unreached``, GPT-OSS with that expert of every layer
    biased out of its router's top-k, so calibration never reaches it. Built on first use."""
    built = {}

    def harness(arch: str, unreached: int | None = None):
        if (arch, unreached) not in built:
            model = build(arch, len(tiny.tokenizer))
            if unreached is not None:
                _unreachable(model, unreached)
            built[arch, unreached] = make_harness(
                model, tiny.tokenizer, spec=f"{arch}-{unreached}", tokens=256, calibration_windows=2
            )
        return built[arch, unreached]

    return harness


@pytest.mark.parametrize("arch", MOE)
def test_each_expert_sees_the_tokens_its_router_sends_it(tiny, arch):
    """Up/gate inputs: exactly the router's input rows whose top-k holds the expert; down
    inputs: what rebuilds the experts module's output as its own kernel computes it, routed
    weights applied; and the model's output is that of its own kernel meanwhile."""
    model = build(arch, len(tiny.tokenizer))
    stacks = expert_stacks(model, "model.layers.1")
    module = stacks[0].module
    ids = torch.randint(1, len(tiny.tokenizer), (2, 48), generator=torch.Generator().manual_seed(0))
    outputs = []
    handle = module.register_forward_hook(lambda m, a, out: outputs.append(out.detach()))
    with torch.no_grad():
        plain = model(ids).logits  # the module's own kernel (grouped_mm here)
        got: dict[tuple[str, int], torch.Tensor] = {}

        def record(stack, expert, x):
            got[stack.param, expert] = x.clone()

        handles = routed_hooks(stacks, record)
        try:
            hidden, index = _routing(model, 1, lambda: outputs.append(model(ids).logits))
        finally:
            for h in [handle, *handles]:
                h.remove()
    kernel, routed_out, routed_logits = outputs
    assert torch.allclose(routed_logits, plain, atol=1e-4, rtol=1e-4)
    assert torch.allclose(routed_out, kernel, atol=1e-5, rtol=1e-4)
    down = next(s for s in stacks if "down" in s.param)
    up = next(s for s in stacks if s is not down)
    weights = _router(model, 1)(hidden)[1]
    rebuilt = torch.zeros_like(hidden)
    for expert in range(up.count):
        rows = (index == expert).any(-1).nonzero().squeeze(1)
        if not len(rows):
            assert (up.param, expert) not in got
            continue
        assert torch.equal(got[up.param, expert], hidden[rows])
        w = getattr(module, down.param)[expert]
        y = got[down.param, expert] @ (w if down.transposed else w.t())
        bias = getattr(module, f"{down.param}_bias", None)
        y = y if bias is None else y + bias[expert]
        share = weights[rows][index[rows] == expert].unsqueeze(1)
        rebuilt.index_add_(0, rows, y * share)
    assert torch.allclose(rebuilt, kernel.reshape(rebuilt.shape), atol=1e-5, rtol=1e-4)


def test_coverage_counts_the_tokens_routed_to_each_expert(moe):
    """details["calibration"]: per MoE module, the routed calibration tokens of its experts."""
    h = moe("mixtral")
    result = h.measure([("prune.wanda", {"sparsity": 0.5})])
    for layer in (0, 1):
        _, index = _routing(h.model, layer, lambda: _calibration_pass(h))
        counts = [int((index == e).any(-1).sum()) for e in range(4)]
        assert result.details["calibration"][EXPERTS.format(layer)] == {
            "method": "prune.wanda",
            "experts": 4,
            "reached": sum(1 for n in counts if n),
            "tokens_min": min(counts),
            "tokens_median": statistics.median(counts),
            "min_tokens": 16,
            "fallback": [],
            "fallback_method": "prune.magnitude",
        }
    record = result.details["calibration"]
    assert json.loads(json.dumps(record)) == record  # plain JSON, as the reports write it


def _calibration_pass(h) -> None:
    for batch in h.context.calibration_windows().split(8):
        h.context.logits(batch)


def _applied(h, name: str, params: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """``name`` applied through a Patch: its details and each stack's effective weights."""
    patch = Patch(h.model)
    try:
        apply(make(name, params), h.model, patch, h.context)
        with torch.no_grad():
            weights = {s.name: getattr(s.module, s.param).clone() for s in expert_stacks(h.model)}
    finally:
        patch.undo()
    return patch.details, weights


@pytest.mark.parametrize(
    ("name", "params", "fallback"),
    [
        ("prune.wanda", {}, "prune.magnitude"),
        ("prune.nm", {"score": "wanda"}, "prune.nm score=magnitude"),
        ("quant.gptq", {}, "quant.rtn"),
        ("prune.sparsegpt", {}, "prune.magnitude"),
        ("quant.awq", {}, "quant.rtn"),
        ("lowrank.asvd", {}, "lowrank.svd"),
    ],
)
def test_an_expert_calibration_never_reaches_falls_back_and_is_named(moe, name, params, fallback):
    """GPT-OSS ((experts, in, out) layout) with expert 3 outside every top-k: each method
    still measures, says expert 3 fell back and to what, and restores bit for bit."""
    h = moe("gpt_oss", unreached=3)
    before = snapshot(h.model)
    result = h.measure([(name, params)])
    assert_restored(h.model, before)
    assert all(torch.isfinite(torch.tensor(v)) for v in result.metrics.values())
    for layer in (0, 1):
        record = result.details["calibration"][EXPERTS.format(layer)]
        assert (record["experts"], record["reached"], record["tokens_min"]) == (4, 3, 0)
        assert (record["fallback"], record["fallback_method"]) == ([3], fallback)


def test_gptq_falls_back_to_rtn_on_the_same_grid(moe):
    """The unreached expert gets exactly quant.rtn at the same bits and group size; a reached
    one gets GPTQ's compensated rounding, which differs."""
    h = moe("gpt_oss", unreached=3)
    params = {"bits": 3, "group_size": 32}
    _, gptq = _applied(h, "quant.gptq", params)
    _, rtn = _applied(h, "quant.rtn", params)
    name = EXPERTS.format(0) + ".gate_up_proj"
    assert torch.equal(gptq[name][3], rtn[name][3])
    assert not torch.equal(gptq[name][0], rtn[name][0])


@pytest.mark.parametrize("name", ["quant.gptq", "prune.wanda", "quant.awq", "lowrank.asvd"])
def test_routed_calibration_changes_the_result_against_the_fallback(moe, name):
    """Calibrated on its routed tokens, each expert is modified differently from its data-free
    fallback (every expert falling back: ``min_expert_tokens`` above any count), and both
    measure finite."""
    h = moe("qwen3_moe")
    routed = h.measure([(name, {})])
    fallen = h.measure([(name, {"min_expert_tokens": 10**6})])
    assert fallen.details["calibration"][EXPERTS.format(0)]["fallback"] == [0, 1, 2, 3]
    assert routed.details["calibration"][EXPERTS.format(0)]["fallback"] == []
    for result in (routed, fallen):
        assert all(torch.isfinite(torch.tensor(v)) for v in result.metrics.values())
    _, calibrated = _applied(h, name, {})
    _, plain = _applied(h, name, {"min_expert_tokens": 10**6})
    for stack in calibrated:
        assert not torch.equal(calibrated[stack], plain[stack]), stack


def test_a_later_stage_still_calibrates_experts_an_earlier_one_edited(moe):
    """After a per-expert stage the experts are parametrized (parametrize subclasses them in
    torch's module); a calibrated stage after it still finds and calibrates them."""
    h = moe("mixtral")
    result = h.measure(["prune.magnitude", ("quant.gptq", {"bits": 4})])
    assert result.details["calibration"][EXPERTS.format(1)]["reached"] == 4
    assert result.details["touched"]["share"] >= 0.95


def test_a_dense_model_result_carries_no_calibration_record(harness):
    assert "calibration" not in harness.measure([("prune.wanda", {"sparsity": 0.5})]).details


@pytest.mark.parametrize(
    ("name", "module", "calibrates"),
    [
        ("quant.gptq", "pytest_hemorrhage.modifications.hessian", "sequential_hessians"),
        ("prune.sparsegpt", "pytest_hemorrhage.modifications.hessian", "sequential_hessians"),
        ("quant.awq", "pytest_hemorrhage.modifications.quant.awq", "walk_blocks"),
    ],
)
def test_a_result_read_from_the_disk_cache_still_reports_its_coverage(
    tiny, make_harness, tmp_path, monkeypatch, name, module, calibrates
):
    """The routed token counts are stored with the solve: a second session applying it from
    the disk cache, without calibrating, reports the same coverage."""
    import importlib

    def fresh():
        model = build("gpt_oss", len(tiny.tokenizer))
        _unreachable(model, 3)
        return make_harness(
            model,
            tiny.tokenizer,
            spec="gpt_oss-3",
            tokens=256,
            calibration_windows=2,
            cache_dir=tmp_path,
        )

    first = fresh().measure([name]).details["calibration"]
    assert first[EXPERTS.format(0)]["fallback"] == [3]

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibrated again")

    monkeypatch.setattr(importlib.import_module(module), calibrates, no_calibration)
    assert fresh().measure([name]).details["calibration"] == first


def test_an_experts_call_by_keyword_is_routed_as_by_position(tiny):
    """Routing read from keyword arguments too (the names transformers' MoE blocks use)."""
    model = build("mixtral", len(tiny.tokenizer))
    stacks = expert_stacks(model, "model.layers.0")
    module = stacks[0].module
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 64, generator=gen)
    index = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(10)])
    weights = torch.rand(10, 2, generator=gen)
    calls = []
    for kwargs in (
        {},
        {"hidden_states": hidden, "top_k_index": index, "top_k_weights": weights},
    ):
        got = {}
        handles = routed_hooks(stacks, lambda s, e, x, got=got: got.__setitem__((s.param, e), x))
        try:
            with torch.no_grad():
                out = module(**kwargs) if kwargs else module(hidden, index, weights)
        finally:
            for h in handles:
                h.remove()
        calls.append((out, got))
    (out, got), (out_kw, got_kw) = calls
    assert torch.equal(out, out_kw) and got.keys() == got_kw.keys() and len(got) == 8
    assert all(torch.equal(got[k], got_kw[k]) for k in got)
    assert "forward" not in module.__dict__  # removed: the module's own forward again


@pytest.mark.parametrize("name", ["quant.gptq", "prune.sparsegpt", "lowrank.asvd"])
def test_applying_evaluates_each_edited_stack_a_fixed_number_of_times(
    tiny, make_harness, monkeypatch, name
):
    """Reading expert e + 1's weight after expert e's edit must not rebuild every expert:
    the edited stacks are evaluated as often with 8 experts as with 4."""
    from pytest_hemorrhage.modifications.experts import ExpertEdit

    calls = [0]
    forward = ExpertEdit.forward

    def counted(self, w):
        calls[0] += 1
        return forward(self, w)

    monkeypatch.setattr(ExpertEdit, "forward", counted)
    counts = []
    for experts in (4, 8):
        model = build("mixtral", len(tiny.tokenizer), num_local_experts=experts)
        h = make_harness(model, tiny.tokenizer, spec=f"mixtral-{experts}", calibration_windows=2)
        calls[0] = 0
        _applied(h, name, {})
        counts.append(calls[0])
    assert counts[0] == counts[1]
