"""The one check of the restore guarantee that every test file uses."""

from __future__ import annotations

import torch


def snapshot(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    """A copy of every tensor in the state_dict, with its storage address."""
    return {k: (v.clone(), v.data_ptr()) for k, v in model.state_dict().items()}


def assert_restored(model: torch.nn.Module, before: dict[str, tuple[torch.Tensor, int]]) -> None:
    """Same keys, same storage, same bits as at ``snapshot`` time."""
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, (tensor, ptr) in before.items():
        assert after[key].data_ptr() == ptr, key
        assert torch.equal(after[key], tensor), key
