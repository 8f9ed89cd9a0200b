"""``quant.kv_cache``: a quantized KV cache (KIVI-style, Liu et al. 2024), quantized incrementally.

A quantized cache leaves every weight alone and changes only what later tokens read: the keys
and values of earlier tokens, stored in ``bits`` bits by the ``backend`` (hqq or quanto). It
acts on tokens that attend to *cached* keys, so it is measured where it acts:

- **Scoring**: each evaluation window is scored as if fed in chunks of ``chunk`` tokens through
  one quantized cache: the tokens of chunk k attend to the quantized keys and values of chunks
  0..k-1 and to their own chunk's in full precision. Of what is cached, the newest
  ``residual_length`` tokens stay in full precision, as in serving. With the default 64-token
  chunks and 128-token windows, half the scored tokens (63 of 127) read a quantized cache of 64
  tokens; ``chunk=32`` makes it 3/4, reading 32 to 96.
- **Generation**: the prompt's keys and values go into a quantized cache, and every generated
  token reads them (the generation metrics, ``gen_mismatch`` and ``gen_first_divergence``).

**Incremental quantization.** Each token's keys and values are quantized once, when they
leave the full-precision residual window (at once with ``residual_length=0``), by the backend's
own quantizer (transformers' ``HQQQuantizedLayer._quantize``: HQQ's optimizer;
``QuantoQuantizedLayer._quantize``: quanto's min-max) applied to those entries only, and
dequantized once (the packed form is dropped: nothing here needs the memory it saves). A group
of ``group_size`` elements lies along one token's head vector (a group wider than the head is
cut to the head), so entries quantize alone and no group mixes tokens quantized at different
times. Both backends work this way; neither needs the whole cache. (optimum-quanto is not among
the test suite's packages: its path was checked by hand with optimum-quanto 0.2.7, where it
differs from transformers' quanto cache by 1.4e-5 in the logits at 4 bits, 32-token chunks,
against 1.55 from the unquantized model. transformers' quanto layer takes 2 or 4 bits and
groups along the last dimension with axis 0, HQQ's with axis 1.)

**One pass where the model allows, chunks elsewhere.** A model whose attention is
transformers' SDPA (its default) and none of whose layers reads another's cache scores a window
in one forward pass. For that pass, and only that pass, its attention is :func:`_attention`
(registered with transformers as ``"hemorrhage_kv_cache"``): a quantized layer's keys and
values are quantized once, then each chunk's queries attend, by SDPA under the window's own
mask cut to the chunk, to the earlier chunks' keys and values as quantized (the residual
window's as computed) and to their own chunk's. The chunks compute exactly that, since a
token's keys at every layer come from hidden states that attended the same way below; but the
rest of the model runs once per window, not once per chunk (the cost:
``benchmarks/bench_kv_cache.py``). A pass in which a quantized layer's attention did not come
through (its own attention code, a position bias) would have scored that layer unquantized: it
is scored again in chunks, and the model stays with chunks (``Result.details["kv_cache"]
["scoring"]`` says how windows were scored, and why not in one pass). Every other model is fed
in chunks through one cache of incremental layers: each chunk's forward pass reads the cache
the earlier ones filled, and the entries a chunk leaves are dequantized in place into the
float buffer the next chunk reads. The two group entries differently for the quantizer (one
pass: a layer's keys, then its values, of the whole batch; chunks: the entries of all layers a
chunk leaves, together), in blocks (see ``_BLOCK``), and HQQ's stopping rule is per block, so
they agree up to it: on the bundled model, kl_mean within 0.01%, logits within 1.5% of what
the cache moves them by (``tests/test_kv_cache.py``).

transformers' own ``QuantizedCache`` instead dequantizes, appends and re-quantizes the *whole*
cache at every chunk (residual_length=0), HQQ's optimizer over every cached element each time:
a cost growing as the square of the number of chunks, and entries quantized again and again.
The results are close but not equal: on the bundled model, 4 windows of 128 tokens in 32-token
chunks, both with 32-element per-token groups (``tests/test_kv_cache.py`` checks it), the
largest logit difference between the two caches is 1.9e-4 at 8 bits, where either differs from
the unquantized model by 0.057 (kl_mean 2.858e-6 here, 2.860e-6 there), and 0.011 at 4 bits
(0.018 in chunks) against 1.21. The cost against a plain measure, at the default window and at
long ones: ``benchmarks/bench_kv_cache.py``.

**Layer kinds.** Full-attention and sliding-window layers (Mistral, Gemma 2/3, GPT-OSS) get a
quantized layer. A sliding layer's quantized cache keeps every token where transformers'
sliding layer keeps the last ``sliding_window``, but the model masks each sliding layer's
attention to its window whatever the cache holds, so it computes the same logits (at 8 bits,
the whole-window reference's up to rounding: ``tests/test_architectures.py``). Every other
kind keeps transformers' own unquantized layer, and the measure goes on with the layers that
are quantized: chunked attention (Llama 4: its layer keeps only the current attention chunk,
and a quantized layer keeping every token is not proven to mask the same), linear-attention
and state-space layers (no per-token keys and values, a recurrent state), hybrid
linear-plus-attention layers, and layers that read another layer's cache (shared KV, as in
Gemma 3n/4) or have no attention. ``Result.details["kv_cache"]`` names the quantized layers,
the sliding ones and their window, and every unquantized layer with its kind and why; a model
with no quantizable layer is refused in one line.

The model's ``forward`` is wrapped through the patch (undone exactly); a model whose forward
takes no transformers cache is refused. The wrapper owns ``input_ids``, ``use_cache`` and the
cache keyword; ``labels`` are refused (chunks' losses are not the sequence's). In one pass,
every other keyword reaches the forward pass as given. In chunks, each reaches each chunk's
forward, per-position ones cut to the chunk (``attention_mask`` to the positions so far,
``position_ids``, and ``logits_to_keep`` to the kept positions inside the chunk, at least one),
the rest as given (``output_hidden_states``: the chunks' hidden states come back joined). So a
forward hook on ``model.base_model`` sees the window's hidden states, at once or chunk by
chunk, and ``logits_to_keep=1`` returns the sequence's last logits.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ...errors import HemorrhageError
from ..handler import Context
from ..registry import Modification, Patch, register_modification
from ..validate import check_choice, check_int

__all__ = ["KV_BACKENDS", "KVCache", "quantized_forward"]

KV_BACKENDS = {"hqq": "hqq", "quanto": "optimum-quanto"}  # backend -> the package it needs
_BITS = {"hqq": (2, 4, 8), "quanto": (2, 4)}  # what each backend's quantized layer takes


@dataclass(frozen=True, kw_only=True)
class KVCache(Modification):
    """Keys and values of earlier tokens quantized in the KV cache.

    Args:
        bits: bits per cached key/value element: 2, 4 or 8 (quanto: 2 or 4).
        backend: ``"hqq"`` or ``"quanto"`` (the quantizers of transformers' QuantizedCache).
        residual_length: newest cached tokens kept in full precision; each older token is
            quantized once, as it leaves them (0 quantizes every token as it is cached).
        group_size: elements sharing a scale, along one token's head dimension (cut to the
            head's width when wider).
        chunk: tokens per forward pass when evaluation windows are scored through the cache
            (smaller: more tokens read the cache; see the module docstring).
    """

    changes: ClassVar[str] = "the KV cache"
    bits: int = 4
    backend: str = "hqq"
    residual_length: int = 0
    group_size: int = 64
    chunk: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self, "backend", tuple(KV_BACKENDS))
        check_choice(self, "bits", _BITS[self.backend])
        check_int(self, "residual_length", 0)
        check_int(self, "group_size", 1)
        check_int(self, "chunk", 1)
        if self.include or self.exclude:
            raise HemorrhageError(
                f"{self.name}: include/exclude do not apply (every full and sliding attention "
                "layer's cache is quantized); drop them"
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
# why each other kind keeps transformers' unquantized layer (see the module docstring)
_UNQUANTIZED = {
    "chunked_attention": "chunked attention: its layer keeps only the current attention chunk",
    "linear_attention": "linear attention: a recurrent state, no per-token keys and values",
    "conv": "a convolution state, no per-token keys and values",
    "hybrid": "linear attention beside attention: a recurrent state in the same layer",
    "hybrid_sliding": "linear attention beside attention: a recurrent state in the same layer",
    "dummy": "reads another layer's cache (shared KV, quantized if that one is) or has no "
    "attention",
}


def _layer_kinds(model: nn.Module) -> tuple[list[str], list[dict[str, Any]]]:
    """Per decoder layer, its cache kind and arguments, as transformers reads them from the
    config (its ``DynamicCache`` and ``QuantizedCache`` do the same)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    return get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))


