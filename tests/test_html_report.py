"""The HTML release report, rendered from a real run's JSON report and opened in a real browser."""

from __future__ import annotations

import base64
import copy
import json
import math
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

# imported before the pytester run: in-process runs drop the modules they imported
from pytest_hemorrhage.report import html as report_html

MODEL = (
    "--hemorrhage-model=hemorrhage-tiny",
    "--hemorrhage-tokens=1024",
    "-p",
    "no:randomly",
    "-p",
    "no:cacheprovider",
)
CHROMIUM = Path("/usr/bin/chromium")

RELEASE = """
import pytest

@pytest.mark.hemorrhage(ppl_increase=0.01, kl_mean=0.005)
def test_int8_is_lossless(hemorrhage):
    hemorrhage.check(hemorrhage.measure("quant.rtn", bits=8, group_size=64))

@pytest.mark.hemorrhage(ppl_increase=0.01, kl_mean=0.005)
def test_two_bits(hemorrhage):
    hemorrhage.check(hemorrhage.measure("quant.rtn", bits=2))

@pytest.mark.hemorrhage(ppl_increase=0.10)
def test_magnitude_curve(hemorrhage):
    hemorrhage.sweep("prune.magnitude", "sparsity", [0.2, 0.5, 0.8])

@pytest.mark.hemorrhage(ppl_increase=0.10)
def test_rtn_threshold(hemorrhage):
    hemorrhage.find_threshold("quant.rtn", "bits", lo=2, hi=4)

@pytest.mark.parametrize("tag", ["<script>alert('x')</script>"])
def test_escaped(hemorrhage, tag):
    hemorrhage.measure("quant.rtn", bits=8)
"""

_RUN: dict[str, dict] = {}


@pytest.fixture
def report(request) -> dict:
    """The JSON report of a real run of RELEASE (run once per process: pytester is
    function-scoped, and one model load and a dozen measures are worth sharing)."""
    if not _RUN:  # a broken run is kept too: every test then fails at once, with its output
        pytester = request.getfixturevalue("pytester")
        pytester.makepyfile(test_release=RELEASE)
        result = pytester.runpytest(*MODEL, "--hemorrhage-report=r.json")
        outcomes = result.parseoutcomes()
        _RUN["run"] = ((outcomes.get("passed"), outcomes.get("failed")), result.stdout.str())
        if (pytester.path / "r.json").exists():
            _RUN["report"] = json.loads((pytester.path / "r.json").read_text())
    counts, output = _RUN["run"]
    assert counts == (4, 1) and "report" in _RUN, output[-3000:]
    return copy.deepcopy(_RUN["report"])


class _Text(HTMLParser):
    """The page's ids, images and visible text; raises on tags closed out of order."""

    VOID = {"meta", "img", "br", "link", "input", "hr"}
    INLINE = {"a", "b", "i", "code", "span", "summary"}  # no space at their edges

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.images: list[str] = []
        self.text: list[str] = []
        self.open: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "img":
            self.images.append(attrs["src"])
        if tag not in self.VOID:
            self.open.append(tag)
        if tag not in self.INLINE:
            self.text.append(" ")

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, (tag, self.open[-5:])
        self.open.pop()
        if tag not in self.INLINE:
            self.text.append(" ")

    def handle_data(self, data):
        self.text.append(data)


def _parse(page: str) -> _Text:
    parser = _Text()
    parser.feed(page)
    parser.close()
    assert parser.open == []
    return parser


def _section(page: str, element_id: str) -> str:
    """The visible text of the element with ``element_id``, whitespace collapsed."""
    match = re.search(rf'<(\w+)[^>]* id="{element_id}"[^>]*>(.*?)</\1>', page, re.S)
    assert match, element_id
    return " ".join("".join(_parse(f"<div>{match.group(2)}</div>").text).split())


def _by_test(report: dict, name: str) -> tuple[int, dict]:
    return next((i, r) for i, r in enumerate(report["results"]) if r["nodeid"].endswith(name))


