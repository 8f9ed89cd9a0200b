"""The portable reference file with top-K storage (a vocabulary above ``EXACT_VOCAB``, as every
real model's): what is saved is what is loaded, field by field, and gating from the file alone
gives the live run's metrics bit for bit (tests/wide_vocab.py's 1,024-token head).

The bundled model's 512-token reference is exact and has no tail; tests/test_gate.py covers
its file."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import wide_vocab

from pytest_hemorrhage.reference import EXACT_VOCAB, Reference
from pytest_hemorrhage.reference_file import PortableReference, vocab_list

TOKENS = 512  # the pytester runs' --hemorrhage-tokens, so their reference is this harness's
GATE = """
def test_release(hemorrhage, hemorrhage_candidate):
    hemorrhage.measure_model(hemorrhage_candidate)
"""


@pytest.fixture(scope="module")
def wide_vocab_harness(make_harness):
    """A Harness on wide_vocab's baseline, with the settings the pytester runs below use."""
    model, tokenizer = wide_vocab.baseline()
    return make_harness(model, tokenizer, spec="wide_vocab:baseline", tokens=TOKENS)


def _assert_same_reference(loaded: Reference, saved: Reference) -> None:
    for f in dataclasses.fields(Reference):
        mine, theirs = getattr(loaded, f.name), getattr(saved, f.name)
        if theirs is None:
            assert mine is None, f.name
            continue
        same = mine.dtype == theirs.dtype and torch.equal(mine, theirs)
        assert same, f"{f.name} differs after the round trip"


def test_a_topk_reference_file_loads_every_field_as_saved(wide_vocab_harness, tmp_path):
    reference = wide_vocab_harness.reference
    assert wide_vocab_harness.vocab == wide_vocab.VOCAB > EXACT_VOCAB and reference.p is None
    # a tail that carries mass: a tail_mass lost on the way would change every KL term
    assert reference.tail_mass.min() > 0.05 and reference.tail_idx is not None
    saved = PortableReference(
        reference,
        wide_vocab_harness.windows.eval,
        wide_vocab_harness.vocab,
        vocab_list(wide_vocab_harness.loaded.tokenizer),
        {
            "spec": wide_vocab_harness.loaded.spec,
            "fingerprint": wide_vocab_harness.loaded.fingerprint,
        },
        {
            "seq_len": 128,
            "tokens": TOKENS,
            "data": "bundled corpus",
            "topk": wide_vocab_harness.topk,
        },
    )
    saved.save(tmp_path / "wide.ref")
    loaded = PortableReference.load(tmp_path / "wide.ref")
    _assert_same_reference(loaded.reference, reference)
    assert loaded.windows.dtype == torch.long and torch.equal(loaded.windows, saved.windows)
    assert (loaded.vocab, loaded.tokens) == (saved.vocab, saved.tokens)
    assert (loaded.baseline, loaded.settings) == (saved.baseline, saved.settings)


def test_gating_from_a_topk_reference_file_gives_the_live_metrics_bit_for_bit(
    pytester, wide_vocab_harness
):
    pytester.makepyfile(test_release_gate=GATE)
    common = (
        f"--hemorrhage-tokens={TOKENS}",
        "--hemorrhage-candidate=wide_vocab:candidate",
        "-p",
        "no:randomly",
        "-p",
        "no:cacheprovider",
    )
    path = pytester.path / "wide.ref"
    live = pytester.runpytest(
        *common,
        "--hemorrhage-model=wide_vocab:baseline",
        f"--hemorrhage-save-reference={path}",
        "--hemorrhage-report=live.json",
    )
    live.assert_outcomes(passed=1)
    alone = pytester.runpytest(
        *common, f"--hemorrhage-reference={path}", "--hemorrhage-report=alone.json"
    )
    alone.assert_outcomes(passed=1)
    (before,) = json.loads((pytester.path / "live.json").read_text())["results"]
    (after,) = json.loads((pytester.path / "alone.json").read_text())["results"]
    assert before["metrics"]["kl_mean"] > 0.01  # the candidate's damage, measured
    assert after["metrics"] == before["metrics"]
    assert after["stderr"] == before["stderr"]
    # what the session wrote is the reference the live run measured against
    _assert_same_reference(PortableReference.load(path).reference, wide_vocab_harness.reference)
