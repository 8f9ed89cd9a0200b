"""A measure leaves the user's process as it found it: torch's global RNG state and thread
count, warnings filters, logger levels and matplotlib's backend; seeded draws come from the
plugin's own generators, so the same seed still gives the same metrics."""

from __future__ import annotations

import importlib.util
import inspect
import logging
import warnings
from dataclasses import dataclass

import pytest
import torch

from pytest_hemorrhage.modifications import Modification, Patch, Target, registry
from pytest_hemorrhage.modifications import register_modification as register

# One measure per family that had (or may reach) an offender: draws (noise, faults, sampled
# generation), the SVD's thread count (lowrank), library loggers and warnings filters quieted
# around lazy imports (bitsandbytes, hqq, torchao).
FAMILIES = [
    ("noise.gaussian", {"sigma": 0.05}),
    ("fault.bitflip", {"count": 4}),
    ("decode.sampling", {}),
    ("lowrank.svd", {"rank_ratio": 0.5}),
    ("quant.bnb_4bit", {}),
    ("quant.hqq", {"bits": 4}),
    ("quant.torchao", {}),
]
NEEDS = {"quant.bnb_4bit": "bitsandbytes", "quant.hqq": "hqq", "quant.torchao": "torchao"}


def process_state() -> dict[str, object]:
    """What a measure must leave alone, in comparable form."""
    loggers = {
        n: lg.level
        for n, lg in logging.root.manager.loggerDict.items()
        if isinstance(lg, logging.Logger)
    }
    state: dict[str, object] = {
        "rng": torch.get_rng_state().tolist(),
        "threads": torch.get_num_threads(),
        "warnings filters": list(warnings.filters),
        "logger levels": loggers | {"<root>": logging.root.level},
    }
    if importlib.util.find_spec("matplotlib"):
        import matplotlib

        state["matplotlib backend"] = matplotlib.get_backend()
    return state


def differences(before: dict[str, object], after: dict[str, object]) -> list[str]:
    """What changed; loggers created meanwhile (lazy imports) must be at their default level."""
    out = [k for k in before if k != "logger levels" and before[k] != after[k]]
    old, new = before["logger levels"], after["logger levels"]
    out += [f"logger {n}: {old[n]} -> {new[n]}" for n in old if old[n] != new[n]]
    out += [f"new logger {n} at level {new[n]}" for n in new.keys() - old.keys() if new[n]]
    return out


USER_TEST = f"""
import importlib.util, pytest, torch
from test_side_effects_helpers import process_state, differences

FAMILIES = {FAMILIES!r}
NEEDS = {NEEDS!r}

def measure_all(hemorrhage, families):
    torch.manual_seed(123)
    first = torch.rand(4)
    before = process_state()
    for name, params in families:
        if name in NEEDS and importlib.util.find_spec(NEEDS[name]) is None:
            continue
        hemorrhage.measure(name, **params)
        assert differences(before, process_state()) == [], name
        print("MEASURED", name)
    then = torch.rand(4)
    torch.manual_seed(123)
    assert torch.equal(torch.cat([first, then]), torch.rand(8)), "the user's stream moved"

def test_measures_leave_the_process_alone(hemorrhage):
    # the libraries imported on first use (where loggers and warnings get quieted), and a draw
    measure_all(hemorrhage, [f for f in FAMILIES if f[0] in NEEDS or f[0] == "noise.gaussian"])
"""


def test_a_measure_of_each_family_leaves_a_fresh_process_as_it_found_it(pytester):
    """In a fresh process, so that the libraries' first imports (where loggers and warnings
    get quieted) happen inside the measure."""
    source = "\n\n".join(inspect.getsource(f) for f in (process_state, differences))
    pytester.makepyfile(
        test_side_effects_helpers="import importlib.util, logging, warnings\nimport torch\n\n"
        + source,
        test_user=USER_TEST,
    )
    result = pytester.runpytest_subprocess(
        "--hemorrhage-model=hemorrhage-tiny",
        "--hemorrhage-tokens=128",
        "-p",
        "no:randomly",
        "-s",
        "-p",
        "no:cacheprovider",
    )
    result.assert_outcomes(passed=1)
    measured = {w for line in result.outlines for w in line.split("MEASURED ")[1:]}
    assert "noise.gaussian" in measured


