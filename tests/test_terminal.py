"""The terminal summary: one row per test that fits the terminal, -v for every measure, plain
lines when the terminal is too narrow for a table."""

from __future__ import annotations

from pytest_hemorrhage.report.markdown import render_markdown
from pytest_hemorrhage.report.terminal import closest_metric, render_results


def _record(nodeid, metrics, budget, outcome="passed", params=None):
    return {
        "nodeid": nodeid,
        "modification": "quant.rtn",
        "params": params or {"bits": 4, "group_size": 64, "symmetric": True},
        "metrics": metrics,
        "budget": budget,
        "violations": [],
        "outcome": outcome,
    }


RECORDS = [
    _record(
        "t.py::test_a_rather_long_test_name_that_will_not_fit",
        {"kl_mean": 0.01, "ppl_increase": 0.04},
        {"kl_mean": 0.1, "ppl_increase": 0.05},
    ),
    _record(
        "t.py::test_a_rather_long_test_name_that_will_not_fit",
        {"kl_mean": 0.02, "ppl_increase": 0.01},
        {"kl_mean": 0.1, "ppl_increase": 0.05},
    ),
    _record("t.py::test_two", {"kl_mean": 3.0}, {"kl_mean": 0.5}, outcome="failed"),
]


def test_the_closest_metric_is_the_largest_share_of_its_budget():
    assert closest_metric(RECORDS[0]) == ("ppl_increase", 0.04, 0.05)  # 80% beats kl's 10%
    assert closest_metric(_record("x", {"kl_mean": 0.2}, {})) == ("kl_mean", 0.2, None)


def test_one_row_per_test_its_worst_measure_within_the_width():
    text = render_results(RECORDS, width=80)
    lines = text.splitlines()
    rows = [line for line in lines if line.startswith((" passed", " failed"))]
    assert len(rows) == 2 and max(len(line) for line in lines) <= 80
    assert "test_a_rather_long_test_name_that_will_not_fit" not in rows[0]  # cut...
    assert "…" in rows[0]  # ...with an ellipsis
    assert rows[0].endswith("+0.01") and "ppl_increase 0.04 ≤ 0.05" in rows[0]
    assert rows[1].startswith(" failed") and rows[1].endswith("-2.5")


def test_verbose_shows_every_measure_and_every_budgeted_metric():
    text = render_results(RECORDS, width=80, verbose=True)
    assert text.count("t.py::test_a_rather_long_test_name_that_will_not_fit passed") == 2
    assert text.count("kl_mean") == 3 and text.count("ppl_increase") == 2


def test_a_terminal_too_narrow_for_a_table_gets_plain_lines():
    text = render_results(RECORDS, width=40)
    assert "─" not in text
    assert (
        "failed · test_two · quant.rtn(bits=4, group_size=64, symmetric=True) · "
        "kl_mean 3 ≤ 0.5 · -2.5"
    ) in text.splitlines()


def test_with_confidence_the_margin_and_verdict_are_the_upper_bounds():
    """A point estimate under its budget whose 95% bound is over it failed the check: the
    summary's margin, the verbose verdict and the CI Markdown say so, showing the bound, as the
    HTML page does."""
    record = _record(
        "t.py::test_bound",
        {"kl_mean": 0.09},
        {"kl_mean": 0.1, "confidence": 0.95},
        outcome="failed",
    )
    record["stderr"] = {"kl_mean": 0.01}  # bound 0.09 + 1.645 * 0.01 = 0.1064
    assert closest_metric(record) == ("kl_mean", 0.09, 0.1)
    row = next(
        line
        for line in render_results([record], width=100).splitlines()
        if line.startswith(" failed")
    )
    assert "kl_mean 0.09 (bound 0.106) ≤ 0.1" in row and row.endswith("-0.00645")
    text = render_results([record], width=100, verbose=True)
    assert "kl_mean" in text and "-0.0064 over (upper 95% bound 0.1064)" in text
    markdown = render_markdown({"results": [record]})
    assert "| kl_mean | 0.09 (upper 95% bound 0.1064) | 0.1 | -0.006449 |" in markdown
    record["stderr"] = {"kl_mean": None}  # no standard error: no bound holds, never ok
    assert "over" in render_results([record], width=100, verbose=True).split("kl_mean")[1]