def test_the_page_shows_fingerprints_each_result_against_its_budget_curves_and_blame(report):
    page = report_html.render_html(report)
    parsed = _parse(page)
    assert {"fingerprints", "results", "curves", "blame"} <= set(parsed.ids)
    text = " ".join("".join(parsed.text).split())
    assert report["model"]["fingerprint"] in text and report["data"]["fingerprint"] in text
    assert (
        f"seq_len {report['data']['seq_len']}" in text
        and f"parameters {report['model']['parameters']:,}" in text
    )

    i, lossless = _by_test(report, "test_int8_is_lossless")
    row = _section(page, f"r{i}")
    value = lossless["metrics"]["ppl_increase"]
    assert "passed" in row and "quant.rtn(bits=8, group_size=64, symmetric=True)" in row
    assert f"ppl_increase {report_html._number_text(value)} ± " in row
    assert f"≤ 0.0100 +{0.01 - value:.4f} ok" in row  # budget, margin, verdict

    i, two = _by_test(report, "test_two_bits")
    row = _section(page, f"r{i}")
    kl = two["metrics"]["kl_mean"]
    assert two["outcome"] == "failed" and "failed" in row and "blame ↓" in row
    assert (
        f"kl_mean {kl:.4f} ± {report_html._number_text(two['stderr']['kl_mean'])} ≤ 0.0050 "
        f"−{kl - 0.005:.4f} over"
    ) in row
    assert "1 of 3 measures over budget" in text  # the banner names the failure

    # each curve: a PNG inline, the finding in words, every measured point
    assert len(parsed.images) == 2
    for src in parsed.images:
        assert base64.b64decode(src.removeprefix("data:image/png;base64,"))[:8] == (
            b"\x89PNG\r\n\x1a\n"
        )
    sweep = next(e for e in report["explorations"] if e["kind"] == "sweep")
    assert sweep["s0"] is None  # three points cannot show a transition: the page says why
    assert f"no phase transition (3 points): {sweep['fit']['reason']}" in text
    threshold = next(e for e in report["explorations"] if e["kind"] == "threshold")
    shown = report_html._number_text(threshold["value"])
    assert f"breaks at bits = {shown} (ppl_increase > 0.1000)" in text

    # blame: one row per block of the failed check, where the drift begins
    i, _ = _by_test(report, "test_two_bits")
    blame = two["details"]["blame"]
    card = _section(page, f"b{i}")
    assert f"hemorrhage begins at block {blame['blocks'][blame['begins']]['index']}" in card
    # in the terminal's words: the finding the failed check printed, whole
    printed = re.search(r"hemorrhage begins at block [^\n]*", _RUN["run"][1])
    assert printed and printed.group(0).strip() in card, printed
    for block in blame["blocks"]:
        assert f"{block['name']} {report_html._number_text(block['drift_l2'])}" in card
    assert page.count('<div class="bar">') == len(blame["blocks"])


def test_the_phase_transition_is_marked_on_the_curve_and_in_words(report):
    pytest.importorskip("matplotlib")
    sweep = next(e for e in report["explorations"] if e["kind"] == "sweep")
    before = _parse(report_html.render_html({"explorations": [sweep]})).images
    assert _parse(report_html.render_html({"explorations": [sweep]})).images == before
    sweep.update(s0=0.62, s0_stderr=0.04)
    sweep["fit"]["r2"] = 0.97
    page = report_html.render_html({"explorations": [sweep]})
    assert "phase transition at sparsity = 0.6200 ± 0.0400 (fit R² 0.97, 3 points" in " ".join(
        "".join(_parse(page).text).split()
    )
    assert _parse(page).images != before  # the marker is drawn


def test_every_string_is_escaped(report):
    hostile = "<img src=x onerror=alert(1)>\"'&"
    shown = "&lt;img src=x onerror=alert(1)&gt;&quot;&#x27;&amp;"
    _, two = _by_test(report, "test_two_bits")
    two["modification"] = hostile
    two["params"] = {hostile: hostile}
    two["violations"].append(f"{hostile}: not measured")
    two["details"]["blame"]["notes"] = [hostile]
    two["details"]["blame"]["blocks"][0]["name"] = hostile
    report["model"]["spec"] = hostile
    report["settings"] = {hostile: hostile}
    for record in report["explorations"]:
        record["modification"] = hostile
        record.setdefault("fit", {})["reason"] = hostile
    page = report_html.render_html(report)
    assert hostile not in page and "onerror=alert(1)>" not in page
    assert page.count(shown) >= 12, page.count(shown)
    # pytest's node id kept the parametrized tag; the page shows it as text, never as markup
    assert "<script" not in page.lower()
    assert "test_escaped[&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;]" in page
    assert len(_parse(page).images) == 2  # no image smuggled in by the hostile strings


