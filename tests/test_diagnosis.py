"""A diagnosis's one wording, for the terminal and for the HTML page's stored copy."""

from __future__ import annotations

import json
import math

from pytest_hemorrhage.diagnosis import BlockDrift, Diagnosis
from pytest_hemorrhage.metrics import jsonable


def _collapsed() -> Diagnosis:
    """Block 1 collapses (NaN outputs); block 0 already drifts."""
    return Diagnosis(
        modification="fault.bitflip",
        blocks=[
            BlockDrift(
                0, "model.layers.0", 0.2, 0.01, {"mlp.down_proj": 0.3, "self_attn.o_proj": 0.1}
            ),
            BlockDrift(1, "model.layers.1", math.nan, math.nan, {"mlp.down_proj": math.nan}),
        ],
        tokens=256,
        threshold=0.05,
        begins=0,
        most=1,
    )


def test_the_finding_opens_the_lines_and_names_where_and_what():
    d = _collapsed()
    assert (
        d.lines()[0]
        == d.finding()
        == (
            "hemorrhage begins at block 0 (mlp.down_proj drift 0.30); block 1 adds the most drift (+nan)"
        )
    )
    assert Diagnosis(**{**d.__dict__, "begins": None}).finding().startswith("no block's hidden")
    assert Diagnosis(**{**d.__dict__, "blocks": [], "begins": None}).lines() == []


def test_a_stored_diagnosis_is_worded_after_the_json_round_trip():
    """The HTML page reads the JSON report, where a non-finite figure is null: it reads "-",
    and every other word is the terminal's."""
    d = _collapsed()
    stored = json.loads(json.dumps(jsonable(d.to_dict())))
    again = Diagnosis.from_dict(stored)
    assert again.finding() == d.finding().replace("+nan", "-")
    assert again.lines()[1] == "drift by block (relative L2 of the residual stream): 0:0.20 1:-"
    collapsed_first = Diagnosis.from_dict({**stored, "begins": 1, "most": None})
    assert collapsed_first.finding() == "hemorrhage begins at block 1 (mlp.down_proj drift -)"
