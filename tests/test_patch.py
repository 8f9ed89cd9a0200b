"""Patch on a tensor two modules share: GPT-2 ties its token embedding and output head."""

from __future__ import annotations

import pytest
import torch
from bit_identity import assert_restored, snapshot

from pytest_hemorrhage.errors import HemorrhageError
from pytest_hemorrhage.modifications.registry import Target


def _tied_targets(model: torch.nn.Module) -> list[Target]:
    wte, head = model.transformer.wte, model.lm_head
    assert head.weight is wte.weight  # one tensor, two modules
    return [Target("transformer.wte", wte, False), Target("lm_head", head, False)]


def test_parametrizing_both_users_of_a_tied_tensor_restores_without_complaint(gpt2):
    """Each registration re-seats the shared tensor (two version bumps, no bit changed): both
    are accepted, the edit is seen through both modules, and the baseline comes back."""
    model = gpt2.model
    before = snapshot(model)
    shared = model.lm_head.weight
    with gpt2.modified([]) as patch:
        for target in _tied_targets(model):
            patch.parametrize(target, lambda w: w * 0.5)
        assert shared._version >= 2  # each registration bumped it
        assert torch.equal(model.lm_head.weight, shared * 0.5)
        assert torch.equal(model.transformer.wte.weight, shared * 0.5)
    assert_restored(model, before)
    gpt2.check_pristine()


def test_a_write_between_the_two_registrations_is_still_caught(gpt2):
    model = gpt2.model
    with pytest.raises(HemorrhageError, match=r"changed in place \(.*lm_head\.weight"):
        with gpt2.modified([]) as patch:
            wte, head = _tied_targets(model)
            patch.parametrize(wte, lambda w: w * 0.5)
            with torch.no_grad():
                model.lm_head.weight.mul_(1.0)  # a real in-place write: bits equal, version not
            patch.parametrize(head, lambda w: w * 0.5)
    gpt2.check_pristine()  # the harness restored the baseline when it raised
