"""Decoding changes: what the model's next-token distribution becomes, and how tokens are picked.

A decoding modification leaves every weight alone. ``decode.temperature``, ``decode.top_k``,
``decode.top_p`` and ``decode.repetition_penalty`` append a logits processor to
``patch.logits_processors`` (transformers' own warpers), so the next-token metrics (``kl_mean``,
``top1_disagreement``, ...) are computed on the *effective* distribution
``softmax(processors(logits))``, and the generation metrics decode with it. ``decode.sampling``
chooses how a generated token is picked from that distribution. The baseline is always measured
with its own decoding: its raw next-token distribution, and greedy generation.

Processors follow one protocol, ``processor(ids, logits) -> logits``: ``ids`` (batch, L) are the
tokens seen so far and ``logits`` (batch, T, vocab) with T <= L the logits at the last T
positions, so ``logits[:, j]`` is the distribution of the token after ``ids[:, :L - T + j + 1]``.
Evaluation passes whole windows (T = L), generation one step at a time (T = 1).

Truncation (top-k, top-p) masks tokens with ``-inf`` exactly as transformers does; the metrics
then compare with the skew divergence (see ``pytest_hemorrhage.metrics``), so a token the
baseline could emit but the modified decoding cannot costs ln(1/skew) nats per unit of mass
instead of an infinite KL.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..errors import HemorrhageError
from .registry import Modification, Patch, register_modification
from .validate import check_choice, check_int, check_number

if TYPE_CHECKING:
    from .registry import LogitsProcessor

__all__ = [
    "Decoding",
    "RepetitionPenalty",
    "Sampling",
    "Temperature",
    "TopK",
    "TopP",
    "decoding_of",
    "per_position",
    "repetition_penalty",
]


@dataclass(frozen=True, kw_only=True)
class _Decode(Modification):
    """A decoding change: no layer is targeted, so include/exclude do not apply."""

    # Whether generation samples when this stage is present: temperature, top-k and top-p
    # change nothing under greedy decoding (transformers applies them only with do_sample).
    samples: ClassVar[bool] = False
    changes: ClassVar[str] = "decoding"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.include or self.exclude:
            raise HemorrhageError(
                f"{self.name}: include/exclude do not apply to a decoding "
                "change (it edits no layer); drop them"
            )


@dataclass(frozen=True, kw_only=True)
class Temperature(_Decode):
    """Divide the logits by a temperature (transformers' ``TemperatureLogitsWarper``).

    Args:
        value: the temperature, > 0; 1 leaves the distribution unchanged, below 1 sharpens it,
            above 1 flattens it. Generation samples (seeded) when this stage is present.
    """

    samples: ClassVar[bool] = True
    value: float = 0.7

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self, "value", 0.0, math.inf, lo_open=True, hi_open=True)


@dataclass(frozen=True, kw_only=True)
class TopK(_Decode):
    """Keep the ``k`` most likely tokens, mask the rest (transformers' ``TopKLogitsWarper``).

    Args:
        k: tokens kept, >= 1; ``k`` >= the vocabulary size changes nothing. Generation samples
            (seeded) when this stage is present.
    """

    samples: ClassVar[bool] = True
    k: int = 50

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "k", 1)


@dataclass(frozen=True, kw_only=True)
class TopP(_Decode):
    """Nucleus truncation: keep the smallest set of most likely tokens whose probability
    reaches ``p``, mask the rest (transformers' ``TopPLogitsWarper``).

    Args:
        p: probability mass kept, in (0, 1]; 1 changes nothing. Generation samples (seeded)
            when this stage is present.
    """

    samples: ClassVar[bool] = True
    p: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self, "p", 0.0, 1.0, lo_open=True)


@dataclass(frozen=True, kw_only=True)
class RepetitionPenalty(_Decode):
    """Penalize every token already seen (transformers' ``RepetitionPenaltyLogitsProcessor``):
    its logit is divided by ``value`` when positive, multiplied when negative.

    In evaluation the tokens seen are those of the window up to the position; in generation
    the prompt and everything generated, as in transformers.

    Args:
        value: the penalty, > 0; 1 changes nothing, above 1 discourages repeats.
    """

    value: float = 1.2

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self, "value", 0.0, math.inf, lo_open=True, hi_open=True)


@dataclass(frozen=True, kw_only=True)
class Sampling(_Decode):
    """How generation picks each token from the next-token distribution.

    The distribution itself is unchanged (its next-token metrics are those of the other
    stages), so only the generation metrics see this stage. ``"sample"`` draws each token from
    exactly the effective distribution ``softmax(processors(logits))``, by the Gumbel-max trick
    with noise seeded by ``(seed, step)``: the same seed gives the same continuations, and two
    modifications measured with one seed share their random numbers.

    Args:
        mode: ``"sample"`` (draw) or ``"greedy"`` (the most likely token: the baseline's
            decoding, also when temperature/top-k/top-p stages are present).
        seed: seed of the draws; None uses ``--hemorrhage-seed``.
    """

    mode: str = "sample"
    seed: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self, "mode", ("sample", "greedy"))
        if self.seed is not None:
            check_int(self, "seed", 0)


@dataclass(frozen=True)
class Decoding:
    """How generation picks tokens: greedy, or sampled with ``seed``."""

    sample: bool
    seed: int

    def __str__(self) -> str:
        return f"sample(seed={self.seed})" if self.sample else "greedy"


def decoding_of(configs: Iterable[Modification], default_seed: int) -> Decoding:
    """The decoding that ``configs`` ask for: greedy unless a temperature/top-k/top-p stage is
    present, with the last ``decode.sampling`` stage overriding both the mode and the seed."""
    sample, seed = False, default_seed
    for config in configs:
        if isinstance(config, Sampling):
            sample = config.mode == "sample"
            seed = default_seed if config.seed is None else config.seed
        elif isinstance(config, _Decode) and config.samples:
            sample = True
    return Decoding(sample, seed)


def per_position(warper: Any) -> LogitsProcessor:
    """A transformers warper that reads only the scores, applied at every position."""

    def process(ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        flat = logits.float().reshape(-1, logits.shape[-1])
        return warper(None, flat).reshape(logits.shape)

    return process


def repetition_penalty(value: float) -> LogitsProcessor:
    """transformers' repetition penalty at every position, each over the tokens seen up to it."""
    from transformers import RepetitionPenaltyLogitsProcessor

    processor = RepetitionPenaltyLogitsProcessor(penalty=value)

    def process(ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        batch, steps, vocab = logits.shape
        seen = ids.shape[1]
        # Row j has seen ids[:, :seen - steps + j + 1]; pad it with its own last seen token,
        # which is already in its set, so that every row has the same length.
        last = torch.arange(seen - steps, seen, device=ids.device)
        cols = torch.minimum(torch.arange(seen, device=ids.device)[None, :], last[:, None])
        rows = ids[:, cols].reshape(batch * steps, seen)
        out = processor(rows, logits.float().reshape(batch * steps, vocab))
        return out.reshape(batch, steps, vocab)

    return process


@register_modification("decode.temperature", Temperature)
def apply_temperature(config: Temperature, model: nn.Module, patch: Patch, context: Any) -> None:
    from transformers import TemperatureLogitsWarper

    if config.value != 1:  # dividing by 1 changes no bit: no pass over the logits for it
        patch.logits_processors.append(per_position(TemperatureLogitsWarper(config.value)))


@register_modification("decode.top_k", TopK)
def apply_top_k(config: TopK, model: nn.Module, patch: Patch, context: Any) -> None:
    from transformers import TopKLogitsWarper

    patch.logits_processors.append(per_position(TopKLogitsWarper(config.k)))


@register_modification("decode.top_p", TopP)
def apply_top_p(config: TopP, model: nn.Module, patch: Patch, context: Any) -> None:
    from transformers import TopPLogitsWarper

    if config.p < 1:  # as transformers: p = 1 would only drop tokens whose probability underflows
        patch.logits_processors.append(per_position(TopPLogitsWarper(config.p)))


@register_modification("decode.repetition_penalty", RepetitionPenalty)
def apply_repetition_penalty(
    config: RepetitionPenalty, model: nn.Module, patch: Patch, context: Any
) -> None:
    if config.value != 1:  # 1 multiplies or divides by 1: no bit changes, no pass needed
        patch.logits_processors.append(repetition_penalty(config.value))


@register_modification("decode.sampling", Sampling)
def apply_sampling(config: Sampling, model: nn.Module, patch: Patch, context: Any) -> None:
    """Nothing to change on the distribution: generation reads the mode from the stages."""
