"""Where does the model break? An exploration suite a user would copy to choose a deployment.

Run: pytest examples/explore --hemorrhage-model=hemorrhage-tiny --hypothesis-profile=hemorrhage-ci
     (add --hemorrhage-plot=plots for one PNG per curve, --hemorrhage-report=report.json for
     the curves as data; point --hemorrhage-model at your own checkpoint and retune)

The summary's "hemorrhage thresholds" table is the output to read: for each method, the
gentlest setting that breaks the budget, the setting next to it that passes, and the
phase-transition point of the damage curve when the curve shows one. The asserts below are the
deployment decision: the configurations we plan to ship must stay on the safe side.
"""

import pytest
from hypothesis import given

from pytest_hemorrhage import strategies as hst

BUDGET = {"ppl_increase": 0.10}  # what we tolerate, for every configuration below
SHIP_SPARSITY = 0.30  # the pruning ratio we plan to ship
SHIP_BITS = 4  # the bit width we plan to ship


@pytest.mark.hemorrhage(**BUDGET)
@pytest.mark.parametrize("method", ["prune.wanda", "prune.magnitude"])
def test_pruning_ratio(hemorrhage, method):
    # the whole damage curve, with its phase-transition point (or why there is none) ...
    curve = hemorrhage.sweep(method, "sparsity", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    assert curve.curve[-1] > curve.curve[0]  # more pruning, more damage
    # ... and where exactly the budget breaks (bisection: 8 measures for 0.01 on [0, 1])
    threshold = hemorrhage.find_threshold(method, "sparsity", tol=0.01)
    assert threshold.value is None or threshold.value > SHIP_SPARSITY, threshold.note


@pytest.mark.hemorrhage(**BUDGET)
@pytest.mark.parametrize("method", ["quant.rtn", "quant.hqq"])
def test_bit_width(hemorrhage, method):
    threshold = hemorrhage.find_threshold(method, "bits", group_size=64)
    # fewer bits is harsher: the threshold is the widest format that breaks the budget
    assert threshold.value is None or threshold.value < SHIP_BITS, threshold.note


@pytest.mark.hemorrhage(**BUDGET)
@given(sparsity=hst.sparsities(max_value=SHIP_SPARSITY))
def test_wanda_holds_up_to_what_we_ship(hemorrhage, sparsity):
    # a property: every sparsity up to the shipped one keeps the budget; if one does not,
    # hypothesis shrinks to the gentlest that breaks, which is the threshold
    hemorrhage.check(hemorrhage.measure("prune.wanda", sparsity=sparsity))
