"""Hypothesis glue: settings profiles, ``@given`` tests that use the fixture, and shrinking
turned into a threshold.

* :func:`hypothesis_call` makes ``@given`` tests that use the ``hemorrhage`` fixture work out of
  the box and turns their examples into a threshold (the falsifying example is the breaking
  point, the passing example next to it brackets it).
* :func:`register_profiles` registers the ``hemorrhage-ci`` and ``hemorrhage-explore`` settings
  profiles for ``--hypothesis-profile``.

Importing this module imports neither torch nor hypothesis: the plugin calls it from its hooks,
for every test, so what the threshold needs (torch among it) is imported where it is used.
"""

from __future__ import annotations

import contextvars
import json
import math
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import HemorrhageError

if TYPE_CHECKING:
    import pytest

__all__ = [
    "PROFILES",
    "adapt_settings",
    "cached_estimate",
    "collect_shrinking",
    "configure",
    "hypothesis_call",
    "register_profiles",
    "reporting_example",
]

# Settings profiles for --hypothesis-profile. hemorrhage-ci is a release gate: like
# hypothesis' own "ci" profile it derandomizes (examples drawn from a hash of the test's code)
# and so has no example database, because a verdict must not depend on a random seed or on
# what an earlier run saved. hemorrhage-explore draws at random and keeps the database, so a
# breaking point found once is replayed first by the next run.
PROFILES: dict[str, dict[str, Any]] = {
    "hemorrhage-ci": {
        "max_examples": 10,
        "derandomize": True,
        "print_blob": True,
        "phases": ("explicit", "reuse", "generate", "shrink"),
    },
    "hemorrhage-explore": {"max_examples": 60},
}


# The running hypothesis test of ours and its session (for near_threshold's estimates).
_CURRENT: contextvars.ContextVar[tuple[Any, Any] | None] = contextvars.ContextVar(
    "hemorrhage_current_test", default=None
)


def register_profiles() -> None:
    """Register the ``hemorrhage-ci`` (10 examples) and ``hemorrhage-explore`` (60) profiles.

    Both: no deadline (a model evaluation takes as long as it takes) and the function-scoped
    ``hemorrhage`` fixture allowed (every measure restores the model exactly).
    ``hemorrhage-ci`` is derandomized with no example database: the same code and model give
    the same examples and verdicts on every run. ``hemorrhage-explore`` draws at random and
    keeps the database, so breaking points are replayed first on the next run.
    """
    from hypothesis import HealthCheck, Phase, settings
    from hypothesis.errors import InvalidArgument

    try:
        settings.get_profile("hemorrhage-ci")
        return  # registered already
    except InvalidArgument:
        pass
    parent = settings.get_profile("default")
    for name, options in PROFILES.items():
        options = dict(options)
        if "phases" in options:
            options["phases"] = tuple(Phase[p] for p in options["phases"])
        settings.register_profile(
            name,
            parent,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
            **options,
        )


def configure(config: pytest.Config) -> None:
    """Register the profiles before hypothesis' own plugin loads ``--hypothesis-profile``."""
    if config.getoption("--hypothesis-profile", None) or "hypothesis" in sys.modules:
        register_profiles()


def adapt_settings(test: Any) -> None:
    """Give a ``@given`` test that uses the ``hemorrhage`` fixture workable settings.

    No deadline unless the test set one itself (model evaluations are slow and their time
    varies), and no ``function_scoped_fixture`` health-check error: the fixture is safe across
    examples because every measure restores the baseline bit for bit.
    """
    from hypothesis import HealthCheck, settings

    fn = getattr(test, "__func__", test)
    current = getattr(fn, "_hypothesis_internal_use_settings", None)
    if current is None or getattr(fn, "_hemorrhage_adapted", False):
        return
    own_deadline = (
        getattr(fn, "_hypothesis_internal_settings_applied", False)
        and current.deadline != settings.default.deadline
    )
    fn._hypothesis_internal_use_settings = settings(
        current,
        deadline=current.deadline if own_deadline else None,
        suppress_health_check={*current.suppress_health_check, HealthCheck.function_scoped_fixture},
    )
    fn._hemorrhage_adapted = True


@contextmanager
def hypothesis_call(item: pytest.Item, session: Any) -> Iterator[None]:
    """Wrap the call of a ``@given`` test that uses the ``hemorrhage`` fixture (else a no-op).

    Before: adapts its settings (see :func:`adapt_settings`) and makes the test known to
    :func:`~pytest_hemorrhage.strategies.near_threshold`. After: turns its examples into a
    threshold exploration (see :func:`collect_shrinking`).
    """
    test = getattr(item, "obj", None)
    current = _CURRENT.get()
    if (
        "hemorrhage" not in getattr(item, "fixturenames", ())
        or not getattr(test, "is_hypothesis_test", False)
        or (current is not None and current[0] is item)
    ):
        yield  # not a hypothesis test of ours, or already wrapped
        return
    adapt_settings(test)
    token = _CURRENT.set((item, session))
    try:
        yield
    except BaseException as exc:
        _keep_notes(exc)
        raise
    finally:
        _CURRENT.reset(token)
        collect_shrinking(item, session)


def reporting_example() -> bool:
    """False while hypothesis runs an example it will not report (generating, shrinking).

    A failed ``check()`` can then skip its costly diagnostics (blame) on the many examples
    that shrinking tries, and keep them for the falsifying example that hypothesis replays
    last; True outside hypothesis.
    """
    if "hypothesis" not in sys.modules:
        return True
    from hypothesis.control import current_build_context, currently_in_test_context

    return not currently_in_test_context() or current_build_context().is_final


