"""Under pytest-xdist (``-n 2``) no result is lost: one user suite measuring every kind of result
(catalogue modifications, a composition, library values in a handler's details, each kind of
candidate, a model object, early stopping, a threshold search, a sweep, blame) gives the same
JSON report, terminal summary, comparison, CI Markdown and HTML page as without xdist; a worker
that cannot send its results, or goes down before sending them, fails the run saying which.

The suite runs once per mode (two pytest processes, side by side), shared by the tests here;
they take about a minute of CPU (three processes import torch and transformers, four candidates
load in each mode), hence ``slow``.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("xdist")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).parent.parent
BUILD = ROOT / "examples" / "gate" / "build_artifacts.py"
ARGS = (
    "--hemorrhage-model=hemorrhage-tiny",
    "--hemorrhage-tokens=2048",  # 16 windows: room for early stopping's interim looks
    "--hemorrhage-early-stop",
    "-p",
    "no:randomly",
    "-p",
    "no:cacheprovider",
    "-rA",
)

CONFTEST = '''
import enum
import pathlib
from dataclasses import dataclass

import torch

from pytest_hemorrhage.modifications import Modification

torch.set_num_threads(1)  # the same kernels, so the same bits, in every process


class Color(enum.Enum):
    RED = 1


class Opaque:
    def __repr__(self):
        return "<opaque>"


@dataclass(frozen=True, kw_only=True)
class Tag(Modification):
    strength: float = 1.0


def tag(config, model, patch, context):
    """Changes nothing; reports what libraries hand back (none of it plain data)."""
    patch.details["tag"] = {
        "color": Color.RED,
        "dtype": torch.float16,
        "path": pathlib.Path("w.bin"),
        "scale": torch.tensor([0.5, 2.0]),
        "opaque": Opaque(),
    }


def pytest_hemorrhage_modifications(register):
    register("user.tag", Tag)(tag)
'''

FACTORIES = '''
def damaged():
    """A candidate made by a factory: the bundled model with one weight scaled."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pytest_hemorrhage.loading import BUNDLED_MODEL

    model = AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL, dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1.05)
    return model, AutoTokenizer.from_pretrained(BUNDLED_MODEL)
