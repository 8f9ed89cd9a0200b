"""Extra metrics: measures beyond the token statistics, computed only when a budget names them
or an option asks, since each costs passes of its own.

A provider is ``compute(harness, patch) -> (metrics, stderr, details)``, run on ``patch.model``
(the modified baseline, or a candidate from ``measure_model``), with a ``baseline(harness)``
that runs first on the unmodified model and memoizes what ``compute`` compares against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from ..data import Windows
    from ..loading import LoadedModel
    from ..modifications.handler import Context
    from ..modifications.registry import Patch
    from ..settings import Settings

__all__ = ["HarnessView", "Provider", "providers"]


class HarnessView(Protocol):
    """What a provider uses of the harness that runs it
    (:class:`~pytest_hemorrhage.harness.Harness`, a layer above the providers it calls).

    Attributes:
        loaded: the baseline and its tokenizer.
        model: the baseline model, unmodified while ``baseline`` runs.
        settings: the run's settings.
        windows: the evaluation windows (generation prompts are cut from them).
        device: where the model's inputs go.
        batch_size: sequences per forward pass.
        level: the one-sided level the measure in progress calibrates standard errors at.
        memo: what a provider's ``baseline`` kept for ``compute``, per harness.
        context: the handler contract: the session memo and the stages applied.
    """

    loaded: LoadedModel
    model: Any
    settings: Settings
    windows: Windows
    device: torch.device
    batch_size: int
    level: float
    memo: dict[Any, Any]
    context: Context


@dataclass(frozen=True)
class Provider:
    """The computation of some extra metrics, and the baseline it needs."""

    compute: Callable[[HarnessView, Patch], tuple[dict[str, float], dict[str, Any], dict[str, Any]]]
    baseline: Callable[[HarnessView], Any]


def providers(want: frozenset[str]) -> list[Provider]:
    """The providers of the extra metrics named in ``want``, each once (imported on demand)."""
    found = []
    if want & {"gen_mismatch", "gen_first_divergence"}:
        from .generation import baseline_continuations, generation_metrics

        found.append(Provider(generation_metrics, baseline_continuations))
    if want & {"accuracy_drop", "flip_rate"}:
        from .tasks import baseline_scores, task_metrics

        found.append(Provider(task_metrics, baseline_scores))
    if "routing_flip" in want:
        from .routing import baseline_routes, routing_metrics

        found.append(Provider(routing_metrics, baseline_routes))
    return found
