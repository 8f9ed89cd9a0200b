"""The baseline's next-token distributions over the evaluation windows, computed once.

Cached on disk under a content hash of everything that determines them (weights, tokenizer,
windows, dtype, batching, storage form), so a changed model or data never reuses a stale entry.
A file lock makes concurrent pytest-xdist workers compute it once.

Storage: for vocabularies up to ``EXACT_VOCAB`` tokens every probability is kept in float32
(4 bytes per vocabulary entry, at most 2 KB per token), with each token's negative entropy
sum(p log p), and all metrics are exact. Above it, per token, the ``topk`` (default
``DEFAULT_TOPK``) largest log-probs as float16 steps down from the largest (see ``_steps``)
with int32 indices, the baseline's mass outside them as float32, and ``TAIL_SAMPLES`` tokens
drawn from the baseline's distribution over the rest (seeded, systematic sampling) with their
float32 log-probs and int32 indices: 24 + 6 K + 8 S bytes, 1,024 bytes at K=124, S=32 whatever
the vocabulary. The exact metrics (ppl_increase, nll_increase, top1_disagreement,
delta_p_mean) read the exact target-token log-prob (float32) and the baseline's argmax (int64)
and have no storage error. KL is the head's terms, the tail as one outcome (which alone falls
short by p_tail * KL(tail-conditionals): 9-24% of kl_mean on a model trained with a 32k
vocabulary, 32-54% on a heavier-tailed stand-in) and an unbiased Monte-Carlo estimate of that
shortfall from the samples (see ``metrics._tail_kl``): random per token, so it averages out in
kl_mean, never negative, and exactly 0 for an unmodified model. The head's rounding, after
which the kept log-probs are renormalized to the exact kept mass, enters KL to second order, as
a bias: +1.4e-9 nats per token with the steps (float16 log-probs: +2.2e-7, +2.6% on 8-bit
RTN's kl_mean of that trained model).
``benchmarks/bench_reference_bpe.py`` measures the error on a model trained here with a 32k BPE
vocabulary, ``benchmarks/bench_reference.py`` on a Zipf-split stand-in at 32k and 128k.

Why the exact limit is 512: exact storage costs 4 V bytes; top-K storage with no truncation
error (K = V) would cost 6 V + 16, so up to 512 (the bundled model) exact is the cheaper of the
two error-free forms, and at most 2 KB. At 8192 it cost 32 KB per token, against < 1 KB at a
measured KL error below 1% for top-K.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import first_line

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_TOPK",
    "EXACT_VOCAB",
    "FORMAT",
    "Reference",
    "TAIL_SAMPLES",
    "cache_key",
    "cached",
    "load_or_compute",
    "storage_bytes",
]

EXACT_VOCAB = 512
DEFAULT_TOPK = 124  # top-K storage at 24 + 6 K + 8 TAIL_SAMPLES = 1,024 bytes per token
TAIL_SAMPLES = 32  # tokens drawn from the baseline's tail to estimate its share of KL
TAIL_SORTED = 1024  # the tail's most likely tokens, sorted before drawing (see _tail_draws)
_Stored = TypeVar("_Stored")  # a dataclass of tensors (Reference, or an encoder's embeddings)
# bump when the stored fields change (3: float16 top-K log-probs, int32 indices; 4: tail
# samples; 5: the top-K log-probs as float16 steps, see _steps)
FORMAT = 5


@dataclass
class Reference:
    """Per scored token (windows x positions, flattened): the baseline's outputs."""

    targets: torch.Tensor  # (N,) int64: the true next token
    target_logp: torch.Tensor  # (N,) float32: baseline log-prob of the true next token
    top1: torch.Tensor  # (N,) int64: baseline argmax
    p: torch.Tensor | None = None  # (N, V) float32, exact storage: probabilities
    neg_entropy: torch.Tensor | None = None  # (N,) float32, exact storage: sum(p log p)
    topk_logp: torch.Tensor | None = None  # (N, K) float16, top-K storage: rounded log-probs
    topk_idx: torch.Tensor | None = None  # (N, K) int32
    tail_mass: torch.Tensor | None = None  # (N,) float32, top-K storage: mass outside the K
    tail_idx: torch.Tensor | None = None  # (N, S) int32: tokens drawn from the tail
    tail_logp: torch.Tensor | None = None  # (N, S) float32: their baseline log-probs

    @property
    def targets_nll(self) -> torch.Tensor:
        return -self.target_logp

    @property
    def logp(self) -> torch.Tensor | None:
        """(N, V) log-probabilities, exact storage only."""
        return None if self.p is None else self.p.log()

    @property
    def nll(self) -> float:
        return self.targets_nll.double().mean().item()

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)

    def rows(self, start: int, stop: int) -> Reference:
        """The reference for scored tokens ``start:stop`` (views)."""
        return self.take(slice(start, stop))

    def take(self, index: slice | torch.Tensor) -> Reference:
        """The reference for the scored tokens at ``index`` (a slice, or row numbers)."""
        return Reference(
            **{
                f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                for f in fields(self)
            }
        )

    @staticmethod
    def from_logprobs(
        logp: torch.Tensor,
        targets: torch.Tensor,
        topk: int,
        tail_samples: int = TAIL_SAMPLES,
        seed: int = 0,
    ) -> Reference:
        """Build from full log-probs (N, V), keeping the top ``topk`` when that is smaller,
        and ``tail_samples`` draws (seeded, systematic) from each row's remaining
        distribution."""
        target_logp = logp.gather(-1, targets[:, None]).squeeze(-1)
        top1 = logp.argmax(-1)
        if topk >= logp.shape[-1]:
            import torch

            p = logp.exp()
            # the same reduction token_stats applies to the modified log-probs: an unmodified
            # model's KL is exactly 0
            return Reference(
                targets, target_logp, top1, p=p, neg_entropy=torch.linalg.vecdot(p, logp)
            )
        import torch

        # one ranking for the kept head and the tail's most likely tokens (see _tail_draws)
        ranked, ranked_idx = logp.topk(min(topk + TAIL_SORTED, logp.shape[-1]), dim=-1)
        values, idx = ranked[:, :topk], ranked_idx[:, :topk]
        # the kept mass from the float32 log-probs, before float16 rounds them
        tail = (-torch.expm1(values.double().logsumexp(-1))).clamp_min(0).float()
        head = _steps(values)
        tail_idx = tail_logp = None
        if tail_samples:
            tail_idx = _tail_draws(logp, ranked, ranked_idx, topk, tail_samples, seed)
            tail_logp = logp.gather(-1, tail_idx).float()
            tail_idx = tail_idx.int()
        return Reference(
            targets,
            target_logp,
            top1,
            topk_logp=head,
            topk_idx=idx.int(),
            tail_mass=tail,
            tail_idx=tail_idx,
            tail_logp=tail_logp,
        )

    def head_logp(self) -> torch.Tensor:
        """(N, K) float32 top-K log-probs, renormalized to the exact kept mass: float16's
        rounding then changes the distribution's shape only, never its head/tail split (a
        wrong split would enter KL to first order).

        ``topk_logp`` in float16 is the stored coding (steps down from the largest, see
        :func:`_steps`); a float32 one, built by hand (the uncompressed form a benchmark
        compares with), holds the log-probs themselves.
        """
        import torch

        lp = self.topk_logp.double()
        if self.topk_logp.dtype == torch.float16:
            lp = lp.cumsum(-1)  # the decoder of _steps: the same float64 sums
        kept = torch.log1p(-self.tail_mass.double().clamp(max=1 - 1e-12))
        return (lp - lp.logsumexp(-1, keepdim=True) + kept[:, None]).float()

    @staticmethod
    def cat(parts: list[Reference]) -> Reference:
        import torch

        return Reference(
            **{
                f.name: None
                if getattr(parts[0], f.name) is None
                else torch.cat([getattr(p, f.name) for p in parts])
                for f in fields(Reference)
            }
        )


