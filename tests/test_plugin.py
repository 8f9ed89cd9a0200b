"""The plugin end to end: real user test files on the bundled model, run through pytester."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

MODEL = ("--hemorrhage-model=hemorrhage-tiny", "--hemorrhage-tokens=1024", "-p", "no:randomly")

RELEASE = """
import pytest

@pytest.mark.hemorrhage(ppl_increase=0.01, kl_mean=0.005, top1_disagreement=0.05)
def test_int8_is_lossless(hemorrhage):
    result = hemorrhage.measure("quant.rtn", bits=8, group_size=64)
    hemorrhage.check(result)

@pytest.mark.hemorrhage(ppl_increase=0.001, kl_mean=0.001)
def test_two_bits(hemorrhage, hemorrhage_model):
    with hemorrhage.modified("prune.magnitude", sparsity=0.5) as model:
        assert model is hemorrhage_model.model
    hemorrhage.check(hemorrhage.measure("quant.rtn", bits=2))
"""


def test_a_budget_that_holds_passes_and_one_that_breaks_fails_line_per_metric(pytester):
    pytester.makepyfile(test_release=RELEASE)
    result = pytester.runpytest(*MODEL, "--strict-markers")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.re_match_lines(
        [
            r"hemorrhage over budget for quant\.rtn bits=2, group_size=128, symmetric=True:",
            r"\s+ppl_increase: \d+\.\d{4} > 0\.0010 \(baseline ppl \d+\.\d\d, modified ppl \d+\.\d\d\)",
            r"\s+kl_mean: \d+\.\d{4} > 0\.0010 \(baseline ppl \d+\.\d\d, modified ppl \d+\.\d\d\)",
        ]
    )
    assert "Traceback" not in result.stdout.str()
    # the summary: one row per test, the metric closest to its budget and the margin, in 80
    # columns; with -v every budgeted metric of every measure
    result.stdout.re_match_lines(
        [
            r" verdict +test +modification +closest to budget +margin",
            r" passed +test_int8.* +quant\.rtn.* top1_disagreement \d\.\d+ ≤ 0\.05 +\+0\.0\d+",
            r" failed +test_two_b.* +quant\.rtn.* ppl_increase \d+\.\d+ ≤ 0\.001 +-\d+\.\d+",
        ]
    )
    lines = result.stdout.lines
    start = lines.index(next(x for x in lines if x.startswith("hemorrhage (one row")))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("==="))
    summary = lines[start:end]  # pytest's own short summary after it is not ours
    assert max(len(line) for line in summary) <= 80
    verbose = pytester.runpytest(*MODEL, "--strict-markers", "-v")
    verbose.stdout.re_match_lines(
        [
            r"test_release.py::test_int8_is_lossless passed quant.rtn\(bits=8, group_size=64, .*",
            r"\s+ppl_increase\s+-?\d\.\d{4}\s+≤ 0\.0100\s+\+\d\.\d{4}\s+ok",
            r"test_release.py::test_two_bits failed quant.rtn\(bits=2, .*",
            r"\s+ppl_increase\s+\d+\.\d{4}\s+≤ 0\.0010\s+-\d+\.\d{4}\s+over",
        ]
    )


def test_no_model_skips_with_a_reason_naming_the_option(pytester):
    pytester.makepyfile(test_release=RELEASE)
    result = pytester.runpytest("-rs")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(["*no model given: pass --hemorrhage-model=*"])


def test_ini_budget_applies_and_the_marker_overrides_it_per_key(pytester):
    pytester.makeini(
        "[pytest]\nhemorrhage_model = hemorrhage-tiny\n"
        "hemorrhage_budget = kl_mean=0.0000001 ppl_increase=0.5\n"
    )
    pytester.makepyfile("""
        import pytest

        def test_default_budget(hemorrhage):
            assert hemorrhage.budget.limits == {"kl_mean": 1e-7, "ppl_increase": 0.5}
            hemorrhage.check(hemorrhage.measure("quant.rtn", bits=4))

        @pytest.mark.hemorrhage(kl_mean=1.0)
        def test_marker_overrides(hemorrhage):
            assert hemorrhage.budget.limits == {"kl_mean": 1.0, "ppl_increase": 0.5}
            hemorrhage.check(hemorrhage.measure("quant.rtn", bits=4))
    """)
    result = pytester.runpytest("--hemorrhage-tokens=1024", "-rfp")
    result.assert_outcomes(passed=1, failed=1)
    # the ini's kl_mean=1e-7 fails the unmarked test; the marker's 1.0 lets the other pass
    result.stdout.fnmatch_lines(
        [
            "*kl_mean: * > 0.0000 *",
            "FAILED *::test_default_budget*",
            "PASSED *::test_marker_overrides",
        ]
    )


@pytest.mark.parametrize(
    "marker, message",
    [
        ("kl_meen=0.1", "can't have 'kl_meen' in the hemorrhage budget; valid keys: ppl_increase,"),
        ("kl_mean=-0.5", "kl_mean=-0.5 must be a non-negative number"),
        ("kl_mean='big'", "kl_mean='big' must be a non-negative number"),
    ],
)
def test_bad_budgets_are_errors_at_setup_naming_test_and_key(pytester, marker, message):
    pytester.makepyfile(
        test_user_budget=f"""
        import pytest

        @pytest.mark.hemorrhage({marker})
        def test_x(hemorrhage):
            pass
    """
    )
    result = pytester.runpytest(*MODEL)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*ERROR at setup of test_x*", f"HemorrhageError: test_user_budget.py::test_x: {message}*"]
    )


def test_json_report_and_junit_properties(pytester):
    pytester.makepyfile(test_release=RELEASE)
    report = pytester.path / "out" / "hemorrhage.json"
    pytester.runpytest(*MODEL, f"--hemorrhage-report={report}", "--junitxml=junit.xml")
    data = json.loads(report.read_text())
    assert data["schema_version"] == 3
    assert data["model"]["spec"] == "hemorrhage-tiny" and len(data["model"]["fingerprint"]) == 16
    assert data["data"]["windows"] == 8 and data["data"]["seq_len"] == 128
    assert data["baseline"]["ppl"] > 1
    first, second = data["results"]
    assert first["nodeid"] == "test_release.py::test_int8_is_lossless"
    assert first["outcome"] == "passed" and first["violations"] == []
    assert first["params"] == {"bits": 8, "group_size": 64, "symmetric": True}
    assert first["budget"] == {"ppl_increase": 0.01, "kl_mean": 0.005, "top1_disagreement": 0.05}
    assert set(first["metrics"]) >= {
        "ppl_increase",
        "kl_mean",
        "kl_p99",
        "kl_max",
        "top1_disagreement",
        "delta_p_mean",
        "nll_increase",
    }
    assert second["outcome"] == "failed" and len(second["violations"]) == 2
    properties = {
        p.get("name"): float(p.get("value"))
        for p in ET.parse(pytester.path / "junit.xml").iter("property")
    }
    assert properties["hemorrhage.quant.rtn.kl_mean"] == pytest.approx(second["metrics"]["kl_mean"])


def test_the_model_is_bit_identical_after_a_test_fails_inside_a_modification(pytester, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # the short summary keeps the error message
    pytester.makepyfile("""
        import torch
        from pytest_hemorrhage.loading import fingerprint

        def test_fails_inside(hemorrhage):
            with hemorrhage.modified("prune.magnitude", sparsity=0.9) as model:
                raise AssertionError("user check failed")

        def test_next_sees_the_baseline(hemorrhage, hemorrhage_model):
            m = hemorrhage_model
            assert fingerprint(m.model, m.tokenizer) == m.fingerprint
            assert hemorrhage.measure("quant.rtn", bits=8).metrics["kl_mean"] < 1e-3
    """)
    result = pytester.runpytest(*MODEL, "-rfp")
    result.assert_outcomes(passed=1, failed=1)
    # the user's own failure is what they see, and the next test passes on the baseline
    result.stdout.fnmatch_lines(
        [
            "FAILED *::test_fails_inside - AssertionError: user check failed",
            "PASSED *::test_next_sees_the_baseline",
        ]
    )
    assert "changed in place" not in result.stdout.str()


def test_in_place_writes_to_the_baseline_are_caught(pytester):
    pytester.makepyfile("""
        import torch

        def test_writes(hemorrhage):
            with torch.no_grad():
                next(hemorrhage.model.parameters()).mul_(2)
    """)
    result = pytester.runpytest(*MODEL)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*the baseline model was changed in place*"])


def test_nonfinite_outputs_fail_the_check_instead_of_crashing(pytester):
    pytester.makeconftest("""
        from dataclasses import dataclass
        from pytest_hemorrhage.modifications import Modification

        @dataclass(frozen=True, kw_only=True)
        class Poison(Modification):
            pass

        def poison(config, model, patch, context):
            target = config.targets(model)[0]
            patch.parametrize(target, lambda w: w * float("nan"))

        def pytest_hemorrhage_modifications(register):
            register("test.poison", Poison)(poison)
    """)
    pytester.makepyfile("""
        import pytest

        @pytest.mark.hemorrhage(kl_mean=1.0)
        def test_poisoned(hemorrhage):
            hemorrhage.check(hemorrhage.measure("test.poison"))
    """)
    result = pytester.runpytest(*MODEL)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*non-finite outputs: 1016 of 1016 tokens got nan/inf logits*"])


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--hemorrhage-model=./no/such/model"],
            "--hemorrhage-model=./no/such/model: no such directory",
        ),
        (
            ["--hemorrhage-model=nobody-xyz/no-such-model"],
            "*not in the local hub cache and HF_HUB_OFFLINE is set*",
        ),
        (["--hemorrhage-tokens=0"], "*--hemorrhage-tokens: '0' is not a positive integer*"),
    ],
)
def test_bad_options_are_usage_errors_at_startup(pytester, monkeypatch, args, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pytester.makepyfile("def test_x(hemorrhage):\n    pass\n")
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{message.strip('*')}*"])


@pytest.mark.parametrize(
    "data, message",
    [
        ("", "no text in it; give a non-empty file"),
        ("tiny text", "fewer than one window of --hemorrhage-seq-len=128"),
        (None, "no such file or directory"),
    ],
)
def test_bad_data_is_a_clear_error(pytester, data, message):
    path = pytester.path / "data.txt"
    if data is not None:
        path.write_text(data)
    pytester.makepyfile("def test_x(hemorrhage):\n    pass\n")
    result = pytester.runpytest(*MODEL, f"--hemorrhage-data={path}")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"HemorrhageError: *{message}*"])
    assert "Traceback" not in result.stdout.str()


def test_jsonl_data_and_text_directories(pytester):
    corpus = pytester.path / "c.txt"
    from pytest_hemorrhage.data import BUNDLED_CORPUS

    text = BUNDLED_CORPUS.read_text()[:20000]
    (pytester.path / "d.jsonl").write_text(json.dumps({"text": text}) + "\n")
    (pytester.path / "texts").mkdir()
    (pytester.path / "texts" / "a.txt").write_text(text)
    corpus.write_text(text)
    pytester.makepyfile(
        "def test_x(hemorrhage):\n    assert hemorrhage.measure('quant.rtn', bits=4).tokens > 0\n"
    )
    seen = {}
    for source in ("d.jsonl", "texts", "c.txt"):
        result = pytester.runpytest(
            *MODEL, f"--hemorrhage-data={source}", "--hemorrhage-report=r.json"
        )
        result.assert_outcomes(passed=1)
        seen[source] = json.loads((pytester.path / "r.json").read_text())["data"]
    # the report names each source; the same text read three ways gives the same windows
    assert [d["source"] for d in seen.values()] == ["d.jsonl", "texts", "c.txt"]
    assert len({(d["fingerprint"], d["windows"]) for d in seen.values()}) == 1
    assert seen["c.txt"]["windows"] > 0
    (pytester.path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    result = pytester.runpytest(*MODEL, "--hemorrhage-data=bad.jsonl")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(['*bad.jsonl:2: each line needs a string "text" field*'])


def test_modification_errors_are_one_clear_line(pytester):
    pytester.makepyfile("""
        def test_unknown(hemorrhage):
            hemorrhage.measure("quant.nope")

        def test_out_of_range(hemorrhage):
            hemorrhage.measure("prune.magnitude", sparsity=1.5)
    """)
    result = pytester.runpytest(*MODEL)
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            "HemorrhageError: unknown modification 'quant.nope'; registered: *quant.rtn*",
            "HemorrhageError: prune.magnitude: sparsity=1.5 is out of range; use a number in [0.0, 1.0]",
        ]
    )


def test_xdist_workers_share_one_reference_and_report_to_the_controller(pytester):
    pytest.importorskip("xdist")
    pytester.makepyfile(
        test_many="""
        import pytest

        @pytest.mark.parametrize("bits", [2, 3, 4, 8])
        def test_bits(hemorrhage, bits, worker_id):
            result = hemorrhage.measure("quant.rtn", bits=bits)
            with open(f"computed-{worker_id}-{bits}", "w") as f:
                f.write(str(hemorrhage.harness.reference_cached))
    """
    )
    report = pytester.path / "report.json"
    result = pytester.runpytest_subprocess("-n", "2", *MODEL, f"--hemorrhage-report={report}")
    result.assert_outcomes(passed=4)
    # the controller's summary holds the workers' results: a row per test
    for b in (2, 3, 4, 8):  # workers finish in any order
        result.stdout.re_match_lines([rf" passed +test_bits\[{b}\] +quant\.rtn\(bits={b}.*"])
    data = json.loads(report.read_text())
    assert sorted(r["params"]["bits"] for r in data["results"]) == [2, 3, 4, 8]
    assert data["model"]["fingerprint"] and data["baseline"]["ppl"] > 1
    flags = {}
    for path in pytester.path.glob("computed-*"):
        flags.setdefault(path.name.split("-")[1], path.read_text())
    assert len(flags) == 2
    assert sorted(flags.values()) == ["False", "True"]  # one worker computed, the other waited


def test_help_lists_options_without_importing_torch(tmp_path):
    code = (
        "import sys, pytest; rc = pytest.main(['--help', '-p', 'no:cacheprovider']); "
        "print('TORCH', 'torch' in sys.modules)"
    )
    # outside the repository: its own conftest.py imports torch
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path
    ).stdout
    assert "--hemorrhage-model=SPEC" in out and "--hemorrhage-no-cache" in out
    assert "TORCH False" in out
