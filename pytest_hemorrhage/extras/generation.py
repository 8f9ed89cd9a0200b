"""Generation divergence: continuations of prompts from the evaluation data, modified vs baseline.

Prompts are ``prompt_tokens``-token slices of the evaluation text, evenly spaced (deterministic);
with chat data, slices that end where a reply begins (after the template's generation prompt),
and each continuation is compared up to the baseline's end-of-turn (``reply_tokens``).
The baseline continues each greedily for ``new_tokens`` tokens, once per session (memoized).
The modified model continues the same prompts under the measured decoding (see
``modifications.decode``): greedy, or sampled with seeded noise, with the patch's logits
processors applied at every step. Two metrics, 0 for an identical model, each with its standard
error over prompts:

- ``gen_mismatch``: share of generated tokens that differ from the baseline's token at the same
  position.
- ``gen_first_divergence``: mean over prompts of ``1 - f / new_tokens``, ``f`` the first position
  where the continuations differ (``new_tokens`` when they never do): 0 when identical, 1 when
  the very first token differs.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..chat import reply_prompts
from ..loading import model_logits
from ..metrics import mean_se
from ..modifications.decode import Decoding, decoding_of

if TYPE_CHECKING:
    from ..modifications.registry import LogitsProcessor, Patch
    from . import HarnessView

__all__ = ["baseline_continuations", "generate", "generation_metrics", "prompts"]

_EXAMPLE_CHARS = 300


def _plan(harness: HarnessView) -> tuple[int, int, int]:
    """(prompts, prompt tokens, new tokens), from --hemorrhage-gen-* options."""
    s = harness.settings
    return s.gen_prompts, s.gen_prompt_tokens, s.gen_tokens


def prompts(harness: HarnessView, count: int, length: int) -> torch.Tensor:
    """``count`` prompts of ``length`` tokens, evenly spaced over the evaluation text (fewer
    when the text is too short); with chat data, each ending where a reply begins (see
    :func:`~pytest_hemorrhage.chat.reply_prompts`)."""
    if harness.windows.roles is not None:
        return reply_prompts(harness.windows, count, length)
    flat = harness.windows.eval.reshape(-1)
    count = max(1, min(count, flat.numel() // length))
    stride = flat.numel() // count
    return torch.stack([flat[i * stride : i * stride + length] for i in range(count)])


def generate(
    model: Any,
    prompt_ids: torch.Tensor,
    new_tokens: int,
    processors: Sequence[LogitsProcessor] = (),
    decoding: Decoding | None = None,
    batch_size: int = 16,
) -> torch.Tensor:
    """Continue every prompt (count, length) by ``new_tokens`` tokens.

    Args:
        model: a transformers causal LM (KV-cached steps) or a module returning logits
            (whole prefix recomputed each step).
        prompt_ids: prompts of equal length, on the model's device.
        new_tokens: tokens to generate per prompt; no early stop at end-of-sequence.
        processors: logits processors applied at every step, in order.
        decoding: greedy (default) or sampled; sampled tokens are
            ``argmax(processed logits + Gumbel noise)``, the noise of step t drawn on the CPU
            from ``seed`` and t for all prompts, so results reproduce on any device and batch size.
        batch_size: prompts per forward pass.

    Returns:
        The generated tokens, (count, new_tokens).
    """
    from torch.nn.utils import parametrize

    decoding = decoding or Decoding(sample=False, seed=0)
    noise = _Noise(decoding.seed, len(prompt_ids)) if decoding.sample else None
    parts = []
    # cached(): each parametrized weight is computed once per call, not once per step
    with torch.inference_mode(), parametrize.cached():
        for start in range(0, len(prompt_ids), batch_size):
            rows = slice(start, start + batch_size)
            parts.append(_continue(model, prompt_ids[rows], new_tokens, processors, noise, rows))
    return torch.cat(parts)


class _Noise:
    """Gumbel noise per (step, prompt), independent of batching; the same for every model."""

    def __init__(self, seed: int, count: int) -> None:
        self.seed, self.count = seed, count
        self._step: tuple[int, torch.Tensor] | None = None

    def __call__(self, step: int, rows: slice, vocab: int, device: torch.device) -> torch.Tensor:
        if self._step is None or self._step[0] != step or self._step[1].shape[-1] != vocab:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            u = torch.rand(self.count, vocab, generator=gen, dtype=torch.float64)
            gumbel = -(-u.clamp_min(1e-300).log()).log()
            self._step = (step, gumbel.float())
        return self._step[1][rows].to(device)


def _cache_argument(model: Any) -> tuple[str | None, dict[str, Any]]:
    """The keyword a transformers model takes its KV cache by (None: a plain module), and the
    keywords that make the prompt's forward compute the last position's logits only."""
    if not hasattr(model, "config"):
        return None, {}
    parameters = inspect.signature(model.forward).parameters
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
    return ("cache" if "cache" in parameters else "past_key_values"), last_only  # < 5.2x


def _continue(
    model: Any,
    ids: torch.Tensor,
    new_tokens: int,
    processors: Sequence[LogitsProcessor],
    noise: _Noise | None,
    rows: slice,
) -> torch.Tensor:
    argument, last_only = _cache_argument(model)
    if argument is not None:
        out = model(input_ids=ids, use_cache=True, **last_only)
        found = out.get("cache")
        cache = {argument: found if found is not None else out.get("past_key_values")}
        logits = out.logits[:, -1:]
    else:
        logits = model_logits(model, ids)[:, -1:]
    for step in range(new_tokens):
        logits = logits.float()
        for process in processors:
            logits = process(ids, logits)
        scores = logits[:, -1]
        if noise is not None:
            scores = scores + noise(step, rows, scores.shape[-1], scores.device)
        token = scores.argmax(-1, keepdim=True)
        ids = torch.cat([ids, token], 1)
        if step + 1 == new_tokens:
            break
        if argument is not None:
            logits = model(input_ids=token, use_cache=True, **cache).logits[:, -1:]
        else:
            logits = model_logits(model, ids)[:, -1:]
    return ids[:, -new_tokens:]


def _reply_lengths(base: torch.Tensor, markers: Sequence[int]) -> torch.Tensor:
    """Per baseline continuation, its tokens up to and including its first end-of-turn
    (``markers``; all of them when none comes)."""
    ends = torch.isin(base, torch.tensor(list(markers), dtype=base.dtype))
    return torch.where(ends.any(1), ends.int().argmax(1) + 1, base.shape[1])


def _baseline_key(harness: HarnessView) -> tuple[Any, ...]:
    return ("generation.baseline", *_plan(harness))


def baseline_continuations(harness: HarnessView) -> None:
    """The baseline's prompts and greedy continuations, computed once per harness."""
    key = _baseline_key(harness)
    if key not in harness.memo:
        count, length, new = _plan(harness)
        ids = prompts(harness, count, length).to(harness.device)
        harness.memo[key] = (
            ids,
            generate(harness.model, ids, new, batch_size=harness.batch_size).cpu(),
        )


