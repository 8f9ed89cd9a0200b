"""Chat data on the bundled model: rendering with the chat template, each token's role,
packing whole conversations, assistant-only scoring as a mask over the same passes, the
special-token flips, and one clear line per kind of bad input."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from pytest_hemorrhage.chat import (
    BUNDLED_CHAT,
    ROLES,
    Conversation,
    chat_windows,
    read_conversations,
    render,
)
from pytest_hemorrhage.errors import HemorrhageError

ASSISTANT = ROLES.index("assistant")
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "The cat sat."},
    {"role": "assistant", "content": "It was on the mat."},
    {"role": "user", "content": "More."},
    {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f"}}]},
    {"role": "tool", "content": "A mat is flat."},
    {"role": "assistant", "content": "Flat."},
]


@pytest.fixture(scope="module")
def chat(tiny):
    """A Harness over 16 windows of 128 tokens of the bundled chat set."""
    from pytest_hemorrhage.harness import Harness
    from pytest_hemorrhage.settings import Settings

    settings = Settings.defaults(model="hemorrhage-tiny", data=BUNDLED_CHAT, tokens=2048)
    return Harness(tiny, settings)


def _conversation(messages, path="c.jsonl"):
    from pathlib import Path

    return Conversation(messages, None, Path(path), 1)


def _spans(tokenizer, rendered, code):
    """The decoded runs of consecutive tokens with role ``code``."""
    runs, run = [], []
    for i, role in zip(rendered.ids, rendered.roles, strict=True):
        if role == code:
            run.append(i)
        elif run:
            runs.append(tokenizer.decode(run))
            run = []
    return runs + ([tokenizer.decode(run)] if run else [])


def test_a_reply_is_what_the_model_generates_after_the_generation_prompt(tiny):
    tok = tiny.tokenizer
    rendered = render(tok, _conversation(CONVERSATION))
    assert tok.decode(rendered.ids) == tok.apply_chat_template(CONVERSATION, tokenize=False)
    # each reply: its content and the end-of-turn, never the "Assistant:" header before it
    assert _spans(tok, rendered, ASSISTANT) == [
        " It was on the mat.\n\n",
        ' [{"type": "function", "function": {"name": "f"}}]\n\n',
        " Flat.\n\n",
    ]
    assert _spans(tok, rendered, ROLES.index("template")) == ["Assistant:"] * 3
    assert _spans(tok, rendered, ROLES.index("tool")) == ["Tool: A mat is flat.\n\n"]
    # the template's end-of-turn, found after the replies' content: the newline token
    assert rendered.end_of_turn == {tok.convert_tokens_to_ids("Ċ")}


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_a_chatml_template_with_added_special_tokens(tiny):
    """A template written here, ChatML's form, on the bundled tokenizer with two added special
    tokens: the reply ends with <|im_end|>, which becomes a marker."""
    tok = copy.deepcopy(tiny.tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    end = tok.convert_tokens_to_ids("<|im_end|>")
    rendered = render(tok, _conversation(CONVERSATION[1:3]), template=CHATML)
    assert _spans(tok, rendered, ASSISTANT) == ["It was on the mat.<|im_end|>\n"]
    assert rendered.end_of_turn == {end}


def test_windows_pack_whole_conversations_and_cut_long_ones_from_the_left(tiny):
    tok = tiny.tokenizer
    seq_len = 64
    windows = chat_windows(tok, BUNDLED_CHAT, seq_len=seq_len, tokens=64 * 40)
    conversations = read_conversations(BUNDLED_CHAT)
    rendered = [render(tok, c) for c in conversations[: windows.details["conversations"]]]
    padding, cut = ROLES.index("padding"), ROLES.index("cut")
    prompts = [ROLES.index(r) for r in ("system", "user", "tool")]
    # the windows hold the conversations in order, each whole or its last seq_len tokens
    expected = [r.ids if len(r.ids) <= seq_len else r.ids[-seq_len:] for r in rendered]
    held = windows.eval[windows.roles != padding].tolist()
    assert held == [i for ids in expected for i in ids]
    truncated = sum(len(r.ids) > seq_len for r in rendered)
    assert windows.details["truncated"] == truncated > 0
    for ids, roles in zip(windows.eval.tolist(), windows.roles.tolist(), strict=True):
        real = [r for r in roles if r != padding]
        assert roles[: len(real)] == real  # padding only at the end
        # a window begins a conversation (<|endoftext|>), a cut message or a whole one
        assert ids[0] == tok.bos_token_id or roles[0] in (cut, *prompts)
        # every scored reply has its prompt before it, in the same window
        first = roles.index(ASSISTANT) if ASSISTANT in roles else len(roles)
        assert first == len(roles) or any(r in prompts for r in roles[:first])


def test_assistant_only_scoring_masks_the_same_passes(tiny, chat):
    """kl_mean, ppl and top-1 over the assistant's targets equal the per-token measures of
    one independent pass, masked by the windows' roles (positions 1:, the targets)."""
    from pytest_hemorrhage.metrics import token_stats

    stage = [("quant.rtn", {"bits": 3})]
    result = chat.measure(stage)
    mask = (chat.windows.roles[:, 1:] == ASSISTANT).reshape(-1)
    ref = chat.reference
    with chat.modified(stage):
        logits = torch.cat([lg for lg, *_ in chat.chunks()])
    stats = token_stats(logits, ref)
    assert result.tokens == int(mask.sum()) == result.details["scored"]["assistant"]
    assert set(result.details["scored"]) == {"assistant"}
    assert result.metrics["kl_mean"] == pytest.approx(stats.kl[mask].double().mean().item())
    disagree = stats.disagree[mask].double().mean().item()
    assert result.metrics["top1_disagreement"] == pytest.approx(disagree)
    # the baseline's own perplexity on the replies: the mask lines up with the reference rows
    assert result.baseline_ppl == pytest.approx(math.exp(-ref.target_logp[mask].mean().item()))
    assert result.modified_ppl == pytest.approx(math.exp(stats.nll[mask].mean().item()))
    # the context is said too, and an unmodified model scores 0
    assert result.details["context"]["user"] > 0
    same = chat.measure([("noise.gaussian", {"sigma": 0.0})])
    assert set(same.metrics.values()) == {0.0}


