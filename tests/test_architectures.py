"""The architecture matrix: every built-in modification with its default parameters on tiny
random-init models of 21 architectures (``architectures.py``: 2 blocks, hidden size 64, the
bundled tokenizer, no download), measured over 2 windows of 128 tokens with 2 calibration
windows.

Every cell either measures (finite metrics, or non-finite outputs counted as such: a bit flip
in an exponent makes a model emit NaN) or refuses in one line that starts with the
modification's name; nothing else may be raised, and the model's tensors come back bit for
bit. A refusal that suggests other methods (``use A, B or C instead``) suggests only methods
that measure on that model. The cells that crashed or were wrongly refused before must
measure (``MEASURES``).

The whole matrix runs by default, none of it marked ``slow`` (which CI runs anyway): its 21
architectures x 31 modifications took 21-44 s on one (shared, loaded) core, tiny models over 2
windows, plus the bundled model's loading that other tests share.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from architectures import ARCHITECTURES, build
from bit_identity import assert_restored, snapshot
from harnesses import build_harness

from pytest_hemorrhage.errors import HemorrhageError
from pytest_hemorrhage.modifications import names, registry

BUILT_IN = [n for n in names() if registry.get(n)[1].__module__.startswith("pytest_hemorrhage.")]

# cells that crashed (a raw traceback) or were refused for a wrong reason before
MEASURES = {
    "gpt2": {"prune.sparsegpt"},  # Conv1D: the transposed weight's copy kept its strides
    "mistral": {"quant.kv_cache"},  # sliding-window layers: transformers' QuantizedCache
    "gemma2": {"quant.kv_cache"},  # refuses them, though masks keep the logits exact
    "gemma3": {"quant.kv_cache"},
    "gpt_oss": {"quant.kv_cache"},
    "phi3": {"prune.heads", "prune.channels", "prune.slicegpt"},  # fused qkv_proj, gate_up_proj
}
# the real blocker each prune.slicegpt refusal names
SLICEGPT_REFUSED = {
    **dict.fromkeys(("gpt2", "opt", "gpt_neox", "falcon", "stablelm", "starcoder2"), "LayerNorm"),
    **dict.fromkeys(("gemma2", "gemma3", "olmo2"), "norms on the sublayers' outputs"),
    **dict.fromkeys(
        ("qwen3_moe", "qwen2_moe", "mixtral", "gpt_oss", "deepseek_v3"), "mixture of experts"
    ),
}
_SUGGESTED = re.compile(r"; use (.+) instead$")


_HARNESSES: dict[str, object] = {}


def _harness(tiny, name: str, **overrides):
    """A Harness on architecture ``name`` (one per architecture and worker)."""
    key = f"{name}{overrides or ''}"
    if key not in _HARNESSES:
        model = build(name, len(tiny.tokenizer), **overrides)
        _HARNESSES[key] = build_harness(
            model, tiny.tokenizer, spec=f"{key}-random", tokens=256, calibration_windows=2
        )
    return _HARNESSES[key]


def _cell(harness, name: str) -> str | None:
    """Measure ``name`` with its defaults: None if it measured, else its one-line refusal."""
    config = registry.make(name, {})
    try:
        result = harness.measure([config])
    except HemorrhageError as exc:
        message = str(exc)
        assert "\n" not in message and message.startswith(f"{name}:"), message
        return message
    finite = all(math.isfinite(v) for v in result.metrics.values())
    assert finite or result.nonfinite > 0, result.metrics
    return None


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_every_modification_measures_or_refuses_in_one_line_and_restores(tiny, architecture):
    harness = _harness(tiny, architecture)
    before = snapshot(harness.model)
    refused = {}
    for name in BUILT_IN:
        refusal = _cell(harness, name)
        assert_restored(harness.model, before)
        if refusal is not None:
            refused[name] = refusal
    assert not MEASURES.get(architecture, set()) & refused.keys(), refused
    for name, refusal in refused.items():
        suggested = _SUGGESTED.search(refusal)
        if suggested:
            alternatives = re.split(r", | or ", suggested.group(1))
            methods = {a.removesuffix(" (experts included)") for a in alternatives}
            assert not methods & refused.keys(), (name, refusal)
    if architecture in SLICEGPT_REFUSED:
        assert SLICEGPT_REFUSED[architecture] in refused["prune.slicegpt"]
    else:
        assert "prune.slicegpt" not in refused, refused["prune.slicegpt"]


def test_mla_inputs_reach_the_int8_kernel_flattened(tiny):
    """DeepSeek's multi-head latent attention feeds kv_b_proj a 4-D input; bitsandbytes'
    LLM.int8() takes (tokens, features) rows (its experts left out: bnb has no 3-D kernel)."""
    harness = _harness(tiny, "deepseek_v3")
    before = snapshot(harness.model)
    result = harness.measure([("quant.bnb_int8", {"exclude": ("*experts*",)})])
    assert 0 < result.metrics["kl_mean"] < 1e-3
    assert_restored(harness.model, before)


@pytest.mark.parametrize("architecture", ["gpt_oss", "gemma2", "gemma3"])
def test_quantized_cache_keeps_sliding_windows_exact(tiny, architecture):
    """Sliding-window layers (window 32) read a cache holding every earlier token of the
    128-token window, chunks of 16 tokens: the model's masks keep each layer to its window, so
    at 8 bits the logits are the reference's up to rounding. Had the mask let the whole cache
    through, widening the window would not change them; it does (by far more)."""
    kl = {}
    for window in (32, 4096):
        harness = _harness(tiny, architecture, sliding_window=window)
        result = harness.measure([("quant.kv_cache", {"bits": 8, "chunk": 16})])
        assert result.details["kv_cache"]["sliding_window_layers"] == [0]
        assert result.details["kv_cache"]["sliding_window"] == [window]
        kl[window] = result.metrics["kl_mean"]
        harness.check_pristine()
    assert kl[32] < 1e-4, kl
    narrow, wide = _harness(tiny, architecture), _harness(tiny, architecture, sliding_window=4096)
    ids = narrow.context.calibration_windows(1)
    with torch.no_grad():
        assert not torch.allclose(narrow.context.logits(ids), wide.context.logits(ids), atol=1e-3)


def _split_like_llama(phi3):
    """The Llama computing what ``phi3`` computes: its fused projections split in two/three."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = phi3.config
    llama = LlamaForCausalLM(
        LlamaConfig(
            **{k: getattr(c, k) for k in ("vocab_size", "hidden_size", "intermediate_size")},
            **{k: getattr(c, k) for k in ("num_hidden_layers", "num_attention_heads")},
            **{k: getattr(c, k) for k in ("num_key_value_heads", "rms_norm_eps")},
        )
    ).eval()
    q, kv = c.hidden_size, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    state = {}
    for key, value in phi3.state_dict().items():
        if "qkv_proj" in key:
            for part, tensor in zip(("q", "k", "v"), value.split([q, kv, kv]), strict=True):
                state[key.replace("qkv", part)] = tensor
        elif "gate_up_proj" in key:
            for part, tensor in zip(("gate", "up"), value.chunk(2), strict=True):
                state[key.replace("gate_up", part)] = tensor
        else:
            state[key] = value
    llama.load_state_dict(state)
    return llama


