"""Metrics by position in the reports, from one real run on the bundled model: the JSON report
keeps every result's buckets, the HTML page and ``--hemorrhage-plot`` draw them with the
budget lines, ``-v`` adds one line along the window.

Windows of 128 tokens (the default) hold three buckets: positions 1-15, 16-63 and 64-127.
"""

from __future__ import annotations

import copy
import json
import re
from html.parser import HTMLParser

import pytest

# imported before the pytester run: in-process runs drop the modules they imported
from pytest_hemorrhage.report import html as report_html
from pytest_hemorrhage.report import plots as report_plots
from pytest_hemorrhage.report.markdown import render_markdown

ARGS = (
    "--hemorrhage-model=hemorrhage-tiny",
    "--hemorrhage-tokens=1024",
    "-p",
    "no:randomly",
    "-p",
    "no:cacheprovider",
)

SUITE = """
import pytest

@pytest.mark.hemorrhage(kl_mean=0.5, positions={"64:": {"kl_mean": 0.6}})
def test_ranged(hemorrhage):
    hemorrhage.check(hemorrhage.measure("quant.rtn", bits=4))

def test_unbudgeted(hemorrhage):
    hemorrhage.measure("quant.rtn", bits=8)
"""

BUCKETS = [[1, 16], [16, 64], [64, 128]]
_RUN: dict[str, object] = {}


@pytest.fixture
def run(request) -> dict:
    """The report, the page, the plot files and the terminal output of one real run of SUITE
    (once per process: one model load and two measures are worth sharing)."""
    if not _RUN:  # a broken run is kept too: every test then fails at once, with its output
        pytester = request.getfixturevalue("pytester")
        pytester.makepyfile(test_suite=SUITE)
        result = pytester.runpytest(
            *ARGS,
            "-v",
            "--hemorrhage-report=r.json",
            "--hemorrhage-html=r.html",
            "--hemorrhage-plot=plots",
        )
        _RUN["outcomes"] = result.parseoutcomes()
        _RUN["output"] = result.stdout.str()
        _RUN["report"] = json.loads((pytester.path / "r.json").read_text())
        _RUN["page"] = (pytester.path / "r.html").read_text(encoding="utf-8")
        _RUN["plots"] = {p.name: p.read_bytes() for p in (pytester.path / "plots").glob("*.png")}
    assert _RUN["outcomes"].get("passed") == 2, _RUN["output"][-3000:]
    return copy.deepcopy(_RUN)


def _result(report: dict, name: str) -> tuple[int, dict]:
    return next((i, r) for i, r in enumerate(report["results"]) if r["nodeid"].endswith(name))