def _plan(model: nn.Module) -> dict[str, Any]:
    """What ``Result.details["kv_cache"]`` reports: which layers are quantized, which slide
    (over what), and which keep an unquantized layer (their kind, and why); refuse a model
    with no layer to quantize."""
    from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING

    kinds, kwargs = _layer_kinds(model)
    unknown = sorted(set(kinds) - set(DYNAMIC_LAYER_TYPE_MAPPING))
    if unknown:
        raise HemorrhageError(
            f"quant.kv_cache: {type(model).__name__} has {', '.join(unknown)} layers, for which "
            "transformers has no cache layer; quantize its weights instead (e.g. quant.rtn)"
        )
    quantized = [i for i, k in enumerate(kinds) if k in _CACHED]
    if not quantized:
        raise HemorrhageError(
            f"quant.kv_cache: {type(model).__name__} has no attention layer whose cache can be "
            f"quantized (its layers: {', '.join(sorted(set(kinds)))}); quantize its weights "
            "instead (e.g. quant.rtn)"
        )
    details: dict[str, Any] = {"layers": len(kinds), "quantized_layers": quantized}
    sliding = [i for i in quantized if kinds[i] == "sliding_attention"]
    if sliding:
        details["sliding_window_layers"] = sliding
        details["sliding_window"] = sorted({kwargs[i]["sliding_window"] for i in sliding})
    unquantized = [
        {
            "layers": [i for i, k in enumerate(kinds) if k == kind],
            "kind": kind,
            "why": _UNQUANTIZED.get(kind, "no quantized layer stands in for this kind"),
        }
        for kind in sorted(set(kinds) - set(_CACHED))
    ]
    if unquantized:
        details["unquantized"] = unquantized
    return details


