"""The handler contract: what a modification's handler is given besides the model and its patch.

A handler is ``handler(config, model, patch, context)``. ``context`` is a :class:`Context`: the
tokenizer, the seeds, calibration windows disjoint from the evaluation ones, a session memo. The
harness implements it; a handler sees only this protocol, so modifications never reach up into
the layers that run them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

__all__ = ["Context"]


class Context(Protocol):
    """What a modification handler may use besides the model: data, seeds, a memo.

    Attributes:
        tokenizer: the baseline's tokenizer.
        device: where the model's inputs go.
        seed: ``--hemorrhage-seed``.
        cache_dir: where calibration results are kept across runs (None: not kept).
        fingerprint: the baseline's content hash.
        applied: the earlier stages of the current composition.
    """

    tokenizer: Any
    device: torch.device
    seed: int
    cache_dir: Path | None
    fingerprint: str
    applied: tuple[Any, ...]  # Modification configs

    def calibration_windows(self, count: int | None = None) -> torch.Tensor:
        """Windows disjoint from the evaluation ones (deterministic), on the model's device."""
        ...

    def memo(self, key: Any, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per session for ``key`` (e.g. calibration activation norms)."""
        ...

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """The (possibly modified) model's logits for ``ids``; for an encoder, its output."""
        ...

    def window_losses(self, ids: torch.Tensor) -> torch.Tensor:
        """Per window of ``ids``, the loss that gradient-aware importance differentiates."""
        ...

    def generator(
        self, *parts: object, device: torch.device | str | None = None
    ) -> torch.Generator:
        """A fresh generator seeded from the seed, the stage's position and ``parts``."""
        ...
