"""Multiple-choice task scoring, flips and McNemar, the shipped cloze task, bad task files."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from pytest_hemorrhage.errors import HemorrhageError
from pytest_hemorrhage.extras.tasks import (
    DEFAULT_TASK,
    baseline_scores,
    encode_task,
    flip_table,
    load_task,
    mcnemar_exact,
    score_task,
)

TASK_METRICS = frozenset({"accuracy_drop", "flip_rate"})
ITEMS = [
    {
        "context": "Return the number of",
        "choices": [" bytes read.", " zebra cloud", " x"],
        "answer": 0,
    },
    {"context": "Open the file and ", "choices": ["read it.", "lines", "the of the"], "answer": 1},
    {"context": "", "choices": [" The module", " )))"], "answer": 0},
]


def write_task(path, items) -> None:
    path.write_text("".join((i if isinstance(i, str) else json.dumps(i)) + "\n" for i in items))


def by_hand(model, tokenizer, context: str, choice: str) -> float:
    """Sum of log-probs of the choice's tokens, one unpadded sequence, as lm-eval does."""
    stripped = context.rstrip()
    choice = context[len(stripped) :] + choice
    ctx = tokenizer(stripped, add_special_tokens=False)["input_ids"]
    whole = tokenizer(stripped + choice, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx) :]
    ctx = ctx or [tokenizer.eos_token_id]
    ids = torch.tensor([ctx + cont])
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=ids[:, :-1]).logits.float(), -1)[0]
    return sum(logp[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont))


def test_scores_equal_a_by_hand_log_likelihood(tiny, tmp_path):
    path = tmp_path / "small.jsonl"
    write_task(path, ITEMS)
    encoded = encode_task(load_task(path), tiny.tokenizer, 512)
    calls = []
    hook = tiny.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        scores = score_task(tiny.model, encoded, device="cpu", batch_tokens=10_000)
    finally:
        hook.remove()
    assert len(calls) == 1  # every choice of every item in one padded batch
    for i, item in enumerate(ITEMS):
        expected = [
            by_hand(tiny.model, tiny.tokenizer, item["context"], choice)
            for choice in item["choices"]
        ]
        assert scores.loglik[i, : len(expected)].tolist() == pytest.approx(expected, abs=1e-4)
        sizes = [len(c.encode()) for c in item["choices"]]
        assert bool(scores.acc[i]) == (
            max(range(len(expected)), key=expected.__getitem__) == item["answer"]
        )
        norm = [e / s for e, s in zip(expected, sizes, strict=True)]
        assert bool(scores.acc_norm[i]) == (
            max(range(len(norm)), key=norm.__getitem__) == item["answer"]
        )
    assert scores.loglik[2, 2] == -math.inf  # an item with fewer choices is padded


def test_scoring_does_not_depend_on_batching(tiny):
    task = load_task(DEFAULT_TASK)
    few = encode_task(dataclasses.replace(task, items=task.items[:6]), tiny.tokenizer, 512)
    one = score_task(tiny.model, few, device="cpu", batch_tokens=1)  # one item per batch
    many = score_task(tiny.model, few, device="cpu", batch_tokens=100_000)
    assert torch.allclose(one.loglik, many.loglik, atol=1e-4)


def test_mcnemar_exact_by_hand():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 1) == pytest.approx(2 * (1 + 6) / 2**6)
    assert mcnemar_exact(1, 5) == mcnemar_exact(5, 1)
    assert mcnemar_exact(10, 0) == pytest.approx(2 / 2**10)
    assert mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(200, 150) == pytest.approx(0.0087200365305559, rel=1e-12)  # scipy


def test_flip_table_by_hand():
    baseline = torch.tensor([1, 1, 1, 1, 1, 0, 0, 0], dtype=torch.bool)
    modified = torch.tensor([0, 0, 0, 0, 1, 0, 0, 0], dtype=torch.bool)
    table = flip_table(baseline, modified)
    assert table["correct_to_incorrect"] == 4 and table["incorrect_to_correct"] == 0
    assert table["baseline"] == 5 / 8 and table["modified"] == 1 / 8
    assert table["drop"] == 4 / 8 and table["flip_rate"] == 4 / 8
    assert table["mcnemar_p"] == 2 / 16
    modified = torch.tensor([1, 1, 1, 1, 0, 1, 0, 0], dtype=torch.bool)  # one flip each way
    table = flip_table(baseline, modified)
    assert table["drop"] == 0 and table["flip_rate"] == 2 / 8 and table["mcnemar_p"] == 1.0


def test_shipped_task_is_clearly_above_chance(harness):
    task = load_task(DEFAULT_TASK)
    assert 200 <= len(task.items) <= 400
    assert all(len(item.choices) == 4 for item in task.items)
    acc = baseline_scores(harness)["cloze"].acc
    correct, n = int(acc.sum()), acc.numel()
    p_chance = sum(math.comb(n, k) * 0.25**k * 0.75 ** (n - k) for k in range(correct, n + 1))
    assert correct / n > 0.35 and p_chance < 1e-6, (correct, n)


