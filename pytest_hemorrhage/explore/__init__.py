"""Where does the model break?

* :func:`find_threshold` (``search``) bisects a parameter for the gentlest value that breaks
  the budget; threshold estimates persist on disk (``estimates``) for ``near_threshold``.
* :func:`sweep` (``sweeps``) measures a parameter over values and fits the phase transition
  (``fit``, Ma et al. 2025).
* ``hypothesis`` makes ``@given`` tests that use the fixture work and turns shrinking into a
  threshold; :func:`register_profiles` registers the ``hemorrhage-ci`` and
  ``hemorrhage-explore`` settings profiles.
* ``domains`` knows each parameter's range and direction.

Importing this package imports neither torch nor hypothesis: names load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "PROFILES",
    "PhaseTransition",
    "Sweep",
    "Threshold",
    "bisect_threshold",
    "cached_estimate",
    "find_threshold",
    "fit_phase_transition",
    "register_profiles",
    "reporting_example",
    "sweep",
]

_HOMES = {
    "PROFILES": "hypothesis",
    "PhaseTransition": "fit",
    "Sweep": "sweeps",
    "Threshold": "fit",
    "bisect_threshold": "fit",
    "cached_estimate": "hypothesis",
    "find_threshold": "search",
    "fit_phase_transition": "fit",
    "register_profiles": "hypothesis",
    "reporting_example": "hypothesis",
    "sweep": "sweeps",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