def test_special_top1_flip_is_the_disagreement_where_the_baseline_predicts_a_marker(chat):
    from pytest_hemorrhage.metrics import token_stats

    stage = [("quant.rtn", {"bits": 3})]
    result = chat.measure(stage)
    ref = chat.reference
    mask = (chat.windows.roles[:, 1:] == ASSISTANT).reshape(-1)
    newline = chat.loaded.tokenizer.convert_tokens_to_ids("Ċ")
    at = mask & (ref.top1 == newline)
    with chat.modified(stage):
        stats = token_stats(torch.cat([lg for lg, *_ in chat.chunks()]), ref)
    flips = stats.disagree[at].double().mean().item()
    assert result.details["special"]["positions"] == int(at.sum()) > 0
    assert result.details["special"]["markers"] == ["<|endoftext|>", "Ċ"]
    assert flips > 0 and result.metrics["special_top1_flip"] == pytest.approx(flips)
    assert result.stderr["special_top1_flip"] > 0


def test_a_candidate_whose_template_renders_other_tokens_is_named_in_one_line(chat, tiny):
    from pytest_hemorrhage.loading import LoadedModel

    same = chat.measure_model(tiny, {"label": "same"})
    assert same.details["chat_template"].startswith("the candidate's renders the 19 conv")
    other = copy.deepcopy(tiny.tokenizer)
    other.chat_template = other.chat_template.replace("'\\n\\n'", "'\\n'")
    assert other.chat_template != tiny.tokenizer.chat_template
    candidate = LoadedModel(model=tiny.model, tokenizer=other, spec="tiny-other")
    with pytest.raises(HemorrhageError) as info:
        chat.measure_model(candidate, {"label": "other"})
    line = str(info.value)
    assert "\n" not in line
    assert "candidate tiny-other's chat template renders" in line
    assert "conversations.jsonl:1 to other tokens than the baseline's, from token 18 ('Ċ')" in line
    # both renderings around it: the candidate ends the system message with one newline
    assert (
        "baseline ['ation' '.' 'Ċ' 'Ċ' 'U' 's'] vs candidate tiny-other ['ation' '.' 'Ċ' 'U'"
        in line
    )
    other.chat_template = None  # nothing shipped, nothing compared
    none = chat.measure_model(candidate, {"label": "none"})
    assert none.details["chat_template"] == "the candidate ships none: not compared"


def test_generation_on_chat_prompts_compares_replies_up_to_the_end_of_turn(tiny):
    from pytest_hemorrhage.harness import Harness
    from pytest_hemorrhage.settings import Settings

    settings = Settings.defaults(
        model="hemorrhage-tiny",
        data=BUNDLED_CHAT,
        tokens=1024,
        gen_prompts=4,
        gen_prompt_tokens=16,
        gen_tokens=24,
    )
    harness = Harness(tiny, settings)
    want = frozenset({"gen_mismatch"})
    same = harness.measure([("noise.gaussian", {"sigma": 0.0})], want)
    assert same.metrics["gen_mismatch"] == 0.0
    prompts, base = harness.memo[("generation.baseline", 4, 16, 24)]
    tok = tiny.tokenizer
    # every prompt ends with the generation prompt: the model starts the reply
    assert all(tok.decode(p).endswith("Assistant:") for p in prompts.tolist())
    lengths = same.details["generation"]["reply_tokens"]
    newline = tok.convert_tokens_to_ids("Ċ")
    for row, n in zip(base.tolist(), lengths, strict=True):
        assert newline not in row[: n - 1] and (n == 24 or row[n - 1] == newline)
    assert min(lengths) < 24  # some reply ended: what follows it is not compared
    stage = [("quant.rtn", {"bits": 3})]
    result = harness.measure(stage, want)
    first = result.details["generation"]["first_divergence"]
    assert all(f <= n for f, n in zip(first, lengths, strict=True))
    # the mismatch counts the reply's tokens only: one greedy pass of the modified model
    from pytest_hemorrhage.extras.generation import generate

    with harness.modified(stage):
        mod = generate(harness.model, prompts, 24)
    expected = [
        (m[:n] != b[:n]).double().mean().item() for m, b, n in zip(mod, base, lengths, strict=True)
    ]
    assert result.metrics["gen_mismatch"] == pytest.approx(sum(expected) / len(expected))