def test_identical_model_flips_nothing(harness):
    r = harness.measure([("prune.magnitude", {"sparsity": 0.0})], TASK_METRICS)  # a no-op
    assert r.metrics["accuracy_drop"] == 0 and r.metrics["flip_rate"] == 0
    assert r.stderr["accuracy_drop"] == 0 and r.stderr["flip_rate"] == 0
    cloze = r.details["tasks"]["cloze"]
    assert cloze["acc"]["correct_to_incorrect"] == cloze["acc"]["incorrect_to_correct"] == 0
    assert cloze["acc"]["mcnemar_p"] == 1.0 and cloze["acc_norm"]["flip_rate"] == 0


def test_gentle_and_heavy_damage(harness):
    gentle = harness.measure([("quant.rtn", {"bits": 8})], TASK_METRICS)
    heavy = harness.measure([("prune.magnitude", {"sparsity": 0.8})], TASK_METRICS)
    assert gentle.metrics["flip_rate"] <= 0.02
    assert heavy.metrics["flip_rate"] > 0.1
    assert heavy.metrics["accuracy_drop"] > 0
    assert heavy.stderr["flip_rate"] > 0
    cloze = heavy.details["tasks"]["cloze"]
    flips = cloze["acc"]["correct_to_incorrect"] + cloze["acc"]["incorrect_to_correct"]
    assert flips == round(heavy.metrics["flip_rate"] * cloze["items"])
    assert cloze["acc"]["baseline"] - cloze["acc"]["modified"] == pytest.approx(
        heavy.metrics["accuracy_drop"]
    )
    assert set(cloze["acc_norm"]) == set(cloze["acc"])
    assert cloze["acc"]["mcnemar_p"] < 0.05


LONG = " ".join(["word"] * 600)
BAD = {
    "missing field": ({"context": "a", "choices": [" b", " c"]}, "missing 'answer'"),
    "not json": ("{context: 1", "not valid JSON"),
    "answer out of range": (
        {"context": "a", "choices": [" b", " c"], "answer": 2},
        "answer=2 is out of range",
    ),
    "bool answer": ({"context": "a", "choices": [" b", " c"], "answer": True}, "answer=True"),
    "empty choices": ({"context": "a", "choices": [], "answer": 0}, "choices is empty"),
    "choice not a string": ({"context": "a", "choices": [" b", 3], "answer": 0}, "list of strings"),
    "empty choice": (
        {"context": "a", "choices": [" b", ""], "answer": 0},
        "choice 1 ('') encodes to no tokens",
    ),
    "prompt too long": (
        {"context": LONG, "choices": [" b", " c"], "answer": 0},
        "more than the model's 512 positions",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_item_names_file_and_line(tiny, tmp_path, case):
    line, message = BAD[case]
    path = tmp_path / "bad.jsonl"
    write_task(path, [ITEMS[0], line])
    with pytest.raises(HemorrhageError) as info:
        encode_task(load_task(path), tiny.tokenizer, 512)
    assert f"{path}:2: " in str(info.value)
    assert message in str(info.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(HemorrhageError, match="no such file"):
        load_task(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(HemorrhageError, match="no items"):
        load_task(tmp_path / "empty.jsonl")


def test_tasks_option_end_to_end(pytester):
    """Two task files through --hemorrhage-tasks; a bad one fails its test with file and line."""
    write_task(pytester.path / "small.jsonl", ITEMS)
    write_task(pytester.path / "other.jsonl", ITEMS[:2])
    write_task(
        pytester.path / "bad.jsonl", [ITEMS[0], {"context": "a", "choices": [" b"], "answer": 0}]
    )
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.hemorrhage(flip_rate=1.0)
        def test_flips(hemorrhage):
            r = hemorrhage.measure("quant.rtn", bits=2)
            assert set(r.details["tasks"]) == {"small", "other"}
            assert r.details["tasks"]["other"]["items"] == 2
            hemorrhage.check(r)
        """
    )
    args = [
        "--hemorrhage-model=hemorrhage-tiny",
        "--hemorrhage-tokens=1024",
        "-p",
        "no:cacheprovider",
    ]
    result = pytester.runpytest(
        *args, "--hemorrhage-tasks=small.jsonl,other.jsonl", "--hemorrhage-report=r.json"
    )
    result.assert_outcomes(passed=1)
    # the flip rate the user gets is over both files' items, and it is within the budget
    [row] = json.loads((pytester.path / "r.json").read_text())["results"]
    tasks = row["details"]["tasks"]
    assert {k: t["items"] for k, t in tasks.items()} == {"small": len(ITEMS), "other": 2}
    assert row["budget"] == {"flip_rate": 1.0} and row["violations"] == []
    pooled = sum(t["acc"]["flip_rate"] * t["items"] for t in tasks.values()) / (len(ITEMS) + 2)
    assert row["metrics"]["flip_rate"] == pytest.approx(pooled) and pooled > 0  # 2 bits flip some
    result = pytester.runpytest(*args, "--hemorrhage-tasks=bad.jsonl")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*HemorrhageError: bad.jsonl:2: choices is a single choice*"])
