"""Chat-formatted evaluation data: conversations -> token windows, each token with its role.

A ``.jsonl`` file whose lines hold OpenAI-style ``messages`` is chat data
(``--hemorrhage-data=conversations.jsonl``): each message has a ``role`` (system, user,
assistant or tool) and a string ``content`` (an assistant message may carry ``tool_calls``
instead); a line may add ``tools``, the functions offered. Each conversation is rendered with
the baseline tokenizer's chat template (``tokenizer.apply_chat_template``), or with the Jinja
template of ``--hemorrhage-chat-template``, and the measures score the tokens of the roles
that ``--hemorrhage-chat-roles`` names (the assistant's, by default), the rest of the
conversation being their context.

Which tokens a reply holds: what the model generates after the template's generation prompt.
Each message's span of the rendered text comes from renderings of the conversation's
prefixes: ``messages[:i]`` ends where message ``i`` begins (its header included); for an
assistant message, ``messages[:i]`` with the generation prompt ends where its reply begins
(the header before it is ``template``). So a reply is its content and its end-of-turn
marker. The text is tokenized whole, as ``apply_chat_template(tokenize=True)`` does it; a span
starts at the first token that the tokenization of the text before it does not hold, so a
token across a boundary belongs to the later span (of a reply: a token the model generates).
A template that renders a prefix of a conversation to anything but a prefix of its whole
rendering (one that drops earlier turns' reasoning, say) is refused, naming the line.

Packing (:func:`chat_windows`): whole conversations in file order, as many as fit a window;
the rest of the window is padding, at its end, where a causal model's earlier positions never
see it, and never scored. A conversation longer than a window keeps its last ``seq_len``
tokens: the message that lost its beginning becomes context (role ``cut``), and so does the
reply that answered it (its prompt is gone); the messages after them keep their roles.
``Windows.details`` says how many conversations were packed and cut.

Markers (:func:`markers`): the tokens that end and route a turn, where
``special_top1_flip`` compares the two models' top-1: the tokenizer's special and added tokens
(end-of-turn, tool-call markers and the like) and, for chat data, the first token after each
reply's content, the template's end-of-turn (found in the renderings).

The bundled model's template (``assets/tiny-llama/chat_template.jinja``, loaded with its
tokenizer): the model was trained on plain text, so its template is plain text in tokens its
vocabulary has, and nothing was retrained: ``<|endoftext|>`` (its only special token) opens
a conversation, each message is ``Role: content`` followed by a blank line (two newline
tokens), and the generation prompt is ``Assistant:``. A reply's end-of-turn is thus the
newline token, which the model learned as the end of a paragraph.
``assets/chat/conversations.jsonl`` (``scripts/make_chat_data.py``) is built from the bundled
held-out corpus: the user gives a paragraph, the assistant continues with the next one.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .data import Windows, jsonl_records
from .errors import HemorrhageError, first_line

if TYPE_CHECKING:
    import torch

__all__ = [
    "BUNDLED_CHAT",
    "DEFAULT_ROLES",
    "MESSAGE_ROLES",
    "ROLES",
    "Conversation",
    "Rendered",
    "chat_windows",
    "is_chat",
    "markers",
    "parse_roles",
    "read_conversations",
    "read_template",
    "render",
    "reply_prompts",
    "role_counts",
    "scored_mask",
    "template_mismatch",
]

BUNDLED_CHAT = Path(__file__).parent / "assets" / "chat" / "conversations.jsonl"
MESSAGE_ROLES = ("system", "user", "assistant", "tool")
# A position's role is its index here: padding is never scored, nor is a cut message.
ROLES = ("padding", "cut", "template", *MESSAGE_ROLES)
DEFAULT_ROLES = ("assistant",)
_CODE = {name: code for code, name in enumerate(ROLES)}
_MESSAGES = (
    'each line needs a "messages" list of {"role": ..., "content": ...} objects '
    '(OpenAI style), e.g. {"messages": [{"role": "user", "content": "Hi"}, '
    '{"role": "assistant", "content": "Hello"}]}'
)


@dataclass(frozen=True)
class Conversation:
    """One line of a chat file: its messages, the tools offered, and where it came from."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    path: Path
    line: int

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass(frozen=True)
class Rendered:
    """A rendered conversation: its token ids, each token's role (a code of ``ROLES``) and
    the ids that followed a reply's content (the template's end-of-turn)."""

    ids: list[int]
    roles: list[int]
    end_of_turn: frozenset[int]


def is_chat(path: str | Path | None) -> bool:
    """Whether ``path`` is a ``.jsonl`` file whose first line holds ``messages``."""
    if path is None or Path(path).suffix != ".jsonl" or not Path(path).is_file():
        return False
    try:
        for _, record in jsonl_records(Path(path)):
            return isinstance(record, dict) and "messages" in record
    except HemorrhageError:
        return False  # the raw-text reader says what is wrong with it
    return False