def test_early_stopping_carries_the_mask(tiny):
    from pytest_hemorrhage.budget import Budget
    from pytest_hemorrhage.harness import Harness
    from pytest_hemorrhage.settings import Settings

    settings = Settings.defaults(
        model="hemorrhage-tiny", data=BUNDLED_CHAT, tokens=2048, early_stop=True
    )
    harness = Harness(tiny, settings)
    result = harness.measure([("quant.rtn", {"bits": 8})], budget=Budget({"kl_mean": 1.0}))
    assert result.details["early_stop"]["stopped"]
    assert result.tokens == result.details["scored"]["assistant"] < 8 * 127


def test_raw_text_keeps_its_results(harness):
    result = harness.measure([("quant.rtn", {"bits": 4})])
    assert not {"scored", "context", "chat", "special"} & set(result.details)
    assert result.tokens == harness.windows.eval[:, 1:].numel()
    assert "special_top1_flip" not in result.metrics  # the model never predicts its one


def _bad(tmp_path, lines):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


USER = {"role": "user", "content": "Hi"}
REPLY = {"role": "assistant", "content": "Hello."}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "c.jsonl:2: not valid JSON"),
        (json.dumps({"messages": [{"content": "x"}]}), 'c.jsonl:2: message 1 has no "role"'),
        (json.dumps({"messages": [{"role": "user"}]}), 'c.jsonl:2: message 1 (user) has no "c'),
        (json.dumps({"messages": [{"role": "bot", "content": "x"}]}), "unknown role 'bot'"),
        (json.dumps({"text": "raw"}), 'c.jsonl:2: each line needs a "messages" list'),
    ],
    ids=["not-json", "no-role", "no-content", "unknown-role", "no-messages"],
)
def test_bad_lines_name_the_file_the_line_and_the_fix(tmp_path, line, message):
    path = _bad(tmp_path, [json.dumps({"messages": [USER, REPLY]}), line])
    with pytest.raises(HemorrhageError, match="use one of|give it|write one|e.g.") as info:
        read_conversations(path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_no_assistant_turn_and_no_template_are_one_line_each(tmp_path, tiny):
    path = _bad(tmp_path, [json.dumps({"messages": [USER]})] * 2)
    with pytest.raises(HemorrhageError, match=r"c.jsonl:2: no assistant turn in any of its 2"):
        read_conversations(path)
    path = _bad(tmp_path, [json.dumps({"messages": [USER, REPLY]})])
    bare = copy.deepcopy(tiny.tokenizer)
    bare.chat_template = None
    with pytest.raises(
        HemorrhageError, match=r"c.jsonl:1: .* no chat template .*--hemorrhage-chat-"
    ):
        chat_windows(bare, path, seq_len=32, tokens=64)
    # the option's template renders it
    windows = chat_windows(bare, path, seq_len=32, tokens=64, template=CHATML)
    assert windows.details["template"] == "--hemorrhage-chat-template"


TEST_FILE = """
import pytest

@pytest.mark.hemorrhage(kl_mean=1.0, special_top1_flip=0.0)
def test_int3(hemorrhage):
    hemorrhage.check(hemorrhage.measure("quant.rtn", bits=3))
"""


def test_chat_data_and_the_template_option_through_pytest(pytester):
    """The option's template replaces the tokenizer's; the JSON report says what was scored;
    a budget on special_top1_flip fails with its one line."""
    pytester.makepyfile(test_instruct=TEST_FILE)
    (pytester.path / "t.jinja").write_text(
        "{% for m in messages %}{{ m.role + ': ' + (m.content or 'call') + '\\n\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
    )
    args = (
        "--hemorrhage-model=hemorrhage-tiny",
        f"--hemorrhage-data={BUNDLED_CHAT}",
        "--hemorrhage-tokens=1024",
        "--hemorrhage-report=r.json",
        "-p",
        "no:randomly",
    )
    result = pytester.runpytest(*args, "--hemorrhage-chat-template=t.jinja")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*special_top1_flip: 0.* > 0.0000 (baseline ppl*"])
    (record,) = json.loads((pytester.path / "r.json").read_text())["results"]
    details = record["details"]
    assert details["chat"]["template"] == "--hemorrhage-chat-template"
    assert set(details["scored"]) == {"assistant"} and details["scored"]["assistant"] > 0
    result = pytester.runpytest(*args, "--hemorrhage-chat-roles=bot")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*--hemorrhage-chat-roles=bot: unknown role 'bot'*"])