def generation_metrics(
    harness: HarnessView, patch: Patch
) -> tuple[dict[str, float], dict[str, float | None], dict[str, Any]]:
    """Compare the modified model's continuations with the baseline's greedy ones."""
    key = _baseline_key(harness)
    if key not in harness.memo:  # the model is modified now: too late to compute it
        raise RuntimeError(
            "the baseline continuations were not computed before the stages were "
            "applied: Harness.measure must run the provider's baseline first"
        )
    ids, base = harness.memo[key]
    decoding = decoding_of(harness.context.applied, harness.settings.seed)
    new = base.shape[1]
    mod = generate(
        patch.model, ids, new, patch.logits_processors, decoding, batch_size=harness.batch_size
    ).cpu()
    # a reply (chat data) is compared up to the baseline's end-of-turn, the rest of a
    # continuation is the next turn, which no model was asked for; else every token
    length = (
        _reply_lengths(base, harness.windows.markers) if harness.windows.roles is not None else None
    )
    compared = torch.full((len(base),), new) if length is None else length
    within = torch.arange(new)[None, :] < compared[:, None]
    differ = (mod != base) & within
    # first differing position (the compared length when none differs)
    first = torch.where(differ.any(1), differ.int().argmax(1), compared)
    mismatch = differ.double().sum(1) / compared.double()
    divergence = 1 - first.double() / compared.double()
    metrics, stderr = {}, {}
    for name, per_prompt in (("gen_mismatch", mismatch), ("gen_first_divergence", divergence)):
        # the prompt is the sampling unit: its tokens' mismatches are one draw
        metrics[name], stderr[name] = mean_se(per_prompt, level=harness.level)
    worst = int(first.argmin())  # the earliest divergence makes the telling example

    def text(tokens: torch.Tensor) -> str:
        return harness.loaded.tokenizer.decode(tokens.tolist())[-_EXAMPLE_CHARS:]

    details = {
        "generation": {
            "prompts": len(ids),
            "prompt_tokens": ids.shape[1],
            "new_tokens": new,
            "decoding": str(decoding),
            "first_divergence": first.tolist(),
            **({} if length is None else {"reply_tokens": length.tolist()}),
            "example": {
                "prompt": text(ids[worst].cpu()),
                "baseline": text(base[worst]),
                "modified": text(mod[worst]),
            },
        }
    }
    return metrics, stderr, details