def parse_roles(names: tuple[str, ...]) -> tuple[str, ...]:
    """``--hemorrhage-chat-roles``: the role names checked, ``all`` for every message role
    and the template's own tokens."""
    if names == ("all",):
        return ("template", *MESSAGE_ROLES)
    wrong = [n for n in names if n not in ("template", *MESSAGE_ROLES)]
    if wrong or not names:
        raise HemorrhageError(
            f"--hemorrhage-chat-roles={','.join(names)}: "
            + (f"unknown role {wrong[0]!r}" if wrong else "no role")
            + f"; name some of {', '.join(MESSAGE_ROLES)}, template, or all"
        )
    return names


def read_conversations(path: Path) -> list[Conversation]:
    """The conversations of a chat file, checked: one line naming the file, the line and the
    fix for a line that is not JSON, a message without role or content, an unknown role, or
    a file without any assistant turn."""
    conversations = []
    for number, record in jsonl_records(path):
        where = f"{path}:{number}"
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not messages:
            raise HemorrhageError(f"{where}: {_MESSAGES}")
        for index, message in enumerate(messages, 1):
            _check_message(message, f"{where}: message {index}")
        tools = record.get("tools")
        if tools is not None and not (
            isinstance(tools, list) and all(isinstance(t, dict) for t in tools)
        ):
            raise HemorrhageError(
                f'{where}: "tools" must be a list of function objects '
                '({"type": "function", "function": {"name": ...}}), or left out'
            )
        conversations.append(Conversation(messages, tools, path, number))
    if not conversations:
        raise HemorrhageError(f"{path}: no conversations in it; {_MESSAGES}")
    if not any(m["role"] == "assistant" for c in conversations for m in c.messages):
        raise HemorrhageError(
            f"{path}:{conversations[-1].line}: no assistant turn in any of its "
            f"{len(conversations)} conversations, so there is no reply to score; add the "
            'assistant\'s replies ({"role": "assistant", "content": ...}) or give raw text'
        )
    return conversations


def _check_message(message: Any, where: str) -> None:
    if not isinstance(message, dict):
        raise HemorrhageError(f"{where} is not an object; {_MESSAGES}")
    role = message.get("role")
    if role is None:
        raise HemorrhageError(f'{where} has no "role"; give it one of {", ".join(MESSAGE_ROLES)}')
    if role not in MESSAGE_ROLES:
        raise HemorrhageError(
            f"{where} has the unknown role {role!r}; use one of {', '.join(MESSAGE_ROLES)}"
        )
    content = message.get("content")
    if content is None and not (role == "assistant" and message.get("tool_calls")):
        raise HemorrhageError(
            f'{where} ({role}) has no "content"; give it a string content (an assistant '
            'message may carry "tool_calls" instead)'
        )
    if content is not None and not isinstance(content, str):
        raise HemorrhageError(
            f'{where} ({role}): "content" must be a string, not {type(content).__name__}; '
            "join the parts of a multi-part content into one string"
        )


def render(tokenizer: Any, conversation: Conversation, template: str | None = None) -> Rendered:
    """``conversation``'s token ids with each token's role (see the module docstring),
    rendered by ``template`` (Jinja source), else by the tokenizer's own chat template."""
    messages, where = conversation.messages, conversation.where
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise HemorrhageError(
            f"{where}: the baseline's tokenizer has no chat template to render this "
            "conversation; pass --hemorrhage-chat-template=PATH (a Jinja template file), or "
            "give raw text (a 'text' field) instead"
        )

    @functools.cache
    def text(count: int, prompt: bool = False) -> str:
        try:
            return tokenizer.apply_chat_template(
                messages[:count],
                tools=conversation.tools,
                chat_template=template,
                add_generation_prompt=prompt,
                tokenize=False,
            )
        except Exception as exc:  # Jinja's and the template's own errors (raise_exception)
            raise HemorrhageError(
                f"{where}: the chat template cannot render this conversation "
                f"({type(exc).__name__}: {first_line(exc)}); fix the conversation or pass "
                "--hemorrhage-chat-template=PATH"
            ) from None

    whole = text(len(messages))
    # where each span starts in the text, and its role; the first starts at 0
    starts: list[tuple[int, int]] = []
    replies: list[tuple[int, int, str]] = []  # (reply start, next start, content)
    for i, message in enumerate(messages):
        begin = _prefix_length(text(i), whole, where) if i else 0
        if message["role"] == "assistant":
            reply = _prefix_length(text(i, prompt=True), whole, where) if i else 0
            starts += [(begin, _CODE["template"]), (reply, _CODE["assistant"])]
            end = len(whole) if i + 1 == len(messages) else len(text(i + 1))
            if isinstance(message.get("content"), str):
                replies.append((reply, end, message["content"]))
        else:
            starts.append((begin, _CODE[message["role"]]))
    tokens = _Tokens(tokenizer, whole)
    roles = [0] * len(tokens.ids)
    for (start, code), (stop, _) in zip(starts, [*starts[1:], (len(whole), 0)], strict=True):
        for k in range(tokens.at(start), tokens.at(stop)):
            roles[k] = code
    end_of_turn = set()
    for start, stop, content in replies:
        found = whole.find(content.strip(), start, stop) if content.strip() else -1
        if found >= 0:
            k = tokens.at(found + len(content.strip()))
            if k < len(tokens.ids) and roles[k] == _CODE["assistant"]:
                end_of_turn.add(tokens.ids[k])
    return Rendered(tokens.ids, roles, frozenset(end_of_turn))


