"""Extra metrics: measures beyond the token statistics, computed only when a budget names them
or an option asks, since each costs passes of its own.

A provider is ``compute(harness, patch) -> (metrics, stderr, details)``, run on ``patch.model``
(the modified baseline, or a candidate from ``measure_model``), with a ``baseline(harness)``
that runs first on the unmodified model and memoizes what ``compute`` compares against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..harness import Harness
    from ..modifications.registry import Patch

__all__ = ["Provider", "providers"]


@dataclass(frozen=True)
class Provider:
    """The computation of some extra metrics, and the baseline it needs."""

    compute: Callable[[Harness, Patch], tuple[dict[str, float], dict[str, Any], dict[str, Any]]]
    baseline: Callable[[Harness], Any]


def providers(want: frozenset[str]) -> list[Provider]:
    """The providers of the extra metrics named in ``want``, each once (imported on demand)."""
    found = []
    if want & {"gen_mismatch", "gen_first_divergence"}:
        from .generation import baseline_continuations, generation_metrics

        found.append(Provider(generation_metrics, baseline_continuations))
    if want & {"accuracy_drop", "flip_rate"}:
        from .tasks import baseline_scores, task_metrics

        found.append(Provider(task_metrics, baseline_scores))
    return found
