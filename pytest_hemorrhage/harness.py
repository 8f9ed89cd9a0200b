"""The model under test: evaluation windows, baseline reference, and modified measurements."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch

from .data import make_windows, read_text
from .errors import HemorrhageError
from .extras import providers
from .loading import model_logits
from .metrics import Result, TokenStats, summarize, token_stats
from .modifications.registry import LogitsProcessor, Modification, Patch, apply, iter_configs
from .reference import EXACT_VOCAB, Reference, cache_key, load_or_compute

if TYPE_CHECKING:
    from .loading import LoadedModel
    from .settings import Settings

__all__ = ["Context", "Harness", "Stages"]

# What measure()/modified() accept: a name, a config, or a sequence of (name, params) / configs.
Stages = str | Modification | Sequence[Any]

class Context:
    """What a modification handler may use besides the model: data, seeds, a memo."""

    def __init__(self, harness: Harness) -> None:
        self._harness = harness
        self.tokenizer = harness.loaded.tokenizer
        self.device = harness.device
        self.seed = harness.settings.seed
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
        """The (possibly modified) model's logits for ``ids``."""
        return model_logits(self._harness.model, ids)


class Harness:
    """Measures modifications of one loaded baseline against its reference."""

    def __init__(self, loaded: LoadedModel, settings: Settings) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.settings = settings
        self.device = loaded.device
        self.memo: dict[Any, Any] = {}
        self.windows = make_windows(
            loaded.tokenizer,
            read_text(settings.data),
            seq_len=settings.seq_len,
            tokens=settings.tokens,
        )
        self.vocab = _vocab_size(self.model, self.windows.eval[:1, :2].to(self.device))
        self.batch_size = settings.batch_size or _auto_batch(settings.seq_len, self.vocab)
        self.topk = settings.topk or (self.vocab if self.vocab <= EXACT_VOCAB else 256)
        self.context = Context(self)
        self.reference_cached = False
        # shared by every harness of this model, so that one harness's restore is the others'
        self._pristine = _PRISTINE.setdefault(self.model, _snapshot(self.model))

    @cached_property
    def data_fingerprint(self) -> str:
        return cache_key(tuple(self.windows.eval.shape), self.windows.eval.numpy().tobytes())

    @cached_property
    def reference(self) -> Reference:
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

    def _compute_reference(self) -> Reference:
        parts = []
        for logits, targets in self.batches():
            logp = torch.log_softmax(logits.float(), -1).flatten(0, -2)
            parts.append(Reference.from_logprobs(logp.cpu(), targets.cpu(), self.topk))
        return Reference.cat(parts)

    def batches(
        self, processors: Sequence[LogitsProcessor] = (), windows: torch.Tensor | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Per batch of ``windows`` (default: the evaluation windows), after ``processors``:
        the logits of the scored positions, (windows, positions, vocab), a view of the model's
        output (not copied to flatten it), and their targets, flattened."""
        windows = self.windows.eval if windows is None else windows
        for i in range(0, len(windows), self.batch_size):
            ids = windows[i : i + self.batch_size].to(self.device)
            with torch.inference_mode():
                logits = model_logits(self.model, ids)[:, :-1]
                for process in processors:
                    logits = process(ids[:, :-1], logits)
            yield logits, ids[:, 1:].reshape(-1)

    @contextmanager
    def modified(self, stages: Stages) -> Iterator[Patch]:
        """Apply ``stages`` for the duration of the block; the baseline is restored exactly."""
        configs = list(iter_configs(_as_list(stages)))
        patch = Patch(self.model)
        self.context.applied = ()
        try:
            for config in configs:
                self._apply(config, patch)
            yield patch
        finally:
            patch.undo()
            self.model.eval()
            self._accept_reseated(patch.reseated)
            self.check_pristine()

    def measure(self, stages: Stages, want: frozenset[str] = frozenset()) -> Result:
        """Measure ``stages`` against the baseline.

        A composition is measured after every stage; ``Result.stages`` holds the cumulative
        measurements before the last stage, the result itself is the total. ``want`` names extra
        metrics (see ``metrics.EXTRA_METRICS``) to compute on the total too.
        """
        configs = list(iter_configs(_as_list(stages)))
        reference = self.reference
        extras = providers(want)
        for extra in extras:
            extra.baseline(self)
        results = []
        with self.modified([]) as patch:
            for i, config in enumerate(configs):
                self._apply(config, patch)
                results.append(self._evaluate(patch, configs[: i + 1], reference))
            for extra in extras:
                metrics, stderr, details = extra.compute(self, patch)
                results[-1].metrics.update(metrics)
                results[-1].stderr.update(stderr)
                results[-1].details.update(details)
        total = results[-1]
        total.stages = results[:-1]
        return total

    def _apply(self, config: Modification, patch: Patch) -> None:
        torch.manual_seed(self.settings.seed)  # handlers that draw (noise, faults) reproduce
        apply(config, self.model, patch, self.context)
        self.context.applied += (config,)

    def _evaluate(self, patch: Patch, configs: list[Modification], reference: Reference) -> Result:
        parts, row = [], 0
        for logits, targets in self.batches(patch.logits_processors):
            parts.append(token_stats(logits, reference.rows(row, row + len(targets))))
            row += len(targets)
        stats = TokenStats.cat(parts)
        metrics, stderr = summarize(stats, reference)
        return Result(
            modification="+".join(c.name for c in configs),
            params=configs[0].params()
            if len(configs) == 1
            else {"stages": [{"name": c.name, **c.params()} for c in configs]},
            metrics=metrics,
            stderr=stderr,
            baseline_ppl=reference.ppl,
            modified_ppl=math.exp(stats.nll.double().mean().item()),
            tokens=stats.nll.numel(),
            nonfinite=int((~stats.finite).sum()),
            configs=list(configs),
        )

    def _accept_reseated(self, reseated: dict[int, int]) -> None:
        """Version bumps that parametrize made, and nothing after it, leave every bit intact."""
        for name, t in self.model.state_dict(keep_vars=True).items():
            entry = self._pristine.get(name)
            if entry and entry[0] == t.data_ptr() and reseated.get(t.data_ptr()) == t._version:
                self._pristine[name] = (entry[0], t._version, *entry[2:])

    def check_pristine(self) -> None:
        """Raise if the model's tensors or modules differ from the baseline's.

        Cheap: compares storage, shape and version counter (bumped by any in-place write)
        of every tensor, and the identity of every module; no weight is read.
        """
        now = _snapshot(self.model)
        if now != self._pristine:
            changed = [
                k for k in now.keys() | self._pristine.keys() if now.get(k) != self._pristine.get(k)
            ][:3]
            names = ", ".join(map(str, changed))
            raise HemorrhageError(
                f"the baseline model was changed in place ({names}); change it only inside "
                "hemorrhage.modified(...) so that it can be restored for the next test"
            )


_PRISTINE: weakref.WeakKeyDictionary[Any, dict[str, tuple[Any, ...]]] = (
    weakref.WeakKeyDictionary()
)


def _snapshot(model: Any) -> dict[str, tuple[Any, ...]]:
    """Storage and version of every tensor, identity of every module."""
    tensors = {
        name: (t.data_ptr(), t._version, tuple(t.shape), t.dtype)
        for name, t in model.state_dict(keep_vars=True).items()
    }
    modules = {f"module {name or '<root>'}": (id(m),) for name, m in model.named_modules()}
    return tensors | modules


def _vocab_size(model: Any, probe: torch.Tensor) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and hasattr(head, "weight"):
        return head.weight.shape[0]
    return model_logits(model, probe).shape[-1]  # plain modules: ask them


def _auto_batch(seq_len: int, vocab: int) -> int:
    """Windows per forward pass: large batches, with logits kept under ~256 MB."""
    return max(1, min(64, (256 << 20) // (seq_len * vocab * 4 * 3)))


def _as_list(stages: Stages) -> list[Any]:
    if isinstance(stages, (str, Modification)):
        return [(stages, {})] if isinstance(stages, str) else [stages]
    return list(stages)
