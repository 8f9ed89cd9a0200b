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
    measured = {b: harness.measure([("quant.kv_cache", {"bits": b})], GENERATION)
                for b in (8, 4, 2)}
    assert_restored(harness.model, before)
    assert "forward" not in vars(harness.model)  # the wrapper is gone, not shadowed by a copy
    return measured


def test_damage_grows_as_bits_fall(by_bits):
    kl = {b: r.metrics["kl_mean"] for b, r in by_bits.items()}
    gen = {b: r.metrics["gen_mismatch"] for b, r in by_bits.items()}
    # measured on the bundled model (16 windows): 8 bits ~1e-6, 4 bits ~1.4e-3, 2 bits ~4e-2
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
    (measured: kl_mean 0.012 vs 0.040 at 2 bits)."""
    quantized = harness.measure([("quant.kv_cache", {"bits": 2})]).metrics["kl_mean"]
    kept = harness.measure([("quant.kv_cache", {"bits": 2, "residual_length": 256})])
    assert 0 < kept.metrics["kl_mean"] < 0.5 * quantized


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

    bert = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=64)).eval()
    with pytest.raises(HemorrhageError, match="does not generate \\(an encoder\\)"):
        apply(make("quant.kv_cache"), bert, Patch(bert), harness.context)
