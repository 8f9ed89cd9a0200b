"""The model under test: evaluation windows, baseline reference, and modified measurements."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from .baseline import baseline_of, named, snapshot
from .chat import (
    chat_windows,
    is_chat,
    markers,
    parse_roles,
    read_template,
    role_counts,
    scored_mask,
    template_mismatch,
)
from .data import Windows, make_windows, read_text
from .early_stop import EarlyStop, take_windows
from .embeddings import (
    EmbeddingReference,
    check_kind,
    contrastive_losses,
    embedding_metrics,
    encode,
    make_texts,
)
from .errors import HemorrhageError, first_line
from .extras import providers
from .forward import chunk_rows, head_chunks, split_forward
from .loading import ENCODER, model_logits
from .metrics import (
    DEFAULT_LEVEL,
    LogitReads,
    Result,
    TokenStats,
    by_position,
    position_range,
    read_logits,
    score_reads,
    scored_tokens,
    summarize,
)
from .modifications.noise import layer_seed
from .modifications.registry import LogitsProcessor, Modification, Patch, apply, iter_configs
from .placement import offloaded_modules
from .reference import DEFAULT_TOPK, EXACT_VOCAB, Reference, cache_key, load_or_compute
from .runtimes import runtime_of

if TYPE_CHECKING:
    from .budget import Budget
    from .loading import LoadedModel
    from .reference_file import PortableReference
    from .settings import Settings

__all__ = [
    "ENCODER_BATCH",
    "Chunk",
    "Harness",
    "HarnessContext",
    "Stages",
    "auto_batch",
]

# Rows per Reference.from_logprobs call while the reference is built (its top-K storage works
# in float64 over each row's tail: tens of bytes per logit for the rows in hand).
_REFERENCE_ROWS = 128
# Texts per forward pass of an encoder (unless --hemorrhage-batch-size says otherwise).
ENCODER_BATCH = 64

# What measure()/modified() accept: a name, a config, or a sequence of (name, params) / configs.
Stages = str | Modification | Sequence[Any]


class Chunk(NamedTuple):
    """Logits of scored positions, (windows, positions, vocab), and their targets,
    flattened: windows ``window``, ``window + 1``, ... of those scored (indices into them),
    positions ``position``, ``position + 1``, ... of each (a position counts the tokens of
    context its prediction had, 1 to the window's length - 1)."""

    logits: torch.Tensor
    targets: torch.Tensor
    window: int
    position: int


class HarnessContext:
    """The handler contract (:class:`~pytest_hemorrhage.modifications.handler.Context`) served
    by a harness: its tokenizer, seeds, calibration windows and session memo."""

    def __init__(self, harness: Harness) -> None:
        self._harness = harness
        self.tokenizer = harness.loaded.tokenizer
        self.device = harness.device
        self.seed = harness.settings.seed
        self.cache_dir = harness.settings.cache_dir  # calibration results kept across runs
        self.fingerprint = harness.loaded.fingerprint  # the baseline's content hash
        self.applied: tuple[Modification, ...] = ()  # earlier stages of the current composition

    def calibration_windows(self, count: int | None = None) -> torch.Tensor:
        """Windows disjoint from the evaluation ones (deterministic), on the model's device."""
        n = count or self._harness.settings.calibration_windows
        return self._harness.windows.calibration(n).to(self.device)

    def memo(self, key: Any, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per session for ``key`` (e.g. calibration activation norms)."""
        memo = self._harness.memo
        if key not in memo:
            memo[key] = compute()
        return memo[key]

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """The (possibly modified) model's logits for ``ids``; for an encoder, its output
        (hidden states: calibration hooks only need the forward pass to run)."""
        return model_logits(self._harness.model, ids)

    def window_losses(self, ids: torch.Tensor) -> torch.Tensor:
        """Per window of ``ids`` (windows, tokens), the loss that gradient-aware importance
        differentiates: the mean next-token NLL for a causal LM; for an encoder, the
        contrastive loss of matching each window's two halves (see
        :func:`pytest_hemorrhage.embeddings.contrastive_losses`)."""
        harness = self._harness
        if harness.loaded.kind == ENCODER:
            return contrastive_losses(harness.model, ids, harness.loaded.pooling)
        logits = self.logits(ids)[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        )
        return nll.view(len(ids), -1).mean(1)

    def generator(
        self, *parts: object, device: torch.device | str | None = None
    ) -> torch.Generator:
        """A fresh generator seeded from ``--hemorrhage-seed``, the stage's position in the
        composition and ``parts`` (e.g. a layer name), on the model's device by default.

        Handlers draw from it instead of torch's global RNG: the same seed gives the same
        draws, and the user's own random stream is left alone.
        """
        generator = torch.Generator(device=device or self.device)
        generator.manual_seed(layer_seed(self.seed, len(self.applied), *parts))
        return generator


class Harness:
    """Measures modifications of one loaded baseline against its reference."""

    def __init__(
        self, loaded: LoadedModel, settings: Settings, portable: PortableReference | None = None
    ) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.settings = settings
        self.device = loaded.device
        self.memo: dict[Any, Any] = {}
        # the one-sided level the measure in progress calibrates its standard errors at
        self.level = DEFAULT_LEVEL
        self.kind = loaded.kind
        # an encoder is measured on texts (embeddings), a causal LM on token windows
        self.texts = None
        if self.kind == ENCODER:
            self.batch_size = settings.batch_size or ENCODER_BATCH
            self.texts = make_texts(
                loaded.tokenizer,
                read_text(settings.data),
                seq_len=settings.seq_len,
                tokens=settings.tokens,
                batch_size=self.batch_size,
            )
            self.windows = self.texts.windows  # calibration only
            self.vocab = self.topk = 0
        else:
            # with a reference file, its windows and reference (checked against the settings)
            self.windows = _windows(loaded, settings, portable)
            self.vocab = (
                portable.vocab
                if portable is not None
                else _vocab_size(self.model, self.windows.eval[:1, :2].to(self.device))
            )
            self.batch_size = settings.batch_size or auto_batch(settings.seq_len, self.vocab)
            self.topk = settings.topk or (self.vocab if self.vocab <= EXACT_VOCAB else DEFAULT_TOPK)
        # chat data: the targets the summaries count (the assistant's, by default)
        self.scored = (
            None
            if self.windows.roles is None or self.texts is not None
            else scored_mask(self.windows, parse_roles(settings.chat_roles))
        )
        # where special_top1_flip compares top-1s (the tokenizer's markers, end-of-turn)
        self.markers = torch.tensor(markers(loaded.tokenizer, self.windows), dtype=torch.long)
        self.portable = portable
        self.context = HarnessContext(self)
        self.reference_cached = False
        if self.model is None:  # only a reference file: nothing to modify or restore
            return
        # shared by every harness of this model, so that one harness's restore is the others'
        self._baseline = baseline_of(self.model)
        self._pristine = self._baseline.versions

    @cached_property
    def data_fingerprint(self) -> str:
        if self.texts is not None:
            return cache_key(*self.texts.fingerprint)
        return cache_key(tuple(self.windows.eval.shape), self.windows.eval.numpy().tobytes())

    @cached_property
    def reference(self) -> Reference:
        if self.portable is not None:
            return self.portable.reference
        if self.texts is not None:
            return self._embedding_reference()  # type: ignore[return-value]
        key = cache_key(
            self.loaded.fingerprint,
            self.data_fingerprint,
            self.batch_size,
            self.topk,
            str(next(self.model.parameters()).dtype),
            str(self.device.type),
        )
        reference, self.reference_cached = load_or_compute(
            key, self.settings.cache_dir, self._compute_reference
        )
        return reference

    def _embedding_reference(self) -> EmbeddingReference:
        """The baseline's embeddings of the texts (an encoder's reference), cached like the
        token reference: content hash, file lock, rebuilt when damaged."""
        key = cache_key(
            "embeddings",
            self.loaded.fingerprint,
            self.data_fingerprint,
            self.loaded.pooling,
            str(next(self.model.parameters()).dtype),
            str(self.device.type),
        )
        reference, self.reference_cached = load_or_compute(
            key,
            self.settings.cache_dir,
            lambda: EmbeddingReference.from_embeddings(self.embed()),
            cls=EmbeddingReference,
            name="embeddings",
        )
        return reference

    def embed(self) -> torch.Tensor:
        """The (possibly modified) encoder's pooled embeddings of the texts, float32, on the
        host."""
        assert self.texts is not None
        return encode(self.model, self.texts.batches, self.loaded.pooling, self.device)

    def _compute_reference(self) -> Reference:
        parts, row = [], 0
        for chunk in self.chunks():
            logits = chunk.logits.flatten(0, -2)
            targets = chunk.targets.cpu()
            # a hundred rows at a time (no copy of the chunk): the top-K storage works in
            # float64 over each row's tail; each block's tail draws seeded by its first row
            for start in range(0, len(logits), _REFERENCE_ROWS):
                rows = slice(start, start + _REFERENCE_ROWS)
                logp = torch.log_softmax(logits[rows].float(), -1).cpu()
                parts.append(
                    Reference.from_logprobs(logp, targets[rows], self.topk, seed=row + start)
                )
            row += len(logits)
            del chunk, logits, logp  # freed before the next chunk (see chunks)
        return Reference.cat(parts)

    def chunks(
        self,
        processors: Sequence[LogitsProcessor] = (),
        windows: torch.Tensor | None = None,
        model: Any = None,
    ) -> Iterator[Chunk]:
        """The logits of ``windows`` (default: the evaluation windows) after ``processors``, a
        chunk of scored positions at a time, in row-major order (see :class:`Chunk`). ``model``
        runs them (default: the baseline, as modified now), on its own device.

        A transformers model runs its body once per batch and its head once per chunk
        (:mod:`pytest_hemorrhage.forward`): one chunk of logits is alive at a time, whatever
        the window's length, with a consumer that drops its own reference before the next
        (as measure() does). Other models give a batch's logits whole, one chunk."""
        windows = self.windows.eval if windows is None else windows
        model = self.model if model is None else model
        device = self.device if model is self.model else _device(model)
        rows = chunk_rows(self.vocab or 1)
        for i in range(0, len(windows), self.batch_size):
            ids = windows[i : i + self.batch_size].to(device)
            with torch.inference_mode():
                split = split_forward(model, ids)
            if split is None:
                yield self._whole(model, ids, processors, i)
                continue
            for at, span in head_chunks(len(ids), ids.shape[1] - 1, rows):
                with torch.inference_mode():
                    logits = split.head(split.hidden[at, span])
                    for process in processors:  # each position sees the ids up to it
                        logits = process(ids[at, : span.stop], logits)
                targets = ids[at, span.start + 1 : span.stop + 1].reshape(-1)
                yield Chunk(logits, targets, i + at.start, span.start + 1)
                del logits  # not held through the next chunk (see above)
            del split

    def _whole(
        self, model: Any, ids: torch.Tensor, processors: Sequence[LogitsProcessor], first: int
    ) -> Chunk:
        """One batch's logits from one forward pass, as one chunk."""
        with torch.inference_mode():
            logits = model_logits(model, ids)
            # processors see the whole window (T = L): the model's output is contiguous
            # there, so a processor that flattens its rows reads a view instead of copying
            # every logit (the last position, scored by nothing, is dropped after; each
            # position's processed logits are the same either way)
            for process in processors:
                logits = process(ids, logits)
        return Chunk(logits[:, :-1], ids[:, 1:].reshape(-1), first, 1)

    @contextmanager
    def modified(self, stages: Stages) -> Iterator[Patch]:
        """Apply ``stages`` for the duration of the block; the baseline is restored exactly."""
        configs = list(iter_configs(_as_list(stages)))
        patch = Patch(self.model)
        self.context.applied = ()
        try:
            with self._own_rng():
                for config in configs:
                    self._apply(config, patch)
            yield patch
        finally:
            with self._own_rng():
                patch.undo()
            self.model.eval()
            self._accept_reseated(patch.reseated)
            self._check_versions()

    def measure(
        self,
        stages: Stages,
        want: frozenset[str] = frozenset(),
        budget: Budget | None = None,
        level: float | None = None,
    ) -> Result:
        """Measure ``stages`` against the baseline.

        A composition is measured after every stage; ``Result.stages`` holds the cumulative
        measurements before the last stage, the result itself is the total. ``want`` names extra
        metrics (see ``metrics.EXTRA_METRICS``) to compute on the total too. With
        ``--hemorrhage-early-stop``, the total stops scoring windows once ``budget``'s verdict
        is settled (see :mod:`pytest_hemorrhage.early_stop`); the stages before it are full.
        The standard errors are calibrated for one-sided bounds at ``level``: by default the
        budget's ``confidence``, else 0.95 (``Result.level``).
        """
        with self._calibrated(level or _level(budget)):
            return self._measure(stages, want, budget)

    def _measure(self, stages: Stages, want: frozenset[str], budget: Budget | None) -> Result:
        configs = list(iter_configs(_as_list(stages)))
        check_kind(want, self.kind, "hemorrhage.measure")
        reference = self.reference
        extras = providers(want)
        for extra in extras:
            extra.baseline(self)
        results = []
        # nothing a measure runs (handlers, libraries, forwards) advances the caller's stream
        with self._own_rng(), self.modified([]) as patch:
            for i, config in enumerate(configs):
                self._apply(config, patch)
                last = i == len(configs) - 1
                results.append(
                    self._evaluate(patch, configs[: i + 1], reference, budget=budget, early=last)
                )
                # what the handlers reported applying it (e.g. GGUF's width fallbacks), so far
                results[-1].details = {**copy.deepcopy(patch.details), **results[-1].details}
            for extra in extras:
                metrics, stderr, details = extra.compute(self, patch)
                results[-1].metrics.update(metrics)
                results[-1].stderr.update(stderr)
                results[-1].details.update(details)
        total = results[-1]
        total.stages = results[:-1]
        return total

    def measure_model(
        self,
        candidate: Any,
        params: dict[str, Any],
        want: frozenset[str] = frozenset(),
        budget: Budget | None = None,
    ) -> Result:
        """Measure a separately produced model (a loaded candidate: ``.model``, ``.tokenizer``,
        ``.spec``) against the baseline's reference, with the same metrics, standard errors and
        extras as :meth:`measure`. Its vocabulary must be the baseline's (see
        :func:`~pytest_hemorrhage.reference_file.check_vocabulary`). The result's modification is
        ``"candidate"`` and its params are ``params``. ``budget``: as for :meth:`measure`."""
        with self._calibrated(_level(budget)):
            return self._measure_model(candidate, params, want, budget)

    def _measure_model(
        self, candidate: Any, params: dict[str, Any], want: frozenset[str], budget: Budget | None
    ) -> Result:
        from .reference_file import check_vocabulary, vocab_list

        model = candidate.model

        def check() -> str | None:  # once per candidate (weights, tokenizer): re-reads the text
            tokens = self.portable.tokens if self.portable else vocab_list(self.loaded.tokenizer)
            text, ids = read_text(self.settings.data), self.windows.eval
            if self.windows.roles is not None:  # chat data: the messages' text, unrendered
                encoded = self.loaded.tokenizer(text, add_special_tokens=False, verbose=False)
                ids = torch.tensor(encoded["input_ids"], dtype=torch.long)
            check_vocabulary(
                self.loaded.spec,
                tokens,
                self.vocab,
                ids,
                text,
                candidate.spec,
                candidate.tokenizer,
                _vocab_size(model, self.windows.eval[:1, :2].to(_device(model))),
            )
            if self.windows.roles is None or candidate.tokenizer is None:
                return None
            # chat data: the template the candidate ships renders the conversations measured
            # to the baseline's tokens, or it is refused (it would serve other prompts)
            count = self.windows.details["conversations"]
            wrong = template_mismatch(
                self.loaded.tokenizer,
                candidate.tokenizer,
                Path(self.settings.data),
                count,
                read_template(self.settings.chat_template),
                name=f"candidate {candidate.spec}",
            )
            if wrong:
                raise HemorrhageError(wrong)
            if not getattr(candidate.tokenizer, "chat_template", None):
                return "the candidate ships none: not compared"
            return f"the candidate's renders the {count} conversations measured as the baseline's"

        # the fingerprint hashes weights and vocabulary; a chat template is checked on its own
        shipped = getattr(candidate.tokenizer, "chat_template", None)
        template = self.context.memo(
            ("candidate-vocabulary", candidate.fingerprint, shipped), check
        )
        reference = self.reference
        extras = providers(want)
        if extras and self.model is None:
            raise HemorrhageError(
                f"{', '.join(sorted(want))}: these metrics compare with the baseline model's own "
                "generations or task answers, which a reference file does not hold; pass "
                "--hemorrhage-model as well, or budget only the token metrics"
            )
        for extra in extras:
            extra.baseline(self)
        self.context.applied = ()  # the candidate's decoding is greedy: no stages applied
        with self._own_rng():
            patch = Patch(model)  # empty: the extras run ``patch.model``, the candidate
            result = self._evaluate(patch, [], reference, model=model, budget=budget, early=True)
            for extra in extras:
                metrics, stderr, details = extra.compute(self, patch)
                result.metrics.update(metrics)
                result.stderr.update(stderr)
                result.details.update(details)
        result.modification, result.params = "candidate", params
        if template is not None:
            result.details["chat_template"] = template
        result.details["runtime"] = runtime_of(model)
        return result

    def measure_endpoint(
        self, endpoint: Any, params: dict[str, Any], budget: Budget | None = None
    ) -> Result:
        """Measure a served model (a :class:`~pytest_hemorrhage.runtimes.endpoint.Endpoint`)
        on the evaluation windows against the reference: the same metrics from what the server
        returns, KL as the coarsened lower bound (exact when the returned ids cover the
        vocabulary; ``details["kl_bound"]``), and how far the server disagrees with itself on
        repeated requests (``details["noise_floor"]``). Under ``confidence`` a KL budget on an
        inexact KL is refused: a lower bound cannot show that a budget holds."""
        from .runtimes.endpoint import (
            KL_METRICS,
            kl_bound,
            noise_floor,
            refuse_bound,
            score_windows,
        )

        with self._calibrated(_level(budget)):
            reference = self.reference
            windows = self.windows.eval.tolist()
            served = endpoint.score(windows)
            scores = score_windows(served, reference, self.vocab)
            if budget is not None and budget.confidence is not None and not scores.exact:
                refuse_bound(endpoint, sorted(KL_METRICS & set(budget.limits)), scores)
            per_window = len(windows[0]) - 1
            stats = TokenStats(
                kl=scores.kl,
                nll=scores.nll,
                disagree=scores.disagree,
                p_target=scores.p_target,
                finite=scores.present,
                window=torch.arange(len(windows)).repeat_interleave(per_window),
                position=torch.arange(1, per_window + 1).repeat(len(windows)),
            )
            stats = self._marked(stats, reference)
            scored = scores.present if stats.scored is None else stats.scored & scores.present
            stats = dataclasses.replace(stats, scored=scored)
            metrics, stderr = summarize(stats, reference, self.level)
            kept, base_logp = scored_tokens(stats, reference)
            details = self._coverage(stats, torch.arange(len(windows)))
            details.update(scores.details)
            details["kl_bound"] = kl_bound(scores, metrics)
            if not bool(scores.present.all()):  # echo after a BOS: its first token has none
                details["unscored"] = int((~scores.present).sum())
            details["noise_floor"] = noise_floor(endpoint, windows, served, budget)
            details["runtime"] = endpoint.describe()
            if self.windows.roles is not None and self.loaded.tokenizer is not None:  # chat
                details["chat_template"] = endpoint.chat_template(
                    self.loaded.tokenizer,
                    Path(self.settings.data),
                    self.windows.details["conversations"],
                    read_template(self.settings.chat_template),
                )
            return Result(
                modification="candidate",
                params=params,
                metrics=metrics,
                stderr=stderr,
                baseline_ppl=math.exp((-base_logp).double().mean().item()),
                modified_ppl=math.exp(kept.nll.double().mean().item()),
                tokens=kept.nll.numel(),
                details=details,
                level=self.level,
                positions=by_position(stats, reference, per_window + 1, self.level),
            )

    @contextmanager
    def _calibrated(self, level: float) -> Iterator[None]:
        """``self.level`` is ``level`` for the measure in progress (its extras read it too)."""
        before, self.level = self.level, level
        try:
            yield
        finally:
            self.level = before

    def _own_rng(self) -> contextlib.AbstractContextManager[None]:
        """torch's global RNG (CPU, and the model's accelerator) as it was on entry, on exit.

        Handlers draw from ``context.generator()``; this covers what they cannot control
        (third-party code drawing from the global generator).
        """
        if self.device.type == "cpu":
            return torch.random.fork_rng(devices=[])
        index = self.device.index if self.device.index is not None else 0
        return torch.random.fork_rng(devices=[index], device_type=self.device.type)

    def _apply(self, config: Modification, patch: Patch) -> None:
        offloaded = self._offloaded()
        if not offloaded:
            apply(config, self.model, patch, self.context)
        else:
            _apply_offloaded(config, self.model, patch, self.context, offloaded)
        self.context.applied += (config,)

    def _offloaded(self) -> dict[int, str]:
        """Modules whose weights accelerate offloaded (``id -> name``); empty (one pass over
        the parameters) for a model on its devices."""
        if not any(p.is_meta for p in self.model.parameters()):
            return {}
        return offloaded_modules(self.model)

    def _evaluate(
        self,
        patch: Patch,
        configs: list[Modification],
        reference: Reference,
        model: Any = None,
        budget: Budget | None = None,
        early: bool = False,
    ) -> Result:
        if self.texts is not None:
            return self._evaluate_embeddings(patch, configs, reference)  # type: ignore[arg-type]
        stop = None
        if early and self.settings.early_stop:
            stats, reference, stop = self._score_sequentially(patch, reference, model, budget)
            scored_windows = stop.order[: stop.stopped_at or stop.windows].sort().values
        else:
            parts, row = [], 0
            for chunk in self.chunks(patch.logits_processors, model=model):
                rows = reference.rows(row, row + len(chunk.targets))
                parts.append(read_logits(chunk.logits, rows, chunk.window, chunk.position))
                row += len(chunk.targets)
                del chunk  # freed before the next chunk (see chunks)
            # the per-token measures once over every chunk: one pass of each small operation
            # per measure, not per chunk (the same bits; see metrics.score_reads)
            stats = self._marked(score_reads(LogitReads.cat(parts), reference), reference)
            scored_windows = torch.arange(len(self.windows.eval))
        within = self._within(budget)
        metrics, stderr = summarize(stats, reference, self.level, within)
        positions = by_position(stats, reference, self.windows.eval.shape[1], self.level)
        details = {} if stop is None else {"early_stop": stop.details(stats.nll.numel())}
        details.update(self._coverage(stats, scored_windows))
        # chat data: the tokens counted (the assistant's) and their baseline log-probs
        stats, base_logp = scored_tokens(stats, reference)
        return Result(
            **_naming(configs),
            metrics=metrics,
            stderr=stderr,
            baseline_ppl=math.exp((-base_logp).double().mean().item()),
            modified_ppl=math.exp(stats.nll.double().mean().item()),
            tokens=stats.nll.numel(),
            nonfinite=int((~stats.finite).sum()),
            details=details,
            configs=list(configs),
            level=self.level,
            positions=positions,
        )

    def _within(self, budget: Budget | None) -> list[str]:
        """The position-restricted metrics ``budget`` names (``"kl_mean[8192:]"``), each
        checked against the window: a range no scored position reaches is a usage error."""
        if budget is None:
            return []
        within = [key for key in budget.limits if position_range(key)[1:] != (1, None)]
        length = self.windows.eval.shape[1]
        for key in within:
            _, lo, hi = position_range(key)
            if lo >= length or (hi is not None and hi <= lo):
                raise HemorrhageError(
                    f"{key}: positions {lo}:{'' if hi is None else hi} hold no token of the "
                    f"windows of {length} tokens (positions 1 to {length - 1}); budget a "
                    f"range inside them, or raise --hemorrhage-seq-len above {lo}"
                )
        return within

    def _marked(
        self, stats: TokenStats, rows: Reference, windows: torch.Tensor | None = None
    ) -> TokenStats:
        """``stats`` of the evaluation windows ``windows`` (every one, in order, when None),
        against their reference ``rows``, with the tokens the summaries count (chat data)
        and the tokens whose baseline top-1 is a marker (where special_top1_flip looks)."""
        scored = None
        if self.scored is not None:
            scored = (self.scored if windows is None else self.scored[windows]).reshape(-1)
        special = torch.isin(rows.top1, self.markers) if len(self.markers) else None
        return dataclasses.replace(stats, scored=scored, special=special)

    def _coverage(self, stats: TokenStats, windows: torch.Tensor) -> dict[str, Any]:
        """What a result says it scored: with chat data, how many tokens of which roles were
        scored and which were context, and how the conversations were packed; the marker
        positions where special_top1_flip was measured (with chat data, or where any)."""
        details: dict[str, Any] = {}
        if self.scored is not None and self.windows.roles is not None:
            roles = self.windows.roles[windows, 1:]
            mask = self.scored[windows]
            details["scored"] = role_counts(roles[mask])
            details["context"] = role_counts(roles[~mask])
            details["chat"] = dict(self.windows.details)
        special = stats.special
        if special is not None and stats.scored is not None:
            special = special[stats.scored]
        positions = 0 if special is None else int(special.sum())
        if positions or self.scored is not None:
            tokenizer = self.loaded.tokenizer
            names = self.markers.tolist()
            if tokenizer is not None:
                names = tokenizer.convert_ids_to_tokens(names)
            details["special"] = {"markers": names, "positions": positions}
        return details

    def _score_sequentially(
        self, patch: Patch, reference: Reference, model: Any, budget: Budget | None
    ) -> tuple[TokenStats, Reference, EarlyStop]:
        """Score the windows in a seeded order, checking at each interim look whether
        ``budget``'s verdict is settled; the stats and reference rows of the windows scored,
        back in window order, and the plan with its outcome."""
        windows = self.windows.eval
        per_window = windows.shape[1] - 1
        stop = EarlyStop(budget, len(windows), per_window, self.settings.seed)

        def score(chosen: torch.Tensor) -> list[TokenStats]:
            parts = []
            for chunk in self.chunks(patch.logits_processors, windows=windows[chosen], model=model):
                at = chosen[chunk.window : chunk.window + len(chunk.logits)]
                positions = torch.arange(chunk.logits.shape[1]) + chunk.position - 1
                rows = reference.take((at[:, None] * per_window + positions).reshape(-1))
                parts.append(read_logits(chunk.logits, rows, chunk.window, chunk.position))
                del chunk  # freed before the next chunk (see chunks)
            if not parts:
                return []
            # per look, the per-token measures once over its batches (see _evaluate)
            rows = take_windows(reference, chosen, per_window)
            return [self._marked(score_reads(LogitReads.cat(parts), rows), rows, chosen)]

        stats, scored = stop.run(score, reference)
        return stats, scored, stop

    def _evaluate_embeddings(
        self, patch: Patch, configs: list[Modification], reference: EmbeddingReference
    ) -> Result:
        decoding = [c.name for c in configs if c.name.startswith("decode.")]
        if patch.logits_processors or decoding:
            raise HemorrhageError(
                f"{(decoding or [configs[-1].name])[0]}: changes next-token decoding, which an "
                "encoder does not have; measure it on a causal LM"
            )
        metrics, stderr, nonfinite = embedding_metrics(reference, self.embed(), self.level)
        texts = len(reference.embeddings)
        return Result(
            **_naming(configs),
            metrics=metrics,
            stderr=stderr,
            baseline_ppl=math.nan,  # an encoder has no perplexity
            modified_ppl=math.nan,
            tokens=self.texts.tokens if self.texts is not None else 0,
            nonfinite=nonfinite,
            details={"kind": ENCODER, "texts": texts},
            configs=list(configs),
            level=self.level,
        )

    def _accept_reseated(self, reseated: dict[int, int]) -> None:
        """Version bumps that parametrize made, and nothing after it, leave every bit intact."""
        for name, t in self.model.state_dict(keep_vars=True).items():
            entry = self._pristine.get(name)
            if t.is_meta:  # offloaded: nothing to accept
                continue
            if entry and entry[0] == t.data_ptr() and reseated.get(t.data_ptr()) == t._version:
                self._pristine[name] = (entry[0], t._version, *entry[2:])

    def check_pristine(self) -> None:
        """Raise if the model's tensors or modules differ from the baseline's, after restoring
        the baseline's weights so that later measurements still see it.

        Two checks: storage, shape and version counter of every tensor (bumped by any in-place
        write through the tensor itself) and the identity of every module; then a checksum of
        every tensor's bits, which also catches writes that leave the version counter alone
        (through ``param.data`` or a ``.numpy()`` view). The checksum reads every weight once
        (about a millisecond for the bundled model); :meth:`modified` runs only the first check,
        the ``hemorrhage`` fixture runs both when its test ends.
        """
        self._check_versions()
        changed = self._baseline.changed(self.model)
        if changed:
            how = self._baseline.restore(self.model, self.settings)
            self._pristine.update(snapshot(self.model))  # the restore's own writes
            raise HemorrhageError(
                f"the baseline model's weights were changed in place ({named(changed)}) by a "
                f"write that bypasses version counters (through .data or a numpy view); {how}. "
                "Change the model only inside hemorrhage.modified(...)"
            )

    def _check_versions(self) -> None:
        """Cheap: storage, shape and version counter of every tensor, identity of every module;
        no weight is read. A changed tensor is restored (see :meth:`check_pristine`)."""
        now = snapshot(self.model)
        if now == self._pristine:
            return
        changed = [
            k for k in now.keys() | self._pristine.keys() if now.get(k) != self._pristine.get(k)
        ]
        modules = [k for k in changed if k.startswith("module ")]
        how = (
            "the model can no longer be restored"
            if modules
            else self._baseline.restore(self.model, self.settings)
        )
        if not modules:
            self._pristine.update(snapshot(self.model))
        raise HemorrhageError(
            f"the baseline model was changed in place ({named(changed)}); {how}. Change it only "
            "inside hemorrhage.modified(...) so that it can be restored for the next test"
        )