def _tail_draws(
    logp: torch.Tensor,
    ranked: torch.Tensor,
    ranked_idx: torch.Tensor,
    topk: int,
    samples: int,
    seed: int,
) -> torch.Tensor:
    """``samples`` tokens per row drawn from the distribution ``logp`` restricted to its tail
    (the tokens after the ``topk`` first of the ranking ``ranked``/``ranked_idx``, which
    holds the row's largest log-probs in order), by systematic sampling: evenly spaced
    points of the tail's CDF from one uniform offset (seeded). Each point is a draw from the
    tail (so the estimate stays unbiased), and the draws spread over the likely and the rare
    tail instead of clumping (lower variance than independent draws).

    The CDF runs over the tail's ``TAIL_SORTED`` most likely tokens, in order of probability
    (the rest of the ranking), then over the rest in vocabulary order: any fixed order gives
    unbiased draws, and sorting the head of the tail is what spreads them; sorting all of it
    would cost a sort of the vocabulary per token (20 ms at 128k tokens, 5x the rest of the
    reference's work). A row whose tail underflows draws anywhere in it: its samples weigh
    p_tail = 0."""
    import torch

    likely, likely_idx = ranked[:, topk:].exp(), ranked_idx[:, topk:]
    rest = logp.exp().scatter_(-1, ranked_idx, 0)  # the tail after its most likely tokens
    empty = (likely.sum(-1) + rest.sum(-1)) <= 0
    if empty.any():
        likely[empty] = 1
        rest[empty] = torch.ones_like(rest[empty]).scatter_(-1, ranked_idx[empty], 0)
    sorted_cdf = likely.double().cumsum(-1)
    gen = torch.Generator(device=logp.device).manual_seed(seed)
    offset = torch.rand(len(rest), 1, generator=gen, device=logp.device, dtype=torch.float64)
    steps = torch.arange(samples, device=logp.device, dtype=torch.float64)
    # the rest's CDF by blocks: each block's mass, then the cumulative sum inside only the
    # blocks a point falls in (a float64 cumulative sum over the whole vocabulary costs more
    # than everything else here)
    if rest.shape[-1] % _BLOCK:
        rest = torch.nn.functional.pad(rest, (0, -rest.shape[-1] % _BLOCK))
    blocks = rest.unflatten(-1, (-1, _BLOCK))
    block_cdf = blocks.sum(-1).double().cumsum(-1) + sorted_cdf[:, -1:]
    points = (offset + steps) / samples * block_cdf[:, -1:]
    in_sorted = points < sorted_cdf[:, -1:]
    at_sorted = torch.searchsorted(sorted_cdf, points).clamp_max(sorted_cdf.shape[-1] - 1)
    block = torch.searchsorted(block_cdf, points).clamp_max(block_cdf.shape[-1] - 1)
    start = torch.cat([sorted_cdf[:, -1:], block_cdf[:, :-1]], -1).gather(-1, block)
    rows = torch.arange(len(rest), device=logp.device)[:, None]
    inside = blocks[rows, block].double().cumsum(-1)
    # a point past its block's float64 total (the block masses are float32 sums) takes the
    # block's last token of nonzero weight, never one outside the tail
    at = torch.minimum(points - start, inside[..., -1] * (1 - 1e-12))
    within = torch.searchsorted(inside, at[..., None]).squeeze(-1)
    at_rest = block * _BLOCK + within
    return torch.where(in_sorted, likely_idx.gather(-1, at_sorted), at_rest)


