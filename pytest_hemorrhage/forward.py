"""A causal LM's forward pass in two halves, so that a window's logits never exist whole.

At 16,384 tokens and a 128k vocabulary, the logits of one window are 8.4 GB of float32; the
hidden states they come from are 32 MB at a width of 512. So the body runs once per batch of
windows and leaves its last hidden states (a forward hook on its decoder, with
``logits_to_keep=1`` so that the model's own head computes one position), and the head then
runs over chunks of positions (:func:`head_chunks`), each chunk's logits scored and dropped
before the next: the extra memory of a measure is one chunk, whatever the window.

The head is the output embeddings (``get_output_embeddings()``, as modified now: a quantized
or swapped module, its hooks included) and what transformers applies after them: Gemma's
``final_logit_softcapping``, Granite's ``logits_scaling``, Cohere's ``logit_scale``. Every
pass checks it against the model: the head of the last position must equal, bit for bit,
the logits the model itself returned for it. A model whose head does something else (custom
code, an unlisted transform), that takes no ``logits_to_keep``, or that is not a transformers
model at all (a plain module, llama.cpp) gets its whole logits from one forward pass, as
before: the same values, with the memory of a whole batch of logits.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["HEAD_CHUNK_BYTES", "Split", "chunk_rows", "head_chunks", "split_forward"]

# Bytes of float32 logits per head chunk: 256 MB is 512 positions of a 128k vocabulary. The
# head's matrix product is what a long window costs, and it runs slower in small chunks (at a
# width of 512: 130 rows 1.47x, 256 rows 1.21x, 512 rows 1.05x the time of 1,024-row chunks).
# Short windows of a small vocabulary fit whole batches in one chunk, as one forward pass did.
HEAD_CHUNK_BYTES = 256 << 20


@dataclass(frozen=True)
class Split:
    """One batch's last hidden states (windows, positions, width) and the head mapping hidden
    states to logits."""

    hidden: torch.Tensor
    head: Callable[[torch.Tensor], torch.Tensor]


def chunk_rows(vocab: int) -> int:
    """Positions per head chunk for a vocabulary of ``vocab`` tokens."""
    return max(1, HEAD_CHUNK_BYTES // (4 * vocab))


def head_chunks(windows: int, positions: int, rows: int) -> Iterator[tuple[slice, slice]]:
    """(windows, positions) slices covering ``windows`` x ``positions`` in row-major order,
    each at most ``rows`` tokens: whole windows together while a window fits, else one
    window's positions in runs of ``rows``. Row-major, so that each chunk's tokens are
    consecutive rows of the reference."""
    if positions <= rows:
        step = rows // positions
        for w in range(0, windows, step):
            yield slice(w, min(w + step, windows)), slice(0, positions)
        return
    for w in range(windows):
        for p in range(0, positions, rows):
            yield slice(w, w + 1), slice(p, min(p + rows, positions))


def split_forward(model: Any, ids: torch.Tensor) -> Split | None:
    """Run ``model``'s body on ``ids``; its last hidden states and head, checked against the
    model's own logits of the last position; None where the head cannot be split off (see
    the module docstring), the forward pass not run."""
    head_module = _head_module(model)
    if head_module is None or model in _UNSPLIT:
        return None
    captured: list[torch.Tensor] = []

    def keep(module: Any, args: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    # a model scoring its window in pieces (quant.kv_cache) calls its body once per piece
    handle = _body(model).register_forward_hook(keep)
    try:
        out = model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    if not captured:  # the body module was not called by that name
        return None
    hidden = torch.cat(captured, 1) if len(captured) > 1 else captured[0]

    def head(states: torch.Tensor) -> torch.Tensor:
        return _after_head(model, head_module(states))

    own, mine = out.logits[:, -1], head(hidden[:, -1:])[:, 0]
    # bit for bit, NaN where NaN: a modification that overflows (fault.bitflip) says nothing
    # of the head, and remembering the model would cost it the split for good
    if hidden.shape[:2] != ids.shape or not ((mine == own) | mine.isnan() & own.isnan()).all():
        _UNSPLIT.add(model)  # not tried again: its later batches run one forward pass, not two
        return None
    return Split(hidden, head)


# Models whose head failed the check: whole logits from then on (what a modification may
# change later can only make the check pass, and whole logits are right either way).
_UNSPLIT: weakref.WeakSet[Any] = weakref.WeakSet()


def _body(model: Any) -> Any:
    """The module whose output is the head's input: the decoder (OPT calls its decoder
    directly, not its base model)."""
    get = getattr(model, "get_decoder", None)
    return get() if get is not None else model.base_model


def _head_module(model: Any) -> Any:
    """The output embeddings of a transformers causal LM whose forward takes
    ``logits_to_keep`` and whose body is a module of its own; else None."""
    get = getattr(model, "get_output_embeddings", None)
    base = getattr(model, "base_model", None)
    if get is None or base is None or base is model or not hasattr(model, "config"):
        return None
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return None
    return get()


def _after_head(model: Any, logits: torch.Tensor) -> torch.Tensor:
    """What transformers' causal LMs apply to the head's output (see the module docstring)."""
    config = model.config.get_text_config()
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    divisor = getattr(config, "logits_scaling", None)
    if divisor is not None:
        logits = logits / divisor
    scale = getattr(model, "logit_scale", None)
    if isinstance(scale, (int, float)):
        logits = logits * scale
    return logits
