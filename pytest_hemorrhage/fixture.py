"""The ``hemorrhage`` fixture object: measure, modify and check inside one test."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .budget import Budget
    from .harness import Harness, Stages
    from .metrics import Result
    from .session import HemorrhageSession

__all__ = ["Hemorrhage"]


class Hemorrhage:
    """Per-test handle on the baseline model and the test's budget.

    Args:
        harness: the session's loaded model, windows and reference.
        budget: the marker's budget merged over the ini default.
        node: the running test item (results are recorded under its id).
        session: the run, which collects every result for the summary and the report.
    """

    def __init__(
        self, harness: Harness, budget: Budget, node: pytest.Item, session: HemorrhageSession
    ) -> None:
        self.harness = harness
        self.budget = budget
        self._node = node
        self._session = session

    def __repr__(self) -> str:
        return f"<hemorrhage {self._node.nodeid} budget={self.budget.to_dict()}>"

    @property
    def node(self) -> pytest.Item:
        """The running test item."""
        return self._node

    @property
    def model(self) -> Any:
        """The baseline model (restored after every modification)."""
        return self.harness.model

    @property
    def tokenizer(self) -> Any:
        return self.harness.loaded.tokenizer

    def measure(self, modification: Stages, /, **params: Any) -> Result:
        """Measure a modification against the baseline, e.g.
        ``measure("quant.rtn", bits=4)`` or
        ``measure([("prune.wanda", {"sparsity": 0.5}), ("quant.rtn", {"bits": 4})])``.
        """
        want = frozenset(self.budget.limits) | self._session.default_extras()
        result = self.harness.measure(_stages(modification, params), want)
        self._session.record(self._node, result, self.budget)
        return result

    @contextmanager
    def modified(self, modification: Stages, /, **params: Any) -> Iterator[Any]:
        """The model with ``modification`` applied inside the block, restored exactly after."""
        with self.harness.modified(_stages(modification, params)):
            yield self.harness.model

    def find_threshold(self, modification: str, param: str, **options: Any) -> Any:
        """The gentlest value of ``param`` that breaks the budget (bisection); see
        :func:`pytest_hemorrhage.explore.find_threshold`."""
        from .explore import find_threshold

        return find_threshold(self, modification, param, **options)

    def sweep(self, modification: str, param: str, values: Any, **options: Any) -> Any:
        """Measure ``param`` over ``values`` and fit the phase transition; see
        :func:`pytest_hemorrhage.explore.sweep`."""
        from .explore import sweep

        return sweep(self, modification, param, values, **options)

    def calibrate_decoding(self, target: Any, **options: Any) -> Any:
        """Fit a decoding temperature that brings ``target`` back toward the baseline; see
        :func:`pytest_hemorrhage.decoding.calibrate_decoding`."""
        from .decoding import calibrate_decoding

        calibration = calibrate_decoding(self, target, **options)
        self.record_exploration("decoding_calibration", calibration.to_dict())
        return calibration

    def record_exploration(self, kind: str, data: dict[str, Any]) -> None:
        """Keep a threshold search, sweep or calibration (``data`` JSON-ready) for the summary
        and the report."""
        self._session.record_exploration(self._node, kind, data)

    def check(self, result: Result, budget: Budget | None = None) -> None:
        """Fail the test with one line per metric of ``result`` over the budget, plus where
        in the model the damage starts."""
        lines = (budget or self.budget).violations(result)
        if lines:
            from .blame import explain
            from .explore import reporting_example

            if reporting_example():  # not on every example hypothesis tries while shrinking
                lines += explain(self.harness, result)
            where = f"{result.modification} {_format_params(result.params)}".strip()
            pytest.fail(
                f"hemorrhage over budget for {where}:\n  " + "\n  ".join(lines), pytrace=False
            )


def _stages(modification: Stages, params: dict[str, Any]) -> Stages:
    if params:
        return [(modification, params)]
    return modification


def _format_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())
