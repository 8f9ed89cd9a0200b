"""``--hemorrhage-save-reference`` / ``--hemorrhage-reference``: the baseline's reference in one
file, so that candidates are gated without the baseline model.

The file holds everything a candidate's measurement needs from the baseline: the evaluation
token ids, every field of :class:`~pytest_hemorrhage.reference.Reference` (whatever its storage
form: the file follows ``reference.FORMAT`` and refuses any other), the model's output
vocabulary size and the tokenizer's vocabulary (to check a candidate's), the baseline's
fingerprint, the settings that determine the reference (seq-len, tokens, a hash of the
evaluation text), and where it was built (:mod:`pytest_hemorrhage.environment`; files written
before it was recorded load with none). It is a ``torch.save`` archive read with
``weights_only=True``: plain tensors, numbers, strings, lists and dicts, never code.

Size: the reference's own bytes (see ``reference``'s module docstring: exact distributions up
to ``EXACT_VOCAB`` tokens of vocabulary, top-K above it), plus 4 bytes of token id per scored
token, plus the vocabulary's text once (zlib-compressed JSON: ~150 KB for 32k tokens).
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import reference as reference_module
from .data import Windows
from .errors import HemorrhageError, first_line
from .loading import CAUSAL
from .reference import Reference

if TYPE_CHECKING:
    import torch

    from .settings import Settings

__all__ = [
    "MAGIC",
    "PORTABLE_FORMAT",
    "AbsentBaseline",
    "PortableReference",
    "text_hash",
    "vocab_list",
]

MAGIC = "pytest-hemorrhage reference"
PORTABLE_FORMAT = 1  # bump when the file's own keys change (the Reference has its FORMAT)
_SAVE = "save it again with --hemorrhage-save-reference=PATH and the baseline model"


def text_hash(text: str) -> str:
    """Content hash of the evaluation text (what ``--hemorrhage-data`` gave)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=12).hexdigest()


def vocab_list(tokenizer: Any) -> list[str]:
    """The tokenizer's vocabulary as a list indexed by token id (gaps as empty strings)."""
    vocab = tokenizer.get_vocab()
    out = [""] * (max(vocab.values(), default=-1) + 1)
    for token, index in vocab.items():
        out[index] = token
    return out


@dataclass
class AbsentBaseline:
    """Stands in for the LoadedModel when only a reference file is given: no model, no
    tokenizer; the baseline's name and fingerprint come from the file."""

    spec: str
    fingerprint: str
    device: Any
    model: Any = None
    tokenizer: Any = None
    kind: str = CAUSAL  # reference files hold next-token distributions only
    pooling: Any = None


