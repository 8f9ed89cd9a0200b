"""Gating an instruct release as it is used: conversations rendered with its chat template,
scored on the assistant's replies, with the end-of-turn flips bounded on their own.

Run on the bundled model and its chat set (or your model and your conversations)::

    pytest examples/instruct --hemorrhage-model=hemorrhage-tiny \\
        --hemorrhage-data=pytest_hemorrhage/assets/chat/conversations.jsonl

Without chat data (a ``.jsonl`` of ``messages``) the tests skip, saying so. See docs/chat.md.
"""

import pytest


@pytest.fixture
def chat(hemorrhage):
    """The measure of ``stage``, skipped unless the run evaluates chat data."""

    def measure(*args, **kwargs):
        result = hemorrhage.measure(*args, **kwargs)
        if "scored" not in result.details:
            pytest.skip("needs chat data: --hemorrhage-data=conversations.jsonl (see docs/chat.md)")
        return result

    return measure


# retune for your model: on the bundled chat set 8-bit RTN measures kl_mean 0.0001 and
# special_top1_flip 0.005 (upper 95% bound 0.03, over 186 end-of-turn positions)
@pytest.mark.hemorrhage(kl_mean=0.01, special_top1_flip=0.05, confidence=0.95)
def test_int8_keeps_the_replies(hemorrhage, chat):
    hemorrhage.check(chat("quant.rtn", bits=8))


# 4-bit RTN: kl_mean 0.042 on the replies, a reply end flipped 18% of the time
@pytest.mark.hemorrhage(kl_mean=0.06, top1_disagreement=0.2, special_top1_flip=0.3)
def test_int4_within_its_budget(hemorrhage, chat):
    hemorrhage.check(chat("quant.rtn", bits=4))


def test_the_result_says_what_it_scored(chat):
    result = chat("quant.rtn", bits=4)
    # the assistant's tokens only; the prompts, headers and cut messages were context
    assert set(result.details["scored"]) == {"assistant"}
    assert result.tokens == result.details["scored"]["assistant"]
    assert result.details["context"]["user"] > 0
    # where the baseline predicted an end-of-turn (a marker), and how often 4 bits changed it
    assert result.details["special"]["positions"] > 0
    assert (
        result.metrics["special_top1_flip"] > chat("quant.rtn", bits=8).metrics["special_top1_flip"]
    )
