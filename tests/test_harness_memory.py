"""How many batches of logits a measure keeps alive: one at a time, whatever the batch count."""

from __future__ import annotations

import pytest
from torch.multiprocessing.reductions import StorageWeakRef


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
    batches = harness.batches

    def watched(*args, **kwargs):
        for logits, targets in batches(*args, **kwargs):
            handed.append(StorageWeakRef(logits.untyped_storage()))
            yield logits, targets
            del logits  # this wrapper must not hold them either

    def count_alive(module, args):
        alive_at_forward.append(sum(not ref.expired() for ref in handed))

    harness.batches = watched
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
