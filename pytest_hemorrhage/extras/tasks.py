"""Multiple-choice tasks scored by log-likelihood, and the answers a modification flips.

A task is a ``.jsonl`` file, one item a line: ``{"context": str, "choices": [str, ...],
"answer": int}`` (the index of the right choice); its name is the file's stem. As in
lm-evaluation-harness, a choice's score is the sum of the log-probs of its tokens given the
context (whitespace at the end of the context moves to the start of the choice); ``acc`` picks
the highest score, ``acc_norm`` the highest score per byte of the choice. Scoring reads the
model's logits before any decoding processor: decoding settings do not change a log-likelihood
evaluation (they show in the generation metrics instead).

Metrics (pooled over the items of every task): ``accuracy_drop`` = baseline acc - modified acc,
``flip_rate`` = share of items whose correctness changed in either direction; both with paired
standard errors. ``Result.details["tasks"]`` holds, per task and for acc and acc_norm, the flip
matrix and an exact McNemar p-value (two-sided binomial test on the discordant items).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import HemorrhageError
from ..loading import model_logits
from ..metrics import mean_se

if TYPE_CHECKING:
    from ..modifications.registry import Patch
    from . import HarnessView

__all__ = [
    "DEFAULT_TASK",
    "EncodedTask",
    "Item",
    "Task",
    "TaskScores",
    "baseline_scores",
    "encode_task",
    "flip_table",
    "load_task",
    "mcnemar_exact",
    "score_task",
    "task_metrics",
]

DEFAULT_TASK = Path(__file__).parent.parent / "assets" / "tasks" / "cloze.jsonl"
_FIELDS = 'each line needs "context" (string), "choices" (list of strings), "answer" (index)'


@dataclass(frozen=True)
class Item:
    """One multiple-choice question; ``line`` is its 1-based line in the task file."""

    context: str
    choices: tuple[str, ...]
    answer: int
    line: int


@dataclass(frozen=True)
class Task:
    """A named list of items read from ``path``."""

    name: str
    path: Path
    items: tuple[Item, ...]


def load_task(path: str | Path) -> Task:
    """Read and validate a task file; errors name the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HemorrhageError(f"--hemorrhage-tasks: {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise HemorrhageError(
            f"--hemorrhage-tasks: {path}: cannot read it as UTF-8 ({exc})"
        ) from None
    items = [
        _item(path, number, line)
        for number, line in enumerate(text.splitlines(), 1)
        if line.strip()
    ]
    if not items:
        raise HemorrhageError(f"{path}: no items; {_FIELDS}")
    return Task(path.stem, path, tuple(items))


def _item(path: Path, number: int, line: str) -> Item:
    where = f"{path}:{number}"
    try:
        record: Any = json.loads(line)
    except json.JSONDecodeError as exc:
        raise HemorrhageError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise HemorrhageError(f"{where}: expected a JSON object; {_FIELDS}")
    missing = [k for k in ("context", "choices", "answer") if k not in record]
    if missing:
        raise HemorrhageError(f"{where}: missing {', '.join(map(repr, missing))}; {_FIELDS}")
    context, choices, answer = record["context"], record["choices"], record["answer"]
    if not isinstance(context, str):
        raise HemorrhageError(f"{where}: context={context!r} must be a string")
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise HemorrhageError(f"{where}: choices must be a list of strings, got {choices!r}")
    if len(choices) < 2:
        what = "empty" if not choices else "a single choice"
        raise HemorrhageError(f"{where}: choices is {what}; give at least 2 choices")
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        raise HemorrhageError(
            f"{where}: answer={answer!r} is out of range; it is the index of "
            f"the right choice, 0 to {len(choices) - 1}"
        )
    return Item(context, tuple(choices), answer, number)


@dataclass(frozen=True)
class EncodedTask:
    """Token ids of every item: ``contexts[i]`` and ``continuations[i][j]`` for choice j."""

    task: Task
    contexts: tuple[tuple[int, ...], ...]
    continuations: tuple[tuple[tuple[int, ...], ...], ...]
    choice_bytes: tuple[tuple[int, ...], ...]


