"""The documented ways to add a modification, used from real test files on the bundled model:
the ``register_modification`` decorator and the ``pytest_hemorrhage_modifications`` hook."""

from __future__ import annotations

import json

import pytest

from pytest_hemorrhage.modifications import registry

ARGS = (
    "--hemorrhage-model=hemorrhage-tiny",
    "--hemorrhage-tokens=512",
    "-p",
    "no:cacheprovider",
    "--hemorrhage-report=report.json",
)

# A user's modification: a frozen config that validates itself, and a handler that records
# its change on the patch. Both registration styles below share it.
CONFIG = '''
from dataclasses import dataclass

from pytest_hemorrhage.errors import HemorrhageError
from pytest_hemorrhage.modifications import Modification


@dataclass(frozen=True, kw_only=True)
class Shrink(Modification):
    """Scale every target weight by ``factor``."""

    factor: float = 0.9

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.factor <= 1:
            raise HemorrhageError(f"{self.name}: factor={self.factor!r} is out of range; "
                                  "use a number in (0, 1]")


def shrink(config, model, patch, context):
    for target in config.targets(model):
        patch.parametrize(target, lambda w: w * config.factor)


def shrink_then_fail(config, model, patch, context):
    shrink(config, model, patch, context)
    raise RuntimeError("the user's handler failed halfway")
'''

TESTS = """
import pytest
import torch


def snapshot(model):
    return {k: (v.clone(), v.data_ptr()) for k, v in model.state_dict().items()}


def assert_restored(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, (tensor, ptr) in before.items():
        assert torch.equal(after[key], tensor) and after[key].data_ptr() == ptr, key


@pytest.mark.hemorrhage(kl_mean=5.0)
def test_within_budget(hemorrhage):
    before = snapshot(hemorrhage.model)
    result = hemorrhage.measure("{name}", factor=0.5, include=("*.mlp.*",))
    assert result.metrics["kl_mean"] > 0
    hemorrhage.check(result)
    with hemorrhage.modified("{name}", factor=0.5) as model:
        assert model.model.layers[0].mlp.up_proj.parametrizations.weight.original is not None
    assert_restored(hemorrhage.model, before)


@pytest.mark.hemorrhage(kl_mean=1e-9)
def test_over_budget(hemorrhage):
    hemorrhage.check(hemorrhage.measure("{name}", factor=0.5))


def test_failing_handler_restores(hemorrhage):
    before = snapshot(hemorrhage.model)
    with pytest.raises(RuntimeError, match="halfway"):
        hemorrhage.measure("{name}.broken")
    assert_restored(hemorrhage.model, before)


def test_bad_parameter(hemorrhage):
    hemorrhage.measure("{name}", factor=2)
"""


@pytest.fixture(autouse=True)
def _isolated_registry(monkeypatch, tiny):
    """The in-process runs register into a copy: the next run may register the same names.

    ``tiny`` loads the model out here first: pytester drops the modules that a run imported,
    and torch refuses to import some of them (its operator libraries) a second time.
    """
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def _check_run(pytester: pytest.Pytester, name: str) -> None:
    result = pytester.runpytest(*ARGS)
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines(
        [
            f"*hemorrhage over budget for {name} factor=0.5:*",
            "*kl_mean: * > 0.0000 (baseline ppl *",
            f"*HemorrhageError: {name}: factor=2 is out of range; use a number in (0, 1]*",
        ]
    )
    report = json.loads((pytester.path / "report.json").read_text())
    mine = [r for r in report["results"] if r["modification"] == name]
    assert [r["outcome"] for r in mine] == ["passed", "failed"]
    assert mine[0]["params"] == {"factor": 0.5, "include": ["*.mlp.*"]}
    assert mine[1]["params"] == {"factor": 0.5}
    assert mine[1]["violations"] and mine[1]["violations"][0].startswith("kl_mean")
    assert mine[0]["budget"] == {"kl_mean": 5.0} and mine[0]["metrics"]["kl_mean"] > 0


def test_register_modification_decorator_in_a_conftest(pytester: pytest.Pytester):
    pytester.makeconftest(
        CONFIG
        + """
from pytest_hemorrhage.modifications import register_modification

register_modification("user.shrink", Shrink)(shrink)


@dataclass(frozen=True, kw_only=True)
class Broken(Shrink):
    pass


register_modification("user.shrink.broken", Broken)(shrink_then_fail)
"""
    )
    pytester.makepyfile(TESTS.replace("{name}", "user.shrink"))
    _check_run(pytester, "user.shrink")


def test_pytest_hemorrhage_modifications_hook_in_a_conftest(pytester: pytest.Pytester):
    pytester.makeconftest(
        CONFIG
        + """

@dataclass(frozen=True, kw_only=True)
class Broken(Shrink):
    pass


def pytest_hemorrhage_modifications(register):
    register("user.hooked", Shrink)(shrink)
    register("user.hooked.broken", Broken)(shrink_then_fail)
"""
    )
    pytester.makepyfile(TESTS.replace("{name}", "user.hooked"))
    _check_run(pytester, "user.hooked")
