"""The test's handle as the analyses see it: what threshold searches, sweeps and decoding
calibration use of the ``hemorrhage`` object they are given.

:class:`~pytest_hemorrhage.fixture.Hemorrhage` implements :class:`Handle`. The analyses see only
this protocol, so they never reach up into the fixture that calls them, as modification handlers
see the harness only through :class:`~pytest_hemorrhage.modifications.handler.Context`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import pytest

    from .budget import Budget
    from .harness import Harness, Stages
    from .metrics import Result

__all__ = ["Handle"]


class Handle(Protocol):
    """What an analysis may use of the test's ``hemorrhage`` object.

    Attributes:
        harness: the session's loaded model, windows and reference.
        budget: the test's budget (the marker's, merged over the ini default).
    """

    harness: Harness
    budget: Budget

    @property
    def node(self) -> pytest.Item:
        """The running test item."""
        ...

    @property
    def model(self) -> Any:
        """The baseline model (restored after every modification)."""
        ...

    def measure(self, modification: Stages, /, **params: Any) -> Result:
        """Measure a modification against the baseline; the result is recorded for the report."""
        ...

    def record_exploration(self, kind: str, data: dict[str, Any]) -> None:
        """Keep a search, sweep or calibration (``data`` JSON-ready) for the summary and the
        report."""
        ...
