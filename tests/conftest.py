"""Shared fixtures: the bundled model loaded once, a harness over a few windows, a small
GPT-2 for the Conv1D / fused-qkv architecture, and ``make_harness`` for any other harness."""

from __future__ import annotations

import pytest
import torch
from harnesses import build_harness

# One thread per process for the test suite (not for ``pytest examples``, which runs as a
# user's suite would): CI runs two xdist workers on two cores, and oversubscribed torch threads
# made the suite several times slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny():
    """The bundled model (LoadedModel), loaded once for the whole test run."""
    from pytest_hemorrhage.loading import load_model

    return load_model("hemorrhage-tiny", device="cpu")


@pytest.fixture(scope="session")
def make_harness():
    """``make_harness(loaded, **settings)`` or ``make_harness(model, tokenizer, spec=..., **settings)``:
    a Harness with the command-line defaults and ``settings`` over them (tests/harnesses.py)."""
    return build_harness


@pytest.fixture(scope="session")
def harness(tiny):
    """A Harness over 16 windows of 128 tokens of the bundled held-out corpus."""
    return build_harness(tiny, tokens=2048)


@pytest.fixture(scope="session")
def gpt2(tiny):
    """A Harness on a random-init two-block GPT-2 (fused c_attn Conv1D, (in, out) weights,
    biases) with the bundled tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tiny.tokenizer),
        n_positions=128,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # random init leaves biases at zero; give them values to matter
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.1)
    return build_harness(
        model, tiny.tokenizer, spec="gpt2-random", tokens=512, calibration_windows=4
    )


@pytest.fixture(scope="module")
def wide(tiny):
    """A Harness (16 windows of 128 tokens) on the bundled model widened by duplication to rows
    of 256 and 768 (benchmarks/models.py): the same function and trained weights, and no K-quant
    falls back. One per test module, as each module built its own."""
    from benchmarks.models import widened

    return build_harness(widened(tiny.model), tiny.tokenizer, spec="tiny-wide", tokens=2048)


@pytest.fixture(scope="session")
def outliers(tiny):
    """A Harness (16 windows of 128 tokens) on a copy of the bundled model with outlier
    activation channels, same function.

    Channels 5, 40, 77 and 110 of every RMSNorm weight are multiplied by 40 and the same input
    columns of each linear layer reading that norm divided by 40: the norms' outputs (the
    inputs of q/k/v and gate/up) now have a few channels 40x larger, as in real LLMs, and the
    logits are unchanged. (tests/test_prune.py's ``most_read_outliers`` puts them on the
    channels the model reads most instead.)
    """
    import copy

    model = copy.deepcopy(tiny.model)
    channels, scale = [5, 40, 77, 110], 40.0
    with torch.no_grad():
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for norm, readers in (
                (layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj)),
                (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj)),
            ):
                norm.weight[channels] *= scale
                for linear in readers:
                    linear.weight[:, channels] /= scale
    return build_harness(model, tiny.tokenizer, spec="tiny+outliers", tokens=2048)


@pytest.fixture(scope="session", autouse=True)
def _import_model_code_before_pytester(tiny):
    """pytester's in-process runs drop the modules they imported; torch then refuses to register
    its operator libraries a second time. Loading the model once up front keeps them loaded."""