def _prefix_length(prefix: str, whole: str, where: str) -> int:
    if not whole.startswith(prefix):
        raise HemorrhageError(
            f"{where}: the chat template renders the conversation's first messages to text "
            "that does not begin its whole rendering, so a reply's tokens cannot be told "
            "apart; pass --hemorrhage-chat-template=PATH with a template that renders each "
            "turn the same whatever follows it"
        )
    return len(prefix)


class _Tokens:
    """The token ids of ``text``, and the token index where a character position's span
    begins: the first token that the tokenization of the text before it does not hold."""

    def __init__(self, tokenizer: Any, text: str) -> None:
        self.tokenizer, self.text = tokenizer, text
        self.ids = self._encode(text)
        self._at: dict[int, int] = {}  # a span's stop is the next one's start: encode once

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def at(self, position: int) -> int:
        if position <= 0:
            return 0
        if position >= len(self.text):
            return len(self.ids)
        if position not in self._at:
            before = self._encode(self.text[:position])
            common = 0
            for a, b in zip(before, self.ids, strict=False):
                if a != b:
                    break
                common += 1
            self._at[position] = common
        return self._at[position]


def chat_windows(
    tokenizer: Any, path: Path, *, seq_len: int, tokens: int, template: str | None = None
) -> Windows:
    """The evaluation windows of a chat file: its conversations rendered, packed whole in
    file order (see the module docstring), with every position's role; the conversations
    after the evaluation windows' are the spare (calibration) tokens."""
    import torch

    conversations = read_conversations(path)
    pad = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    count = max(1, tokens // seq_len)
    windows: list[tuple[list[int], list[int]]] = []
    ids: list[int] = []
    roles: list[int] = []
    spare: list[int] = []
    end_of_turn: set[int] = set()
    packed = cut = dropped = 0
    for conversation in conversations:
        rendered = render(tokenizer, conversation, template)
        end_of_turn |= rendered.end_of_turn
        if len(windows) < count and len(ids) + min(len(rendered.ids), seq_len) > seq_len:
            windows.append(_padded(ids, roles, seq_len, pad))
            ids, roles = [], []
        if len(windows) == count:  # the rest calibrates
            spare += rendered.ids
            continue
        more, more_roles = rendered.ids, rendered.roles
        if len(more) > seq_len:  # keep the end (see the module docstring)
            cut += 1
            dropped += len(more) - seq_len
            first = more_roles[len(more) - seq_len - 1]
            more, more_roles = more[-seq_len:], more_roles[-seq_len:]
            # context: the message cut in two, and the reply that answered it
            reply = (_CODE["template"], _CODE["assistant"])
            k = 0
            while k < seq_len and (more_roles[k] == first or more_roles[k] in reply):
                more_roles[k] = _CODE["cut"]
                k += 1
        ids, roles = ids + more, roles + more_roles
        packed += 1
    if ids and len(windows) < count:
        windows.append(_padded(ids, roles, seq_len, pad))
    return Windows(
        eval=torch.tensor([i for i, _ in windows], dtype=torch.long),
        spare=torch.tensor(spare, dtype=torch.long),
        roles=torch.tensor([r for _, r in windows], dtype=torch.int8),
        markers=tuple(sorted(end_of_turn)),
        details={
            "source": str(path),
            "conversations": packed,
            "truncated": cut,
            "truncated_tokens": dropped,
            "template": "--hemorrhage-chat-template" if template is not None else "tokenizer",
        },
    )


def read_template(path: Path | None) -> str | None:
    """The Jinja source of ``--hemorrhage-chat-template`` (None: the tokenizer's own)."""
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise HemorrhageError(
            f"--hemorrhage-chat-template={path}: cannot read it ({first_line(exc)}); give a "
            "Jinja template file"
        ) from None


def template_mismatch(
    baseline: Any,
    candidate: Any,
    path: Path,
    count: int,
    template: str | None = None,
    name: str = "the candidate",
) -> str | None:
    """Whether ``candidate`` (a tokenizer with the baseline's vocabulary) renders the first
    ``count`` conversations of ``path`` with its own chat template to the token ids the
    baseline renders them to (with ``template``, else its tokenizer's): None when it does, or
    has no template of its own to compare; else one line naming the conversation's line, the
    first differing token and both renderings around it."""
    if not getattr(candidate, "chat_template", None):
        return None
    for conversation in read_conversations(path)[:count]:
        mine = render(baseline, conversation, template).ids
        try:
            theirs = render(candidate, conversation).ids
        except HemorrhageError as exc:
            return f"{name} (its own chat template): {exc}"
        if mine == theirs:
            continue
        at = next((k for k, (a, b) in enumerate(zip(mine, theirs, strict=False)) if a != b), None)
        at = min(len(mine), len(theirs)) if at is None else at
        first = repr(baseline.convert_ids_to_tokens(mine[at])) if at < len(mine) else "the end"
        return (
            f"{name}'s chat template renders {conversation.where} to other tokens than the "
            f"baseline's, from token {at} ({first}): baseline {_around(baseline, mine, at)} vs "
            f"{name} {_around(baseline, theirs, at)}; ship the baseline's chat template with it"
        )
    return None


def _around(tokenizer: Any, ids: list[int], at: int) -> str:
    """The tokens of ``ids`` from three before ``at`` to two after it, as a reader sees them."""
    shown = tokenizer.convert_ids_to_tokens(ids[max(0, at - 3) : at + 3])
    return "[" + " ".join(repr(t) for t in shown) + "]"


def _padded(
    ids: list[int], roles: list[int], seq_len: int, pad: int
) -> tuple[list[int], list[int]]:
    room = seq_len - len(ids)
    return ids + [pad] * room, roles + [_CODE["padding"]] * room


def scored_mask(windows: Windows, names: tuple[str, ...]) -> torch.Tensor:
    """Which targets of ``windows`` (positions 1:, as their logits score them) belong to the
    roles ``names``: (windows, seq_len - 1) bool. Refused when none does."""
    import torch

    assert windows.roles is not None
    codes = torch.tensor([_CODE[n] for n in names], dtype=windows.roles.dtype)
    mask = torch.isin(windows.roles[:, 1:], codes)
    if not bool(mask.any()):
        raise HemorrhageError(
            f"{windows.details.get('source')}: no token of the roles scored "
            f"({', '.join(names)}) in the {len(mask)} evaluation windows of "
            f"{mask.shape[1] + 1} tokens; give conversations whose replies fit a window, a "
            "longer --hemorrhage-seq-len, or other --hemorrhage-chat-roles"
        )
    return mask


def reply_prompts(windows: Windows, count: int, length: int) -> torch.Tensor:
    """Up to ``count`` prompts of ``length`` tokens that end where a reply begins (after the
    template's generation prompt), evenly spaced over the replies of ``windows``: those with
    ``length`` tokens before them in their window; (prompts, length)."""
    import torch

    assert windows.roles is not None
    reply = windows.roles == _CODE["assistant"]
    begins = reply[:, 1:] & ~reply[:, :-1]  # position p + 1 begins a reply
    rows, at = begins.nonzero(as_tuple=True)
    keep = at + 1 >= length
    rows, at = rows[keep], at[keep] + 1
    if not len(rows):
        raise HemorrhageError(
            f"{windows.details.get('source')}: no reply has {length} tokens before it in its "
            "window, so no generation prompt ends where a reply begins; lower "
            "--hemorrhage-gen-prompt-tokens or raise --hemorrhage-seq-len"
        )
    pick = torch.linspace(0, len(rows) - 1, min(count, len(rows))).round().long()
    return torch.stack([windows.eval[rows[i], at[i] - length : at[i]] for i in pick.tolist()])


def role_counts(roles: torch.Tensor) -> dict[str, int]:
    """How many of ``roles`` (codes) each role has, by name, in ``ROLES`` order; padding
    left out."""
    counts = Counter(roles.reshape(-1).tolist())
    return {name: counts[code] for code, name in enumerate(ROLES) if counts[code] and code}


def markers(tokenizer: Any, windows: Windows) -> list[int]:
    """The ids where ``special_top1_flip`` compares top-1s: the tokenizer's special and added
    tokens and the end-of-turn tokens found rendering chat data (``windows.markers``)."""
    ids = set(windows.markers)
    if tokenizer is not None:
        ids |= set(getattr(tokenizer, "all_special_ids", ()) or ())
        ids |= set((getattr(tokenizer, "added_tokens_decoder", None) or {}).keys())
    return sorted(int(i) for i in ids)
