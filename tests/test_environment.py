"""Drift told apart from damage: the reference file and every result record where they were
measured, and ``--hemorrhage-compare`` and ``--hemorrhage-reference`` say what changed in the
environment beside what changed in the metrics. The earlier stack is simulated by editing the
files as it would have written them (another torch, another transformers); files from before
environments were recorded still work, saying ``not recorded``."""

from __future__ import annotations

import json
from importlib import metadata

import pytest
import torch

from pytest_hemorrhage.environment import (
    changes,
    describe_changes,
    drift_warning,
    environment_id,
    measured_in,
)
from pytest_hemorrhage.plain import first_unplain
from pytest_hemorrhage.reference_file import PortableReference

RUN = (
    "--hemorrhage-model=hemorrhage-tiny",
    "--hemorrhage-tokens=512",
    "-p",
    "no:randomly",
    "-p",
    "no:cacheprovider",
)
TESTS = """
def test_8bit(hemorrhage):
    hemorrhage.measure("quant.rtn", bits=8)

def test_release(hemorrhage, hemorrhage_candidate):
    hemorrhage.measure_model(hemorrhage_candidate)
"""


def test_the_environment_is_plain_data_and_names_this_process():
    found = measured_in(torch.device("cpu"), torch.float32)
    assert first_unplain(found) is None
    assert found["packages"]["torch"] == metadata.version("torch")
    assert found["packages"]["transformers"] == metadata.version("transformers")
    assert found["torch_build"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert found["device"]["type"] == "cpu" and found["dtype"] == "float32"
    assert found["threads"] == torch.get_num_threads()
    # the same process measured twice: the same id, so a run records it once
    assert environment_id(measured_in("cpu", "float32")) == environment_id(found)


def test_changes_name_each_difference_and_skip_what_one_side_did_not_record():
    new = measured_in("cpu", torch.float32)
    old = json.loads(json.dumps(new))
    old["packages"]["torch"] = "2.12.0"
    del old["packages"]["transformers"]
    old["dtype"] = None  # a reference-only run: no baseline model, so no dtype to compare
    old["device"]["name"] = "Some Other CPU"
    assert describe_changes(changes(old, new)) == (
        f"torch 2.12.0 -> {new['packages']['torch']}, transformers not installed -> "
        f"{new['packages']['transformers']}, device name Some Other CPU -> "
        f"{new['device']['name']}: differences include drift"
    )
    assert describe_changes(changes(new, new)) == "unchanged"
    assert changes(None, new) is None and describe_changes(None) == "not recorded"
    assert drift_warning(new, new) is None
    assert drift_warning(old, new).startswith("the reference was built under torch 2.12.0, ")


def _edit(environments: dict) -> None:
    """As an earlier stack would have written them: torch 2.12.0, transformers 5.24.0."""
    for environment in environments.values():
        environment["packages"].update(torch="2.12.0", transformers="5.24.0")


def test_every_result_and_the_reference_record_their_environment_and_a_changed_stack_shows(
    pytester, monkeypatch
):
    """One run saves the reference and the report; the next compares with both, as an earlier
    stack wrote them: the terminal, the JSON report and the Markdown say what changed."""
    pytester.makepyfile(test_env_gate=TESTS)
    first = pytester.runpytest(
        *RUN,
        "--hemorrhage-candidate=hemorrhage-tiny",
        "--hemorrhage-save-reference=baseline.ref",
        "--hemorrhage-report=old.json",
    )
    first.assert_outcomes(passed=2)
    report = json.loads((pytester.path / "old.json").read_text())
    assert report["schema_version"] == 3
    assert len(report["results"]) == 2  # a modification and a candidate
    for record in report["results"]:
        environment = report["environments"][record["environment"]]
        assert environment["packages"]["torch"] == metadata.version("torch")
        assert environment["dtype"] == "float32" and environment["device"]["type"] == "cpu"
    candidate = next(r for r in report["results"] if r["modification"] == "candidate")
    assert candidate["details"]["runtime"]["name"] == "transformers"  # its runtime stays there
    stored = PortableReference.load(pytester.path / "baseline.ref").environment
    assert stored == report["environments"][report["reference_file"]["environment"]]

    _edit(report["environments"])
    (pytester.path / "old.json").write_text(json.dumps(report))
    state = torch.load(pytester.path / "baseline.ref", weights_only=True)
    _edit({"reference": state["environment"]})
    torch.save(state, pytester.path / "old.ref")

    summary = pytester.path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    result = pytester.runpytest(
        *RUN,
        "--hemorrhage-candidate=hemorrhage-tiny",
        "--hemorrhage-compare=old.json",
        "--hemorrhage-reference=old.ref",
        "--hemorrhage-report=new.json",
    )
    result.assert_outcomes(passed=2)
    torch_now, transformers_now = metadata.version("torch"), metadata.version("transformers")
    changed = (
        f"torch 2.12.0 -> {torch_now}, transformers 5.24.0 -> {transformers_now}: "
        "differences include drift"
    )
    result.stdout.fnmatch_lines(
        [
            "hemorrhage compared with old.json:",
            f"  environment: {changed}",
            "  test_8bit  quant.rtn(*  kl_mean *",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "hemorrhage: the reference was built under torch 2.12.0, transformers 5.24.0; this "
            f"run uses torch {torch_now}, transformers {transformers_now}: differences include "
            "drift"
        ]
    )
    new = json.loads((pytester.path / "new.json").read_text())
    for record in new["results"]:
        assert [c["what"] for c in record["comparison"]["environment"]] == [
            "torch",
            "transformers",
        ]
    assert new["environments"][new["data"]["reference_environment"]]["packages"]["torch"] == (
        "2.12.0"
    )
    markdown = summary.read_text()
    assert f"Environment: {changed}" in markdown
    assert "> ⚠️ the reference was built under torch 2.12.0" in markdown


def test_a_report_and_a_reference_from_before_environments_were_recorded_still_work(pytester):
    """Files as the previous pytest-hemorrhage wrote them: no environments, no environment in
    the reference file. The run passes and says the environment was not recorded."""
    pytester.makepyfile(test_env_gate=TESTS.partition("def test_release")[0])
    pytester.runpytest(
        *RUN, "--hemorrhage-save-reference=baseline.ref", "--hemorrhage-report=old.json"
    ).assert_outcomes(passed=1)
    report = json.loads((pytester.path / "old.json").read_text())
    del report["environments"]
    for record in report["results"]:
        del record["environment"]
    report["schema_version"] = 2
    (pytester.path / "old.json").write_text(json.dumps(report))
    state = torch.load(pytester.path / "baseline.ref", weights_only=True)
    del state["environment"]
    torch.save(state, pytester.path / "old.ref")
    assert PortableReference.load(pytester.path / "old.ref").environment is None

    result = pytester.runpytest(
        *RUN,
        "--hemorrhage-compare=old.json",
        "--hemorrhage-reference=old.ref",
        "--hemorrhage-report=new.json",
    )
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "hemorrhage compared with old.json:",
            "  environment: not recorded in old.json",
            "  test_8bit  quant.rtn(*  kl_mean *",
        ]
    )
    result.stdout.fnmatch_lines(["hemorrhage: the reference does not record where it was built*"])
    new = json.loads((pytester.path / "new.json").read_text())
    assert new["data"]["reference_environment"] is None
    assert new["results"][0]["comparison"]["environment"] is None
    assert new["results"][0]["environment"] in new["environments"]


@pytest.mark.parametrize("differ", [False, True])
def test_results_whose_environment_changes_differ_are_shown_each_beside_its_metrics(differ):
    """Usually one line for the run; where the results' changes differ (an old report merged
    from two machines), one line per result, beside its metrics."""
    from pytest_hemorrhage.report.comparison import render_comparison

    def record(test: str, found: list) -> dict:
        return {
            "nodeid": f"t.py::{test}",
            "modification": "quant.rtn",
            "params": {"bits": 8},
            "metrics": {"kl_mean": 0.2},
            "comparison": {
                "matched": True,
                "metrics": {"kl_mean": {"old": 0.1, "change": 0.1, "relative": 1.0}},
                "environment": found,
            },
        }

    torch_change = [{"what": "torch", "old": "2.12.0", "new": "2.13.0"}]
    report = {
        "comparison": {"file": "old.json", "fail": []},
        "results": [
            record("test_a", torch_change),
            record("test_b", [] if differ else torch_change),
        ],
    }
    lines = render_comparison(report).splitlines()
    if differ:
        assert not any(line.startswith("  environment:") for line in lines)
        assert lines[1].startswith("  test_a  quant.rtn(bits=8)  environment: torch 2.12.0")
        assert "  test_b  quant.rtn(bits=8)  environment: unchanged" in lines
    else:
        assert lines[1] == "  environment: torch 2.12.0 -> 2.13.0: differences include drift"
        assert not any("  environment: " in line for line in lines[2:])