def _windows(
    loaded: LoadedModel, settings: Settings, portable: PortableReference | None
) -> Windows:
    """A causal LM's evaluation windows: a reference file's, else cut from the raw text or
    packed from the conversations of ``--hemorrhage-data`` (chat data; see
    :mod:`pytest_hemorrhage.chat`)."""
    chat = is_chat(settings.data)
    if portable is not None and not chat:
        return portable.eval_windows()
    if not chat:
        return make_windows(
            loaded.tokenizer,
            read_text(settings.data),
            seq_len=settings.seq_len,
            tokens=settings.tokens,
            source=settings.data,
        )
    if loaded.tokenizer is None:
        raise HemorrhageError(
            f"--hemorrhage-data={settings.data}: chat data is rendered with the baseline's "
            "chat template, and a reference file holds neither; pass --hemorrhage-model too"
        )
    windows = chat_windows(
        loaded.tokenizer,
        Path(settings.data),
        seq_len=settings.seq_len,
        tokens=settings.tokens,
        template=read_template(settings.chat_template),
    )
    if portable is not None:
        if not torch.equal(portable.windows, windows.eval):
            raise HemorrhageError(
                f"--hemorrhage-reference={portable.name}: its windows are not the ones "
                f"{settings.data} renders to with this chat template; save a reference from "
                "this data and template"
            )
        return dataclasses.replace(
            portable.eval_windows(),
            roles=windows.roles,
            markers=windows.markers,
            details=windows.details,
        )
    return windows


