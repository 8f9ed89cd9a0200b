"""Gating shipped artifacts end to end: real checkpoints (llm-compressor GPTQ W4A16, bitsandbytes
NF4, GGUF Q8_0/Q4_0) against the bundled baseline, the portable reference, the comparison with
an earlier report, the GitHub summary, and every bad input, through pytester."""

from __future__ import annotations

import importlib.util
import json
import shutil
import weakref
from fnmatch import fnmatch
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "examples" / "gate"
COMMON = ("--hemorrhage-tokens=512", "-p", "no:randomly", "-p", "no:cacheprovider")
MODEL = ("--hemorrhage-model=hemorrhage-tiny", *COMMON)

GATE = """
import pytest

@pytest.mark.hemorrhage(kl_mean={kl}, top1_disagreement={top1})
def test_release(hemorrhage, hemorrhage_candidate):
    hemorrhage.check(hemorrhage.measure_model(hemorrhage_candidate))

def test_baseline_modification(hemorrhage):
    hemorrhage.measure("quant.rtn", bits=8)
"""


def _builder():
    spec = importlib.util.spec_from_file_location("gate_build", EXAMPLE / "build_artifacts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory, tiny):
    """Every candidate, built once per test session: the real artifacts and the damaged,
    depth-pruned, foreign-tokenizer and unloadable ones the bad-input tests need."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    from pytest_hemorrhage.loading import BUNDLED_MODEL

    root = tmp_path_factory.mktemp("artifacts")
    build = _builder()
    out = {"w4a16": root / "w4a16"}
    shutil.copytree(EXAMPLE / "artifacts" / "w4a16", out["w4a16"])
    out["nf4"] = build.build_nf4(root / "nf4")
    for qtype in ("Q8_0", "Q4_0"):
        out[qtype] = build.build_gguf(root / f"tiny-{qtype.lower()}.gguf", qtype)
    out["baseline"] = Path(shutil.copytree(BUNDLED_MODEL, root / "baseline"))

    model = AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL, dtype=torch.float32)
    weight = model.model.layers[2].mlp.down_proj.weight
    noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        weight.add_(noise * weight.std() * 0.5)  # damage that begins at block 2
    model.save_pretrained(root / "damaged")
    tiny.tokenizer.save_pretrained(root / "damaged")
    out["damaged"] = root / "damaged"

    model = AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL, dtype=torch.float32)
    model.model.layers = model.model.layers[:3]  # depth pruning: same vocabulary, 3 blocks
    model.config.num_hidden_layers = 3
    model.save_pretrained(root / "pruned")
    tiny.tokenizer.save_pretrained(root / "pruned")
    out["pruned"] = root / "pruned"

    other = Path(shutil.copytree(BUNDLED_MODEL, root / "other-tokenizer"))
    data = json.loads((other / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = (t for t, i in vocab.items() if i in (300, 301))
    vocab[a], vocab[b] = vocab[b], vocab[a]  # the same tokens, two of them renumbered
    (other / "tokenizer.json").write_text(json.dumps(data))
    out["other-tokenizer"] = other

    writer = gguf.GGUFWriter(str(root / "alien.gguf"), "hemorrhage-alien")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 32).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out["alien"] = root / "alien.gguf"
    return {k: str(v) for k, v in out.items()}


def _results(path: Path) -> dict[str, dict]:
    report = json.loads(path.read_text())
    return {r["params"].get("label", r["modification"]): r for r in report["results"]}


def test_real_artifacts_are_measured_and_the_baseline_saved_to_a_directory_measures_zero(
    pytester, artifacts, tiny
):
    pytester.makepyfile(test_release_gate=GATE.format(kl=0.03, top1=0.2))
    report = pytester.path / "report.json"
    names = ("baseline", "w4a16", "nf4", "Q8_0", "Q4_0")
    result = pytester.runpytest(
        *MODEL,
        *(f"--hemorrhage-candidate={artifacts[n]}" for n in names),
        f"--hemorrhage-report={report}",
        "-v",
    )
    result.assert_outcomes(passed=5, failed=1)
    for label in ("baseline", "w4a16", "nf4", "tiny-q8_0.gguf", "tiny-q4_0.gguf"):
        result.stdout.fnmatch_lines([f"*test_release?{label}? *"])
    results = _results(report)
    base = results["baseline"]
    assert base["modification"] == "candidate"
    assert all(v == 0 for v in base["metrics"].values()), base["metrics"]
    assert base["params"]["fingerprint"] == tiny.fingerprint
    kl = {k: results[k]["metrics"]["kl_mean"] for k in results if k != "quant.rtn"}
    # Q8_0 is near-lossless; every 4-bit format costs more than it (real damage, measured)
    assert 0 < kl["tiny-q8_0.gguf"] < 1e-3 < min(kl["w4a16"], kl["nf4"], kl["tiny-q4_0.gguf"])
    assert kl["tiny-q4_0.gguf"] > 0.03  # the failed one, over its budget
    for label in ("w4a16", "nf4"):
        assert results[label]["stderr"]["kl_mean"] > 0
    data = json.loads(report.read_text())
    assert data["schema_version"] == 3
    described = {c["label"]: c for c in data["candidates"]}
    assert described["w4a16"]["quantization"] == "compressed-tensors"
    assert described["nf4"]["quantization"] == "bitsandbytes"
    assert described["baseline"]["fingerprint"] == tiny.fingerprint


def test_a_damaged_candidate_fails_line_per_metric_with_blame_and_a_pruned_one_says_why_not(
    pytester, artifacts
):
    pytester.makepyfile(test_release_gate=GATE.format(kl=0.001, top1=0.01))
    result = pytester.runpytest(
        *MODEL,
        f"--hemorrhage-candidate={artifacts['damaged']}",
        f"--hemorrhage-candidate={artifacts['pruned']}",
    )
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*hemorrhage over budget for candidate*label=damaged*",
            "  kl_mean: * > 0.0010 *",
            "  top1_disagreement: * > 0.0100 *",
            "  hemorrhage begins at block 2 (mlp.down_proj drift *",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*hemorrhage over budget for candidate*label=pruned*",
            "*(no blame for the candidate: its architecture differs (LlamaForCausalLM with 3 "
            "blocks at model.layers, the baseline LlamaForCausalLM with 4 at model.layers)*",
        ]
    )


INNER_CONFTEST = """
import pytest_hemorrhage.loading as loading

_real = loading.load_model

def _guarded(spec, **kwargs):
    assert spec != "hemorrhage-tiny", "the baseline was loaded in a reference-only run"
    return _real(spec, **kwargs)

def pytest_configure(config):
    loading.load_model = _guarded

def pytest_unconfigure(config):
    loading.load_model = _real
"""


def test_save_reference_then_reference_only_gives_the_same_metrics_without_the_baseline(
    pytester, artifacts
):
    pytester.makepyfile(test_release_gate=GATE.format(kl=1, top1=1))
    reference = pytester.path / "baseline.ref"
    candidates = [f"--hemorrhage-candidate={artifacts[n]}" for n in ("w4a16", "Q4_0")]
    live = pytester.runpytest(
        *MODEL,
        *candidates,
        f"--hemorrhage-save-reference={reference}",
        "--hemorrhage-report=live.json",
    )
    live.assert_outcomes(passed=3)
    assert reference.stat().st_size > 0
    pytester.makeconftest(INNER_CONFTEST)
    alone = pytester.runpytest(
        *COMMON,
        *candidates,
        f"--hemorrhage-reference={reference}",
        "--hemorrhage-report=alone.json",
        "-rs",
    )
    alone.assert_outcomes(passed=2, skipped=1)
    alone.stdout.fnmatch_lines(
        [
            "*hemorrhage.measure needs the baseline model, and this run has only "
            "--hemorrhage-reference=*baseline.ref; pass --hemorrhage-model to run it*"
        ]
    )
    before, after = _results(pytester.path / "live.json"), _results(pytester.path / "alone.json")
    for label in ("w4a16", "tiny-q4_0.gguf"):
        for metric, value in before[label]["metrics"].items():
            assert after[label]["metrics"][metric] == pytest.approx(value, rel=1e-6, abs=1e-9)
    header = json.loads((pytester.path / "live.json").read_text())
    assert header["reference_file"]["bytes_per_token"] > 0
    alone_header = json.loads((pytester.path / "alone.json").read_text())
    assert alone_header["model"]["fingerprint"] == header["model"]["fingerprint"]


def test_compare_passes_an_identical_rerun_and_fails_a_worse_candidate_with_a_summary(
    pytester, artifacts, monkeypatch
):
    old, new = pytester.path / "v1", pytester.path / "v2"
    old.mkdir()
    new.mkdir()
    shutil.copy(artifacts["Q8_0"], old / "tiny.gguf")  # the same label, a worse rebuild
    shutil.copy(artifacts["Q4_0"], new / "tiny.gguf")
    pytester.makepyfile(
        test_release_gate="""
        def test_release(hemorrhage, hemorrhage_candidate):
            hemorrhage.measure_model(hemorrhage_candidate)  # no budget, no check: compare only
        """
    )
    pytester.runpytest(
        *MODEL,
        f"--hemorrhage-candidate={old / 'tiny.gguf'}",
        "--hemorrhage-report=last-release.json",
    ).assert_outcomes(passed=1)
    compare = (
        "--hemorrhage-compare=last-release.json",
        "--hemorrhage-compare-fail=kl_mean:10%,top1_disagreement:0.005",
    )
    again = pytester.runpytest(*MODEL, f"--hemorrhage-candidate={old / 'tiny.gguf'}", *compare)
    again.assert_outcomes(passed=1)
    again.stdout.fnmatch_lines(["*candidate tiny.gguf  kl_mean * -> * (+0.0000, +0%)*"])
    summary = pytester.path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    worse = pytester.runpytest(
        *MODEL,
        f"--hemorrhage-candidate={new / 'tiny.gguf'}",
        f"--hemorrhage-candidate={artifacts['w4a16']}",  # not in the old report: noted only
        *compare,
        "--hemorrhage-report=now.json",
    )
    worse.assert_outcomes(passed=1, failed=1)
    worse.stdout.fnmatch_lines(
        [
            "*hemorrhage worse than the compared report:*",
            "*kl_mean: 0.0* vs 0.000* in last-release.json (+*% > 10%)",
            "*top1_disagreement: 0.1* vs 0.0* in last-release.json (+0.* > 0.005)",
        ]
    )
    worse.stdout.fnmatch_lines(["*w4a16: not in last-release.json (not compared)*"])
    text = summary.read_text()
    assert "## pytest-hemorrhage" in text and "### Compared with `last-release.json`" in text
    assert "| kl_mean |" in text and "❌" in text and "Not in the old report" in text
    record = _results(pytester.path / "now.json")["tiny.gguf"]
    kl = record["comparison"]["metrics"]["kl_mean"]
    assert kl["change"] == pytest.approx(record["metrics"]["kl_mean"] - kl["old"])
    assert len(record["comparison"]["failures"]) == 2


def test_a_session_holds_one_candidate_at_a_time(artifacts):
    from pytest_hemorrhage.session import HemorrhageSession
    from pytest_hemorrhage.settings import Settings

    session = HemorrhageSession(Settings.defaults(model="hemorrhage-tiny", device="cpu"))
    first = session.candidate(artifacts["Q8_0"])
    assert session.candidate(artifacts["Q8_0"]) is first  # loaded once per spec
    gone = weakref.ref(first.model)
    del first
    session.candidate(artifacts["Q4_0"])
    assert gone() is None  # released when the next one loaded


def _startup_error(pytester, *args: str) -> str:
    pytester.makepyfile(test_release_gate=GATE.format(kl=1, top1=1))
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.stderr.lines if line.startswith("ERROR")]
    assert len(errors) == 1 and "Traceback" not in result.stderr.str(), result.stderr.str()
    return errors[0]


@pytest.fixture(scope="session")
def saved_reference(tmp_path_factory, harness):
    """A reference file of the bundled baseline (the conftest's 2048-token harness)."""
    from pytest_hemorrhage.data import read_text
    from pytest_hemorrhage.reference_file import PortableReference, text_hash, vocab_list

    s = harness.settings
    path = tmp_path_factory.mktemp("reference") / "baseline.ref"
    PortableReference(
        harness.reference,
        harness.windows.eval,
        harness.vocab,
        vocab_list(harness.loaded.tokenizer),
        {"spec": "hemorrhage-tiny", "fingerprint": harness.loaded.fingerprint},
        {
            "seq_len": s.seq_len,
            "tokens": s.tokens,
            "data": "bundled corpus",
            "data_hash": text_hash(read_text(None)),
            "topk": harness.topk,
        },
    ).save(path)
    return path


def _reference_variant(source: Path, target: Path, change) -> Path:
    import torch

    state = torch.load(source, weights_only=True)
    change(state)
    torch.save(state, target)
    return target


@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("missing", "--hemorrhage-candidate=*nope: no such file or directory; give a .gguf file*"),
        ("missing-gguf", "--hemorrhage-candidate=*nope.gguf: no such file; give a .gguf file*"),
        (
            "truncated",
            "--hemorrhage-reference=*: unreadable, truncated or not a reference file*"
            "save it again with --hemorrhage-save-reference*",
        ),
        (
            "old-format",
            "--hemorrhage-reference=*: written in another format (file 1.1, this "
            "pytest-hemorrhage reads 1.*); save it again*",
        ),
        ("not-a-reference", "--hemorrhage-reference=*: not a pytest-hemorrhage reference file*"),
        (
            "not-json",
            "--hemorrhage-compare=*: not a JSON report (*); give the file an earlier "
            "run wrote with --hemorrhage-report",
        ),
        (
            "not-a-report",
            "--hemorrhage-compare=*: not a pytest-hemorrhage report (no "
            "schema_version and results)*",
        ),
        (
            "malformed",
            "--hemorrhage-compare-fail=kl_mean=10%: 'kl_mean=10%' is not metric:N% or "
            "metric:X with a number >= 0; e.g. *",
        ),
        ("unknown", "--hemorrhage-compare-fail=kl_meen:10%: unknown metric 'kl_meen'; one of *"),
        (
            "fail-alone",
            "--hemorrhage-compare-fail=kl_mean:1%: nothing to compare with; pass "
            "--hemorrhage-compare=OLD_REPORT.json too",
        ),
    ],
)
def test_bad_input_at_startup_is_one_line_naming_the_value_and_the_fix(
    pytester, saved_reference, what, message
):
    report = pytester.path / "old.json"
    report.write_text(json.dumps({"results": []}) if what == "not-a-report" else "{oops")
    args = {
        "missing": ["--hemorrhage-candidate=./nope"],
        "missing-gguf": ["--hemorrhage-candidate=nope.gguf"],
        "truncated": [f"--hemorrhage-reference={_truncated(saved_reference, pytester.path)}"],
        "old-format": [
            "--hemorrhage-reference="
            + str(
                _reference_variant(
                    saved_reference,
                    pytester.path / "old.ref",
                    lambda s: s.update(reference_format=1),
                )
            )
        ],
        "not-a-reference": [
            "--hemorrhage-reference="
            + str(
                _reference_variant(
                    saved_reference,
                    pytester.path / "other.ref",
                    lambda s: s.update(magic="something else"),
                )
            )
        ],
        "not-json": [f"--hemorrhage-compare={report}"],
        "not-a-report": [f"--hemorrhage-compare={report}"],
        "malformed": ["--hemorrhage-compare=x.json", "--hemorrhage-compare-fail=kl_mean=10%"],
        "unknown": [
            f"--hemorrhage-compare={_empty_report(pytester.path)}",
            "--hemorrhage-compare-fail=kl_meen:10%",
        ],
        "fail-alone": ["--hemorrhage-compare-fail=kl_mean:1%"],
    }[what]
    line = _startup_error(pytester, *args)
    assert fnmatch(line, f"ERROR: {message}"), line


