"""Compact calibration results: weights' masks and codes as bits, every layer's state as views
of one flat buffer per dtype, kept in the session memo and on disk under a content hash.

GPTQ keeps integer codes bit-packed with a scale and zero point per group; SparseGPT its
surviving weights with a one-bit mask; AWQ its scales. Each is computed once per model,
calibration data, earlier stages and config: kept in the session memo (the last few configs)
and on disk when the context has a ``cache_dir``, so a second pytest run applies without
calibrating.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..reference import cache_key, cached
from .handler import Context
from .registry import Modification

__all__ = [
    "FORMAT",
    "Arena",
    "Layout",
    "States",
    "calibrated",
    "expert_tokens",
    "pack_bits",
    "pack_states",
    "unpack_bits",
    "unpack_states",
]

FORMAT = 3  # bump when the stored state changes (3: flat buffers per dtype plus an index)
_RECENT = 4  # configs whose results the session memo keeps (a sweep's neighbours)
_BITS = 8


def pack_bits(keep: torch.Tensor) -> torch.Tensor:
    """A bool (out, in) mask as uint8 (out, ceil(in / 8)): one bit per weight."""
    pad = -keep.shape[1] % _BITS
    bits = nn.functional.pad(keep, (0, pad)).view(keep.shape[0], -1, _BITS).to(torch.uint8)
    shifts = torch.arange(_BITS, dtype=torch.uint8, device=keep.device)
    return (bits << shifts).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, columns: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: the bool (out, columns) mask."""
    shifts = torch.arange(_BITS, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 1).bool().view(packed.shape[0], -1)[:, :columns]


States = dict[str, Any]  # {layer: tensor} or {layer: {key: tensor}}
Layout = dict[str, dict[str, tuple[tuple[int, ...], torch.dtype]]]


class Arena:
    """Every layer's state as views of one flat buffer per dtype.

    The solves write their results straight into these views (no copy of the whole state at
    the end, so the state is in memory once), and the disk cache stores the buffers and an
    index: loading an entry is a few large reads instead of unpickling a small tensor per layer
    and key (torch's weights-only unpickler costs about a quarter of a millisecond per tensor,
    which was most of a cached apply on a small model).
    """

    def __init__(self, layout: Layout, device: torch.device | str = "cpu") -> None:
        sizes: dict[torch.dtype, int] = {}
        self.entries: list[tuple[tuple[str, ...], torch.dtype, int, tuple[int, ...]]] = []
        for name, keys in layout.items():
            for key, (shape, dtype) in keys.items():
                offset = sizes.get(dtype, 0)
                self.entries.append(((name, key) if key else (name,), dtype, offset, shape))
                sizes[dtype] = offset + math.prod(shape)
        # empty, not zeros: pages are only touched (made resident) as the solves fill them
        self.flats = {d: torch.empty(n, dtype=d, device=device) for d, n in sizes.items()}

    def states(self) -> States:
        """``{layer: {key: view}}`` (``{layer: view}`` for a layout with empty keys)."""
        return _views(self.flats, self.entries)

    def packed(self) -> dict[str, Any]:
        """What the disk cache stores: the flat buffers, the index and the names."""
        slot = {d: i for i, d in enumerate(self.flats)}
        index: list[int] = []
        for _, dtype, offset, shape in self.entries:
            index += [slot[dtype], offset, len(shape), *shape]
        return {
            "flats": list(self.flats.values()),
            "index": torch.tensor(index, dtype=torch.int64),
            "names": "\n".join("\t".join(path) for path, *_ in self.entries),
        }


def expert_tokens(target: Any) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The layout entry holding how many calibration tokens the router sent ``target``'s
    expert (none for a linear layer): stored with the solve, so a cached result still reports
    its coverage."""
    return {} if target.expert is None else {"tokens": ((), torch.int64)}


def _views(
    flats: dict[torch.dtype, torch.Tensor],
    entries: list[tuple[tuple[str, ...], torch.dtype, int, tuple[int, ...]]],
) -> States:
    states: States = {}
    for path, dtype, offset, shape in entries:
        view = flats[dtype][offset : offset + math.prod(shape)].view(shape)
        if len(path) == 1:
            states[path[0]] = view
        else:
            states.setdefault(path[0], {})[path[1]] = view
    return states


def pack_states(states: States) -> dict[str, Any]:
    """``states`` (``{layer: tensor}`` or ``{layer: {key: tensor}}``) in ``Arena``'s stored form
    (one copy of each tensor; for results computed outside an arena, e.g. AWQ's scales)."""
    layout: Layout = {}
    for name, value in states.items():
        tensors = value if isinstance(value, dict) else {"": value}
        layout[name] = {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}
    arena = Arena(layout, "cpu")
    stored = arena.states()
    for name, value in states.items():
        if isinstance(value, dict):
            for key, t in value.items():
                stored[name][key].copy_(t)
        else:
            stored[name].copy_(value)
    return arena.packed()


def unpack_states(packed: dict[str, Any]) -> States:
    """Inverse of ``Arena.packed``/``pack_states``: views of the stored flat buffers."""
    flats = {t.dtype: t for t in packed["flats"]}
    dtypes = [t.dtype for t in packed["flats"]]
    index = packed["index"].tolist()
    names = packed["names"].split("\n") if packed["names"] else []
    entries = []
    i = 0
    for name in names:
        slot, offset, ndim = index[i : i + 3]
        shape = tuple(index[i + 3 : i + 3 + ndim])
        i += 3 + ndim
        entries.append((tuple(name.split("\t")), dtypes[slot], offset, shape))
    return _views(flats, entries)


def calibrated(
    config: Modification,
    context: Context,
    weight: torch.Tensor,
    compute: Callable[[], dict[str, Any]],
    *,
    name: str = "obs",
    format: int = FORMAT,
) -> States:
    """The calibration result of ``config``: session memo, else the disk cache next to the
    reference, else ``compute()`` (stored in both).

    ``compute`` returns the result packed (``Arena.packed()`` or ``pack_states(...)``); the
    caller gets it unpacked (``{layer: tensor}`` or ``{layer: {key: tensor}}``, views of the
    packed buffers, on the CPU when read from disk). The key hashes everything the result
    depends on: the config, the stages applied before it, the seed, the baseline's content
    hash, the calibration windows, and the dtype and device kind of ``weight`` (a target's).
    The memo keeps the last few configs of each ``name`` (a sweep's neighbours); the disk cache
    (``reference.cached``: lock, atomic write, damaged entries rebuilt) lets a second pytest
    run apply without calibrating.
    """
    windows = context.calibration_windows()
    key = cache_key(
        name,
        format,
        config.to_dict(),
        [c.to_dict() for c in context.applied],
        context.seed,
        context.fingerprint,
        tuple(windows.shape),
        windows.cpu().numpy().tobytes(),
        str(weight.dtype),
        weight.device.type,
    )
    recent: OrderedDict[str, States] = context.memo((f"{name}.recent",), OrderedDict)
    if key not in recent:
        packed = cached(key, context.cache_dir, compute, name=name, format=format)[0]
        recent[key] = unpack_states(packed)
        while len(recent) > _RECENT:
            recent.popitem(last=False)
    recent.move_to_end(key)
    return recent[key]