@dataclass
class PortableReference:
    """A baseline's reference, portable: see the module docstring."""

    reference: Reference
    windows: torch.Tensor  # (windows, seq_len) int64: the evaluation token ids
    vocab: int  # the model's output vocabulary (logits width)
    tokens: list[str]  # the tokenizer's vocabulary by id
    baseline: dict[str, Any]  # spec, fingerprint, class, parameters, dtype, device
    settings: dict[str, Any]  # seq_len, tokens, data, data_hash, topk
    path: Path | None = field(default=None, compare=False)
    # where it was built (environment.measured_in); None: a file from before it was recorded
    environment: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return str(self.path) if self.path else "the reference file"

    def eval_windows(self) -> Windows:
        """The file's evaluation windows; no spare tokens (nothing calibrates without the
        baseline model)."""
        import torch

        return Windows(eval=self.windows, spare=torch.zeros(0, dtype=torch.long))

    def save(self, path: Path) -> int:
        """Write the file atomically; returns its size in bytes."""
        import torch

        ids = self.windows
        if self.vocab < 2**31:
            ids = ids.to(torch.int32)  # half the bytes; widened back on load
        state = {
            "magic": MAGIC,
            "portable_format": PORTABLE_FORMAT,
            "reference_format": reference_module.FORMAT,
            "reference": {f.name: getattr(self.reference, f.name) for f in fields(self.reference)},
            "windows": ids.contiguous(),
            "vocab": self.vocab,
            # the vocabulary once, as zlib-compressed JSON (a list of strings pickles ~4x larger)
            "tokens": torch.frombuffer(
                bytearray(zlib.compress(json.dumps(self.tokens).encode("utf-8"), 9)),
                dtype=torch.uint8,
            ),
            "baseline": self.baseline,
            "settings": self.settings,
            # optional, so that a file without it (an earlier one) keeps the same format
            **({"environment": self.environment} if self.environment is not None else {}),
        }
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, tmp)
            tmp.replace(path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise HemorrhageError(
                f"--hemorrhage-save-reference={path}: cannot write it ({first_line(exc)}); "
                "give a writable path"
            ) from None
        return path.stat().st_size

    @classmethod
    def load(cls, path: Path) -> PortableReference:
        """Read and validate a file; every problem is one line naming the file and the fix."""
        import torch

        path = Path(path)
        where = f"--hemorrhage-reference={path}"
        if not path.is_file():
            raise HemorrhageError(
                f"{where}: no such file; give a file written by --hemorrhage-save-reference"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # a truncated zip, a foreign file: never a torch traceback
            raise HemorrhageError(
                f"{where}: unreadable, truncated or not a reference file ({first_line(exc)}); "
                f"{_SAVE}"
            ) from None
        if not isinstance(state, dict) or state.get("magic") != MAGIC:
            raise HemorrhageError(
                f"{where}: not a pytest-hemorrhage reference file; give one written by "
                "--hemorrhage-save-reference"
            )
        found = (state.get("portable_format"), state.get("reference_format"))
        wanted = (PORTABLE_FORMAT, reference_module.FORMAT)
        if found != wanted:
            raise HemorrhageError(
                f"{where}: written in another format (file {found[0]}.{found[1]}, this "
                f"pytest-hemorrhage reads {wanted[0]}.{wanted[1]}); {_SAVE}"
            )
        try:
            names = {f.name for f in fields(Reference)}
            stored = state["reference"]
            if set(stored) != names:
                raise KeyError(", ".join(sorted(names ^ set(stored))))
            reference = Reference(**stored)
            windows = state["windows"].to(torch.long)
            portable = cls(
                reference,
                windows,
                int(state["vocab"]),
                json.loads(zlib.decompress(state["tokens"].numpy().tobytes()).decode("utf-8")),
                dict(state["baseline"]),
                dict(state["settings"]),
                path,
                dict(state["environment"]) if state.get("environment") is not None else None,
            )
            scored = windows.shape[0] * (windows.shape[1] - 1)
            if len(reference.targets) != scored:
                raise ValueError(f"{len(reference.targets)} scored tokens for {scored}")
        except Exception as exc:
            raise HemorrhageError(
                f"{where}: damaged ({type(exc).__name__}: {first_line(exc)}); {_SAVE}"
            ) from None
        return portable

    def check_settings(self, settings: Settings, text: str) -> None:
        """Refuse the file if the settings in force would evaluate other tokens."""
        mine = self.settings
        now = {"seq_len": settings.seq_len, "tokens": settings.tokens, "data_hash": text_hash(text)}
        for key, option in (("seq_len", "seq-len"), ("tokens", "tokens")):
            if mine.get(key) != now[key]:
                raise HemorrhageError(
                    f"--hemorrhage-reference={self.name}: made with --hemorrhage-{option}="
                    f"{mine.get(key)}, this run has {now[key]}; pass --hemorrhage-{option}="
                    f"{mine.get(key)} or save a reference with these settings"
                )
        if mine.get("data_hash") != now["data_hash"]:
            raise HemorrhageError(
                f"--hemorrhage-reference={self.name}: made with other evaluation data "
                f"({mine.get('data')}), this run reads {settings.data or 'the bundled corpus'}; "
                "pass the same --hemorrhage-data or save a reference from this data"
            )

    def check_baseline(self, spec: str, fingerprint: str) -> None:
        """Refuse a baseline model that is not the one the file was made from."""
        if fingerprint != self.baseline.get("fingerprint"):
            raise HemorrhageError(
                f"--hemorrhage-reference={self.name} was made from {self.baseline.get('spec')} "
                f"(fingerprint {self.baseline.get('fingerprint')}), but --hemorrhage-model="
                f"{spec} has fingerprint {fingerprint}; drop one of the two options, or save the "
                "reference again from this model"
            )


def check_vocabulary(
    baseline: str,
    tokens: list[str],
    vocab: int,
    windows: torch.Tensor,
    text: str,
    candidate: str,
    tokenizer: Any,
    candidate_vocab: int,
) -> None:
    """Refuse a candidate whose vocabulary or tokenizer is not the baseline's: a different
    logits width, a token with another id, or the evaluation text encoding to other ids.

    Args:
        baseline, candidate: the two models' names, for the message.
        tokens: the baseline tokenizer's vocabulary by id (``vocab_list``).
        vocab: the baseline's logits width.
        windows: the evaluation windows (the baseline tokenizer's ids for ``text``).
        text: the evaluation text.
        tokenizer: the candidate's tokenizer (None: a model object given without one, which
            is taken to share the baseline's).
        candidate_vocab: the candidate's logits width.
    """
    import torch

    def refuse(what: str) -> HemorrhageError:
        return HemorrhageError(
            f"candidate {candidate} does not share the vocabulary of baseline {baseline}: "
            f"{what}; gate a model made from this baseline with its tokenizer"
        )

    if candidate_vocab != vocab:
        raise refuse(f"{candidate_vocab} logits per token, the baseline has {vocab}")
    if tokenizer is None:
        return
    theirs = vocab_list(tokenizer)
    for index in range(max(len(tokens), len(theirs))):
        mine = tokens[index] if index < len(tokens) else None
        other = theirs[index] if index < len(theirs) else None
        if mine != other:
            raise refuse(f"first differing token id {index}: {mine!r} vs {other!r}")
    flat = windows.reshape(-1)
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"][: flat.numel()]
    ids = torch.tensor(ids, dtype=torch.long)
    if len(ids) < flat.numel() or not torch.equal(ids, flat):
        n = min(len(ids), flat.numel())
        diff = (ids[:n] != flat[:n]).nonzero()
        at = int(diff[0]) if len(diff) else n
        mine = tokens[int(flat[at])] if at < flat.numel() else None
        other = theirs[int(ids[at])] if at < len(ids) else None
        raise refuse(
            f"the evaluation text encodes differently from token {at} on: {mine!r} vs {other!r}"
        )
