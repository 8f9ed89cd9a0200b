"""Mixture-of-experts weights stored fused (3-D parameters, as transformers 5 keeps them): every
weight modification applies to each expert's matrix or refuses in one line, every result says
what share of the block weights it touched, and the baseline comes back bit for bit.

The five MoE architectures of ``architectures.py`` (2 blocks, hidden 64, 4 experts, random init).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch
from architectures import build
from bit_identity import assert_restored, snapshot

from pytest_hemorrhage.errors import HemorrhageError
from pytest_hemorrhage.modifications import Modification, get, names, register_modification
from pytest_hemorrhage.modifications.experts import ExpertEdit, expert_stacks
from pytest_hemorrhage.modifications.quant.rtn import rtn_quantize
from pytest_hemorrhage.modifications.registry import names_by_expert_support, select_targets
from pytest_hemorrhage.report.describe import describe_touched, describe_untouched
from pytest_hemorrhage.report.terminal import render_results, render_table

MOE = ("mixtral", "qwen3_moe", "qwen2_moe", "gpt_oss", "deepseek_v3")  # in architectures.py


@pytest.fixture(scope="module")
def moe(tiny):
    """``moe(architecture)``: a Harness (2 windows of 128 tokens) on the tiny random-init model
    of ``architectures.py``, built on first use."""
    from pytest_hemorrhage.harness import Harness
    from pytest_hemorrhage.loading import LoadedModel
    from pytest_hemorrhage.settings import Settings

    built = {}

    def harness(arch: str) -> Harness:
        if arch not in built:
            model = build(arch, len(tiny.tokenizer))
            loaded = LoadedModel(model=model, tokenizer=tiny.tokenizer, spec=f"{arch}-random")
            settings = Settings.defaults(model=loaded.spec, tokens=256, calibration_windows=2)
            built[arch] = Harness(loaded, settings)
        return built[arch]

    return harness


def _built_in(changes: tuple[str, ...]) -> list[str]:
    """The package's own modifications (not those other test files register) that change
    ``changes``."""
    return [
        n
        for n in names()
        if get(n)[1].__module__.startswith("pytest_hemorrhage.") and get(n)[0].changes in changes
    ]


def _expert_parameters(model: torch.nn.Module) -> int:
    return sum(getattr(s.module, s.param).numel() for s in expert_stacks(model))


@pytest.mark.parametrize("arch", MOE)
def test_every_weight_modification_touches_the_experts_or_refuses_in_one_line(moe, arch):
    h = moe(arch)
    before = snapshot(h.model)
    measured, refused = [], {}
    for name in _built_in(("weights",)):
        try:
            result = h.measure([name])
        except HemorrhageError as exc:
            refused[name] = str(exc)
        else:
            measured.append(name)
            touched = result.details["touched"]
            assert touched["share"] >= 0.95, (name, touched)
            assert touched["of"] > _expert_parameters(h.model) > 0
        assert_restored(h.model, before)
    assert measured == names_by_expert_support()  # every per-expert method, and only those
    for name, message in refused.items():
        assert "\n" not in message, name
    experts_refusals = [m for n, m in refused.items() if n != "prune.slicegpt"]
    assert all(
        ".experts.gate_up_proj" in m and "per-expert methods: " in m for m in experts_refusals
    )


def test_modifications_of_structure_or_no_weights_say_what_they_touched(moe):
    h = moe("mixtral")
    heads = h.measure(["prune.heads"]).to_dict()
    assert 0 < heads["details"]["touched"]["share"] < 0.2  # attention only, by design
    assert describe_untouched(heads) == ""  # not noted: structured pruning is partial
    for name, says in [
        ("decode.temperature", "decoding"),
        ("expand.layers", "the block list"),
        ("quant.kv_cache", "the KV cache"),
    ]:
        record = h.measure([(name, {"value": 0.9} if name.startswith("decode") else {})])
        assert record.details["touched"]["share"] is None
        assert describe_touched(record.to_dict()).startswith(
            f"touched no weights: it changes {says}"
        )


def test_include_and_exclude_name_experts_by_parameter_module_and_index(moe):
    h = moe("qwen3_moe")
    stacks = expert_stacks(h.model)
    everything = h.measure([("quant.rtn", {"bits": 4, "include": ("*experts*",)})])
    touched = everything.details["touched"]
    assert touched["parameters"] == _expert_parameters(h.model)
    assert touched["targeted"] and not any("experts" in u for u in touched["untouched"])
    by_module = h.measure([("quant.rtn", {"bits": 4, "include": ("*.mlp.experts",)})])
    assert by_module.details["touched"]["parameters"] == touched["parameters"]

    one = h.measure([("prune.magnitude", {"include": ("*.experts.gate_up_proj[1]",)})])
    gate_up = [s for s in stacks if s.param == "gate_up_proj"]
    per_expert = gate_up[0].module.gate_up_proj[1].numel()
    assert one.details["touched"]["parameters"] == len(gate_up) * per_expert
    assert "model.layers.*.mlp.experts.gate_up_proj[0,2-3]" in one.details["touched"]["untouched"]

    without = h.measure([("noise.gaussian", {"exclude": ("*.experts[0-1]",)})])
    untouched = without.details["touched"]["untouched"]
    assert "model.layers.*.mlp.experts.gate_up_proj[0-1]" in untouched
    assert "model.layers.*.mlp.experts.down_proj[0-1]" in untouched

    with pytest.raises(HemorrhageError, match="no linear layer matches"):
        h.measure([("quant.rtn", {"include": ("*.experts.up_proj[1]",)})])


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_groups_run_along_each_experts_input_dimension(moe, arch):
    """Mixtral stores (experts, out, in), GPT-OSS (experts, in, out): either way each expert's
    RTN groups are runs of its inputs, as for a linear layer."""
    h = moe(arch)
    experts = h.model.model.layers[0].mlp.experts
    original = experts.down_proj.detach().clone()
    transposed = arch == "gpt_oss"
    assert [s.transposed for s in expert_stacks(h.model)] == [transposed] * 4

    def along_inputs(w: torch.Tensor) -> torch.Tensor:  # w: one expert's (out, in) matrix
        return rtn_quantize(w, 3, 16, True)

    with h.modified([("quant.rtn", {"bits": 3, "group_size": 16})]):
        quantized = experts.down_proj.detach().clone()
    for i in range(original.shape[0]):
        w = original[i].t() if transposed else original[i]
        expected = along_inputs(w).t() if transposed else along_inputs(w)
        wrong_way = along_inputs(w.t()).t()
        assert torch.equal(quantized[i], expected)
        assert not torch.equal(quantized[i], wrong_way.t() if transposed else wrong_way)


def test_gguf_quantizes_each_expert_as_llama_cpp_writes_ffn_exps(moe):
    """Each expert's (out, in) matrix is its own GGUF tensor rows: the dequantized blocks of
    the expert's rows, whichever way the stack is stored."""
    from pytest_hemorrhage.modifications.quant.gguf import Gguf, dequantize, plan, quantize

    h = moe("gpt_oss")  # (experts, in, out)
    experts = h.model.model.layers[1].mlp.experts
    original = experts.down_proj.detach().clone()
    config = Gguf(type="Q4_0", activations=False)
    types = {p.name: p.type for p in plan(config, h.model)}
    with h.modified([config]):
        quantized = experts.down_proj.detach().clone()
    for i in range(original.shape[0]):
        qtype = types[f"model.layers.1.mlp.experts.down_proj[{i}]"]
        rows = original[i].t()  # (out, in): llama.cpp's rows run along the inputs
        expected = torch.from_numpy(dequantize(quantize(rows, qtype), qtype)).reshape(rows.shape)
        assert torch.equal(quantized[i], expected.t())