class _Incremental:
    """What both backends' layers share, mixed in before transformers' ``HQQQuantizedLayer`` /
    ``QuantoQuantizedLayer`` (whose ``_quantize`` and ``_dequantize`` quantize here): an
    ``update`` that appends each chunk's keys and values to a buffer of floats and returns
    them with everything before, and entries that left the residual window quantized and
    dequantized once, in place, before anything reads the cache again (see the module
    docstring). Quantizing before the next read, not at once, reads the same values and lets
    :func:`_quantize_pending` quantize the entries of every layer together."""

    axis: int  # the axis that makes the backend's groups runs of a 2-D tensor's rows
    capacity = 0  # tokens to allocate at once, when known

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.buffers = [
            s.new_empty((*s.shape[:-2], 0, s.shape[-1])) for s in (key_states, value_states)
        ]
        self.done = 0  # the first ``done`` tokens hold their dequantized values
        self.quantized_elements = 0  # entries handed to the quantizer (tests count them)

    def pending(self) -> int:
        """Tokens that left the residual window, not yet quantized."""
        return max(0, self.cumulative_length - self.done - self.residual_length)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        _quantize_pending([self])  # a generation step: nothing quantized it since the last
        held, new = self.cumulative_length, key_states.shape[-2]
        if held + new > self.buffers[0].shape[-2]:
            # a scored window's length is known (``capacity``): one buffer, never copied; a
            # generation's grows by doubling, so appends copy nothing on average
            size = self.capacity if held + new <= self.capacity else 2 * (held + new)
            grown = []
            for buffer in self.buffers:
                shape = (*buffer.shape[:-2], size, buffer.shape[-1])
                bigger = buffer.new_empty(shape)
                bigger[..., :held, :] = buffer[..., :held, :]
                grown.append(bigger)
            self.buffers = grown
        for buffer, states in zip(self.buffers, (key_states, value_states), strict=True):
            buffer[..., held : held + new, :] = states
        self.cumulative_length = held + new
        self.keys, self.values = (b[..., : held + new, :] for b in self.buffers)
        return self.keys, self.values

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            beam_idx = beam_idx.to(self.keys.device)
            self.buffers = [b.index_select(0, beam_idx) for b in self.buffers]
            self.keys, self.values = (b[..., : self.cumulative_length, :] for b in self.buffers)