@pytest.mark.parametrize(("name", "params"), FAMILIES, ids=[n for n, _ in FAMILIES])
def test_a_measure_leaves_the_process_as_it_found_it(harness, name, params):
    if name in NEEDS and importlib.util.find_spec(NEEDS[name]) is None:
        pytest.skip(f"{NEEDS[name]} is not installed")
    torch.manual_seed(7)
    before = process_state()
    harness.measure([(name, params)], frozenset({"gen_mismatch"}))
    assert differences(before, process_state()) == []


def test_the_svd_leaves_torchs_process_wide_thread_count_alone(harness, monkeypatch):
    calls = []
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the old code dropped it to 1 (and back) when above 1
    try:
        monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
        with harness.modified([("lowrank.svd", {"rank_ratio": 0.5})]):  # the SVDs, no forward
            pass
        monkeypatch.undo()
    finally:
        torch.set_num_threads(threads)
    assert calls == []


@pytest.mark.parametrize("name", ["noise.gaussian", "fault.bitflip"])
def test_the_same_seed_gives_the_same_metrics_whatever_the_global_rng(harness, name):
    torch.manual_seed(1)
    first = harness.measure(name).metrics
    torch.manual_seed(2)
    torch.rand(1000)
    second = harness.measure(name).metrics
    assert first == second
    assert first["kl_mean"] > 0  # the draw did change the model


@dataclass(frozen=True, kw_only=True)
class DrawsFromContext(Modification):
    """Noise on the head, drawn from the context's generator."""

    sigma: float = 0.5


@dataclass(frozen=True, kw_only=True)
class DrawsFromGlobal(Modification):
    """Noise on the head, drawn from torch's global generator (third-party style)."""

    sigma: float = 0.5


def _head_noise(config, model, patch: Patch, context) -> None:
    noise = (
        torch.randn(model.lm_head.weight.shape, generator=context.generator("lm_head"))
        if isinstance(config, DrawsFromContext)
        else torch.randn(model.lm_head.weight.shape)
    )
    patch.parametrize(
        Target("lm_head", model.lm_head, False), lambda w: w + config.sigma * noise.to(w)
    )


@pytest.fixture
def drawing_handlers():
    saved = dict(registry._REGISTRY)
    register("test.draws_from_context", DrawsFromContext)(_head_noise)
    register("test.draws_from_global", DrawsFromGlobal)(_head_noise)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


def test_context_generator_is_seeded_and_leaves_the_global_stream_alone(harness, drawing_handlers):
    torch.manual_seed(1)
    first = harness.measure(DrawsFromContext()).metrics
    torch.manual_seed(2)
    state = torch.get_rng_state()
    second = harness.measure(DrawsFromContext()).metrics
    assert torch.equal(torch.get_rng_state(), state)
    assert first == second and first["kl_mean"] > 0
    # the stage's position and the parts enter the seed: two stages draw different noise
    g = harness.context.generator
    assert not torch.equal(torch.rand(8, generator=g("a")), torch.rand(8, generator=g("b")))
    assert torch.equal(torch.rand(8, generator=g("a")), torch.rand(8, generator=g("a")))
    assert g().device == harness.device


def test_a_handler_drawing_from_the_global_rng_does_not_advance_the_callers_stream(
    harness, drawing_handlers
):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    result = harness.measure(DrawsFromGlobal())
    with harness.modified(DrawsFromGlobal()):
        pass
    assert result.metrics["kl_mean"] > 0
    assert torch.equal(torch.rand(3), expected)
