"""The harness (harness.py) around a measure: writes into the baseline that bypass version
counters (through ``.data``, through a numpy view) are caught when the test ends, named, and
undone so that later tests see the baseline; and a measure keeps one batch of logits alive at a
time, whatever the batch count."""

from __future__ import annotations

import pytest
import torch
from bit_identity import assert_restored, snapshot
from torch.multiprocessing.reductions import StorageWeakRef

from pytest_hemorrhage import baseline as baseline_module
from pytest_hemorrhage.errors import HemorrhageError
from pytest_hemorrhage.loading import load_model

NAME = "model.layers.1.mlp.down_proj.weight"


def _write(model: torch.nn.Module, how: str) -> None:
    weight = model.get_parameter(NAME)
    if how == "data":
        weight.data.mul_(1.5)
    elif how == "numpy":
        weight.detach().numpy()[3, 5] += 1.0
    else:
        with torch.no_grad():
            weight.add_(0.25)


@pytest.mark.parametrize("how", ["data", "numpy", "in place"])
def test_a_write_is_named_and_undone(harness, how):
    before = snapshot(harness.model)
    _write(harness.model, how)
    with pytest.raises(HemorrhageError, match=rf"changed in place \({NAME}\).*restored"):
        harness.check_pristine()
    assert_restored(harness.model, before)
    harness.check_pristine()  # and the restore itself is accepted


def test_a_model_too_large_to_copy_is_reloaded_from_its_spec(make_harness, monkeypatch):
    monkeypatch.setattr(baseline_module, "RESTORE_COPY_BYTES", 0)
    loaded = load_model("hemorrhage-tiny", device="cpu")  # its own model: its own baseline
    h = make_harness(loaded, tokens=512)
    assert h._baseline.copy is None
    before = snapshot(h.model)
    _write(h.model, "data")
    with pytest.raises(HemorrhageError, match=rf"\({NAME}\).*reloaded from hemorrhage-tiny"):
        h.check_pristine()
    assert_restored(h.model, before)


BAD_THEN_GOOD = """
import json, torch

def test_writes_through_data(hemorrhage):
    hemorrhage.model.get_parameter("{name}").data.mul_(3.0)

def test_sees_the_baseline(hemorrhage):
    print("KL", hemorrhage.measure("quant.rtn", bits=4).metrics["kl_mean"])
"""


def test_the_writing_test_fails_and_the_next_one_sees_the_baseline(pytester):
    pytester.makepyfile(test_user=BAD_THEN_GOOD.format(name=NAME))
    args = (
        "--hemorrhage-model=hemorrhage-tiny",
        "--hemorrhage-tokens=256",
        "-p",
        "no:randomly",
        "-s",
    )
    result = pytester.runpytest(*args)
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_writes_through_data*",
            f"*changed in place ({NAME}) by a write that bypasses*",
        ]
    )
    alone = pytester.runpytest(*args, "-k", "sees_the_baseline")
    after_bad, baseline = (
        [w for line in r.outlines for w in line.split("KL ")[1:]] for r in (result, alone)
    )
    assert after_bad and after_bad == baseline  # the same bits as in a run without the write


# -- memory: how many batches of logits a measure keeps alive ---------------------------------


@pytest.mark.parametrize("early_stop", [False, True])
@pytest.mark.parametrize("stages", [[("quant.rtn", {"bits": 8})], [("decode.top_k", {"k": 20})]])
def test_no_logits_alive_during_the_next_forward_pass(tiny, make_harness, stages, early_stop):
    """When a batch's forward pass starts, no earlier batch's logits (the model's output, or a
    processor's) is still referenced: measure() (and the reference it computes first) holds
    one batch of logits, not two."""
    from pytest_hemorrhage.budget import Budget

    harness = make_harness(tiny, tokens=8 * 128, batch_size=2, early_stop=early_stop)
    handed = []  # weak references to the memory of every batch of logits measure() scored
    alive_at_forward = []
    chunks = harness.chunks

    def watched(*args, **kwargs):
        for chunk in chunks(*args, **kwargs):
            handed.append(StorageWeakRef(chunk.logits.untyped_storage()))
            yield chunk
            del chunk  # this wrapper must not hold them either

    def count_alive(module, args):
        alive_at_forward.append(sum(not ref.expired() for ref in handed))

    harness.chunks = watched
    hook = harness.model.register_forward_pre_hook(count_alive)
    try:
        harness.measure(stages, budget=Budget({"kl_mean": 1e9}) if early_stop else None)
    finally:
        hook.remove()
    # the reference's 4 batches, then the measure's (early stopping may score fewer): several,
    # since the claim is about the ones before
    assert len(handed) >= 4 + 2
    assert len(alive_at_forward) == len(handed)
    assert alive_at_forward == [0] * len(handed)