class _Svg(HTMLParser):
    """The elements inside one card's charts: (tag, attributes) in order, and the text of
    each ``<title>`` (the tooltips)."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict]] = []
        self.titles: list[str] = []
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))
        self._in_title = tag == "title"

    def handle_endtag(self, tag):
        self._in_title = False

    def handle_data(self, data):
        if self._in_title:
            self.titles.append(data)


def _card(page: str, index: int) -> str:
    match = re.search(rf'<section class="card" id="p{index}">(.*?)</section>', page, re.S)
    assert match, f"no by-position card p{index}"
    return match.group(1)


def _svgs(card: str) -> list[_Svg]:
    parsed = []
    for svg in re.findall(r"<svg .*?</svg>", card, re.S):
        parser = _Svg()
        parser.feed(svg)
        parsed.append(parser)
    return parsed


def _of(svg: _Svg, tag: str, cls: str) -> list[dict]:
    return [a for t, a in svg.elements if t == tag and a.get("class") == cls]


def test_the_json_report_keeps_every_results_buckets(run):
    report = run["report"]
    for record in report["results"]:
        positions = record["positions"]
        assert [b["positions"] for b in positions] == BUCKETS
        # every scored token is in one bucket: 8 windows, 127 predictions each
        assert sum(b["tokens"] for b in positions) == record["tokens"] == 8 * 127
        for bucket in positions:
            assert bucket["metrics"]["kl_mean"] > 0 and bucket["stderr"]["kl_mean"] > 0
    _, ranged = _result(report, "test_ranged")
    assert ranged["budget"] == {"kl_mean": 0.5, "kl_mean[64:]": 0.6}
    # the range's metric is the last bucket's: the same tokens
    assert ranged["metrics"]["kl_mean[64:]"] == pytest.approx(
        ranged["positions"][2]["metrics"]["kl_mean"], rel=1e-6
    )


def test_the_page_draws_each_bucket_with_its_error_bar_tokens_and_the_budget_lines(run):
    report, page = run["report"], run["page"]
    assert page == report_html.render_html(report)  # the page the run wrote
    assert 'id="positions"' in page
    i, ranged = _result(report, "test_ranged")
    assert f'<a href="#p{i}">by position ↓</a>' in page  # the result's row links its chart
    card = _card(page, i)
    [svg] = _svgs(card)  # one budgeted metric: one chart
    points = _of(svg, "circle", "point")
    assert len(points) == 3
    xs = [float(p["cx"]) for p in points]
    assert xs == sorted(xs) and len(set(xs)) == 3
    # one error bar per point (a stem and two caps), as long as the standard error says
    errors = _of(svg, "line", "err")
    assert len(errors) == 3 * 3
    stems = [e for e in errors if e["x1"] == e["x2"]]
    heights = [abs(float(e["y1"]) - float(e["y2"])) for e in stems]
    ses = [b["stderr"]["kl_mean"] for b in ranged["positions"]]
    assert [h / heights[0] for h in heights] == pytest.approx([se / ses[0] for se in ses], abs=0.02)
    # the tokens per bucket: in each point's tooltip and in the table beside the chart
    for bucket, label in zip(ranged["positions"], ("1-15", "16-63", "64-127"), strict=True):
        assert any(
            f"at positions {label} ({bucket['tokens']:,} tokens)" in t for t in svg.titles
        ), svg.titles
        assert (
            f'<td class="n">{label}</td><td class="n">{report_html._number_text(bucket["tokens"])}'
            in card
        )

    whole = _of(svg, "line", "budget")
    [ranged_line] = _of(svg, "line", "budget range")
    assert [w["data-key"] for w in whole] == ["kl_mean"]
    assert ranged_line["data-key"] == "kl_mean[64:]"
    half = (xs[1] - xs[0]) / 2  # the buckets are drawn equally wide
    # the whole window's budget spans every bucket; the range's starts where 64-127 does
    assert float(whole[0]["x1"]) == pytest.approx(xs[0] - half, abs=0.2)
    assert float(whole[0]["x2"]) == pytest.approx(xs[2] + half, abs=0.2)
    assert float(ranged_line["x1"]) == pytest.approx(xs[2] - half, abs=0.2)
    assert float(ranged_line["x2"]) == pytest.approx(xs[2] + half, abs=0.2)
    # the budgets sit at their heights: 0.6 above 0.5, the same scale as the points
    assert float(ranged_line["y1"]) < float(whole[0]["y1"])
    assert "kl_mean[64:] ≤ 0.6000 (positions 64-127)" in card

    # a measure without a budget: kl_mean along the window, no budget line
    j, _ = _result(report, "test_unbudgeted")
    [svg] = _svgs(_card(page, j))
    assert len(_of(svg, "circle", "point")) == 3 and 'aria-label="kl_mean by position"' in page
    assert not _of(svg, "line", "budget") and not _of(svg, "line", "budget range")


def test_a_range_inside_a_bucket_is_placed_on_the_log_scale(run):
    """Positions 16-63 are drawn log-spaced: a budget up to position 32 ends halfway through
    that bucket, at its point; one beyond the window draws nothing."""
    report = run["report"]
    i, record = _result(report, "test_ranged")
    record["budget"] = {"kl_mean[:32]": 0.1, "kl_mean[4096:]": 0.1}
    [svg] = _svgs(_card(report_html.render_html(report), i))
    xs = [float(p["cx"]) for p in _of(svg, "circle", "point")]
    [line] = _of(svg, "line", "budget range")
    assert line["data-key"] == "kl_mean[:32]"
    assert float(line["x1"]) == pytest.approx(xs[0] - (xs[1] - xs[0]) / 2, abs=0.2)
    assert float(line["x2"]) == pytest.approx(xs[1], abs=0.2)


def test_each_budgeted_metric_gets_a_chart_and_a_non_finite_bucket_no_point(run):
    """A collapsed bucket (inf before the JSON round trip, null after) is left off the chart and
    shown in the table; the other buckets and the budget lines are drawn as ever."""
    report = run["report"]
    i, record = _result(report, "test_ranged")
    record["budget"] = {"ppl_increase": 0.5, "kl_mean": 0.5}
    record["positions"][0]["metrics"]["kl_mean"] = float("inf")
    record["positions"][1]["metrics"]["kl_mean"] = None
    card = _card(report_html.render_html(report), i)
    ppl, kl = _svgs(card)
    assert len(_of(ppl, "circle", "point")) == 3 and len(_of(kl, "circle", "point")) == 1
    assert [b["data-key"] for b in _of(kl, "line", "budget")] == ["kl_mean"]
    assert '<th class="n">ppl_increase</th><th class="n">kl_mean</th>' in card
    assert re.search(r'<td class="n">1-15</td>.*?<td class="n">inf ± ', card)
    assert re.search(
        r'<td class="n">16-63</td>(<td class="n">[^<]*</td>){2}<td class="n">n/a ± ', card
    )


def test_a_result_with_one_bucket_or_none_gets_no_chart(run):
    """An encoder's result, or one from a report written before positions were measured."""
    report = run["report"]
    report["results"][0]["positions"] = report["results"][0]["positions"][:1]
    del report["results"][1]["positions"]
    page = report_html.render_html(report)
    assert 'id="positions"' not in page and "<svg" not in page and "by position ↓" not in page


def test_the_plot_directory_has_one_chart_per_result_and_it_draws_the_budget(run, tmp_path):
    pytest.importorskip("matplotlib")
    plots = run["plots"]
    for name in ("test_ranged", "test_unbudgeted"):
        [png] = [p for n, p in plots.items() if n.startswith(f"positions-{name}-quant.rtn-")]
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000  # a drawn chart
    _, record = _result(run["report"], "test_ranged")
    drawn = report_plots.plot_positions(tmp_path / "with.png", record).read_bytes()
    record["budget"] = {"kl_mean": 0.5}
    without = report_plots.plot_positions(tmp_path / "without.png", record).read_bytes()
    assert drawn != without  # the range's budget line is in the figure


def test_verbose_summary_and_markdown_show_the_range_like_any_metric(run):
    output = run["output"]
    _, ranged = _result(run["report"], "test_ranged")
    assert re.search(r"kl_mean\[64:\] +0\.\d{4} +≤ 0\.6000 +\+0\.\d{4} ok", output), output
    # one line along the window per measure, each bucket named by its positions
    lines = re.findall(r"by position: kl_mean .*", output)
    assert len(lines) == 2, output
    for line in lines:
        assert re.fullmatch(
            r"by position: kl_mean \S+ \(1-15\)(, \S+ \(16-63\),| …) \S+ \(64-127\)", line.strip()
        ), line
    markdown = render_markdown(run["report"])
    value = f"{ranged['metrics']['kl_mean[64:]']:.4g}"
    assert f"| kl_mean[64:] | {value} | 0.6 |" in markdown, markdown
