"""Candidates that do not share the baseline's vocabulary are refused, each failing its own test
with one line: the same token list with another encoding of the evaluation text (a different
merge order), and a different logits width (a resized embedding). Scored anyway, either would
be measured against the wrong token ids. (A renumbered token and an unloadable file:
tests/test_gate.py.)"""

from __future__ import annotations

import json
import shutil

import pytest

GATE = """
def test_release(hemorrhage, hemorrhage_candidate):
    hemorrhage.measure_model(hemorrhage_candidate)
"""


@pytest.fixture(scope="module")
def mismatched(tmp_path_factory):
    """Two candidate directories made from the bundled baseline: ``merges`` (its weights and
    token list, the BPE merges in reverse order) and ``resized`` (its tokenizer, the embedding
    and head resized from 512 to 576 rows)."""
    import torch
    from transformers import AutoModelForCausalLM

    from pytest_hemorrhage.loading import BUNDLED_MODEL

    root = tmp_path_factory.mktemp("mismatched")
    merges = shutil.copytree(BUNDLED_MODEL, root / "merges")
    data = json.loads((merges / "tokenizer.json").read_text())
    data["model"]["merges"].reverse()  # the same tokens, merged in another order
    (merges / "tokenizer.json").write_text(json.dumps(data))

    model = AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL, dtype=torch.float32)
    model.resize_token_embeddings(576)
    model.save_pretrained(root / "resized")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BUNDLED_MODEL / name, root / "resized" / name)
    return {"merges": str(merges), "resized": str(root / "resized")}


def test_a_candidate_with_another_encoding_or_logits_width_fails_with_one_line(
    pytester, mismatched
):
    pytester.makepyfile(test_release_gate=GATE)
    result = pytester.runpytest(
        "--hemorrhage-model=hemorrhage-tiny",
        "--hemorrhage-tokens=512",
        "--hemorrhage-candidate=hemorrhage-tiny",  # the baseline itself: accepted
        f"--hemorrhage-candidate={mismatched['merges']}",
        f"--hemorrhage-candidate={mismatched['resized']}",
        "-p",
        "no:randomly",
        "-p",
        "no:cacheprovider",
    )
    result.assert_outcomes(passed=1, failed=2)
    refused = "HemorrhageError: candidate *{} does not share the vocabulary of baseline "
    fix = "; gate a model made from this baseline with its tokenizer"
    result.stdout.fnmatch_lines(
        [
            refused.format("merges")
            + "hemorrhage-tiny: the evaluation text encodes differently from token 6 on: "
            + "* vs *"
            + fix
        ]
    )
    result.stdout.fnmatch_lines(
        [
            refused.format("resized")
            + "hemorrhage-tiny: 576 logits per token, the baseline has 512"
            + fix
        ]
    )
    assert "Traceback" not in result.stdout.str()