'''

KINDS = """
import copy

import pytest
import torch

from conftest import Color


@pytest.mark.hemorrhage(kl_mean=5.0)
def test_catalogue(hemorrhage):
    hemorrhage.check(hemorrhage.measure("quant.rtn", bits=4))  # settled early


def test_composition(hemorrhage):
    hemorrhage.measure([("prune.magnitude", {"sparsity": 0.3}), ("quant.rtn", {"bits": 8})])


def test_library_values(hemorrhage):
    tag = hemorrhage.measure("user.tag").details["tag"]
    assert tag["color"] == 1 and tag["dtype"] == "float16" and tag["scale"] == [0.5, 2.0]
    assert tag["path"] == "w.bin" and tag["opaque"] == "<opaque>"


@pytest.mark.hemorrhage(kl_mean=5.0)
def test_candidate(hemorrhage, hemorrhage_candidate):
    hemorrhage.check(hemorrhage.measure_model(hemorrhage_candidate))


def test_model_object(hemorrhage):
    model = copy.deepcopy(hemorrhage.model)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.1)
    hemorrhage.measure_model(model, label="object")


@pytest.mark.hemorrhage(kl_mean=0.01)
def test_threshold(hemorrhage):
    hemorrhage.find_threshold("quant.rtn", "bits")


def test_sweep(hemorrhage):
    hemorrhage.sweep("prune.magnitude", "sparsity", [0.2, 0.6])


@pytest.mark.xfail(strict=True, reason="over budget: blame's figures go to the report")
@pytest.mark.hemorrhage(kl_mean=1e-9)
def test_blame(hemorrhage):
    hemorrhage.check(hemorrhage.measure("quant.rtn", bits=2))


def test_late_value(hemorrhage):
    result = hemorrhage.measure("quant.rtn", bits=8)
    result.details["late"] = Color.RED  # after the result was recorded: not converted
"""

SUMMARY = re.compile(r"hemorrhage(: | compared with | model: )")
LATE = (
    "hemorrhage: test_kinds.py::test_late_value: result details.late = <Color.RED: 1> (Color) "
    "is not plain data*"
)


def _builder():
    spec = importlib.util.spec_from_file_location("gate_build", BUILD)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _start(where: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "GITHUB_STEP_SUMMARY": str(where / "summary.md")}
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", *ARGS, *args],
        cwd=where,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The suite's two runs, ``plain`` and ``xdist`` (``-n 2``): per mode, its exit code,
    output, JSON report, CI Markdown and HTML page."""
    root = tmp_path_factory.mktemp("xdist")
    build = _builder()
    candidates = [
        shutil.copytree(ROOT / "examples" / "gate" / "artifacts" / "w4a16", root / "w4a16"),
        build.build_nf4(root / "nf4"),
        build.build_gguf(root / "tiny-q8_0.gguf", "Q8_0"),
        "factories:damaged",
    ]
    old = {  # the last release's report: the GGUF file measured no drift then
        "schema_version": 2,
        "results": [
            {
                "nodeid": "test_kinds.py::test_candidate[tiny-q8_0.gguf]",
                "modification": "candidate",
                "params": {"label": "tiny-q8_0.gguf"},
                "metrics": {"kl_mean": 0.0},
            }
        ],
    }
    (root / "old.json").write_text(json.dumps(old))
    started = {}
    for mode, extra in (("plain", ()), ("xdist", ("-n", "2"))):
        where = root / mode
        where.mkdir()
        (where / "conftest.py").write_text(CONFTEST)
        (where / "factories.py").write_text(FACTORIES)
        (where / "test_kinds.py").write_text(KINDS)
        started[mode] = _start(
            where,
            *extra,
            *(f"--hemorrhage-candidate={c}" for c in candidates),
            f"--hemorrhage-cache-dir={root / 'cache'}",
            f"--hemorrhage-compare={root / 'old.json'}",
            "--hemorrhage-compare-fail=kl_mean:0",
            "--hemorrhage-report=report.json",
            "--hemorrhage-html=page.html",
        )
    out = {}
    for mode, process in started.items():
        output = process.communicate(timeout=900)[0]
        where = root / mode
        (where / "output.txt").write_text(output)
        out[mode] = {
            "rc": process.returncode,
            "output": output,
            "report": json.loads((where / "report.json").read_text()),
            "markdown": (where / "summary.md").read_text()
            if (where / "summary.md").exists()
            else "",
            "html": (where / "page.html").read_text(),
        }
    return out


def _key(record: dict) -> str:
    return json.dumps([record["nodeid"], record.get("modification"), record.get("params")])


def _results(report: dict) -> list[dict]:
    return sorted(report["results"], key=_key)


def test_the_report_under_xdist_equals_the_report_without(runs):
    plain, xdist = runs["plain"]["report"], runs["xdist"]["report"]
    assert _results(xdist) == _results(plain)  # same results, metrics, details, comparisons
    assert sorted(xdist["explorations"], key=_key) == sorted(plain["explorations"], key=_key)
    by_label = lambda report: sorted(report["candidates"], key=lambda c: c["label"])  # noqa: E731
    assert by_label(xdist) == by_label(plain)
    assert {
        k: v for k, v in xdist.items() if k not in ("results", "explorations", "candidates")
    } == {k: v for k, v in plain.items() if k not in ("results", "explorations", "candidates")}


def test_every_kind_of_result_arrives(runs):
    report = runs["xdist"]["report"]
    results = {
        r["params"].get("label", r["nodeid"].partition("::")[2]): r for r in report["results"]
    }
    for name in (
        "test_catalogue",
        "test_composition",
        "test_library_values",
        "test_blame",
        "test_late_value",
        "w4a16",
        "nf4",
        "tiny-q8_0.gguf",
        "factories:damaged",
        "object",
    ):
        assert name in results, sorted(results)
    assert results["test_catalogue"]["details"]["early_stop"]["stopped"] is True
    assert results["test_blame"]["details"]["blame"]["blocks"]  # added after the record
    assert results["test_blame"]["outcome"] == "xfailed"
    assert "+" in results["test_composition"]["modification"]
    # the values a handler or a library hands back, as plain data; the object, as its repr
    tag = results["test_library_values"]["details"]
    assert tag["tag"] == {
        "color": 1,
        "dtype": "float16",
        "path": "w.bin",
        "scale": [0.5, 2.0],
        "opaque": "<opaque>",
    }
    assert tag["repr_of"] == ["details.tag.opaque (Opaque)"]
    assert results["test_late_value"]["details"]["late"] == 1
    quantization = {c["label"]: c["quantization"] for c in report["candidates"]}
    # bitsandbytes' config hands back transformers' QuantizationMethod enum (issue 24's crash)
    assert quantization["nf4"] == "bitsandbytes" and quantization["w4a16"] == "compressed-tensors"
    assert {e["kind"] for e in report["explorations"]} == {"threshold", "sweep"}
    assert all("comparison" in r for r in report["results"])
    # every worker's environment reached the controller: each result names one it has
    measured = [*report["results"], *report["explorations"]]
    assert all(r["environment"] in report["environments"] for r in measured)


def _summary(output: str) -> list[str]:
    """The terminal summary (lost results, comparison, rows, thresholds), in no particular
    order: xdist shuffles the tests."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if SUMMARY.match(line))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("=="))
    return sorted(lines[start:end])


def _unordered(text: str) -> list[str]:
    """``text``'s lines, and the items of a line listing results (``label: a; b``), sorted."""

    def items(line: str) -> str:
        label, colon, rest = line.partition(": ")
        return label + colon + "; ".join(sorted(rest.split("; "))) if "; " in rest else line

    return sorted(items(line) for line in text.splitlines())


def _outcomes(output: str) -> dict[str, int]:
    last = output.strip().splitlines()[-1]
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|xfailed|error)", last)}


def test_summary_comparison_markdown_and_page_see_every_result(runs):
    plain, xdist = runs["plain"], runs["xdist"]
    for mode in (plain, xdist):
        # the gate fails the GGUF file against the last release, and the run a value added late
        assert mode["rc"] == 1, mode["output"][-3000:]
        assert _outcomes(mode["output"]) == {"passed": 10, "failed": 1, "xfailed": 1}
        assert fnmatch.filter(mode["output"].splitlines(), "  kl_mean: * vs 0.0000 in old.json *")
        assert fnmatch.filter(mode["output"].splitlines(), LATE), mode["output"][-3000:]
    assert _summary(xdist["output"]) == _summary(plain["output"])
    assert _unordered(xdist["markdown"]) == _unordered(plain["markdown"])
    assert "test_model_object" in xdist["markdown"]

    def parts(page: str) -> list[str]:
        """The page's result rows and cards (explorations, blame, by position), without the
        numbering by position that xdist shuffles."""
        body = re.sub(r'(id="[rbp]|href="#[rbp])\d+', r"\1", page)
        return sorted(
            re.findall(r'<tbody id="r">.*?</tbody>|<section class="card".*?</section>', body, re.S)
        )

    rows = [p for p in parts(xdist["html"]) if p.startswith("<tbody")]
    assert len(rows) == len(xdist["report"]["results"])
    assert parts(xdist["html"]) == parts(plain["html"])


def test_a_worker_that_goes_down_before_sending_fails_the_run(pytester):
    pytester.makeconftest(
        """
        import os

        import pytest


        @pytest.hookimpl(tryfirst=True)
        def pytest_sessionfinish(session):
            if os.environ.get("DOOMED"):  # this worker ran test_doomed: it dies before sending
                os._exit(0)
        """
    )
    pytester.makepyfile(
        test_doomed="""
        import os

        def test_doomed(hemorrhage):
            hemorrhage.measure("quant.rtn", bits=8)
            os.environ["DOOMED"] = "1"
        """,
        test_kept="""
        def test_kept(hemorrhage):
            hemorrhage.measure("quant.rtn", bits=4)
        """,
    )
    result = pytester.runpytest_subprocess(
        "-n",
        "2",
        "--dist=loadfile",  # one file per worker
        "--hemorrhage-model=hemorrhage-tiny",
        "--hemorrhage-tokens=256",
        "--hemorrhage-report=report.json",
        "-p",
        "no:randomly",
    )
    assert result.ret == 1
    result.stdout.fnmatch_lines(
        [
            "hemorrhage: xdist worker gw* went down without sending its hemorrhage results (*)",
            "hemorrhage: test_doomed.py::test_doomed: 1 of its 1 hemorrhage results never "
            "reached the xdist controller*",
        ]
    )
    report = json.loads((pytester.path / "report.json").read_text())
    assert [r["nodeid"] for r in report["results"]] == ["test_kept.py::test_kept"]
