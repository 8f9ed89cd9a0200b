"""The restore guarantee, as a property: whatever sequence of registered modifications is
applied, and wherever it fails, the baseline's tensors come back bit for bit, in place."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch
from bit_identity import assert_restored, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_hemorrhage import strategies as hst
from pytest_hemorrhage.errors import HemorrhageError
from pytest_hemorrhage.modifications import (
    Modification,
    Target,
    names,
    register_modification,
    registry,
)


class Injected(Exception):
    """The failure this test injects; it must reach the caller, after the restore."""


@dataclass(frozen=True, kw_only=True)
class FailsHalfway(Modification):
    """A user modification that records every kind of change, then raises."""


def fails_halfway(config, model, patch, context):
    # edits what no other stage replaces (a block, the head) so it works after any of them
    patch.parametrize(Target("lm_head", model.lm_head, False), lambda w: w * 0)
    prefix, _ = registry.blocks(model)
    patch.swap_module(f"{prefix}.0", torch.nn.Identity())
    patch.setattr(model.config, "num_hidden_layers", 1)
    patch.on_undo(lambda: None)
    raise Injected("halfway through the handler")


@contextmanager
def registered(name, config, handler):
    """``handler`` registered under ``name`` for the block only."""
    saved = dict(registry._REGISTRY)
    register_modification(name, config)(handler)
    try:
        yield
    finally:
        registry._REGISTRY.clear()
        registry._REGISTRY.update(saved)


def _configs(model) -> st.SearchStrategy[Modification]:
    """Every registered modification with valid random parameters (the project's strategies),
    plus values for the parameters they cannot guess for this model."""
    blocks = len(registry.blocks(model)[1])
    extra = {
        "expand.layers": {
            "positions": st.lists(st.integers(-blocks, blocks - 1), min_size=1, max_size=3).map(
                tuple
            )
        },
        "prune.layers": {"count": st.integers(0, blocks - 1)},
    }
    params = {n: p for n, p in extra.items() if n in names()}
    return st.one_of(
        hst.modifications(params=params),
        hst.modifications(params=params, exclude=("*.layers.0.*",)),
    )


def test_any_sequence_with_any_failure_restores_the_baseline_bit_for_bit(harness):
    model = harness.model
    before = snapshot(model)
    configs = _configs(model)
    ids = harness.windows.eval[:2]

    @settings(
        max_examples=20,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(
        stages=st.lists(configs, min_size=1, max_size=3),
        failure=st.sampled_from(["none", "handler", "body"]),
        where=st.integers(0, 3),
        via_measure=st.booleans(),
        generate=st.booleans(),
    )
    def check(stages, failure, where, via_measure, generate):
        stages = list(stages)
        if failure == "handler":
            stages.insert(min(where, len(stages)), FailsHalfway())
        raised = None
        try:
            if via_measure and failure != "body":
                harness.measure(stages)
            else:
                with harness.modified(stages), torch.no_grad():
                    harness.context.logits(ids)
                    if generate:
                        model.generate(
                            ids[:1, :6],
                            max_new_tokens=2,
                            do_sample=False,
                            attention_mask=torch.ones_like(ids[:1, :6]),
                        )
                    if failure == "body":
                        raise Injected("inside the block")
        except Exception as exc:
            raised = exc
        if failure != "none":  # an earlier stage may fail first; nothing may swallow it
            assert raised is not None, "the injected failure was swallowed"
        assert_restored(model, before)
        harness.check_pristine()
        # the model came back; now any other error is a bug in a modification: fail with it
        # (HemorrhageError is a refusal, e.g. more layers than the model has)
        if raised is not None and not isinstance(raised, (Injected, HemorrhageError)):
            raise raised

    with registered("test.fails_halfway", FailsHalfway, fails_halfway):
        check()


def test_the_injected_failure_leaves_something_to_undo(harness):
    """The property above is only meaningful if the failing handler changed the model."""
    seen = {}

    def spy(config, model, patch, context):
        try:
            fails_halfway(config, model, patch, context)
        finally:
            seen["layers"] = model.config.num_hidden_layers
            seen["swapped"] = isinstance(model.model.layers[0], torch.nn.Identity)
            seen["zeroed"] = not model.lm_head.weight.any()

    with registered("test.fails_halfway", FailsHalfway, spy), pytest.raises(Injected):
        harness.measure(FailsHalfway())
    assert seen == {"layers": 1, "swapped": True, "zeroed": True}
    assert harness.model.config.num_hidden_layers == len(registry.blocks(harness.model)[1])