_BLOCK = 256  # vocabulary entries per block of the tail's CDF (see _tail_draws)


def _steps(values: torch.Tensor) -> torch.Tensor:
    """(N, K) descending log-probs coded as float16 steps down from the first: step i is
    ``values[i] - values[0]`` minus the sum of the steps before it, rounded (error feedback), so
    the decoded ``cumsum`` misses each value by the rounding of its own step only (relative
    2^-11 of the gap to its predecessor), never by a sum of roundings.

    Why not the log-probs themselves in float16: their rounding grows with |log p| (2^-8 at
    log p = -5), and any rounding of the head adds KL(rounded || true) >= 0 to every token's KL,
    whatever the modification: +2.2e-7 nats per token against +1.4e-9 with steps, measured on
    a model trained with a 32k vocabulary (benchmarks/bench_reference_bpe.py), where that made
    8-bit RTN's kl_mean 2.6% high (40% on a less trained one). The first value is not stored:
    :meth:`Reference.head_logp` renormalizes to the kept mass.
    """
    import torch

    # finite, so that no step is inf - inf; exp(-1e4) is 0 in any float format
    t = values.double().clamp_min(-1e4)
    t = t - t[:, :1]
    steps = torch.zeros(t.shape, dtype=torch.float16, device=t.device)
    decoded = torch.zeros(len(t), dtype=torch.float64, device=t.device)
    for i in range(1, t.shape[-1]):
        # never up: a descending head decodes descending, whatever the rounding before
        step = (t[:, i] - decoded).clamp_max(0).half()
        steps[:, i] = step
        decoded = decoded + step.double()
    return steps