def _apply_offloaded(
    config: Modification,
    model: Any,
    patch: Patch,
    context: HarnessContext,
    offloaded: dict[int, str],
) -> None:
    """Apply ``config`` to a model with offloaded weights, or refuse it (naming the
    modification, the offloaded modules and why): weights held on the meta device between
    forward passes cannot be read or recomputed by a handler, and a parametrization or module
    swap on them would fight accelerate's hook. What does not touch them (decoding changes,
    KV cache, modules left on a device) works as on any model; restore stays exact."""
    from torch.nn.utils import parametrize

    def refuse(names: list[str], why: str) -> HemorrhageError:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        return HemorrhageError(
            f"{config.name}: refused: {why}, and accelerate offloaded {shown} to CPU memory or "
            "disk (--hemorrhage-device-map): offloaded weights are loaded anew for every "
            "forward pass, so a modification can neither read nor change them. Give the "
            "device map room for every weight on a device (no offload), or exclude the "
            "offloaded modules"
        )

    before = {id(m) for m in model.modules()}
    try:
        apply(config, model, patch, context)
    except HemorrhageError:
        raise
    except Exception as exc:
        why = f"it reads their weights ({type(exc).__name__}: {first_line(exc)})"
        raise refuse(list(offloaded.values()), why) from None
    touched = [
        name
        for name, m in model.named_modules()
        if (id(m) in offloaded and parametrize.is_parametrized(m))
        or (id(m) not in before and any(t.is_meta for t in _own_tensors(m)))
    ]
    if touched:
        raise refuse(touched, "it changes or rebuilds their weights")


