"""quant.kv_cache: transformers' QuantizedCache, measured where it acts (cached keys)."""

from __future__ import annotations

import pytest
import torch
from bit_identity import assert_restored, snapshot

from pytest_hemorrhage.errors import HemorrhageError
from pytest_hemorrhage.modifications import make

GENERATION = frozenset({"gen_mismatch"})


@pytest.fixture(scope="module")
def by_bits(harness):
    before = snapshot(harness.model)
    measured = {
        b: harness.measure([("quant.kv_cache", {"bits": b})], GENERATION) for b in (8, 4, 2)
    }
    assert_restored(harness.model, before)
    assert "forward" not in vars(harness.model)  # the wrapper is gone, not shadowed by a copy
    return measured


def test_damage_grows_as_bits_fall(by_bits):
    kl = {b: r.metrics["kl_mean"] for b, r in by_bits.items()}
    gen = {b: r.metrics["gen_mismatch"] for b, r in by_bits.items()}
    # measured on the bundled model (16 windows, 64-token chunks): kl_mean 1.3e-6 / 3.6e-4 /
    # 1.6e-2 at 8 / 4 / 2 bits (1.4e-3 and 4e-2 at 4 and 2 bits with 32-token chunks)
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
    """transformers quantizes the first (prefill) chunk as it is cached; a residual window as
    long as the whole window keeps every later chunk in full precision: less damage, not none
    (measured at 32-token chunks: kl_mean 0.012 vs 0.040 at 2 bits). Two chunks (the default
    64) could not tell: only the first chunk is ever read, quantized either way."""
    quantized = harness.measure([("quant.kv_cache", {"bits": 2, "chunk": 32})]).metrics["kl_mean"]
    kept = harness.measure([("quant.kv_cache", {"bits": 2, "chunk": 32, "residual_length": 256})])
    assert 0 < kept.metrics["kl_mean"] < 0.5 * quantized


@pytest.mark.parametrize("residual_length", [0, 40])
def test_the_last_chunk_is_not_requantized_and_no_logit_changes(
    harness, monkeypatch, residual_length
):
    """Nothing reads what the last chunk caches: transformers' QuantizedCache fed every chunk
    as is gives the same logits bit for bit, with one re-quantization per layer more."""
    from transformers.cache_utils import HQQQuantizedLayer

    from pytest_hemorrhage.modifications.quant.kv_cache import (
        _cache_keyword,
        _new_cache,
        quantized_forward,
    )

    calls = []
    real = HQQQuantizedLayer._quantize
    monkeypatch.setattr(
        HQQQuantizedLayer, "_quantize", lambda self, *a, **k: calls.append(1) or real(self, *a, **k)
    )
    config = make("quant.kv_cache", {"bits": 2, "chunk": 32, "residual_length": residual_length})
    model, ids = harness.model, harness.windows.eval[:4]
    with torch.inference_mode():
        cache, as_is = _new_cache(config, model), []
        for start in range(0, ids.shape[1], 32):
            as_is.append(
                model(
                    input_ids=ids[:, start : start + 32],
                    use_cache=True,
                    **{_cache_keyword(model): cache},
                ).logits
            )
        fed, calls[:] = len(calls), []
        ours = quantized_forward(config, model)(input_ids=ids).logits
    assert torch.equal(ours, torch.cat(as_is, 1))
    layers = model.config.num_hidden_layers
    # keys and values per layer: the prefill, then every chunk that fills the residual window
    assert fed - len(calls) == (2 * layers if residual_length < 32 else 0)
    assert len(calls) == 2 * layers * (3 if residual_length < 32 else 2)


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
