"""Evaluation text -> token windows: fixed, non-overlapping, with spare tokens for calibration."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import HemorrhageError

if TYPE_CHECKING:
    import torch

__all__ = [
    "BUNDLED_CORPUS",
    "Windows",
    "jsonl_records",
    "leading_bos",
    "make_windows",
    "read_text",
]

BUNDLED_CORPUS = Path(__file__).parent / "assets" / "corpus" / "valid.txt"


def read_text(path: str | Path | None) -> str:
    """The evaluation text from a ``.txt`` file, a ``.jsonl`` file (``text`` field) or a
    directory of ``.txt`` files; the bundled held-out corpus when ``path`` is None. Records and
    files are joined, a blank line between them, into one text that the windows are cut from
    as llama.cpp's perplexity tool cuts its input file: a long window spans documents.

    A ``.jsonl`` file of conversations (``messages``, see :mod:`pytest_hemorrhage.chat`)
    gives its messages' contents, one conversation a paragraph: the text an encoder embeds
    and a reference file hashes (its windows come from the rendered conversations)."""
    path = Path(path) if path else BUNDLED_CORPUS
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise HemorrhageError(f"--hemorrhage-data={path}: directory has no .txt files")
        text = "\n\n".join(_read(f) for f in files)
    elif path.suffix == ".jsonl":
        text = "\n\n".join(_jsonl_texts(path))
    else:
        text = _read(path)
    if not text.strip():
        raise HemorrhageError(f"--hemorrhage-data={path}: no text in it; give a non-empty file")
    return text


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HemorrhageError(f"--hemorrhage-data={path}: no such file or directory") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise HemorrhageError(
            f"--hemorrhage-data={path}: cannot read it as UTF-8 text ({exc})"
        ) from None


def jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    """The JSON value of every non-blank line of ``path`` with its 1-based line number; a
    line that is not JSON stops with one line naming the file, the line and the fix."""
    for number, line in enumerate(_read(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise HemorrhageError(
                f"{path}:{number}: not valid JSON ({exc.msg}); write one JSON object a line"
            ) from None


def _jsonl_texts(path: Path) -> list[str]:
    texts = []
    for number, record in jsonl_records(path):
        if isinstance(record, dict) and isinstance(record.get("messages"), list):
            contents = [m.get("content") for m in record["messages"] if isinstance(m, dict)]
            texts.append("\n\n".join(c for c in contents if isinstance(c, str)))
            continue
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise HemorrhageError(
                f'{path}:{number}: each line needs a string "text" field (raw text) or a '
                '"messages" list (conversations)'
            )
        texts.append(record["text"])
    return texts


@dataclass(frozen=True)
class Windows:
    """Evaluation windows and the tokens left after them, kept apart for calibration.

    Chat data (:func:`pytest_hemorrhage.chat.chat_windows`) also gives each position's role
    (an index into ``chat.ROLES``: which message, or padding, it belongs to), the template's
    end-of-turn tokens and what packing the conversations did (``details``); raw text has
    none of them.
    """

    eval: torch.Tensor  # (n_windows, seq_len) int64
    spare: torch.Tensor  # (n_spare,) int64, disjoint from eval
    roles: torch.Tensor | None = None  # (n_windows, seq_len) int8, chat data only
    markers: tuple[int, ...] = ()  # chat data: the template's end-of-turn token ids
    details: dict[str, Any] = field(default_factory=dict)
    bos: int | None = None  # raw text: the token that leads every window (see make_windows)

    def calibration(self, count: int) -> torch.Tensor:
        """``count`` windows from the spare tokens, in order (deterministic, disjoint from eval)."""
        seq_len = self.eval.shape[1]
        available = self.spare.numel() // seq_len
        if count > available:
            raise HemorrhageError(
                f"calibration needs {count} windows of {seq_len} tokens but the data leaves "
                f"{available} after the evaluation windows; lower --hemorrhage-tokens, ask for "
                "fewer calibration windows, or give more --hemorrhage-data"
            )
        windows = self.spare[: count * seq_len].reshape(count, seq_len)
        if self.bos is not None:  # led like the evaluation windows
            windows = windows.clone()
            windows[:, 0] = self.bos
        return windows


def make_windows(
    tokenizer: Any, text: str, *, seq_len: int, tokens: int, source: str | Path | None = None
) -> Windows:
    """Tokenize ``text`` as one stream and cut its first ``tokens`` tokens into windows of
    ``seq_len``, as llama.cpp's perplexity tool does: where the tokenizer puts a BOS token
    before a text (:func:`leading_bos`), it takes each window's first position, so every
    window starts as the model saw its training sequences start. ``source`` (the
    ``--hemorrhage-data`` path; None: the bundled corpus) names the text in errors."""
    import torch

    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    ids = torch.tensor(ids, dtype=torch.long)
    if ids.numel() < seq_len:
        where = f"--hemorrhage-data={source}" if source else "the evaluation text"
        raise HemorrhageError(
            f"{where} has {ids.numel():,} tokens, fewer than one window of "
            f"--hemorrhage-seq-len={seq_len}; the longest window it makes is "
            f"--hemorrhage-seq-len={ids.numel()}; give more text (its documents are joined "
            "into one stream) or ask for a shorter window"
        )
    count = max(1, min(tokens, ids.numel()) // seq_len)
    windows = ids[: count * seq_len].reshape(count, seq_len)
    bos = leading_bos(tokenizer)
    if bos is not None:
        windows[:, 0] = bos
    return Windows(eval=windows, spare=ids[count * seq_len :], bos=bos)


def leading_bos(tokenizer: Any) -> int | None:
    """The beginning-of-sequence token ``tokenizer`` puts before a text, or None when it puts
    none (GPT-2 style tokenizers, the bundled model's)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True, verbose=False)["input_ids"]
    return bos if ids and ids[0] == bos else None