def _own_tensors(module: Any) -> Iterator[torch.Tensor]:
    """A module's own parameters and buffers (a swapped-in int8 layer keeps its weight in one)."""
    yield from module.parameters(recurse=False)
    yield from module.buffers(recurse=False)


def _device(model: Any) -> torch.device:
    """Where ``model``'s weights live (its first parameter's device)."""
    return next(model.parameters()).device


def _vocab_size(model: Any, probe: torch.Tensor) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and hasattr(head, "weight"):
        return head.weight.shape[0]
    return model_logits(model, probe).shape[-1]  # plain modules: ask them


def _level(budget: Budget | None) -> float:
    """The level a measure for ``budget`` calibrates its standard errors at."""
    return (budget.confidence if budget is not None else None) or DEFAULT_LEVEL


def _naming(configs: Sequence[Modification]) -> dict[str, Any]:
    """A result's ``modification`` and ``params``: one stage's own, or every stage's."""
    if len(configs) == 1:
        return {"modification": configs[0].name, "params": configs[0].params()}
    return {
        "modification": "+".join(c.name for c in configs),
        "params": {"stages": [{"name": c.name, **c.params()} for c in configs]},
    }


def auto_batch(seq_len: int, vocab: int) -> int:
    """Windows per forward pass: large batches, fewer as windows x vocabulary grow.

    A transformers model's batch holds its hidden states, and its head runs over chunks of
    positions (:mod:`pytest_hemorrhage.forward`), so its logits are never whole; the bound is
    for the models whose head cannot be split off, whose batch's logits exist at once: they
    take at most a third of ~256 MB, the rest being room for a logits processor's output
    beside them and for the scoring's row blocks (``metrics.read_logits``). A processor that
    sorts the vocabulary (``decode.top_p``) takes a few more copies while it runs.
    """
    return max(1, min(64, (256 << 20) // (seq_len * vocab * 4 * 3)))


def _as_list(stages: Stages) -> list[Any]:
    if isinstance(stages, (str, Modification)):
        return [(stages, {})] if isinstance(stages, str) else [stages]
    return list(stages)
