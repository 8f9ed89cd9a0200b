#!/usr/bin/env python
"""Build the bundled chat set from the bundled held-out corpus.

Each conversation takes consecutive paragraphs of ``pytest_hemorrhage/assets/corpus/valid.txt``
(never seen in training): the user gives the first one and asks for the passage to go on, the
assistant replies with the next one, and in longer conversations the user asks for more and
the assistant gives the paragraph after. Every fourth conversation opens with a system
message; every eighth offers a tool, which the assistant calls for the second paragraph (the
tool message holds it) before it replies with the third. Paragraphs over ``MAX_CHARS``
characters are skipped so that most conversations fit a window of 128 tokens of the bundled
model; the few longer ones exercise left truncation. Deterministic: no randomness.

Usage::

    python scripts/make_chat_data.py [--out pytest_hemorrhage/assets/chat/conversations.jsonl]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "pytest_hemorrhage" / "assets" / "corpus" / "valid.txt"
OUT = ROOT / "pytest_hemorrhage" / "assets" / "chat" / "conversations.jsonl"
MAX_CHARS = 100
CONVERSATIONS = 200
SYSTEM = "Continue the documentation."
TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Find the documentation paragraph that follows a passage.",
        "parameters": {
            "type": "object",
            "properties": {"passage": {"type": "string"}},
            "required": ["passage"],
        },
    },
}


def conversations(paragraphs: list[str]) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    at = 0
    while len(out) < CONVERSATIONS:
        k = len(out)
        size = 2 + (k % 4 == 3)  # 2, 2, 2 or 3 paragraphs
        tools = k % 8 == 7
        size = max(size, 3) if tools else size
        if at + size > len(paragraphs):
            break
        part, at = paragraphs[at : at + size], at + size
        messages: list[dict[str, object]] = []
        if k % 4 == 0:
            messages.append({"role": "system", "content": SYSTEM})
        messages.append({"role": "user", "content": f"Continue: {part[0]}"})
        rest = part[1:]
        if tools:
            call = {"name": "lookup", "arguments": {"passage": part[0][:40]}}
            messages += [
                {"role": "assistant", "tool_calls": [{"type": "function", "function": call}]},
                {"role": "tool", "content": rest[0]},
            ]
            rest = rest[1:]
        for i, paragraph in enumerate(rest):
            if i:
                messages.append({"role": "user", "content": "Go on."})
            messages.append({"role": "assistant", "content": paragraph})
        out.append({"messages": messages, **({"tools": [TOOL]} if tools else {})})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    text = CORPUS.read_text(encoding="utf-8")
    paragraphs = [p.strip() for p in text.split("\n\n") if 0 < len(p.strip()) <= MAX_CHARS]
    lines = [json.dumps(c, ensure_ascii=True) for c in conversations(paragraphs)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{len(lines)} conversations -> {args.out}")


if __name__ == "__main__":
    main()