def test_non_finite_values_and_confidence_bounds_read_honestly(report):
    """Before the JSON round trip a collapsed model's metric is nan or inf; with a confidence
    budget the verdict is the plugin's (its violation lines), the margin is to the bound."""
    i, lossless = _by_test(report, "test_int8_is_lossless")
    lossless["metrics"]["kl_mean"] = math.inf
    lossless["stderr"]["kl_mean"] = math.nan
    lossless["nonfinite_tokens"] = 3
    j, two = _by_test(report, "test_two_bits")
    two["budget"] = {"kl_mean": 100.0, "confidence": 0.95}
    two["metrics"]["kl_mean"], two["stderr"]["kl_mean"] = 99.0, 1.0
    two["violations"] = ["kl_mean: 99.0000 (upper 95% bound 100.6449) > 100.0000 (...)"]
    page = report_html.render_html(report)
    row = _section(page, f"r{i}")
    assert "kl_mean inf ± nan ≤ 0.0050 over" in row
    assert "non-finite tokens 3 ≤ 0 over" in row
    row = _section(page, f"r{j}")
    assert "kl_mean 99.0000 (upper 95% bound 100.6449) ± 1.0000 ≤ 100.0000 −0.6449 over" in row


def test_without_matplotlib_the_tables_remain_with_a_note(report, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    page = report_html.render_html(report)
    parsed = _parse(page)
    assert parsed.images == [] and {"results", "curves", "blame"} <= set(parsed.ids)
    text = " ".join("".join(parsed.text).split())
    assert (
        "curves not drawn: matplotlib is not installed (pip install pytest-hemorrhage[plot])"
        in text
    )
    sweep = next(e for e in report["explorations"] if e["kind"] == "sweep")
    for point in sweep["points"]:
        metric = point["metrics"]["ppl_increase"]
        assert (
            f"{report_html._number_text(point['value'])} {report_html._number_text(metric)} "
            in text
        )


def test_write_html_writes_the_page_or_warns_once_and_leaves_the_verdicts(report, tmp_path):
    path = report_html.write_html(report, tmp_path / "out" / "release.html")
    assert path == tmp_path / "out" / "release.html"
    assert path.read_text(encoding="utf-8") == report_html.render_html(report)

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    before = copy.deepcopy(report)
    with pytest.warns(UserWarning) as caught:
        assert report_html.write_html(report, blocker / "release.html") is None
    assert len(caught) == 1
    message = str(caught[0].message)
    assert str(blocker / "release.html") in message and "verdicts are unchanged" in message
    assert f"{blocker} is not a directory" in message
    assert report == before


def _chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp / 'profile'}",
            "--enable-logging=stderr",
            "--v=0",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="headless Chromium is not installed at "
    "/usr/bin/chromium (Debian: apt-get install chromium; .ci/run installs it)",
)
def test_chromium_renders_the_page_without_console_errors(report, tmp_path):
    page = report_html.write_html(report, tmp_path / "release.html")
    shot = tmp_path / "shot.png"
    run = _chromium(f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri(), tmp=tmp_path)
    # any console message is a failure: the page has no script, and a fetch the CSP blocks
    # or a script error shows up as one
    console = [line for line in run.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    assert console == [], console
    assert shot.exists(), run.stderr[-2000:]
    pil = pytest.importorskip("PIL.Image")
    with pil.open(shot) as image:
        assert image.size == (1200, 2000)
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colors) > 200  # text, badges and curves, not a blank or error page
    dom = _chromium("--dump-dom", page.as_uri(), tmp=tmp_path).stdout
    for section in ("fingerprints", "results", "curves", "blame"):
        assert f'id="{section}"' in dom
    assert dom.count("<img") == 2 and "1 of 3 measures over budget" in dom