def storage_bytes(reference: Reference) -> int:
    """Bytes the reference's tensors take (what the cache stores, less the file's framing)."""
    return sum(
        t.numel() * t.element_size()
        for f in fields(reference)
        if (t := getattr(reference, f.name)) is not None
    )


def cache_key(*parts: object) -> str:
    """Hash of the things that determine a reference."""
    h = hashlib.blake2b(digest_size=12)
    for part in (FORMAT, *parts):
        h.update(repr(part).encode())
        h.update(b"\0")
    return h.hexdigest()


def load_or_compute(
    key: str,
    cache_dir: Path | None,
    compute: Callable[[], _Stored],
    *,
    cls: Any = Reference,
    name: str = "reference",
) -> tuple[_Stored, bool]:
    """The cached reference for ``key``, else ``compute()`` and store it (see :func:`cached`).

    Returns the reference and whether it came from the cache. ``cls`` is the stored dataclass
    of tensors and ``name`` its files' prefix (an encoder's baseline embeddings use their own).
    """

    def as_dict() -> dict[str, Any]:
        value = compute()
        return {f.name: getattr(value, f.name) for f in fields(value)}

    state, hit = cached(key, cache_dir, as_dict, name=name)
    return cls(**state), hit


def cached(
    key: str,
    cache_dir: Path | None,
    compute: Callable[[], dict[str, Any]],
    *,
    name: str,
    format: int = FORMAT,
) -> tuple[dict[str, Any], bool]:
    """The dict stored as ``{name}-{key}.pt`` in ``cache_dir``, else ``compute()`` and store it.

    The one disk cache of the project (the baseline's reference, calibration results of the
    modifications). Returns the dict (tensors, nested dicts and lists of them, numbers, strings:
    what ``torch.load(weights_only=True)`` reads) and whether it came from disk. Guarantees: a
    file lock makes concurrent pytest-xdist workers compute it once; the write is atomic, so a
    reader never sees half a file; an entry that is damaged or of another ``format`` is
    recomputed and an unwritable directory bypassed, each with a warning: a wrong entry is never
    used. ``key`` must hash everything the result depends on (see :func:`cache_key`).
    """
    if cache_dir is None:
        return compute(), False
    try:
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        from filelock import FileLock

        lock = FileLock(str(cache_dir / f"{name}-{key}.lock"))
        lock.acquire(timeout=3600)
    except OSError as exc:
        warnings.warn(
            f"hemorrhage cache {cache_dir} is not writable ({first_line(exc)}); "
            f"computing the {name} without it",
            stacklevel=2,
        )
        return compute(), False
    try:
        path = cache_dir / f"{name}-{key}.pt"
        state = _load(path, format)
        if state is not None:
            return state, True
        state = compute()
        if "format" in state:
            raise ValueError(f"{name}: a cached dict cannot have a 'format' key (the file's own)")
        _store(path, state, format)
        return state, False
    finally:
        lock.release()


def _load(path: Path, format: int) -> dict[str, Any] | None:
    import torch

    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.pop("format") != format:
            raise ValueError("old format")
        return state
    except Exception as exc:  # any damage: rebuild rather than trust it
        warnings.warn(
            f"hemorrhage cache entry {path} is unreadable ({first_line(exc)}); rebuilding it",
            stacklevel=4,
        )
        return None


def _store(path: Path, state: dict[str, Any], format: int) -> None:
    import torch

    tmp = path.with_suffix(".tmp")
    try:
        torch.save({"format": format, **state}, tmp)
        tmp.replace(path)  # atomic: readers never see half a file
    except OSError as exc:
        warnings.warn(
            f"cannot write hemorrhage cache entry {path} ({first_line(exc)}); continuing without "
            "it",
            stacklevel=4,
        )
        tmp.unlink(missing_ok=True)
