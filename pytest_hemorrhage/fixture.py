"""The ``hemorrhage`` fixture object: measure, modify and check inside one test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

import pytest

if TYPE_CHECKING:
    from .budget import Budget
    from .harness import Harness, Stages
    from .loading import LoadedModel
    from .metrics import Result
    from .settings import Settings

__all__ = ["Hemorrhage", "Run"]


class Run(Protocol):
    """What the fixture uses of the pytest run that creates it
    (:class:`~pytest_hemorrhage.session.HemorrhageSession`, a layer above it): the settings,
    where results go, and the candidates it holds."""

    settings: Settings

    def default_extras(self) -> frozenset[str]: ...

    def record(self, item: pytest.Item, result: Result, budget: Budget) -> None: ...

    def record_exploration(self, item: pytest.Item, kind: str, data: dict[str, Any]) -> None: ...

    def comparison_failures(self, nodeid: str) -> list[str]: ...

    def candidate(self, spec: str) -> LoadedModel: ...

    def held_candidate(self, fingerprint: str) -> Any: ...

    def note_candidate(self, label: str, loaded: Any) -> None: ...

    def note_endpoint(self, label: str, result: Result) -> None: ...


class Hemorrhage:
    """Per-test handle on the baseline model and the test's budget.

    Args:
        harness: the session's loaded model, windows and reference.
        budget: the marker's budget merged over the ini default.
        node: the running test item (results are recorded under its id).
        session: the run, which collects every result for the summary and the report.
    """

    def __init__(self, harness: Harness, budget: Budget, node: pytest.Item, session: Run) -> None:
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
        self._needs_baseline("measure")
        want = frozenset(self.budget.limits) | self._session.default_extras()
        result = self.harness.measure(_stages(modification, params), want, budget=self.budget)
        self._session.record(self._node, result, self.budget)
        return result

    def measure_model(
        self, candidate: Any, /, *, label: str | None = None, **endpoint: Any
    ) -> Result:
        """Measure a separately produced model against the baseline's reference, with every
        metric, standard error, extra metric and budget check that :meth:`measure` has.

        ``candidate``: what ``--hemorrhage-candidate`` accepts (a ``.gguf`` file, a directory
        saved with ``save_pretrained``, quantized or not, a hub id, ``module:factory``), an
        already loaded model, or ``(model, tokenizer)``. A spec is loaded once and released
        when the next one is. The result's modification is ``"candidate"``, its params the
        ``label`` (default: the directory or file name), the spec and the content fingerprint.

        A ``http://`` or ``https://`` base URL (``http://HOST:PORT/v1``) measures a served
        model from its prompt log-probabilities (docs/gating.md, "Gate the served model");
        ``endpoint`` keywords: ``model`` (the served name; default: the first listed),
        ``logprobs`` (top-k, default 20), ``protocol``, ``concurrency``, ``timeout``,
        ``retries``.
        """
        from .candidates import candidate_label, load_endpoint
        from .explore.progress import progress
        from .runtimes.endpoint import is_endpoint, public_url

        if _is_spec(candidate) and is_endpoint(str(candidate)):
            served = load_endpoint(str(candidate), self.harness.loaded.tokenizer, **endpoint)
            params = {"label": label or str(candidate), "spec": str(candidate)}
            total = served.requests(len(self.harness.windows.eval))
            with progress(self, total, public_url(served.url), unit="req") as advance:
                served.on_response = advance
                result = self.harness.measure_endpoint(served, params, budget=self.budget)
            self._session.note_endpoint(params["label"], result)
            self._session.record(self._node, result, self.budget)
            return result
        if endpoint:
            raise TypeError(f"measure_model: {sorted(endpoint)} apply to a served model's URL")

        loaded = self._session.candidate(str(candidate)) if _is_spec(candidate) else None
        if loaded is None:
            loaded = _given(candidate, self.harness.loaded.tokenizer)
        name = label or (candidate_label(str(candidate)) if _is_spec(candidate) else loaded.spec)
        params = {"label": name, "spec": str(loaded.spec), "fingerprint": loaded.fingerprint}
        want = frozenset(self.budget.limits) | self._session.default_extras()
        result = self.harness.measure_model(loaded, params, want, budget=self.budget)
        self._session.note_candidate(name, loaded)
        self._session.record(self._node, result, self.budget)
        return result

    def _needs_baseline(self, what: str) -> None:
        """Skip the test when only a reference file is given: ``what`` needs the model."""
        if self.harness.model is None:
            pytest.skip(
                f"hemorrhage.{what} needs the baseline model, and this run has only "
                f"--hemorrhage-reference={self._session.settings.reference}; pass "
                "--hemorrhage-model to run it"
            )

    @contextmanager
    def modified(self, modification: Stages, /, **params: Any) -> Iterator[Any]:
        """The model with ``modification`` applied inside the block, restored exactly after."""
        self._needs_baseline("modified")
        with self.harness.modified(_stages(modification, params)):
            yield self.harness.model

    def find_threshold(self, modification: str, param: str, **options: Any) -> Any:
        """The gentlest value of ``param`` that breaks the budget (bisection); see
        :func:`pytest_hemorrhage.explore.find_threshold`."""
        from .explore import find_threshold

        self._needs_baseline("find_threshold")
        return find_threshold(self, modification, param, **options)

    def sweep(self, modification: str, param: str, values: Any, **options: Any) -> Any:
        """Measure ``param`` over ``values`` and fit the phase transition; see
        :func:`pytest_hemorrhage.explore.sweep`."""
        from .explore import sweep

        self._needs_baseline("sweep")
        return sweep(self, modification, param, values, **options)

    def calibrate_decoding(self, target: Any, **options: Any) -> Any:
        """Fit a decoding temperature that brings ``target`` back toward the baseline; see
        :func:`pytest_hemorrhage.decoding_calibration.calibrate_decoding`."""
        from .decoding_calibration import calibrate_decoding

        self._needs_baseline("calibrate_decoding")
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
        lines += self._session.comparison_failures(self._node.nodeid)
        if lines:
            from .blame import explain, explain_candidate
            from .explore import reporting_example

            if result.modification == "candidate":
                held = self._session.held_candidate(result.params.get("fingerprint", ""))
                lines += explain_candidate(self.harness, held, result)
            elif reporting_example():  # not on every example hypothesis tries while shrinking
                lines += explain(self.harness, result)
            where = f"{result.modification} {_format_params(result.params)}".strip()
            pytest.fail(
                f"hemorrhage over budget for {where}:\n  " + "\n  ".join(lines), pytrace=False
            )


def _is_spec(candidate: Any) -> bool:
    return isinstance(candidate, (str, os.PathLike))


def _given(candidate: Any, tokenizer: Any) -> Any:
    """An already loaded candidate, ``model`` or ``(model, tokenizer)``, as a LoadedModel (its
    tokenizer defaults to the baseline's)."""
    from .errors import HemorrhageError
    from .loading import LoadedModel

    if isinstance(candidate, LoadedModel):
        return candidate
    model, tokenizer = candidate if isinstance(candidate, tuple) else (candidate, tokenizer)
    if not hasattr(model, "parameters") or tokenizer is None:
        raise HemorrhageError(
            f"measure_model({type(candidate).__name__}): give a spec (path, .gguf file, hub id, "
            "module:factory), a loaded model, or (model, tokenizer) when no baseline tokenizer "
            "is loaded"
        )
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, spec=os.path.basename(str(name)))


def _stages(modification: Stages, params: dict[str, Any]) -> Stages:
    if params:
        return [(modification, params)]
    return modification


def _format_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())
