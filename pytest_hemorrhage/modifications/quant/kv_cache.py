"""``quant.kv_cache``: transformers' quantized KV cache (KIVI-style, Liu et al. 2024).

A quantized cache leaves every weight alone and changes only what later tokens read: the keys
and values of earlier tokens, stored in ``bits`` bits by the ``backend`` (hqq or quanto)
through transformers' own ``QuantizedCache``. It acts on tokens that attend to *cached* keys,
so it is measured where it acts:

- **Scoring**: each evaluation window is fed in chunks of ``chunk`` tokens through one
  quantized cache, so the tokens of chunk k attend to the quantized keys and values of chunks
  0..k-1 (and to their own chunk's in full precision). The first chunk scores itself in full
  precision and is quantized as it is cached (transformers quantizes a prefill at once); of
  what is cached after it, the newest ``residual_length`` tokens stay in full precision, as in
  serving. With the default 64-token chunks and 128-token windows, half the scored tokens (63
  of 127) read a quantized cache of 64 tokens; ``chunk=32`` makes it 3/4, reading 32 to 96.
- **Generation**: the prompt's keys and values go into a quantized cache, and every generated
  token reads them (the generation metrics, ``gen_mismatch`` and ``gen_first_divergence``).

What the chunking costs, and why: the forward passes themselves cost about what one pass over
the window does; the time goes to quantizing. With ``residual_length=0`` transformers
re-quantizes the *whole* cache at every chunk (dequantize, append, quantize), and the hqq
backend runs HQQ's optimizer (up to 20 proximal iterations over every cached element) each
time. A window of n chunks of C tokens therefore quantizes C + 2C + ... + (n-1)C cached
positions per layer, keys and values: 64 at the default, 192 at ``chunk=32``, 448 at
``chunk=16``. The last chunk's re-quantization, which nothing reads, is skipped (the logits are
bit-identical). Measured on the bundled model (benchmarks/bench_kv_cache.py), a measure costs
about 2x a plain one at the default, and grows with the quantized volume at smaller chunks.

Sliding-window layers (Mistral, Gemma 2/3, GPT-OSS) are quantized too. transformers'
``QuantizedCache`` refuses such models because its layers keep every cached token where a
sliding layer keeps the last ``sliding_window``; but the model masks each sliding layer's
attention to its window whatever the cache holds, so a cache keeping everything computes the
same logits (at 8 bits, the whole-window reference's up to rounding:
``tests/test_architectures.py``), and the cache here is built from transformers' quantized
layers directly, one per attention layer. ``Result.details["kv_cache"]`` names the sliding-window
layers and their window. Other layer kinds (chunked or linear attention, shared caches) are
refused in one line naming them.

The model's ``forward`` is wrapped through the patch (undone exactly); a model whose forward
takes no transformers cache is refused.
"""

from __future__ import annotations

import functools
import inspect
import sys
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ...errors import HemorrhageError
from ..handler import Context
from ..registry import Modification, Patch, register_modification
from ..validate import check_choice, check_int

__all__ = ["KV_BACKENDS", "KVCache", "quantized_forward"]

KV_BACKENDS = {"hqq": "hqq", "quanto": "optimum-quanto"}  # backend -> the package it needs


@dataclass(frozen=True, kw_only=True)
class KVCache(Modification):
    """Keys and values of earlier tokens quantized in the KV cache.

    Args:
        bits: bits per cached key/value element: 2, 4 or 8.
        backend: ``"hqq"`` or ``"quanto"`` (transformers' QuantizedCache backends).
        residual_length: newest cached tokens kept in full precision before they are
            quantized (transformers' default is 128; 0 quantizes every cached token).
        group_size: elements sharing a scale, along the head dimension.
        chunk: tokens per forward pass when evaluation windows are scored through the cache
            (smaller: more tokens read the cache, at a quantizing cost growing about as the
            square of the number of chunks; see the module docstring).
    """

    changes: ClassVar[str] = "the KV cache"
    bits: int = 4
    backend: str = "hqq"
    residual_length: int = 0
    group_size: int = 64
    chunk: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self, "bits", (2, 4, 8))
        check_choice(self, "backend", tuple(KV_BACKENDS))
        check_int(self, "residual_length", 0)
        check_int(self, "group_size", 1)
        check_int(self, "chunk", 1)
        if self.include or self.exclude:
            raise HemorrhageError(
                f"{self.name}: include/exclude do not apply (the cache of every attention layer "
                "is quantized); drop them"
            )


def _cache_keyword(model: nn.Module) -> str:
    """The keyword the model's forward takes a transformers cache by; refuse it otherwise."""
    if hasattr(model, "config") and not (hasattr(model, "can_generate") and model.can_generate()):
        raise HemorrhageError(
            f"quant.kv_cache: {type(model).__name__} does not generate (an encoder), so no "
            "token ever reads a cached key; it applies to causal LMs only"
        )
    parameters = inspect.signature(model.forward).parameters
    for keyword in ("cache", "past_key_values"):  # transformers >= 5.2x renamed it
        if keyword in parameters and hasattr(model, "config"):
            return keyword
    raise HemorrhageError(
        f"quant.kv_cache: {type(model).__name__}'s forward takes no transformers cache "
        "(no cache / past_key_values argument), so its attention does not use transformers' "
        "cache classes; quantize its weights instead (e.g. quant.rtn)"
    )


