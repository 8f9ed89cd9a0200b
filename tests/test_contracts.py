"""The protocols through which a lower layer sees the one above it (so that it never imports it)
are met by the real objects that layer is given. Nothing type-checks them, so a member renamed on
one side only would otherwise surface as an AttributeError in whichever call uses it first."""

from __future__ import annotations

from typing import Any

from pytest_hemorrhage.budget import Budget
from pytest_hemorrhage.extras import HarnessView
from pytest_hemorrhage.fixture import Hemorrhage, Run
from pytest_hemorrhage.handle import Handle
from pytest_hemorrhage.metrics import BudgetCheck
from pytest_hemorrhage.modifications.handler import Context
from pytest_hemorrhage.session import HemorrhageSession
from pytest_hemorrhage.settings import Settings


def _members(protocol: type) -> set[str]:
    """The attributes, properties and methods ``protocol`` declares."""
    declared = set(vars(protocol).get("__annotations__", {}))
    return declared | {
        name
        for name, value in vars(protocol).items()
        if not name.startswith("_") and (callable(value) or isinstance(value, property))
    }


def _missing(protocol: type, implementation: Any) -> list[str]:
    return sorted(m for m in _members(protocol) if not hasattr(implementation, m))


def test_the_members_are_read_from_the_protocol():
    assert _members(Handle) == {
        "harness",
        "budget",
        "node",
        "model",
        "measure",
        "record_exploration",
    }
    assert _missing(Handle, object()) == sorted(_members(Handle))


def test_every_protocol_is_met_by_what_implements_it(harness, request):
    session = HemorrhageSession(Settings.defaults(model="hemorrhage-tiny"))
    budget = Budget({"kl_mean": 0.1})
    hemorrhage = Hemorrhage(harness, budget, request.node, session)
    assert _missing(Run, session) == []  # what the fixture uses of the run
    assert _missing(Handle, hemorrhage) == []  # what explore/ and decoding calibration use
    assert _missing(HarnessView, harness) == []  # what extras/ providers use
    assert _missing(Context, harness.context) == []  # what modification handlers use
    assert _missing(BudgetCheck, budget) == []  # what Result.violations uses
