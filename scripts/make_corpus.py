#!/usr/bin/env python
"""Build the bundled English corpus from Python standard-library docstrings.

The corpus is derived deterministically from the docstrings of the standard
library source that ships with the running interpreter (PSF-licensed), so it
can be redistributed with the package.  Source files are parsed with ``ast``
and never imported.

Pipeline:

1. walk ``sysconfig.get_paths()["stdlib"]`` in sorted path order, skipping
   ``test``/``tests``/``idlelib``/``lib2to3``/``site-packages``/``__pycache__``;
2. take module / class / function docstrings (``ast.get_docstring``) in
   source order;
3. keep ASCII-printable characters only, drop doctest paragraphs, collapse
   whitespace inside paragraphs (paragraph breaks are kept), drop very short
   docstrings and exact duplicates;
4. cap the text taken from each module so that no single module dominates;
   the cap is chosen by bisection so that the corpus is close to
   ``--target-bytes``;
5. split by module: modules are ordered by the SHA-256 of their relative path
   and taken into the validation split until it holds ``--valid-fraction`` of
   the text; everything else is training text.  Both files list their
   documents in sorted module order, separated by blank lines.

Usage::

    python scripts/make_corpus.py [--out pytest_hemorrhage/assets/corpus]
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import os
import re
import sys
import sysconfig
from pathlib import Path

SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__"}
DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
MIN_WORDS = 4

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "pytest_hemorrhage" / "assets" / "corpus"

NOTICE = """\
Corpus: docstrings of the Python {version} standard library
==========================================================

train.txt and valid.txt are derived mechanically from the docstrings (module,
class and function docstrings, extracted with the `ast` module) of the Python
standard library source code distributed with CPython {version}. They were
produced by scripts/make_corpus.py in this repository: text was restricted to
printable ASCII, whitespace was normalised, doctest examples and very short or
duplicate docstrings were dropped, and the text taken from each module was
capped. Split: by module (SHA-256 of the module path), {n_train} modules in
train.txt ({train_bytes} bytes), {n_valid} modules in valid.txt ({valid_bytes} bytes).

The Python standard library is Copyright (c) 2001-present Python Software
Foundation; All Rights Reserved, and is distributed under the Python Software
Foundation License Version 2 (PSF-2.0), see
https://docs.python.org/3/license.html. The derived text is redistributed
under the same license; no endorsement by the PSF is implied.
"""


def iter_source_files(root: Path) -> list[Path]:
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in filenames:
            if name.endswith(".py"):
                files.append(Path(dirpath) / name)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _ascii_printable(text: str) -> str:
    text = text.replace("\t", " ")
    return "".join(c for c in text if c == "\n" or 32 <= ord(c) < 127)


def normalise(doc: str) -> str:
    """Return the cleaned docstring: paragraphs joined by one blank line."""
    doc = _ascii_printable(doc)
    paragraphs = []
    for para in re.split(r"\n\s*\n", doc):
        lines = [ln.strip() for ln in para.splitlines() if ln.strip()]
        if not lines:
            continue
        if any(ln.startswith((">>>", "...")) for ln in lines):
            continue  # doctest example: code, not prose
        text = re.sub(r"\s+", " ", " ".join(lines)).strip()
        if text:
            paragraphs.append(text)
    return "\n\n".join(paragraphs)


def collect(root: Path) -> list[tuple[str, list[str]]]:
    """Return [(module relpath, [cleaned docstrings])] in sorted path order."""
    seen: set[str] = set()
    modules = []
    for path in iter_source_files(root):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):
            continue
        docs = []
        # ast.walk is breadth-first; sort by position for source order.
        nodes = [n for n in ast.walk(tree) if isinstance(n, DOC_NODES)]
        nodes.sort(key=lambda n: getattr(n, "lineno", 0))
        for node in nodes:
            raw = ast.get_docstring(node, clean=True)
            if not raw:
                continue
            doc = normalise(raw)
            if len(doc.split()) < MIN_WORDS or doc in seen:
                continue
            seen.add(doc)
            docs.append(doc)
        if docs:
            modules.append((path.relative_to(root).as_posix(), docs))
    return modules


def cap_module(docs: list[str], cap: int) -> str:
    """Whole docstrings in source order while they fit in ``cap`` chars (at least one)."""
    out: list[str] = []
    size = 0
    for doc in docs:
        if out and size + len(doc) + 2 > cap:
            break
        out.append(doc)
        size += len(doc) + 2
    return "\n\n".join(out)


def build(modules, target_bytes: int) -> list[tuple[str, str]]:
    def total(cap: int) -> int:
        return sum(len(cap_module(d, cap)) + 2 for _, d in modules)

    lo, hi = 200, max(sum(len(x) + 2 for x in d) for _, d in modules) + 1
    if total(hi) <= target_bytes:
        cap = hi
    else:
        while hi - lo > 1:  # largest cap with total(cap) <= target
            mid = (lo + hi) // 2
            if total(mid) <= target_bytes:
                lo = mid
            else:
                hi = mid
        cap = lo
    print(f"per-module cap: {cap} chars", file=sys.stderr)
    return [(rel, cap_module(docs, cap)) for rel, docs in modules]


def split(docs: list[tuple[str, str]], valid_fraction: float):
    total = sum(len(t) for _, t in docs)
    order = sorted(docs, key=lambda rt: hashlib.sha256(rt[0].encode()).hexdigest())
    valid_names: set[str] = set()
    size = 0
    for rel, text in order:
        if size >= valid_fraction * total:
            break
        valid_names.add(rel)
        size += len(text)
    train = [(r, t) for r, t in docs if r not in valid_names]
    valid = [(r, t) for r, t in docs if r in valid_names]
    return train, valid


def write(path: Path, docs: list[tuple[str, str]]) -> int:
    text = "\n\n".join(t for _, t in docs) + "\n"
    path.write_text(text, encoding="ascii", newline="\n")
    return len(text.encode("ascii"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    ap.add_argument("--target-bytes", type=int, default=650_000)
    ap.add_argument("--valid-fraction", type=float, default=0.135)
    args = ap.parse_args(argv)

    modules = collect(args.stdlib)
    docs = build(modules, args.target_bytes)
    train, valid = split(docs, args.valid_fraction)
    args.out.mkdir(parents=True, exist_ok=True)
    train_bytes = write(args.out / "train.txt", train)
    valid_bytes = write(args.out / "valid.txt", valid)
    version = ".".join(map(str, sys.version_info[:3]))
    (args.out / "NOTICE").write_text(
        NOTICE.format(
            version=version,
            n_train=len(train),
            n_valid=len(valid),
            train_bytes=train_bytes,
            valid_bytes=valid_bytes,
        ),
        encoding="ascii",
    )
    print(
        f"{len(modules)} modules; train.txt {train_bytes} bytes ({len(train)} modules), "
        f"valid.txt {valid_bytes} bytes ({len(valid)} modules) -> {args.out}"
    )


if __name__ == "__main__":
    main()
