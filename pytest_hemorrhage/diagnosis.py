"""What blame found, as data (``Diagnosis``, ``BlockDrift``), and its one wording.

:mod:`pytest_hemorrhage.blame` computes a diagnosis; a failed check's lines
(:meth:`Diagnosis.lines`) and the HTML page's blame card (:meth:`Diagnosis.finding`, read back
from the JSON report with :meth:`Diagnosis.from_dict`) say it in the same words. Nothing here
imports torch, so a renderer can word a stored diagnosis without it.

A figure may be None (not measured, or not finite after the JSON round trip): it reads ``-``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BEGIN_LEVEL", "BEGIN_SHARE", "BlockDrift", "Diagnosis", "severity"]

BEGIN_LEVEL = 0.05  # relative L2 drift at which a block counts as bleeding...
BEGIN_SHARE = 0.10  # ...or this share of the final block's drift, whichever is lower


@dataclass
class BlockDrift:
    """Figures of one transformer block, modified vs baseline."""

    index: int
    name: str
    drift_l2: float  # relative L2 of the residual stream at the block's output
    drift_cos: float  # mean 1 - cosine, same tensors
    sublayers: dict[str, float] = field(default_factory=dict)  # linear -> relative L2 of output
    attn_entropy_shift: float | None = None  # mean |H' - H| over heads and queries (nats)
    attn_entropy_change: float | None = None  # mean H' - H (nats): < 0 sharper, > 0 flatter
    kl_mean: float | None = None  # attribution: one-block kl_mean (this block's edits alone)
    kl_ratio: float | None = None  # attribution: one-block kl_mean / the whole kl_mean
    kl_added: float | None = None  # attribution: this block's part of the whole kl_mean
    share: float | None = None  # attribution: kl_added / the whole kl_mean (parts sum to 1)
    added: bool = False  # a block the modification added after baseline block ``index``

    @property
    def label(self) -> str:
        return f"{self.index}'" if self.added else str(self.index)


@dataclass
class Diagnosis:
    """Per-block diagnostics of one modification; ``lines()`` is what a failed check shows."""

    modification: str
    blocks: list[BlockDrift]
    tokens: int
    threshold: float
    begins: int | None  # position in ``blocks`` of the first bleeding block
    most: int | None  # position in ``blocks`` of the block that contributes most
    attribution: bool = False
    kl_mean: float | None = None  # the whole modification's kl_mean (attribution runs)
    kl_outside: float | None = None  # its part from edits outside the blocks (last in order)
    outside: list[str] = field(default_factory=list)  # those edits: modules, logits processing
    notes: list[str] = field(default_factory=list)

    def finding(self) -> str | None:
        """The one-sentence finding, first of :meth:`lines` and the HTML card's summary:
        ``hemorrhage begins at block 3 (mlp.down_proj drift 0.21); block 5 adds the most to
        kl_mean (+0.81, 41% of 1.97)``. None without blocks."""
        if not self.blocks:
            return None
        if self.begins is None:
            return (
                "no block's hidden states drift: the change acts after the blocks "
                "(lm_head, logits or decoding)"
            )
        block = self.blocks[self.begins]
        sub = max(block.sublayers.items(), key=lambda kv: severity(kv[1]), default=None)
        what = f"{sub[0]} drift {_fmt(sub[1])}" if sub else f"drift {_fmt(block.drift_l2)}"
        line = f"hemorrhage begins at block {block.label} ({what})"
        if self.most is None:
            return line
        worst = self.blocks[self.most]
        if self.attribution and worst.kl_added is not None:
            line += (
                f"; block {worst.label} adds the most to kl_mean "
                f"({_signed(worst.kl_added)}, {_percent(worst.share)} of {_fmt(self.kl_mean)})"
            )
            if self.kl_outside is not None and self.kl_outside > worst.kl_added:
                share = self.kl_outside / self.kl_mean if self.kl_mean else None
                line += (
                    f", the edits outside the blocks more "
                    f"({_signed(self.kl_outside)}, {_percent(share)})"
                )
            return line
        before = self.blocks[self.most - 1].drift_l2 if self.most else 0.0
        added = None if worst.drift_l2 is None or before is None else worst.drift_l2 - before
        return line + f"; block {worst.label} adds the most drift ({_signed(added)})"

    def lines(self) -> list[str]:
        """:meth:`finding`, then the figures per block, then the notes."""
        finding = self.finding()
        out = [] if finding is None else [finding]
        if self.blocks:
            out.append(
                "drift by block (relative L2 of the residual stream): "
                + " ".join(f"{b.label}:{_fmt(b.drift_l2)}" for b in self.blocks)
            )
        shifts = [b.attn_entropy_shift for b in self.blocks]
        if any(s for s in shifts):
            out.append(
                "attention entropy shift by block (nats): "
                + " ".join(f"{b.label}:{_fmt(b.attn_entropy_shift)}" for b in self.blocks)
            )
        if self.attribution:
            outside = f" outside:{_signed(self.kl_outside)}" if self.kl_outside is not None else ""
            out.append(
                f"kl_mean {_fmt(self.kl_mean)} by block (each block's edits added to "
                "those before it; the parts sum to kl_mean): "
                + " ".join(f"{b.label}:{_signed(b.kl_added)}" for b in self.blocks)
                + outside
            )
            out.append(
                "one-block kl_mean (each block's edits alone; ratio to the whole): "
                + " ".join(
                    f"{b.label}:{_fmt(b.kl_mean)} ({_times(b.kl_ratio)})" for b in self.blocks
                )
            )
        return out + self.notes

    def to_dict(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "levels": {"begin_level": BEGIN_LEVEL, "begin_share": BEGIN_SHARE},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Diagnosis:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values["blocks"] = [BlockDrift(**b) for b in values["blocks"]]
        return cls(**values)


def severity(value: float | None) -> float:
    """A drift or KL figure as the key that picks the block "most" affected: NaN (a collapsed
    output) and None (not finite, after the JSON round trip) count as the largest."""
    return math.inf if value is None or math.isnan(value) else value


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.2f}" if value == 0 or 0.01 <= abs(value) < 1e4 else f"{value:.1e}"


def _signed(value: float | None) -> str:
    text = _fmt(value)
    return text if value is None or text.startswith("-") else f"+{text}"


def _percent(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.0%}"


def _times(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.2f}x"