def test_gguf_mixtures_follow_llama_cpp_for_eight_experts():
    """llama.cpp bumps attn_v and attn_k to Q8_0 and attn_output to Q5_K (Q4_K_M) on 8-expert
    models; the experts' down projections follow the ffn_down rule of their block."""
    from pytest_hemorrhage.modifications.quant.gguf import Gguf, plan

    with torch.device("meta"):  # the plan reads shapes only
        model = build("mixtral", 512, hidden_size=256, intermediate_size=256, num_local_experts=8)
    types = {p.name: p.type for p in plan(Gguf(type="Q4_K_M"), model)}
    assert types["model.layers.0.self_attn.v_proj"] == "Q8_0"
    assert types["model.layers.0.self_attn.k_proj"] == "Q8_0"
    assert types["model.layers.0.self_attn.o_proj"] == "Q5_K"
    assert types["model.layers.0.self_attn.q_proj"] == "Q4_K"
    assert {types[f"model.layers.0.mlp.experts.down_proj[{i}]"] for i in range(8)} == {"Q4_K"}
    assert {types[f"model.layers.1.mlp.experts.down_proj[{i}]"] for i in range(8)} == {"Q6_K"}
    assert {types[f"model.layers.1.mlp.experts.gate_up_proj[{i}]"] for i in range(8)} == {"Q4_K"}


def test_eager_experts_evaluate_each_parameter_once_per_call(moe):
    """transformers' eager loop indexes the stacked parameter once per routed expert; the
    per-expert functions still run once per forward of the experts module."""
    h = moe("mixtral")
    h.model.set_experts_implementation("eager")
    try:
        runs = []
        with h.modified([("quant.rtn", {"bits": 4})]) as patch:
            edits = [m for m in patch.model.modules() if isinstance(m, ExpertEdit)]
            hooks = [e.register_forward_hook(lambda *a: runs.append(1)) for e in edits]
            h.context.logits(h.windows.eval[:1])
            for hook in hooks:
                hook.remove()
        assert len(edits) == 4  # gate_up_proj and down_proj of two blocks
        assert len(runs) == len(edits)
    finally:
        h.model.set_experts_implementation("grouped_mm")


@dataclass(frozen=True, kw_only=True)
class AttentionOnly(Modification):
    """A user's modification choosing its own layers: attention only, whatever ``include`` says."""

    sigma: float = 0.1


def test_the_summary_notes_a_weight_modification_that_left_experts_unchanged(moe, monkeypatch):
    from pytest_hemorrhage.modifications import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # keep it test-local

    @register_modification("test.attention_only", AttentionOnly)
    def attention_only(config, model, patch, context):
        for target in select_targets(model, ("*.self_attn.*",), (), config.name):
            patch.parametrize(target, lambda w: w * (1 + config.sigma))

    h = moe("mixtral")
    records = [
        {**h.measure([config]).to_dict(), "nodeid": f"test_moe.py::test_{i}", "budget": {}}
        for i, config in enumerate(
            [AttentionOnly(), dataclasses.replace(AttentionOnly(), include=("*.self_attn.*",))]
        )
    ]
    note = describe_untouched(records[0])
    assert note.startswith("test.attention_only left 89% of the block weights unchanged")
    assert "model.layers.*.mlp.experts.gate_up_proj" in note
    assert describe_untouched(records[1]) == ""  # include says the experts are left on purpose
    summary = render_results(records, width=200)
    assert summary.count("left 89% of the block weights unchanged") == 1
    verbose = render_table(records, width=200)
    assert verbose.count("touched 11% of the block weights") == 2