# Elements per quantizer call. HQQ's optimizer makes up to 20 passes over what it is given: a
# chunk's entries of one layer are mostly per-call overhead, and the entries of a whole batch
# of windows overflow the CPU's caches (2M elements took 5x the time of 2^17-element blocks on
# this machine; 2^15 to 2^18 were alike).
_BLOCK = 1 << 17


def _quantize_pending(layers: Any) -> None:
    """Quantize and dequantize, in place, the entries that left the residual window of every
    incremental layer among ``layers``: keys and values of all of them as rows of one matrix
    per group width, quantized in blocks of ``_BLOCK`` elements (HQQ's stopping rule, the mean
    error, is then per block). A group is ``group_size`` elements of one token's head vector,
    cut to the head's width."""
    parts: dict[int, list[tuple[Any, torch.Tensor]]] = {}
    for layer in layers:
        if not isinstance(layer, _Incremental) or not layer.is_initialized:
            continue
        count = layer.pending()
        if not count:
            continue
        for buffer in layer.buffers:
            entries = buffer[..., layer.done : layer.done + count, :]
            group = _group(layer.q_group_size, entries.shape[-1])
            parts.setdefault(group, []).append((layer, entries))
            layer.quantized_elements += entries.numel()
        layer.done += count
    for group, entries in parts.items():
        rows = _round_trip(entries[0][0], torch.cat([e.reshape(-1, group) for _, e in entries]))
        at = 0
        for _, e in entries:
            e.copy_(rows[at : at + e.numel() // group].reshape(e.shape))
            at += e.numel() // group


def _group(group_size: int, width: int) -> int:
    """Elements per group along a head vector of ``width``: ``group_size``, cut to the head."""
    group = min(group_size, width)
    if width % group:
        raise HemorrhageError(
            f"quant.kv_cache: group_size={group} does not divide the head dimension "
            f"({width}); choose a divisor of it"
        )
    return group


def _round_trip(layer: Any, rows: torch.Tensor) -> torch.Tensor:
    """``rows`` (one group each) quantized and dequantized by ``layer``'s backend, in blocks
    of ``_BLOCK`` elements."""
    group = rows.shape[-1]
    block = max(1, _BLOCK // group)
    saved, layer.q_group_size = layer.q_group_size, group
    try:
        return torch.cat(
            [
                layer._dequantize(layer._quantize(rows[i : i + block], axis=layer.axis))
                for i in range(0, len(rows), block)
            ]
        )
    finally:
        layer.q_group_size = saved


@functools.cache
def _layer_class(backend: str) -> type:
    """The incremental layer of ``backend`` (classes built here: transformers imports lazily)."""
    from transformers.cache_utils import HQQQuantizedLayer, QuantoQuantizedLayer

    if backend == "hqq":
        # HQQ groups runs of the last dimension with axis=1 (it reshapes to (-1, group))
        return type("HQQIncrementalLayer", (_Incremental, HQQQuantizedLayer), {"axis": 1})
    # quanto groups runs of the last dimension with axis=0 (``optimum.quanto``'s ``group``)
    return type("QuantoIncrementalLayer", (_Incremental, QuantoQuantizedLayer), {"axis": 0})


def _quantized_layer(config: KVCache) -> Any:
    """An empty incremental layer of ``config``'s backend."""
    layer = _layer_class(config.backend)
    return layer(
        nbits=config.bits,
        q_group_size=config.group_size,
        residual_length=config.residual_length,
        axis_key=layer.axis,
        axis_value=layer.axis,
    )


def _new_cache(config: KVCache, model: nn.Module) -> Any:
    """A cache of incremental quantized layers for the full and sliding attention layers, and
    transformers' own layer for every other kind (see the module docstring)."""
    from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache

    kinds, kwargs = _layer_kinds(model)
    return Cache(
        layers=[
            _quantized_layer(config) if kind in _CACHED else DYNAMIC_LAYER_TYPE_MAPPING[kind](**kw)
            for kind, kw in zip(kinds, kwargs, strict=True)
        ]
    )


# The attention implementation's name while a window is scored in one pass (registered with
# transformers for that forward pass only).
_ATTENTION = "hemorrhage_kv_cache"


class _NotOnePass(Exception):
    """The model's attention took a path the one-pass scoring does not cover."""


@dataclass
class _Pass:
    """One forward pass scoring windows in one pass: the quantizer (an incremental layer of the
    backend, for its ``_quantize``/``_dequantize``), the layers to quantize, those whose
    attention came through (none may be missed), and the causal pattern per window length."""

    config: KVCache
    quantizer: Any
    quantized: frozenset[int]
    seen: set[int] = field(default_factory=set)
    patterns: dict[tuple[Any, int], torch.Tensor] = field(default_factory=dict)

    def causal(self, start: int, stop: int, length: int, device: Any) -> torch.Tensor:
        """The chunk ``start:stop``'s causal mask over keys ``0:stop``, a view of one pattern
        per window: row i of the pattern lets key j through while j <= length + i, so the
        columns from ``length - start`` let the chunk's row i see keys 0..start + i."""
        pattern = self.patterns.get((device, length))
        if pattern is None:
            chunk = self.config.chunk
            pattern = torch.ones(chunk, length + chunk, dtype=torch.bool, device=device)
            self.patterns[device, length] = pattern = pattern.tril(length)
        return pattern[: stop - start, length - start : length - start + stop]

    def round_trip(self, states: torch.Tensor, count: int) -> torch.Tensor:
        """The first ``count`` positions of ``states`` quantized and dequantized."""
        entries = states[..., :count, :]
        if not count:
            return entries
        if not self.quantizer.is_initialized:  # HQQ reads its device and dtype off the layer
            self.quantizer.lazy_initialization(entries[..., :0, :], entries[..., :0, :])
        group = _group(self.config.group_size, entries.shape[-1])
        return _round_trip(self.quantizer, entries.reshape(-1, group)).reshape(entries.shape)


def _attention(
    run: _Pass,
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, over a whole window, as if it were fed in chunks through
    the quantized cache: the queries of each chunk attend to the keys and values of earlier
    chunks quantized (but the residual window's) and to their own chunk's in full precision.
    Each key and value is quantized once (see the module docstring); a layer that is not
    quantized gets transformers' own SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layer = getattr(module, "layer_idx", None)
    if layer not in run.quantized:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    length = key.shape[-2]
    if kwargs.get("position_bias") is not None:
        raise _NotOnePass(f"layer {layer}'s attention takes a position bias")
    if query.shape[-2] != length:
        raise _NotOnePass(f"layer {layer} attends to other keys than its window's")
    run.seen.add(layer)
    chunk, residual = run.config.chunk, run.config.residual_length
    read = max(0, (length - 1) // chunk * chunk - residual)  # positions read quantized
    quantized = [run.round_trip(states, read) for states in (key, value)]
    keys, values = key.clone(), value.clone()  # each chunk reads a mix of the two
    out = query.new_empty((*query.shape[:-1], value.shape[-1]))
    done = 0
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        reads = max(0, start - residual)  # this chunk reads positions 0:reads quantized
        for mixed, rounded in zip((keys, values), quantized, strict=True):
            mixed[..., done:reads, :] = rounded[..., done:reads, :]
        done = reads
        if attention_mask is None:  # transformers left a causal window to the kernel
            mask = run.causal(start, stop, length, query.device)
        else:  # padding or a sliding window: the window's own mask, cut to the chunk
            mask = attention_mask[..., start:stop, :stop]
        out[..., start:stop, :] = torch.nn.functional.scaled_dot_product_attention(
            query[..., start:stop, :],
            keys[..., :stop, :],
            values[..., :stop, :],
            attn_mask=mask,
            dropout_p=dropout,
            scale=scaling,
            enable_gqa=query.shape[1] != key.shape[1],
        )
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def _attending(text_config: Any, run: _Pass) -> Iterator[None]:
    """The model's attention is :func:`_attention` bound to ``run``, with SDPA's masks, for the
    duration of one forward pass; transformers' registries and the config as they were after."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    functions, masks = AttentionInterface._global_mapping, AttentionMaskInterface._global_mapping
    functions[_ATTENTION] = functools.partial(_attention, run)
    masks[_ATTENTION] = masks["sdpa"]
    saved = text_config._attn_implementation_internal
    text_config._attn_implementation_internal = _ATTENTION
    try:
        yield
    finally:
        text_config._attn_implementation_internal = saved
        del functions[_ATTENTION], masks[_ATTENTION]


def _one_pass_layers(model: nn.Module) -> tuple[frozenset[int] | None, str]:
    """The layers a window scored in one pass quantizes, and how windows are scored; None
    where they cannot be: attention other than SDPA, or layers reading another layer's cache
    (they would read the full-precision states of their source, not its quantized cache)."""
    text = model.config.get_text_config(decoder=True)
    kinds, _ = _layer_kinds(model)
    attention = getattr(text, "_attn_implementation", None)
    if attention != "sdpa":
        return None, f"in chunks through the cache: {attention} attention (one pass takes SDPA)"
    shared = [i for i, kind in enumerate(kinds) if kind == "dummy"]
    if shared:
        return None, (
            f"in chunks through the cache: layers {_listed(shared)} read another layer's cache "
            "or have no attention"
        )
    return frozenset(i for i, kind in enumerate(kinds) if kind in _CACHED), "in one pass"


def _listed(layers: Any) -> str:
    return ", ".join(map(str, sorted(layers)))


def _chunk_keep(keep: Any, start: int, stop: int, length: int) -> tuple[Any, int | None]:
    """What ``logits_to_keep`` asks of the chunk ``start:stop`` of a sequence of ``length``: the
    value to pass it, and how many of its last logits to keep (None: all it returns)."""
    if isinstance(keep, torch.Tensor):  # positions of the whole sequence
        inside = keep[(keep >= start) & (keep < stop)]
        return inside - start, None
    if not keep:  # 0 or None: every position
        return keep, None
    wanted = max(0, stop - max(start, length - keep))
    # a chunk wanting none still computes one logit: 0 would mean all of them
    return max(1, wanted), wanted


def quantized_forward(
    config: KVCache, model: nn.Module, details: dict[str, Any] | None = None
) -> Any:
    """``model.forward`` with a quantized KV cache: whole sequences scored in one pass where
    the model allows, else chunk by chunk through one cache (see the module docstring), how
    written to ``details["scoring"]``; a generation prefill given a quantized cache to fill."""
    original = model.forward
    keyword = _cache_keyword(model)
    details = {} if details is None else details
    one_pass, details["scoring"] = _one_pass_layers(model)
    layers = [one_pass]  # None once the model turned out not to allow it

    @functools.wraps(original)
    def forward(*args: Any, input_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if kwargs.get(keyword) is not None:  # a later generation step: the cache is ours
            return original(*args, input_ids=input_ids, **kwargs)
        if kwargs.get("use_cache"):  # a generation prefill: fill a quantized cache
            return original(
                *args, input_ids=input_ids, **kwargs, **{keyword: _new_cache(config, model)}
            )
        if input_ids is None or args:
            raise HemorrhageError(
                "quant.kv_cache: the model was called without input_ids as a keyword"
            )
        if kwargs.get("labels") is not None:
            raise HemorrhageError(
                "quant.kv_cache: labels are not split over chunks; compute the loss from the logits"
            )
        kwargs.pop(keyword, None)
        kwargs.pop("use_cache", None)
        if layers[0] is not None:
            run = _Pass(config, _quantized_layer(config), layers[0])
            try:
                with _attending(model.config.get_text_config(decoder=True), run):
                    out = original(input_ids=input_ids, use_cache=False, **kwargs)
                missed = run.quantized - run.seen
                if not missed:
                    return out
                why = f"the attention of layers {_listed(missed)} did not come through it"
            except _NotOnePass as error:
                why = str(error)
            # that layer would have been scored unquantized: chunks, from now on
            layers[0] = None
            details["scoring"] = f"in chunks through the cache: one pass failed ({why})"
        return _chunked(original, config, model, keyword, input_ids, kwargs)

    return forward


def _chunked(
    original: Any,
    config: KVCache,
    model: nn.Module,
    keyword: str,
    input_ids: torch.Tensor,
    kwargs: dict[str, Any],
) -> Any:
    """The model's output for ``input_ids`` fed in chunks through one quantized cache, every
    keyword in ``kwargs`` passed to each chunk (per-position ones cut to it)."""
    keep = kwargs.pop("logits_to_keep", None)
    mask = kwargs.pop("attention_mask", None)
    positions = kwargs.pop("position_ids", None)
    length = input_ids.shape[1]
    cache, logits, hidden = _new_cache(config, model), [], []
    for layer in cache.layers:
        if isinstance(layer, _Incremental):
            layer.capacity = length
    for start in range(0, length, config.chunk):
        stop = min(start + config.chunk, length)
        chunk = dict(kwargs)
        if keep is not None:
            chunk["logits_to_keep"], wanted = _chunk_keep(keep, start, stop, length)
        else:
            wanted = None
        if mask is not None:  # a padding mask covers the cache and the chunk
            chunk["attention_mask"] = mask[..., :stop]
        if positions is not None:
            chunk["position_ids"] = positions[..., start:stop]
        out = original(
            input_ids=input_ids[:, start:stop], use_cache=True, **chunk, **{keyword: cache}
        )
        if stop < length:  # what this chunk left the residual, before the next reads it
            _quantize_pending(cache.layers)
        part = out.logits
        logits.append(part if wanted is None else part[:, part.shape[1] - wanted :])
        if getattr(out, "hidden_states", None) is not None:
            hidden.append(out.hidden_states)
    out.logits = torch.cat(logits, 1)
    if hidden:
        out.hidden_states = tuple(torch.cat(layer, 1) for layer in zip(*hidden, strict=True))
    return out


@register_modification("quant.kv_cache", KVCache)
def kv_cache(config: KVCache, model: nn.Module, patch: Patch, context: Context) -> None:
    """Route the model's forward through a quantized KV cache (see the module docstring)."""
    _cache_keyword(model)
    details = _plan(model)
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
    forward = quantized_forward(config, model, details)  # it reports how windows are scored
    if "forward" in vars(model):  # already wrapped (e.g. twice in one composition)
        patch.setattr(model, "forward", forward)
        return
    model.forward = forward  # an instance attribute shadows the method
    patch.on_undo(lambda: vars(model).pop("forward", None))