_CACHED = ("full_attention", "sliding_attention")  # layer kinds a quantized layer stands in for


def _layer_kinds(model: nn.Module) -> tuple[list[str], list[dict[str, Any]]]:
    """Per decoder layer, its attention kind and cache arguments, as transformers reads them
    from the config (``QuantizedCache`` does the same)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    return get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))


def _check_layers(model: nn.Module) -> dict[str, Any]:
    """Refuse layer kinds a quantized cache layer cannot stand in for; else what
    ``Result.details["kv_cache"]`` reports: the layers, and which of them slide, over what."""
    kinds, kwargs = _layer_kinds(model)
    other = sorted({k for k in kinds if k not in _CACHED})
    if other:
        raise HemorrhageError(
            f"quant.kv_cache: {type(model).__name__} has {', '.join(other)} layers, whose "
            "caches transformers' quantized cache layers cannot stand in for (they hold full "
            "or sliding-window attention only); quantize its weights instead (e.g. quant.rtn)"
        )
    details: dict[str, Any] = {"layers": len(kinds)}
    sliding = [i for i, k in enumerate(kinds) if k == "sliding_attention"]
    if sliding:
        details["sliding_window_layers"] = sliding
        details["sliding_window"] = sorted({kwargs[i]["sliding_window"] for i in sliding})
    return details


def _new_cache(config: KVCache, model: nn.Module) -> Any:
    """transformers' quantized cache layers, one per attention layer, sliding ones included
    (see the module docstring: transformers' ``QuantizedCache`` would refuse those)."""
    from transformers.cache_utils import Cache, HQQQuantizedLayer, QuantoQuantizedLayer

    layer = HQQQuantizedLayer if config.backend == "hqq" else QuantoQuantizedLayer
    return Cache(
        layers=[
            layer(
                nbits=config.bits,
                q_group_size=config.group_size,
                residual_length=config.residual_length,
                axis_key=1,  # per channel of the head dimension, as KIVI quantizes keys
                axis_value=1,
            )
            for _ in _layer_kinds(model)[0]
        ]
    )


def _keep_last(cache: Any) -> None:
    """Before the last chunk: nothing reads what it caches, so let every layer keep it in its
    full-precision residual instead of quantizing the whole cache again. transformers builds
    the keys and values a chunk attends to before it decides whether to quantize, so the
    logits are bit-identical; the cost is not (with ``residual_length=0`` every chunk
    re-quantizes the whole cache, HQQ's optimizer iterating over all of it)."""
    for layer in getattr(cache, "layers", ()):
        if hasattr(layer, "residual_length"):
            layer.residual_length = sys.maxsize


def quantized_forward(config: KVCache, model: nn.Module) -> Any:
    """``model.forward`` with a quantized KV cache: whole sequences scored chunk by chunk
    through one cache; a generation prefill given a quantized cache to fill."""
    original = model.forward
    keyword = _cache_keyword(model)

    @functools.wraps(original)
    def forward(*args: Any, input_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if kwargs.get(keyword) is not None:  # a later generation step: the cache is ours
            return original(*args, input_ids=input_ids, **kwargs)
        if kwargs.get("use_cache"):  # a generation prefill: fill a quantized cache
            return original(
                *args, input_ids=input_ids, **kwargs, **{keyword: _new_cache(config, model)}
            )
        if input_ids is None:
            raise HemorrhageError("quant.kv_cache: the model was called without input_ids")
        kwargs.pop("use_cache", None)
        cache, parts = _new_cache(config, model), []
        starts = range(0, input_ids.shape[1], config.chunk)
        for start in starts:
            if start == starts[-1] and start:
                _keep_last(cache)
            out = original(
                input_ids=input_ids[:, start : start + config.chunk],
                use_cache=True,
                **kwargs,
                **{keyword: cache},
            )
            parts.append(out.logits)
        out.logits = torch.cat(parts, 1)
        return out

    return forward


@register_modification("quant.kv_cache", KVCache)
def kv_cache(config: KVCache, model: nn.Module, patch: Patch, context: Context) -> None:
    """Route the model's forward through a quantized KV cache (see the module docstring)."""
    _cache_keyword(model)
    details = _check_layers(model)
    backend = config.backend
    try:
        __import__("hqq" if backend == "hqq" else "optimum.quanto")
    except ImportError:
        raise HemorrhageError(
            f"quant.kv_cache: backend={backend!r} needs the {KV_BACKENDS[backend]} package, "
            f"which is not installed; pip install {KV_BACKENDS[backend]}, or use "
            "backend='hqq'"
        ) from None
    patch.details["kv_cache"] = details
    if "forward" in vars(model):  # already wrapped (e.g. twice in one composition)
        patch.setattr(model, "forward", quantized_forward(config, model))
        return
    model.forward = quantized_forward(config, model)  # an instance attribute shadows the method
    patch.on_undo(lambda: vars(model).pop("forward", None))