def encode_task(task: Task, tokenizer: Any, max_positions: int) -> EncodedTask:
    """Tokenize like lm-evaluation-harness; errors name the file and line.

    Args:
        task: the items.
        tokenizer: the model's tokenizer.
        max_positions: most tokens the model reads at once (context + choice, minus the last).
    """
    unk = getattr(tokenizer, "unk_token_id", None)
    special = {getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "pad")}
    start = next(
        (t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id) if t is not None), None
    )
    contexts, continuations, sizes = [], [], []
    for item in task.items:
        where = f"{task.path}:{item.line}"
        context = item.context.rstrip()
        moved = item.context[len(context) :]  # trailing spaces belong to the continuation
        encoded_context = _encode(tokenizer, context)
        ctx = encoded_context or ([start] if start is not None else [])
        if not ctx:
            raise HemorrhageError(
                f"{where}: the context encodes to no tokens and the tokenizer "
                "has no bos/eos token to start from; give a context"
            )
        conts = []
        for j, choice in enumerate(item.choices):
            cont = _encode(tokenizer, context + moved + choice)[len(encoded_context) :]
            if not cont:
                raise HemorrhageError(
                    f"{where}: choice {j} ({choice!r}) encodes to no tokens; "
                    "give every choice some text the tokenizer can encode"
                )
            if unk is not None and unk not in special and unk in cont:
                raise HemorrhageError(
                    f"{where}: choice {j} ({choice!r}) encodes to the unknown "
                    "token; remove the characters the tokenizer lacks"
                )
            length = len(ctx) + len(cont) - 1
            if length > max_positions:
                raise HemorrhageError(
                    f"{where}: context + choice {j} is {length} tokens, more than the model's "
                    f"{max_positions} positions; shorten the context"
                )
            conts.append(tuple(cont))
        contexts.append(tuple(ctx))
        continuations.append(tuple(conts))
        sizes.append(tuple(max(1, len(c.encode("utf-8"))) for c in item.choices))
    return EncodedTask(task, tuple(contexts), tuple(continuations), tuple(sizes))


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


@dataclass(frozen=True)
class TaskScores:
    """Per item: log-likelihood of every choice (-inf pads short items) and correctness."""

    loglik: torch.Tensor  # (items, max choices) float64
    acc: torch.Tensor  # (items,) bool
    acc_norm: torch.Tensor  # (items,) bool

    def to_dict(self) -> dict[str, float]:
        return {
            "acc": self.acc.double().mean().item(),
            "acc_norm": self.acc_norm.double().mean().item(),
        }


@torch.inference_mode()
def score_task(model: Any, encoded: EncodedTask, *, device: Any, batch_tokens: int) -> TaskScores:
    """Score every choice of every item, several items per forward pass.

    Items are sorted by length and packed whole (all their choices in one padded batch) while
    rows x longest row stays within ``batch_tokens``. Right padding needs no attention mask:
    a causal model's outputs at a position do not depend on later tokens.
    """
    n = len(encoded.contexts)
    width = max(len(c) for c in encoded.continuations)
    loglik = torch.full((n, width), -math.inf, dtype=torch.float64)
    rows = [
        [(*ctx, *cont) for cont in conts]
        for ctx, conts in zip(encoded.contexts, encoded.continuations, strict=True)
    ]
    order = sorted(range(n), key=lambda i: -max(map(len, rows[i])))
    batch: list[int] = []
    count = longest = 0
    for i in order:
        size, length = len(rows[i]), max(map(len, rows[i])) - 1
        if batch and (count + size) * max(longest, length) > batch_tokens:
            _score_batch(model, encoded, rows, batch, loglik, device)
            batch, count, longest = [], 0, 0
        batch.append(i)
        count, longest = count + size, max(longest, length)
    if batch:
        _score_batch(model, encoded, rows, batch, loglik, device)
    answers = torch.tensor([item.answer for item in encoded.task.items])
    sizes = torch.ones(n, width, dtype=torch.float64)
    for i, s in enumerate(encoded.choice_bytes):
        sizes[i, : len(s)] = torch.tensor(s, dtype=torch.float64)
    finite = torch.isfinite(loglik.gather(1, answers[:, None]).squeeze(1))  # nan is never right
    clean = torch.nan_to_num(loglik, nan=-math.inf)
    return TaskScores(
        loglik,
        (clean.argmax(1) == answers) & finite,
        ((clean / sizes).argmax(1) == answers) & finite,
    )