def _truncated(source: Path, folder: Path) -> Path:
    target = folder / "truncated.ref"
    target.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    return target


def _empty_report(folder: Path) -> Path:
    path = folder / "empty.json"
    path.write_text(json.dumps({"schema_version": 2, "results": []}))
    return path


def test_incompatible_candidates_fail_their_test_with_one_line(pytester, artifacts):
    pytester.makepyfile(test_release_gate=GATE.format(kl=1, top1=1))
    result = pytester.runpytest(
        *MODEL,
        f"--hemorrhage-candidate={artifacts['other-tokenizer']}",
        f"--hemorrhage-candidate={artifacts['alien']}",
    )
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(
        [
            "HemorrhageError: candidate *other-tokenizer does not share the vocabulary of "
            "baseline hemorrhage-tiny: first differing token id 300: * vs *; gate a model made "
            "from this baseline with its tokenizer",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "HemorrhageError: --hemorrhage-candidate=*alien.gguf: transformers cannot load this "
            "GGUF file (*hemorrhage-alien*); convert a supported architecture, or give the "
            "save_pretrained directory instead"
        ]
    )
    assert "Traceback" not in result.stdout.str()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--hemorrhage-seq-len=64",),
            "*made with --hemorrhage-seq-len=128, this run has 64; "
            "pass --hemorrhage-seq-len=128 or save a reference*",
        ),
        (("--hemorrhage-tokens=1024",), "*made with --hemorrhage-tokens=2048, this run has 1024*"),
        (
            ("--hemorrhage-data=other.txt",),
            "*made with other evaluation data (bundled corpus), "
            "this run reads other.txt; pass the same*",
        ),
        (
            ("--hemorrhage-model=DAMAGED",),
            "*was made from hemorrhage-tiny (fingerprint *), but "
            "--hemorrhage-model=*damaged has fingerprint *; drop "
            "one of the two options, or save the reference again*",
        ),
    ],
)
def test_a_reference_file_that_does_not_match_stops_the_run_naming_the_difference(
    pytester, saved_reference, artifacts, args, message
):
    pytester.makepyfile(test_release_gate=GATE.format(kl=1, top1=1))
    (pytester.path / "other.txt").write_text("some other evaluation text. " * 400)
    args = tuple(a.replace("DAMAGED", artifacts["damaged"]) for a in args)
    result = pytester.runpytest(
        "--hemorrhage-tokens=2048",  # the file's; an option below may override it
        *COMMON[1:],
        f"--hemorrhage-reference={saved_reference}",
        f"--hemorrhage-candidate={artifacts['Q8_0']}",
        *args,
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stdout.fnmatch_lines([f"*hemorrhage: --hemorrhage-reference={message}"])
    assert "Traceback" not in result.stdout.str()


def test_ini_candidates_one_a_line_parametrize_the_fixture_and_none_skips_naming_the_option(
    pytester, artifacts
):
    pytester.makepyfile(test_release_gate=GATE.format(kl=1, top1=1))
    pytester.makeini(
        f"""
        [pytest]
        hemorrhage_candidate =
            {artifacts["Q8_0"]}
            {artifacts["w4a16"]}
        """
    )
    collected = pytester.runpytest("--collect-only", "-q", "-p", "no:randomly")
    collected.stdout.fnmatch_lines(
        [
            "test_release_gate.py::test_release[tiny-q8_0.gguf]",
            "test_release_gate.py::test_release[w4a16]",
        ]
    )
    pytester.makeini("[pytest]\n")
    none = pytester.runpytest(*MODEL, "-rs", "-k", "not baseline_modification")
    none.assert_outcomes(skipped=1, deselected=1)
    none.stdout.fnmatch_lines(
        [
            "*no candidate given: pass --hemorrhage-candidate=SPEC (repeatable) or set "
            "hemorrhage_candidate in the ini file, one per line*"
        ]
    )
