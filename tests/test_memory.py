"""The window checks before the baseline loads: its context, and the memory a measure needs."""

from __future__ import annotations

import pytest

from pytest_hemorrhage.errors import HemorrhageError
from pytest_hemorrhage.forward import chunk_rows
from pytest_hemorrhage.loading import BUNDLED_MODEL, model_context
from pytest_hemorrhage.memory import (
    RUNTIME_BYTES,
    check_window,
    estimate_measure,
    parameter_count,
)
from pytest_hemorrhage.settings import Settings

TINY = ("--hemorrhage-model=hemorrhage-tiny", "-p", "no:randomly")
USES_THE_MODEL = "def test_x(hemorrhage):\n    assert hemorrhage.measure('quant.rtn').tokens\n"


@pytest.fixture(scope="module")
def config():
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(BUNDLED_MODEL)


def test_the_parameter_count_from_the_config_is_the_models(tiny, config):
    assert parameter_count(config) == sum(p.numel() for p in tiny.model.parameters())


def _estimate(config, seq_len, batch_size=1, tokens=0):
    return estimate_measure(
        config,
        seq_len=seq_len,
        batch_size=batch_size,
        tokens=tokens or seq_len * batch_size,
        dtype_bytes=4,
        restore_copy_limit=1 << 30,
    )


def test_the_estimate_grows_with_the_window_and_the_batch(config):
    windows = [128, 1024, 16384, 131072]
    totals = [_estimate(config, n).total for n in windows]
    assert totals == sorted(set(totals))
    # the body's activations grow linearly with the window under SDPA
    assert _estimate(config, 131072).activations == 8 * _estimate(config, 16384).activations
    assert _estimate(config, 16384, batch_size=2).activations == 2 * (
        _estimate(config, 16384).activations
    )
    # a batch never holds more windows than there are
    assert _estimate(config, 16384, batch_size=8, tokens=16384).batch_size == 1
    # the head runs in chunks: past a chunk's rows its cost stops growing
    rows = chunk_rows(config.vocab_size)
    assert _estimate(config, 4 * rows).head == _estimate(config, 2 * rows).head
    assert _estimate(config, rows // 2).head < _estimate(config, rows).head
    small = _estimate(config, 128)
    assert small.restore_copy == small.weights > 0
    assert small.total == small.weights * 2 + small.activations + small.head + small.reference + (
        RUNTIME_BYTES
    )


def test_eager_attention_costs_a_window_squared_per_head(config):
    import copy

    eager = copy.deepcopy(config)
    eager._attn_implementation = "eager"
    extra = [
        _estimate(eager, n).activations - _estimate(config, n).activations for n in (1024, 2048)
    ]
    assert extra[0] == config.num_attention_heads * 1024 * 1024 * (2 * 4 + 4)
    assert extra[1] == 4 * extra[0]


def test_the_context_a_config_declares():
    from transformers import GPT2Config, LlamaConfig

    assert model_context(LlamaConfig(max_position_embeddings=4096)) == (
        4096,
        "max_position_embeddings=4096",
    )
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
    assert model_context(LlamaConfig(max_position_embeddings=4096, rope_scaling=yarn))[0] == 16384
    linear = {"rope_type": "linear", "factor": 2.0}
    context = model_context(LlamaConfig(max_position_embeddings=2048, rope_scaling=linear))
    assert context == (4096, "max_position_embeddings=2048 with linear RoPE scaling x2")
    # Llama 3.1 declares the stretched length already; its factor is not applied twice
    llama3 = {
        "rope_type": "llama3",
        "factor": 8.0,
        "original_max_position_embeddings": 8192,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
    }
    assert model_context(LlamaConfig(max_position_embeddings=131072, rope_scaling=llama3))[0] == (
        131072
    )
    assert model_context(GPT2Config(n_positions=1024))[0] == 1024
    assert model_context(object()) is None


def test_a_window_past_the_context_stops_the_run_naming_both_lengths_and_the_fix(pytester):
    pytester.makepyfile(USES_THE_MODEL)
    result = pytester.runpytest(*TINY, "--hemorrhage-seq-len=1024", "--hemorrhage-tokens=1024")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stdout.fnmatch_lines(
        [
            "*hemorrhage: --hemorrhage-seq-len=1024 is longer than the context of "
            "hemorrhage-tiny: 512 tokens (max_position_embeddings=512); lower "
            "--hemorrhage-seq-len to 512 or less, or pass --hemorrhage-beyond-context to score "
            "windows past it (to measure context extension, context.rope_scaling, *"
        ]
    )
    # asked for, the window past the context is measured
    result = pytester.runpytest(
        *TINY,
        "--hemorrhage-seq-len=1024",
        "--hemorrhage-tokens=1024",
        "--hemorrhage-beyond-context",
    )
    result.assert_outcomes(passed=1)


def test_a_window_this_machine_cannot_hold_stops_before_any_weight_is_read(pytester, monkeypatch):
    from transformers import PreTrainedModel

    loads = []
    original = PreTrainedModel.from_pretrained.__func__

    def recorded(cls, *args, **kwargs):
        loads.append(args[0])
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(recorded))
    pytester.makepyfile(USES_THE_MODEL)
    huge = 1 << 28  # ~3 TB of activations and reference on the bundled model's widths
    result = pytester.runpytest(
        *TINY, f"--hemorrhage-seq-len={huge}", "--hemorrhage-beyond-context"
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stdout.fnmatch_lines(
        [
            f"*hemorrhage: a {huge:,}-token window of hemorrhage-tiny needs about * GB "
            "(weights *, activations * GB (batch of 1), head chunks *, reference * GB, restore "
            "copy *); this machine has * GB available*; lower --hemorrhage-seq-len (to * or "
            "less), or measure on a device with more memory*"
        ]
    )
    assert loads == []
    # the spy sees a load that happens: the window that fits loads the weights
    pytester.runpytest(*TINY, "--hemorrhage-tokens=256").assert_outcomes(passed=1)
    assert len(loads) == 1


def test_the_refusal_names_a_batch_of_one_when_that_fits():
    from pytest_hemorrhage.memory import available_bytes

    room = available_bytes("cpu")
    assert room is not None
    # the bundled model spends ~12 KB a token in its body: a window of a tenth of the room
    # fits alone, ten of them at once do not
    seq_len = room[0] // 12_288 // 10
    settings = Settings.defaults(
        model="hemorrhage-tiny",
        seq_len=seq_len,
        tokens=seq_len * 64,
        batch_size=64,
        beyond_context=True,
    )
    with pytest.raises(HemorrhageError, match=r"or --hemorrhage-batch-size=1 \(that fits\)"):
        check_window(settings)


def test_a_mixture_counts_the_experts_a_token_passes_and_a_sliding_window_its_mask():
    from transformers import LlamaConfig, MistralConfig, MixtralConfig

    widths = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
    }
    mixture = MixtralConfig(**widths, num_local_experts=8, num_experts_per_tok=2)
    dense = LlamaConfig(**widths)
    assert parameter_count(mixture) - parameter_count(dense) == 7 * 2 * 3 * 64 * 128
    # two experts' intermediates per token, not eight
    extra = _estimate(mixture, 1024).activations - _estimate(dense, 1024).activations
    assert extra == 1024 * 4 * 128 * 4
    # SDPA gets a boolean window x window mask once the window passes the sliding one
    sliding = [_estimate(MistralConfig(**widths, sliding_window=w), 1024) for w in (512, 4096)]
    assert sliding[0].activations - sliding[1].activations == 1024 * 1024
