"""quant.kv_cache: a quantized KV cache quantizing each entry once, measured where it acts
(cached keys), on hybrid models with the layers that can be quantized."""

from __future__ import annotations

import math

import pytest
import torch
from bit_identity import assert_restored, snapshot

from pytest_hemorrhage.errors import HemorrhageError
from pytest_hemorrhage.modifications import make
from pytest_hemorrhage.report.describe import describe_touched

GENERATION = frozenset({"gen_mismatch"})


@pytest.fixture(scope="module")
def by_bits(harness):
    before = snapshot(harness.model)
    measured = {
        b: harness.measure([("quant.kv_cache", {"bits": b})], GENERATION) for b in (8, 4, 2)
    }
    assert_restored(harness.model, before)
    assert "forward" not in vars(harness.model)  # the wrapper is gone, not shadowed by a copy
    # the one-pass attention was transformers' for its passes only
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert harness.model.config._attn_implementation == "sdpa"
    for registry in (AttentionInterface, AttentionMaskInterface):
        assert "hemorrhage_kv_cache" not in registry._global_mapping
    return measured


def test_damage_grows_as_bits_fall(by_bits):
    kl = {b: r.metrics["kl_mean"] for b, r in by_bits.items()}
    gen = {b: r.metrics["gen_mismatch"] for b, r in by_bits.items()}
    # measured on the bundled model (16 windows, 64-token chunks): kl_mean 1.2e-6 / 3.3e-4 /
    # 1.4e-2 at 8 / 4 / 2 bits (9.7e-4 and 3.6e-2 at 4 and 2 bits with 32-token chunks)
    assert kl[8] < 1e-5 < kl[4] < kl[2] and kl[2] > 10 * kl[4]
    assert gen[8] <= gen[4] <= gen[2] and gen[2] > 0.5


