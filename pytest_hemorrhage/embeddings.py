"""Embedding hemorrhage: how far an encoder's sentence embeddings move from the baseline's.

Texts: ``--hemorrhage-data`` (default: the bundled corpus) split into lines, and each line into
sentences after ``.``, ``!`` or ``?`` followed by whitespace; pieces of fewer than
``MIN_WORDS`` words, and repeats, are dropped. The first texts, in order, up to
``--hemorrhage-tokens`` tokens in all (each text truncated to ``--hemorrhage-seq-len``), are
measured; the tokens of the others, joined, are the calibration windows of data-aware
modifications (so the two never overlap).

Every metric is 0 for a model identical to the baseline and grows with damage. Standard errors:
by text for ``emb_cos_drift`` (a mean) and ``emb_cos_p99`` (Woodruff's bound, as ``kl_p99``);
by query for ``retrieval_drop`` (every text is a query against the other texts; the queries
share the index, so the SE treats them as independent draws, which they nearly are); by a
delete-a-group jackknife over texts for ``sim_rank_drop`` (a text enters n - 1 pairs, so
pairs are not independent; ``JACKKNIFE_GROUPS`` groups of texts, each left out once).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .data import Windows
from .errors import HemorrhageError
from .loading import CAUSAL, ENCODER, Pooling
from .metrics import EXTRA_METRICS, METRICS, mean_se, quantile_se

if TYPE_CHECKING:
    import torch

__all__ = [
    "EMBEDDING_METRICS",
    "JACKKNIFE_GROUPS",
    "MIN_WORDS",
    "RETRIEVAL_K",
    "EmbeddingReference",
    "EmbeddingTexts",
    "applicable_metrics",
    "check_kind",
    "contrastive_losses",
    "embedding_metrics",
    "encode",
    "make_texts",
    "pool",
    "split_texts",
]

EMBEDDING_METRICS: dict[str, str] = {
    "emb_cos_drift": "mean over texts of 1 - cosine(baseline embedding, modified embedding)",
    "emb_cos_p99": "99th percentile over texts of 1 - cosine(baseline, modified embedding)",
    "retrieval_drop": "1 - mean overlap of each text's top-10 neighbours among the other "
    "texts, baseline vs modified (each model embeds queries and index)",
    "sim_rank_drop": "1 - Spearman correlation of every pair's cosine similarity, baseline vs "
    "modified",
}
RETRIEVAL_K = 10
MIN_WORDS = 3
JACKKNIFE_GROUPS = 32
# InfoNCE temperature of the encoder loss (sentence-transformers' MultipleNegativesRankingLoss
# scale 20, with which all-MiniLM-L6-v2 was trained)
_SCALE = 20.0
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_texts(text: str) -> list[str]:
    """Lines, then sentences (see the module docstring); short pieces and repeats dropped."""
    seen: dict[str, None] = {}
    for line in text.splitlines():
        for piece in _SENTENCE_END.split(line.strip()):
            piece = piece.strip()
            if len(piece.split()) >= MIN_WORDS:
                seen.setdefault(piece, None)
    return list(seen)


@dataclass(frozen=True)
class EmbeddingTexts:
    """The measured texts, tokenized in batches, and calibration windows from the rest."""

    texts: list[str]
    batches: list[dict[str, torch.Tensor]]  # tokenizer outputs, texts in order
    tokens: int  # real (unpadded) tokens over every measured text
    windows: Windows  # eval is empty; spare holds the other texts' tokens

    @property
    def fingerprint(self) -> tuple[Any, ...]:
        return (
            len(self.texts),
            [tuple(b["input_ids"].shape) for b in self.batches],
            b"".join(b["input_ids"].numpy().tobytes() for b in self.batches),
        )


def make_texts(
    tokenizer: Any, text: str, *, seq_len: int, tokens: int, batch_size: int
) -> EmbeddingTexts:
    """Split ``text``, keep the first texts up to ``tokens`` tokens, tokenize them in batches."""
    import torch

    pieces = split_texts(text)
    ids = tokenizer(pieces, truncation=True, max_length=seq_len, verbose=False)["input_ids"]
    count, total = 0, 0
    while count < len(pieces) and total + len(ids[count]) <= tokens:
        total += len(ids[count])
        count += 1
    if count < RETRIEVAL_K + 1:
        raise HemorrhageError(
            f"the data gives {count} texts (sentences or lines of at least {MIN_WORDS} words) "
            f"within --hemorrhage-tokens={tokens}, fewer than the {RETRIEVAL_K + 1} that "
            f"retrieval_drop's top-{RETRIEVAL_K} neighbours need; give more --hemorrhage-data "
            "or raise --hemorrhage-tokens"
        )
    texts = pieces[:count]
    batches = [
        dict(
            tokenizer(
                texts[i : i + batch_size],
                padding=True,
                truncation=True,
                max_length=seq_len,
                return_tensors="pt",
                verbose=False,
            )
        )
        for i in range(0, count, batch_size)
    ]
    spare = torch.tensor([t for row in ids[count:] for t in row], dtype=torch.long)
    windows = Windows(eval=torch.empty((0, seq_len), dtype=torch.long), spare=spare)
    return EmbeddingTexts(texts, batches, total, windows)


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """One embedding per row of ``hidden`` (batch, tokens, dim), float32, as sentence-transformers
    pools (``mask`` marks the real tokens)."""
    import torch

    h = hidden.float()
    m = mask.to(h.dtype).unsqueeze(-1)
    if pooling.mode == "cls":
        out = h[:, 0]
    elif pooling.mode == "max":
        out = h.masked_fill(m == 0, -1e9).amax(1)
    else:
        summed, count = (h * m).sum(1), m.sum(1).clamp_min(1e-9)
        out = summed / (count.sqrt() if pooling.mode == "mean_sqrt_len" else count)
    return torch.nn.functional.normalize(out, p=2, dim=1) if pooling.normalize else out


def _hidden(output: Any) -> torch.Tensor:
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


def encode(
    model: Any, batches: Iterable[dict[str, torch.Tensor]], pooling: Pooling, device: Any
) -> torch.Tensor:
    """The pooled embeddings (texts, dim) of every batch, float32, on the host."""
    import torch

    parts = []
    with torch.inference_mode():
        for batch in batches:
            inputs = {k: v.to(device) for k, v in batch.items()}
            parts.append(pool(_hidden(model(**inputs)), inputs["attention_mask"], pooling).cpu())
    return torch.cat(parts)


def contrastive_losses(model: Any, ids: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """Per window of ``ids`` (windows, tokens): the in-batch InfoNCE loss of matching the
    embedding of its first half to that of its second half (spans of one text as positives,
    the other windows' as negatives: DeCLUTR, Giorgi et al. 2021). The encoder's stand-in for
    the next-token loss of gradient-aware (Taylor) importance."""
    import torch

    half = ids.shape[1] // 2
    mask = torch.ones_like(ids[:, :half])
    first = pool(_hidden(model(input_ids=ids[:, :half], attention_mask=mask)), mask, pooling)
    second = pool(
        _hidden(model(input_ids=ids[:, half : 2 * half], attention_mask=mask)), mask, pooling
    )
    first = torch.nn.functional.normalize(first, dim=1)
    second = torch.nn.functional.normalize(second, dim=1)
    scores = _SCALE * first @ second.T
    return torch.nn.functional.cross_entropy(
        scores, torch.arange(len(ids), device=ids.device), reduction="none"
    )


@dataclass
class EmbeddingReference:
    """The baseline's embeddings of the measured texts and what the metrics compare with."""

    embeddings: torch.Tensor  # (texts, dim) float32, as pooled
    neighbours: torch.Tensor  # (texts, RETRIEVAL_K) int64: each text's nearest other texts
    pair_sims: torch.Tensor  # (texts * (texts - 1) / 2,) float32: cosine of every pair

    @staticmethod
    def from_embeddings(embeddings: torch.Tensor) -> EmbeddingReference:
        unit = _unit(embeddings)
        sims = unit @ unit.T
        return EmbeddingReference(embeddings, _neighbours(sims), _pairs(sims))


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x.double() / x.double().norm(dim=1, keepdim=True)


def _neighbours(sims: torch.Tensor) -> torch.Tensor:
    s = sims.clone()
    s.fill_diagonal_(-math.inf)
    return s.topk(RETRIEVAL_K, dim=1).indices


def _pairs(sims: torch.Tensor) -> torch.Tensor:
    import torch

    i, j = torch.triu_indices(len(sims), len(sims), 1)
    return sims[i, j].float()


def embedding_metrics(
    ref: EmbeddingReference, embeddings: torch.Tensor, level: float = 0.95
) -> tuple[dict[str, float], dict[str, float | None], int]:
    """The four metrics of ``embeddings`` (modified, same texts) against the baseline's, their
    standard errors (calibrated at ``level``, see :func:`~pytest_hemorrhage.metrics.mean_se`),
    and the number of texts whose embedding is not finite."""
    import torch

    nonfinite = int((~torch.isfinite(embeddings).all(1)).sum())
    a, b = _unit(ref.embeddings), _unit(embeddings)
    # 1 - cos as half the squared distance of the unit vectors: exactly 0 for equal embeddings
    drift = 0.5 * (a - b).square().sum(1)
    sims = b @ b.T
    found = _neighbours(sims)
    overlap = (ref.neighbours[:, :, None] == found[:, None, :]).any(-1).double().mean(1)
    values = {
        "emb_cos_drift": mean_se(drift, level=level),
        "emb_cos_p99": quantile_se(drift, 0.99, level=level),
        "retrieval_drop": mean_se(1 - overlap, level=level),
        "sim_rank_drop": _rank_drop(ref.pair_sims, _pairs(sims), len(embeddings)),
    }
    return (
        {k: v for k, (v, _) in values.items()},
        {k: se for k, (_, se) in values.items()},
        nonfinite,
    )


def _ranks(x: torch.Tensor) -> torch.Tensor:
    import torch

    ranks = torch.empty(len(x), dtype=torch.float64)
    ranks[x.argsort(stable=True)] = torch.arange(len(x), dtype=torch.float64)
    return ranks


def _spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    return _rank_correlation(_ranks(x), _ranks(y))


def _kept_ranks(order: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The ranks ``_ranks`` gives the kept values among themselves, from the full stable order
    (a subset keeps the full order's relative order): a cumulative count, no second sort."""
    import torch

    ranks = torch.empty(len(order), dtype=torch.float64)
    ranks[order] = (keep[order].cumsum(0) - 1).double()
    return ranks[keep]


def _rank_correlation(rx: torch.Tensor, ry: torch.Tensor) -> float:
    if rx.equal(ry):
        return 1.0
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.square().sum() * ry.square().sum()).sqrt())


def _rank_drop(base: torch.Tensor, mod: torch.Tensor, n: int) -> tuple[float, float | None]:
    """1 - Spearman over the pairs, and its delete-a-group jackknife SE over texts."""
    import torch

    value = 1 - _spearman(base, mod)
    groups = min(n, JACKKNIFE_GROUPS)
    i, j = torch.triu_indices(n, n, 1)
    label = torch.arange(n) % groups
    order_base, order_mod = base.argsort(stable=True), mod.argsort(stable=True)
    drops = []
    for g in range(groups):
        keep = (label[i] != g) & (label[j] != g)
        drops.append(
            1 - _rank_correlation(_kept_ranks(order_base, keep), _kept_ranks(order_mod, keep))
        )
    d = torch.tensor(drops, dtype=torch.float64)
    se = math.sqrt((groups - 1) / groups * (d - d.mean()).square().sum().item())
    return value, se


def applicable_metrics(kind: str) -> list[str]:
    """The budget keys that a model of ``kind`` (``CAUSAL`` or ``ENCODER``) can measure."""
    return list(EMBEDDING_METRICS) if kind == ENCODER else [*METRICS, *EXTRA_METRICS]


def check_kind(metrics: Iterable[str], kind: str, where: str) -> None:
    """Refuse budget keys that do not apply to the model under test (token metrics on an
    encoder, embedding metrics on a causal LM), naming those that do."""
    wrong = [m for m in metrics if m in EMBEDDING_METRICS or m in METRICS or m in EXTRA_METRICS]
    wrong = [m for m in wrong if m not in applicable_metrics(kind)]
    if wrong:
        other = ENCODER if kind == CAUSAL else CAUSAL
        raise HemorrhageError(
            f"{where}: {', '.join(wrong)} measure(s) {_a(other)}, but the model under test is "
            f"{_a(kind)}; the metrics that apply: {', '.join(applicable_metrics(kind))}"
        )


def _a(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind
