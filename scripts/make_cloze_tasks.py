#!/usr/bin/env python
"""Build the shipped cloze task from the bundled held-out corpus, deterministically.

Each item takes a sentence of ``pytest_hemorrhage/assets/corpus/valid.txt`` (text the bundled
model never trained on), keeps the previous sentence of its paragraph and the sentence's first
words as the context, and asks which of four continuations comes next: the true next
``SPAN`` words, or three spans of ``SPAN`` words taken from other sentences of the held-out
text. Distractors are drawn among the ``NEAREST`` spans closest to the true one in word
frequency (sum of log unigram frequencies over the held-out text) with a byte length within
``LENGTH_SLACK`` of it, so that neither length nor rarity gives the answer away: only how well a
span continues the context does. Chance is 25%.

Usage::

    python scripts/make_cloze_tasks.py [--items N] [--out PATH]

Running it twice gives byte-identical output.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import random
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CORPUS = REPO_ROOT / "pytest_hemorrhage" / "assets" / "corpus" / "valid.txt"
DEFAULT_OUT = REPO_ROOT / "pytest_hemorrhage" / "assets" / "tasks" / "cloze.jsonl"

SEED = 20250331
ITEMS = 200
SPAN = 3  # words per continuation
CHOICES = 4
MIN_PREFIX = 4  # words of the sentence kept in the context, at least
MAX_CONTEXT = 150  # characters of context, cut at a word boundary from the left
LENGTH_SLACK = 0.35  # distractor byte length within +-35% of the true continuation's
NEAREST = 20  # distractors drawn among this many spans closest in word frequency


def sentences(text: str) -> list[tuple[str, str]]:
    """(previous sentence of the same paragraph or "", sentence) for every sentence."""
    pairs = []
    for paragraph in text.split("\n\n"):
        previous = ""
        for sentence in re.split(r"(?<=[.!?])\s+", paragraph.strip()):
            if sentence:
                pairs.append((previous, sentence))
                previous = sentence
    return pairs


def spans(words: list[str]) -> list[str]:
    return [" " + " ".join(words[i : i + SPAN]) for i in range(len(words) - SPAN + 1)]


def make_items(text: str, count: int, seed: int) -> list[dict[str, object]]:
    rng = random.Random(seed)
    pairs = sentences(text)
    counts = collections.Counter(text.split())
    total = sum(counts.values()) + len(counts)

    def rarity(span: str) -> float:
        return sum(math.log((counts[w] + 1) / total) for w in span.split())

    pool = sorted({s for _, sentence in pairs for s in spans(sentence.split())})
    pool_rarity = {s: rarity(s) for s in pool}
    usable = [(p, s) for p, s in pairs if len(s.split()) >= MIN_PREFIX + SPAN]
    chosen = sorted(rng.sample(range(len(usable)), min(count, len(usable))))
    items = []
    for index in chosen:
        previous, sentence = usable[index]
        words = sentence.split()
        cut = rng.randint(MIN_PREFIX, len(words) - SPAN)
        answer = " " + " ".join(words[cut : cut + SPAN])
        context = " ".join(filter(None, [previous, " ".join(words[:cut])]))
        if len(context) > MAX_CONTEXT:
            context = context[-MAX_CONTEXT:].partition(" ")[2]
        low, high = len(answer) * (1 - LENGTH_SLACK), len(answer) * (1 + LENGTH_SLACK)
        own = set(spans(words))
        target = rarity(answer)
        near = sorted(
            (s for s in pool if low <= len(s) <= high and s not in own),
            key=lambda s: (abs(pool_rarity[s] - target), s),
        )[:NEAREST]
        choices = rng.sample(near, CHOICES - 1)
        position = rng.randrange(CHOICES)
        choices.insert(position, answer)
        items.append({"context": context, "choices": choices, "answer": position})
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=ITEMS, help=f"Default: {ITEMS}.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"Default: {DEFAULT_OUT}.")
    args = parser.parse_args()
    items = make_items(CORPUS.read_text(encoding="utf-8"), args.items, SEED)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    print(f"wrote {len(items)} items to {args.out}")


if __name__ == "__main__":
    main()