def _score_batch(
    model: Any,
    encoded: EncodedTask,
    rows: list[list[tuple[int, ...]]],
    batch: list[int],
    loglik: torch.Tensor,
    device: Any,
) -> None:
    flat = [(i, j, row) for i in batch for j, row in enumerate(rows[i])]
    length = max(len(row) for *_, row in flat) - 1
    ids = torch.zeros(len(flat), length, dtype=torch.long)
    targets = torch.zeros(len(flat), length, dtype=torch.long)
    mask = torch.zeros(len(flat), length, dtype=torch.bool)
    for r, (i, j, row) in enumerate(flat):
        ids[r, : len(row) - 1] = torch.tensor(row[:-1])
        start = len(encoded.contexts[i]) - 1  # the logits at start predict the first choice token
        cont = encoded.continuations[i][j]
        targets[r, start : start + len(cont)] = torch.tensor(cont)
        mask[r, start : start + len(cont)] = True
    logits = model_logits(model, ids.to(device)).float()
    logp = torch.log_softmax(logits, -1).gather(-1, targets.to(device)[..., None]).squeeze(-1)
    sums = torch.where(mask.to(device), logp, 0).double().sum(-1).cpu()
    for r, (i, j, _) in enumerate(flat):
        loglik[i, j] = sums[r]


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value for ``b`` and ``c`` discordant items (binomial, p=1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)  # int / int rounds correctly however large


def flip_table(baseline: torch.Tensor, modified: torch.Tensor) -> dict[str, Any]:
    """Accuracies, flips both ways and the McNemar p-value of two correctness vectors."""
    b = int((baseline & ~modified).sum())
    c = int((~baseline & modified).sum())
    n = baseline.numel()
    return {
        "baseline": baseline.double().mean().item(),
        "modified": modified.double().mean().item(),
        "drop": (b - c) / n,
        "flip_rate": (b + c) / n,
        "correct_to_incorrect": b,
        "incorrect_to_correct": c,
        "mcnemar_p": mcnemar_exact(b, c),
    }


def _tasks(harness: HarnessView) -> list[EncodedTask]:
    """The session's tasks (``--hemorrhage-tasks``, else the shipped cloze task), encoded once."""
    paths = harness.settings.tasks or (DEFAULT_TASK,)

    def load() -> list[EncodedTask]:
        tasks = [load_task(p) for p in paths]
        names = [t.name for t in tasks]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise HemorrhageError(
                f"--hemorrhage-tasks: several files named {twice[0]!r}; a "
                "task is named by its file's stem, so rename one"
            )
        limit = _max_positions(harness)
        return [encode_task(t, harness.loaded.tokenizer, limit) for t in tasks]

    return harness.context.memo(("tasks", tuple(map(str, paths))), load)


def _max_positions(harness: HarnessView) -> int:
    config = getattr(harness.model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return harness.settings.seq_len


def _score(harness: HarnessView, encoded: EncodedTask, model: Any = None) -> TaskScores:
    """Scores of ``model`` (default: the baseline, as modified now)."""
    tokens = harness.batch_size * harness.settings.seq_len
    model = harness.model if model is None else model
    return score_task(model, encoded, device=next(model.parameters()).device, batch_tokens=tokens)


def baseline_scores(harness: HarnessView) -> dict[str, TaskScores]:
    """The unmodified model's scores per task, computed once per session."""
    return {
        e.task.name: harness.context.memo(
            ("task-baseline", str(e.task.path)), lambda e=e: _score(harness, e)
        )
        for e in _tasks(harness)
    }


def task_metrics(
    harness: HarnessView, patch: Patch
) -> tuple[dict[str, float], dict[str, float | None], dict[str, Any]]:
    """``accuracy_drop`` and ``flip_rate`` of the modified model, with per-task details; the
    item is the sampling unit of their standard errors (one value per item)."""
    keys = [("task-baseline", str(e.task.path)) for e in _tasks(harness)]
    if not all(k in harness.memo for k in keys):
        raise RuntimeError(
            "task baselines must be scored before the model is modified "
            "(Harness.measure runs the provider's baseline first)"
        )
    drops, flips, details = [], [], {}
    for encoded, key in zip(_tasks(harness), keys, strict=True):
        base, now = harness.memo[key], _score(harness, encoded, patch.model)
        drops.append(base.acc.double() - now.acc.double())
        flips.append((base.acc != now.acc).double())
        details[encoded.task.name] = {
            "path": str(encoded.task.path),
            "items": len(encoded.task.items),
            "acc": flip_table(base.acc, now.acc),
            "acc_norm": flip_table(base.acc_norm, now.acc_norm),
        }
    drop, drop_se = mean_se(torch.cat(drops), level=harness.level)
    flip, flip_se = mean_se(torch.cat(flips), level=harness.level)
    return (
        {"accuracy_drop": drop, "flip_rate": flip},
        {"accuracy_drop": drop_se, "flip_rate": flip_se},
        {"tasks": details},
    )