@pytest.mark.parametrize(
    "stage",
    [
        ("prune.heads", {"heads": ((0, 1), (1, 2), (1, 3))}),  # block 1's second kv head too
        ("prune.channels", {"fraction": 0.25, "importance": "weight"}),
        ("prune.slicegpt", {"fraction": 0.25}),
    ],
    ids=lambda s: s[0] if isinstance(s, tuple) else "",
)
def test_phi3_fused_projections_prune_as_the_same_model_with_separate_ones(tiny, stage):
    """Phi-3's qkv_proj (q heads, then k, then v rows) and gate_up_proj (gate rows, then up)
    pruned give the logits of the same weights split into Llama's q/k/v and gate/up."""
    phi3 = _harness(tiny, "phi3")
    split = build_harness(
        _split_like_llama(phi3.model), tiny.tokenizer, spec="s", tokens=256, calibration_windows=2
    )
    ids = phi3.context.calibration_windows(2)
    with torch.no_grad():
        torch.testing.assert_close(phi3.context.logits(ids), split.context.logits(ids))
        with phi3.modified([stage]), split.modified([stage]):
            fused, separate = phi3.context.logits(ids), split.context.logits(ids)
            # rows nothing reads (k/v of a fully pruned group) leave the logits alike: the
            # weights themselves must match too
            for fused_layer, llama_layer in zip(
                phi3.model.model.layers, split.model.model.layers, strict=True
            ):
                _assert_same_weights(fused_layer, llama_layer)
        torch.testing.assert_close(fused, separate, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(fused, phi3.context.logits(ids), atol=1e-3)  # it pruned


def _assert_same_weights(phi3_block, llama_block) -> None:
    """The (effective) weights of a Phi-3 block are its Llama split's, concatenated."""
    attn, mlp = llama_block.self_attn, llama_block.mlp
    for fused, parts in (
        (phi3_block.self_attn.qkv_proj, (attn.q_proj, attn.k_proj, attn.v_proj)),
        (phi3_block.mlp.gate_up_proj, (mlp.gate_proj, mlp.up_proj)),
        (phi3_block.self_attn.o_proj, (attn.o_proj,)),
        (phi3_block.mlp.down_proj, (mlp.down_proj,)),
    ):
        expected = torch.cat([p.weight for p in parts])
        torch.testing.assert_close(fused.weight, expected, rtol=1e-5, atol=1e-6)
