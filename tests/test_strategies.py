"""Strategies shrink toward the gentlest modification and draw only valid configs."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import Phase, find, given, settings
from hypothesis import strategies as st

from pytest_hemorrhage import strategies as hst
from pytest_hemorrhage.errors import HemorrhageError
from pytest_hemorrhage.modifications import (
    Modification,
    get,
    make,
    names,
    register_modification,
)

QUIET = settings(database=None, max_examples=200)


def test_all_is_complete():
    public = {
        n
        for n, v in vars(hst).items()
        if not n.startswith("_") and callable(v) and getattr(v, "__module__", "") == hst.__name__
    }
    assert public <= set(hst.__all__)
    assert all(hasattr(hst, n) for n in hst.__all__)


def test_bit_widths_shrink_toward_more_bits():
    assert find(hst.bit_widths(), lambda b: True, settings=QUIET) == 8
    assert find(hst.bit_widths(), lambda b: b <= 3, settings=QUIET) == 3  # the breaking point
    assert find(hst.bit_widths(min_value=2, max_value=6), lambda b: True, settings=QUIET) == 6
    assert find(hst.bit_widths(choices=[1, 2, 3, 4, 8]), lambda b: b < 8, settings=QUIET) == 4


@pytest.mark.parametrize("threshold", [0.0, 0.05, 0.313, 0.62, 0.9])
def test_sparsities_shrink_to_the_smallest_failing_grid_value(threshold):
    found = find(hst.sparsities(max_value=0.9), lambda s: s >= threshold, settings=QUIET)
    assert threshold <= found < threshold + 0.01 + 1e-12


def test_sparsities_stay_on_their_grid_and_bounds():
    @settings(database=None, max_examples=50, phases=[Phase.generate])
    @given(hst.sparsities(min_value=0.2, max_value=0.5, resolution=0.05))
    def check(s):
        assert 0.2 <= s <= 0.5
        assert abs(s / 0.05 - round(s / 0.05)) < 1e-9

    check()
    with pytest.raises(HemorrhageError, match="fraction in \\[0, 1\\]"):
        hst.sparsities(max_value=1.5)


def test_group_sizes_shrink_toward_the_smallest_group():
    assert find(hst.group_sizes(), lambda g: True, settings=QUIET) == 16
    assert find(hst.group_sizes(per_row=True), lambda g: g == 0 or g >= 64, settings=QUIET) == 64
    assert find(hst.group_sizes(per_row=True), lambda g: g == 0, settings=QUIET) == 0


def test_nm_patterns_shrink_toward_low_sparsity_then_larger_groups():
    assert find(hst.nm_patterns(), lambda nm: True, settings=QUIET) == (7, 8)
    # the gentlest 50% pattern is 4:8, not 2:4
    assert find(hst.nm_patterns(), lambda nm: 1 - nm[0] / nm[1] >= 0.5, settings=QUIET) == (4, 8)
    for n, m in [(2, 4), (1, 4), (3, 8)]:
        make("prune.nm", {"n": n, "m": m})  # the patterns mean what prune.nm means


def _builtin_catalogue() -> list[str]:
    """The modifications the package itself registers, sorted: names whose handler lives in
    pytest_hemorrhage. Test files register their own (test.*, user.*) when imported; which of
    those exist at collection depends on import order, so they are left out."""
    return [n for n in names() if get(n)[1].__module__.startswith("pytest_hemorrhage.")]


BUILTIN = _builtin_catalogue()
# Parameters whose range depends on the model: the user must say (the strategy refuses).
MODEL_DEPENDENT = {"prune.layers": {"count": st.integers(0, 3)}}  # the bundled model: 4 blocks


def test_the_builtin_catalogue_is_the_package_s_own():
    assert not any(n.startswith(("test.", "user.")) for n in BUILTIN)
    assert {"quant.rtn", "quant.dtype", "prune.magnitude", "prune.layers", "decode.top_p"} <= set(
        BUILTIN
    )
    assert set(MODEL_DEPENDENT) <= set(BUILTIN)


@pytest.mark.parametrize("name", BUILTIN)
def test_every_drawn_config_is_valid(name):
    config_cls, _ = get(name)
    params = MODEL_DEPENDENT.get(name)
    if params is not None:  # without the user's range: a clear refusal naming what to pass
        with pytest.raises(HemorrhageError, match=f"pass params=\\{{'{name}'"):
            hst.modifications(names=[name])
    strategy = hst.modifications(names=[name], params={name: params} if params else None)
    drawn = []

    @settings(database=None, max_examples=15, phases=[Phase.generate])
    @given(strategy)
    def check(config):
        assert isinstance(config, config_cls)
        assert make(name, config.params()) == config  # round-trips through validation
        drawn.append(config)

    check()
    if params is not None:  # the user's strategy is the one drawn from
        assert {c.count for c in drawn} <= {0, 1, 2, 3} and len({c.count for c in drawn}) > 1


def test_modifications_shrink_to_the_gentlest_setting():
    config = find(hst.modifications(names=["quant.rtn"]), lambda c: True, settings=QUIET)
    assert (config.bits, config.group_size, config.symmetric) == (8, 16, True)
    config = find(
        hst.modifications(names=["prune.magnitude"]), lambda c: c.sparsity >= 0.4, settings=QUIET
    )
    assert (config.sparsity, config.scope) == (0.4, "layer")
    hqq = find(hst.quant_configs(names=["quant.hqq"], max_bits=6), lambda c: True, settings=QUIET)
    assert hqq.bits == 6
    pruned = find(hst.prune_configs(max_sparsity=0.5), lambda c: True, settings=QUIET)
    assert pruned.name.startswith("prune.")


def test_fixed_parameters_and_custom_strategies():
    config = find(
        hst.modifications(
            names=["quant.rtn"], group_size=32, params={"quant.rtn": {"bits": st.just(3)}}
        ),
        lambda c: True,
        settings=QUIET,
    )
    assert (config.bits, config.group_size) == (3, 32)


def test_unknown_names_and_parameters_are_clear_errors():
    with pytest.raises(HemorrhageError, match="unknown modification 'prune.nope'.*registered"):
        hst.modifications(names=["prune.nope"])

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Needs(Modification):
        strength: float  # required, and no known domain

    register_modification("test.strategies_needs", Needs)(lambda *a: None)
    with pytest.raises(HemorrhageError, match="strength.*params=\\{'test.strategies_needs'"):
        hst.modifications(names=["test.strategies_needs"])
    hst.modifications()  # left out by default instead of failing the whole strategy
    with pytest.raises(HemorrhageError, match="depends on the model; pass hi="):
        hst.near_threshold("prune.layers", "count")


def test_near_threshold_concentrates_and_still_covers_the_range():
    drawn: list[float] = []

    # derandomized: a statistical check of 40 draws must not fail by chance on some run
    @settings(database=None, max_examples=40, phases=[Phase.generate], derandomize=True)
    @given(hst.near_threshold("prune.wanda", "sparsity", estimate=0.4))
    def collect(x):
        drawn.append(x)

    collect()
    near = sum(abs(x - 0.4) <= 0.05 + 1e-9 for x in drawn)
    assert near >= 0.3 * len(drawn)  # uniform draws would put ~10% there
    assert any(x < 0.3 for x in drawn) and any(x > 0.5 for x in drawn)
    found = find(
        hst.near_threshold("prune.wanda", "sparsity", estimate=0.4),
        lambda x: x >= 0.37,
        settings=QUIET,
    )
    assert found == 0.37  # shrinking still lands on the breaking point


def test_near_threshold_draws_only_values_the_config_accepts():
    drawn: set[int] = set()

    @settings(database=None, max_examples=60, phases=[Phase.generate])
    @given(hst.near_threshold("quant.hqq", "bits", estimate=7))
    def collect(bits):
        drawn.add(bits)

    collect()
    assert 7 not in drawn and drawn <= {1, 2, 3, 4, 5, 6, 8}
    assert find(hst.near_threshold("quant.hqq", "bits"), lambda b: b <= 5, settings=QUIET) == 5


def test_the_ci_profile_is_derandomized_and_exploration_is_not():
    ci = settings.get_profile("hemorrhage-ci")
    explore = settings.get_profile("hemorrhage-explore")
    assert ci.max_examples < explore.max_examples
    assert ci.deadline is None and explore.deadline is None
    # a gate's examples follow from the code alone; exploring draws anew and replays breaks
    assert ci.derandomize and ci.database is None
    assert not explore.derandomize and explore.database is not None