def _keep_notes(exc: BaseException) -> None:
    """Put hypothesis' notes ("Falsifying example: ...") into the message of a failure that
    is reported by its message alone (``check()``'s ``pytest.fail(pytrace=False)``, a
    HemorrhageError): pytest shows notes only with a traceback."""
    import pytest

    notes = getattr(exc, "__notes__", None)
    if not notes:
        return
    if isinstance(exc, pytest.fail.Exception) and not exc.pytrace:
        exc.msg = "\n".join([exc.msg or "", *notes])
        exc.__notes__ = []
    elif isinstance(exc, HemorrhageError) and len(exc.args) == 1:
        exc.args = ("\n".join([str(exc.args[0]), *notes]),)
        exc.__notes__ = []


def collect_shrinking(item: pytest.Item, session: Any) -> None:
    """Turn a hypothesis test's measurements into one threshold per modification.

    Where exactly one numeric parameter varied across the examples, the gentlest value that
    broke the budget is the threshold (hypothesis shrinks toward it) and the harshest passing
    value below it brackets it. The per-example results are then reduced to those two, so the
    summary shows the breaking point instead of one row per example.
    """
    from .domains import Domain, domain_for
    from .estimates import save_estimate
    from .search import budget_from_dict, budget_metric, threshold_from_points, threshold_record

    mine = [r for r in session.records if r["nodeid"] == item.nodeid]
    if not mine:
        return
    keep: set[int] = set()
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in mine:
        groups.setdefault(record["modification"], []).append(record)
    drawn = _given_names(item)
    for name, records in groups.items():
        param = _explored_param(records, drawn)
        if param is None:
            broken = [r for r in records if r["violations"]]
            keep.add(id((broken or records)[-1]))
            continue
        domain = domain_for(name, param) or Domain(0.0, 1.0)
        metric = budget_metric(records[0]["budget"])
        seen: dict[float, dict[str, Any]] = {}
        for record in records:  # hypothesis replays examples: first measurement of each value
            seen.setdefault(record["params"][param], record)
        points = [
            (x, r["metrics"].get(metric, math.nan), bool(r["violations"])) for x, r in seen.items()
        ]
        threshold = threshold_from_points(points, domain, param, "hypothesis shrinking")
        value, passing = threshold.value, threshold.bracket[0]
        for x in (value, passing):
            if x is not None:
                keep.add(id(seen[x]))
        fixed = _non_default(name, {k: v for k, v in records[0]["params"].items() if k != param})
        budget = records[0]["budget"]
        session.record_exploration(
            item,
            "threshold",
            threshold_record(
                name,
                param,
                fixed,
                budget,
                metric,
                "shrinking",
                domain.increasing,
                threshold,
                [seen[x]["metrics"] for x, _, _ in threshold.measurements],
            ),
        )
        if value is not None and session.settings.cache_dir is not None:
            save_estimate(
                session.harness(), budget_from_dict(budget), name, param, fixed, threshold
            )
    session.records[:] = [r for r in session.records if r["nodeid"] != item.nodeid or id(r) in keep]


def _given_names(item: pytest.Item) -> set[str]:
    """The arguments that ``@given`` draws (the test's parameters that are not fixtures)."""
    import inspect

    inner = getattr(getattr(getattr(item, "obj", None), "hypothesis", None), "inner_test", None)
    if inner is None:
        return set()
    return set(inspect.signature(inner).parameters) - set(getattr(item, "fixturenames", ()))


def _explored_param(records: list[dict[str, Any]], drawn: set[str]) -> str | None:
    """The one numeric parameter that the examples explored, else None.

    The one whose value varied; when hypothesis measured a single value (e.g. it replayed a
    saved breaking point that was already minimal), the numeric parameter named like a drawn
    argument.
    """
    if "stages" in records[0]["params"]:
        return None
    numeric = [
        k
        for k, v in records[0]["params"].items()
        if all(
            isinstance(r["params"].get(k), (int, float))
            and not isinstance(r["params"].get(k), bool)
            for r in records
        )
    ]
    varying = [
        k for k in records[0]["params"] if len({_hashable(r["params"].get(k)) for r in records}) > 1
    ]
    if varying:
        return varying[0] if len(varying) == 1 and varying[0] in numeric else None
    named = [k for k in numeric if k in drawn]
    return named[0] if len(named) == 1 else None


def _non_default(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` without those at the modification's default (as a user would write them)."""
    from ..modifications import make

    try:
        defaults = make(name).params()
    except HemorrhageError:  # no defaults for a required parameter: keep them all
        return dict(params)
    return {k: v for k, v in params.items() if defaults.get(k, object()) != v}


def _hashable(value: Any) -> Any:
    return json.dumps(value, sort_keys=True, default=str)


def cached_estimate(name: str, param: str, fixed: Mapping[str, Any]) -> float | None:
    """The threshold of ``param`` found earlier for the running test's model, data and budget
    (this session or a previous one), or None outside a hemorrhage test or when none is known."""
    current = _CURRENT.get()
    if current is None:
        return None
    from .estimates import ESTIMATES_FILE, estimate_key, read_estimates

    item, session = current
    if session.settings.cache_dir is None:
        return None
    key = estimate_key(session.harness(), session.budget_for(item), name, param, fixed)
    entry = read_estimates(Path(session.settings.cache_dir) / ESTIMATES_FILE).get(key)
    return None if entry is None else entry.get("value")
