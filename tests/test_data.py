"""Evaluation text -> windows: one stream cut as llama.cpp's perplexity tool cuts it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from pytest_hemorrhage.data import BUNDLED_CORPUS, leading_bos, make_windows, read_text
from pytest_hemorrhage.errors import HemorrhageError

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _with_bos(tokenizer):
    """The bundled tokenizer, made to put its BOS token before every text (as Llama's does)."""
    from tokenizers.processors import TemplateProcessing

    leading = copy.deepcopy(tokenizer)
    bos = leading.bos_token
    leading.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, leading.bos_token_id)]
    )
    return leading


def test_text_shorter_than_a_window_names_its_tokens_and_the_longest_window(tiny):
    text = "def f(x): return x\n" * 10
    count = len(tiny.tokenizer(text, add_special_tokens=False)["input_ids"])
    with pytest.raises(HemorrhageError) as stop:
        make_windows(tiny.tokenizer, text, seq_len=4096, tokens=8192, source="short.txt")
    assert str(stop.value) == (
        f"--hemorrhage-data=short.txt has {count} tokens, fewer than one window of "
        f"--hemorrhage-seq-len=4096; the longest window it makes is --hemorrhage-seq-len={count}; "
        "give more text (its documents are joined into one stream) or ask for a shorter window"
    )
    assert make_windows(tiny.tokenizer, text, seq_len=count, tokens=count).eval.shape == (1, count)


def test_a_bos_leads_every_window_where_the_tokenizer_puts_one(tiny):
    text = read_text(None)[:20000]
    plain = make_windows(tiny.tokenizer, text, seq_len=256, tokens=1024)
    assert leading_bos(tiny.tokenizer) is None and plain.bos is None
    stream = tiny.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert plain.eval.flatten().tolist() == stream[:1024]  # consecutive, nothing added

    leading = _with_bos(tiny.tokenizer)
    bos = leading_bos(leading)
    assert bos == leading.bos_token_id
    led = make_windows(leading, text, seq_len=256, tokens=1024)
    assert led.eval[:, 0].tolist() == [bos] * 4
    assert led.eval[:, 1:].equal(plain.eval[:, 1:])  # the same grid of the same stream
    assert led.spare.equal(plain.spare)
    calibration = led.calibration(2)
    assert calibration[:, 0].tolist() == [bos] * 2
    assert calibration[:, 1:].equal(plain.calibration(2)[:, 1:])
    assert led.spare.equal(plain.spare)  # calibration writes its BOS into copies


def test_the_docs_say_how_far_the_bundled_corpus_reaches(tiny):
    count = len(tiny.tokenizer(BUNDLED_CORPUS.read_text(), add_special_tokens=False)["input_ids"])
    assert f"bundled held-out corpus is {count:,} tokens" in (DOCS / "options.md").read_text()