def test_it_acts_only_on_tokens_that_read_the_cache(harness):
    """A chunk as long as the window scores every token in one pass, before anything is
    cached: no token reads a quantized key, so nothing changes."""
    seq_len = harness.windows.eval.shape[1]
    whole = harness.measure([("quant.kv_cache", {"bits": 2, "chunk": seq_len})])
    assert whole.metrics["kl_mean"] < 1e-9 and whole.metrics["top1_disagreement"] == 0
    chunked = harness.measure([("quant.kv_cache", {"bits": 2, "chunk": seq_len // 2})])
    assert chunked.metrics["kl_mean"] > 1e-3


def test_kept_residual_tokens_stay_in_full_precision(harness):
    """The newest ``residual_length`` cached tokens are read unquantized: with 32-token chunks
    and a 32-token residual, each chunk reads the one before it in full precision and only the
    older ones quantized (less damage, not none); a residual as long as the window quantizes
    nothing that is read."""
    chunks = {"bits": 2, "chunk": 32}
    quantized = harness.measure([("quant.kv_cache", chunks)]).metrics["kl_mean"]
    kept = harness.measure([("quant.kv_cache", {**chunks, "residual_length": 32})])
    assert 0 < kept.metrics["kl_mean"] < 0.5 * quantized
    whole = harness.measure([("quant.kv_cache", {**chunks, "residual_length": 128})])
    assert whole.metrics["kl_mean"] < 1e-9


def _forward(model, options, ids, chunked=False, **keywords):
    """The output for ``ids`` through a quantized cache (scored in one pass, or ``chunked``
    through the cache), and the sizes of what was handed the quantizer, call by call."""
    from transformers.cache_utils import HQQQuantizedLayer, QuantoQuantizedLayer

    from pytest_hemorrhage.modifications.quant.kv_cache import (
        _cache_keyword,
        _chunked,
        quantized_forward,
    )

    config = make("quant.kv_cache", options)
    layer = HQQQuantizedLayer if config.backend == "hqq" else QuantoQuantizedLayer
    seen = []
    real = layer._quantize

    def counted(self, tensor, axis):
        seen.append(tensor.numel())
        return real(self, tensor, axis)

    layer._quantize = counted
    try:
        with torch.inference_mode():
            if chunked:
                out = _chunked(model.forward, config, model, _cache_keyword(model), ids, keywords)
            else:
                out = quantized_forward(config, model)(input_ids=ids, **keywords)
    finally:
        layer._quantize = real
    return out, seen


@pytest.mark.parametrize("chunked", [False, True], ids=["one-pass", "chunked"])
@pytest.mark.parametrize(
    ("chunk", "residual_length", "backend"),
    [(32, 0, "hqq"), (32, 40, "hqq"), (16, 0, "hqq"), (128, 0, "hqq"), (32, 40, "quanto")],
)
def test_each_token_is_quantized_once(harness, chunk, residual_length, backend, chunked):
    """Every cached key and value is quantized once, when it leaves the residual window; what
    the last chunk caches is never read, so never quantized. Chunked, in one quantizer call per
    chunk (keys and values of every layer together); in one pass, one call per layer for its
    keys and one for its values. transformers' QuantizedCache would quantize C + 2C + ... +
    (n-1)C positions per layer instead, re-quantizing the whole cache."""
    if backend == "quanto":
        pytest.importorskip("optimum.quanto")
    config = harness.model.config
    ids = harness.windows.eval[:2]
    options = {"bits": 4, "chunk": chunk, "residual_length": residual_length, "backend": backend}
    _, seen = _forward(harness.model, options, ids, chunked=chunked)
    per_token = 2 * ids.shape[0] * config.num_key_value_heads * config.head_dim  # keys, values
    last = (ids.shape[1] - 1) % chunk + 1
    cached = max(0, ids.shape[1] - last - residual_length)
    assert sum(seen) == cached * per_token * config.num_hidden_layers
    if not chunked:
        assert len(seen) == (2 * config.num_hidden_layers if cached else 0)
        return
    reading = -(-ids.shape[1] // chunk) - 1  # chunks whose entries a later chunk reads
    quantizing = sum(1 for c in range(reading) if (c + 1) * chunk > residual_length)
    assert len(seen) == quantizing


def test_a_scored_window_allocates_its_cache_once(harness):
    """The wrapper knows the window's length: each quantized layer allocates one buffer of
    it, and every chunk reads a view of that buffer (no copy of the cache per chunk)."""
    model, ids = harness.model, harness.windows.eval[:2]
    caches = []

    def keep(module, args, kwargs):
        caches.append(kwargs.get("cache", kwargs.get("past_key_values")))

    hook = model.base_model.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        _forward(harness.model, {"bits": 4, "chunk": 32}, ids, chunked=True)
    finally:
        hook.remove()
    assert len(caches) == 4 and all(c is caches[0] for c in caches)
    for layer in caches[0].layers:
        assert [b.shape[-2] for b in layer.buffers] == [ids.shape[1]] * 2
        assert layer.keys.data_ptr() == layer.buffers[0].data_ptr()


def test_close_to_transformers_quantized_cache_at_8_bits(harness):
    """transformers' QuantizedCache (hqq, the same per-token groups) re-quantizes the whole
    cache at every chunk; ours quantizes each entry once. At 8 bits both are finite and differ
    from each other by a small fraction of what either changes (4 windows of 128 tokens in
    32-token chunks; the figures are in the module docstring)."""
    from transformers.cache_utils import QuantizedCache

    from pytest_hemorrhage.modifications.quant.kv_cache import _cache_keyword

    model, ids = harness.model, harness.windows.eval[:4]
    group = model.config.head_dim
    ours = _forward(harness.model, {"bits": 8, "chunk": 32, "group_size": group}, ids)[0].logits
    cache = QuantizedCache(
        "hqq",
        model.config,
        nbits=8,
        axis_key=1,
        axis_value=1,
        q_group_size=group,
        residual_length=0,
    )
    theirs = []
    with torch.inference_mode():
        plain = model(input_ids=ids, use_cache=False).logits
        for start in range(0, ids.shape[1], 32):
            chunk = ids[:, start : start + 32]
            out = model(input_ids=chunk, use_cache=True, **{_cache_keyword(model): cache})
            theirs.append(out.logits)
    theirs = torch.cat(theirs, 1)
    assert torch.isfinite(ours).all()
    damage = (theirs - plain).abs().max()
    assert 0 < (ours - theirs).abs().max() < 0.01 * damage  # measured: 0.0034
    assert (ours - plain).abs().max() < 2 * damage
    assert torch.equal(ours[:, :32], plain[:, :32])  # the first chunk reads no cache


def test_a_forward_hook_on_the_body_sees_every_chunk(harness):
    """Chunked, keywords the wrapper does not own reach each chunk's forward: a forward hook on
    ``model.base_model`` sees every chunk's hidden states, ``logits_to_keep=1`` makes each
    chunk's head compute one position and returns the sequence's last one, and
    ``output_hidden_states`` comes back whole. In one pass, the hook sees the whole window."""
    model, ids = harness.model, harness.windows.eval[:2]
    options = {"bits": 4, "chunk": 32}
    hidden, heads = [], []
    hooks = [
        model.base_model.register_forward_hook(lambda m, a, out: hidden.append(out[0])),
        model.lm_head.register_forward_hook(lambda m, a, out: heads.append(a[0].shape[1])),
    ]
    try:
        whole = _forward(harness.model, options, ids, True, output_hidden_states=True)[0]
        body, hidden[:], heads[:] = torch.cat(hidden, 1), [], []
        last = _forward(harness.model, options, ids, True, logits_to_keep=1)[0]
        assert [h.shape[1] for h in hidden] == [32] * 4 and heads == [1] * 4
        tail = _forward(harness.model, options, ids, True, logits_to_keep=40)[
            0
        ]  # across two chunks
        pieces, hidden[:], heads[:] = hidden[:4], [], []
        _forward(harness.model, options, ids, logits_to_keep=1)
        assert [h.shape[1] for h in hidden] == [128] and heads == [1]
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.equal(torch.cat(pieces, 1), body)
    assert len(whole.hidden_states) == model.config.num_hidden_layers + 1
    assert torch.equal(whole.hidden_states[-1], body)
    assert last.logits.shape[1] == 1
    torch.testing.assert_close(last.logits[:, 0], whole.logits[:, -1])
    torch.testing.assert_close(tail.logits, whole.logits[:, -40:])


@pytest.mark.parametrize(
    "options",
    [
        {"bits": 8, "chunk": 32},
        {"bits": 4, "chunk": 32},
        {"bits": 2, "chunk": 16, "residual_length": 40},
        {"bits": 4, "chunk": 64, "group_size": 16},
    ],
)
def test_one_pass_scores_as_the_chunks_do(harness, options):
    """A window scored in one pass (each chunk's queries attending to earlier chunks' keys and
    values quantized) gives the logits of the same window fed chunk by chunk through the cache,
    also in a left-padded batch, up to HQQ's stopping rule, which sees other blocks (measured:
    logits within 1.5% of what the cache moves them by, kl_mean within 0.01%)."""
    ids = harness.windows.eval[:4]
    padding = torch.ones_like(ids)
    padding[:2, :20] = 0
    for keywords in ({}, {"attention_mask": padding}):
        one, seen = _forward(harness.model, options, ids, **keywords)
        chunked = _forward(harness.model, options, ids, chunked=True, **keywords)[0]
        with torch.inference_mode():
            plain = harness.model(input_ids=ids, **keywords).logits
        assert len(seen) == 2 * harness.model.config.num_hidden_layers  # one pass it was
        moved = (chunked.logits - plain).abs().max()
        assert (one.logits - chunked.logits).abs().max() <= 0.02 * moved
        assert _kl(plain, one.logits) == pytest.approx(_kl(plain, chunked.logits), rel=1e-3)
    # the padding reached the attention: the padded windows' logits moved
    assert (
        one.logits[:2, 20:] - _forward(harness.model, options, ids)[0].logits[:2, 20:]
    ).abs().max() > 1


def test_a_layer_missed_by_the_one_pass_sends_the_model_to_chunks(harness, monkeypatch):
    """A quantized layer whose attention does not come through the one-pass attention (here
    one with a config of its own, so it keeps SDPA) would be scored unquantized: the wrapper
    sees it, scores chunk by chunk instead, and keeps to chunks for that model."""
    import copy

    from transformers.cache_utils import HQQQuantizedLayer

    from pytest_hemorrhage.modifications.quant.kv_cache import (
        _cache_keyword,
        _chunked,
        quantized_forward,
    )

    model, ids = harness.model, harness.windows.eval[:2]
    config = make("quant.kv_cache", {"bits": 4, "chunk": 32})
    calls = []
    real = HQQQuantizedLayer._quantize
    monkeypatch.setattr(
        HQQQuantizedLayer, "_quantize", lambda self, t, axis: calls.append(1) or real(self, t, axis)
    )
    attention = model.model.layers[2].self_attn
    monkeypatch.setattr(attention, "config", copy.copy(attention.config))
    details = {}
    forward = quantized_forward(config, model, details)
    assert details["scoring"] == "in one pass"
    with torch.inference_mode():
        first = forward(input_ids=ids).logits
        tried = len(calls)
        second = forward(input_ids=ids).logits
        chunked = _chunked(model.forward, config, model, _cache_keyword(model), ids, {}).logits
    assert torch.equal(first, chunked) and torch.equal(second, chunked)
    chunks = len(calls) - tried  # the second call and _chunked: 3 calls each (chunks 1-3)
    assert chunks == 6 and tried == 2 * 3 + 3  # keys and values of layers 0, 1, 3; then chunks
    assert details["scoring"] == (
        "in chunks through the cache: one pass failed (the attention of layers 2 did not come "
        "through it)"
    )


def test_eager_attention_is_scored_in_chunks(harness, monkeypatch):
    """The one pass stands in for SDPA only: a model attending eagerly is fed in chunks, and
    the result says so."""
    from pytest_hemorrhage.modifications.quant.kv_cache import (
        _cache_keyword,
        _chunked,
        quantized_forward,
    )

    model, ids = harness.model, harness.windows.eval[:2]
    monkeypatch.setattr(model.config, "_attn_implementation_internal", "eager")
    config, details = make("quant.kv_cache", {"bits": 4, "chunk": 32}), {}
    forward = quantized_forward(config, model, details)
    assert (
        details["scoring"] == "in chunks through the cache: eager attention (one pass takes SDPA)"
    )
    with torch.inference_mode():
        chunked = _chunked(model.forward, config, model, _cache_keyword(model), ids, {})
        assert torch.equal(forward(input_ids=ids).logits, chunked.logits)


def _kl(baseline, modified):
    """Mean KL divergence of ``modified``'s next-token distributions from ``baseline``'s."""
    p, q = baseline.log_softmax(-1), modified.log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_gpt2_layout(gpt2):
    before = snapshot(gpt2.model)
    result = gpt2.measure([("quant.kv_cache", {"bits": 2})], GENERATION)
    assert_restored(gpt2.model, before)
    # random-init GPT-2 attends almost uniformly: small damage, but far above no cache read
    seq_len = gpt2.windows.eval.shape[1]
    unread = gpt2.measure([("quant.kv_cache", {"bits": 2, "chunk": seq_len})])
    assert result.metrics["kl_mean"] > 1e-7 > unread.metrics["kl_mean"] * 100


def test_bad_configs_and_models_are_clear_errors(harness):
    with pytest.raises(HemorrhageError, match="bits=3 is not valid; choose one of 2, 4, 8"):
        make("quant.kv_cache", {"bits": 3})
    with pytest.raises(HemorrhageError, match="bits=8 is not valid; choose one of 2, 4"):
        make("quant.kv_cache", {"backend": "quanto", "bits": 8})  # quanto's layer takes 2, 4
    with pytest.raises(HemorrhageError, match="include/exclude do not apply"):
        make("quant.kv_cache", {"include": ("*.mlp.*",)})
    before = snapshot(harness.model)
    with pytest.raises(HemorrhageError, match="needs the optimum-quanto package") as error:
        with harness.modified([("quant.kv_cache", {"backend": "quanto"})]):
            pass
    if error is None:  # pragma: no cover - optimum-quanto installed: nothing to refuse
        pytest.skip("optimum-quanto is installed")
    assert_restored(harness.model, before)


def test_a_model_without_transformers_cache_is_refused(harness):
    from pytest_hemorrhage.modifications.registry import Patch, apply

    class Plain(torch.nn.Module):
        def forward(self, ids):
            return ids

    with pytest.raises(HemorrhageError, match="takes no transformers cache"):
        apply(make("quant.kv_cache"), Plain(), Patch(Plain()), harness.context)


def test_an_encoder_is_refused(harness):
    from transformers import BertConfig, BertModel

    from pytest_hemorrhage.modifications.registry import Patch, apply

    bert = BertModel(
        BertConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
    ).eval()
    with pytest.raises(HemorrhageError, match="does not generate \\(an encoder\\)"):
        apply(make("quant.kv_cache"), bert, Patch(bert), harness.context)


# tiny hybrids (4 blocks, hidden size 64): layer kinds a quantized layer does not stand in for
_HYBRIDS = {
    "lfm2": ("Lfm2Config", "Lfm2ForCausalLM", {"layer_types": ["conv", "full_attention"] * 2}),
    "llama4": (
        "Llama4TextConfig",
        "Llama4ForCausalLM",
        {
            "attention_chunk_size": 32,
            "head_dim": 16,
            "num_local_experts": 2,
            "intermediate_size_mlp": 128,
            "no_rope_layers": [1, 1, 1, 0],
        },
    ),
    "gemma3n": (
        "Gemma3nTextConfig",
        "Gemma3nForCausalLM",
        {
            "num_kv_shared_layers": 2,
            "head_dim": 16,
            "layer_types": ["sliding_attention", "full_attention"] * 2,
            "sliding_window": 32,
            "laurel_rank": 4,
            "hidden_size_per_layer_input": 8,
            "vocab_size_per_layer_input": 64,
            "activation_sparsity_pattern": [0.0] * 4,
            "altup_num_inputs": 2,
        },
    ),
}
_UNQUANTIZED = {
    "lfm2": ([0, 2], "conv", "no per-token keys and values"),
    "llama4": ([0, 1, 2], "chunked_attention", "keeps only the current attention chunk"),
    "gemma3n": ([2, 3], "dummy", "reads another layer's cache"),
}
_SCORING = {
    "lfm2": "in one pass",
    "llama4": "in one pass",
    "gemma3n": "in chunks through the cache: layers 2, 3 read another layer's cache or have no "
    "attention",
}


def _hybrid(tiny, architecture, **overrides):
    """The tiny random-init hybrid ``architecture``, ``overrides`` over its config."""
    import transformers

    config_class, model_class, arguments = _HYBRIDS[architecture]
    config = getattr(transformers, config_class)(
        vocab_size=len(tiny.tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **{**arguments, **overrides},
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return getattr(transformers, model_class)(config).eval()


def test_a_model_with_no_layer_to_quantize_is_refused(tiny, harness):
    from pytest_hemorrhage.modifications.registry import Patch, apply

    model = _hybrid(tiny, "lfm2", layer_types=["conv"] * 4)
    with pytest.raises(HemorrhageError, match="has no attention layer whose cache can be quanti"):
        apply(make("quant.kv_cache"), model, Patch(model), harness.context)


@pytest.mark.parametrize("architecture", list(_HYBRIDS))
def test_hybrid_models_measure_with_the_layers_that_can_be_quantized(
    tiny, make_harness, architecture
):
    """Convolution (LFM2), chunked-attention (Llama 4) and shared-cache (Gemma 3n) layers keep
    transformers' unquantized layer; the others are quantized, and the result says which."""
    model = _hybrid(tiny, architecture)
    harness = make_harness(model, tiny.tokenizer, spec=architecture, tokens=256)
    before = snapshot(model)
    result = harness.measure([("quant.kv_cache", {"bits": 2, "chunk": 32})])
    assert_restored(model, before)
    layers, kind, why = _UNQUANTIZED[architecture]
    details = result.details["kv_cache"]
    (unquantized,) = details["unquantized"]
    assert unquantized["layers"] == layers and unquantized["kind"] == kind
    assert why in unquantized["why"]
    assert sorted(details["quantized_layers"] + layers) == list(range(4))
    assert details["scoring"] == _SCORING[architecture]
    quantized = 4 - len(layers)
    assert describe_touched(result.to_dict()) == (
        f"touched no weights: it changes the KV cache; KV cache quantized in {quantized} of 4 "
        f"layers, scored {_SCORING[architecture]}"
    )
    # with a weight modification too, the line still says what the cache covered
    both = harness.measure([("quant.rtn", {"bits": 8}), ("quant.kv_cache", {"chunk": 32})])
    assert describe_touched(both.to_dict()).endswith(
        f"; KV cache quantized in {quantized} of 4 layers, scored {_SCORING[architecture]}"
    )
    assert 0 < result.metrics["kl_mean"] < math.inf
