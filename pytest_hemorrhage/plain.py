"""Plain data: what a result holds, so that it reaches the xdist controller and the JSON report
unchanged. Plain is ``None``, ``bool``, ``int``, ``float``, ``str``, and lists and dicts of
them (dict keys: strings or numbers).

Whatever a handler, a candidate's loader or a library puts in a result (an enum such as
transformers' ``QuantizationMethod``, a dtype, a path, a tensor, a config object) is converted
once, when the result enters the run (``HemorrhageSession.record``); what has no plain form
is kept as its ``repr`` and named in ``notes``. This module imports neither torch nor numpy:
values of theirs exist only once they are imported.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import sys
from collections.abc import Mapping
from typing import Any

__all__ = ["ARRAY_LIMIT", "PLAIN_TYPES", "first_unplain", "plain"]

# Tensors and arrays up to this many elements become (nested) lists; larger ones their repr,
# noted: a result is a summary, not a place for weights.
ARRAY_LIMIT = 4096
PLAIN_TYPES = (str, int, float, bool, type(None))
_SCALARS = frozenset(PLAIN_TYPES)  # a set: one hash per lookup, on the hot path
_KEYS = _SCALARS  # what JSON (and execnet) take as a dict key


def plain(value: Any, notes: list[str] | None = None, where: str = "") -> Any:
    """``value`` as plain data. Floats stay as they are, non-finite ones too (the JSON writer
    makes them null, see ``metrics.jsonable``; execnet sends them).

    Enums become their value, dtypes and devices their name (``float16``, ``cpu``), paths
    strings, tuples and sets lists (sets sorted), small tensors and arrays nested lists (0-d:
    a number), objects with ``to_dict()`` (transformers configs) and dataclasses dicts.
    Anything else becomes its ``repr``, and ``notes`` (when given) gets ``"where (type)"``.

    Args:
        value: what to convert; plain data comes back equal (dicts and lists copied).
        notes: collects one entry per value kept as its repr.
        where: the path of ``value`` in its record, e.g. ``details.fallbacks``, for the notes.
    """
    kind = type(value)
    if kind in _SCALARS:
        return value
    # scalars inline, and a path built only for what is not one: most of a result is numbers
    if kind is dict:
        return {
            (k if type(k) in _KEYS else _key(k)): v
            if type(v) in _SCALARS
            else plain(v, notes, f"{where}.{k}" if where else str(k))
            for k, v in value.items()
        }
    if kind is list or kind is tuple:
        return [
            v if type(v) in _SCALARS else plain(v, notes, f"{where}[{i}]")
            for i, v in enumerate(value)
        ]
    return _convert(value, notes, where)


def _convert(value: Any, notes: list[str] | None, where: str) -> Any:
    """The slow path of :func:`plain`: anything but exact plain types, dicts and lists."""
    if isinstance(value, enum.Enum):  # before str and int: str- and int-enums are both
        return plain(value.value, notes, where)
    if isinstance(value, (str, int, float)):  # subclasses, e.g. numpy.float64
        return (str if isinstance(value, str) else int if isinstance(value, int) else float)(value)
    if isinstance(value, Mapping):
        return plain(dict(value), notes, where)
    if isinstance(value, (list, tuple)):
        return plain(list(value), notes, where)
    if isinstance(value, (set, frozenset)):
        items = plain(list(value), notes, where)
        try:
            return sorted(items)
        except TypeError:  # mixed types: a stable order all the same
            return sorted(items, key=repr)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    torch = sys.modules.get("torch")
    if torch is not None:
        if isinstance(value, (torch.dtype, torch.device)):
            return str(value).removeprefix("torch.")
        if isinstance(value, torch.Size):
            return list(value)
        if isinstance(value, torch.Tensor) and value.numel() <= ARRAY_LIMIT:
            try:
                return plain(value.detach().cpu().tolist(), notes, where)
            except (RuntimeError, TypeError, NotImplementedError):  # meta, sparse, subclasses
                pass
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        if isinstance(value, numpy.generic):
            return plain(value.item(), notes, where)
        if isinstance(value, numpy.ndarray) and value.size <= ARRAY_LIMIT:
            return plain(value.tolist(), notes, where)
        if isinstance(value, numpy.dtype):
            return str(value)
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict) and not isinstance(value, type):
        try:
            data = to_dict()
        except Exception:  # a broken to_dict: the repr below still says what it was
            data = None
        if isinstance(data, Mapping):
            return plain(data, notes, where)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return plain(fields, notes, where)
    if notes is not None:
        notes.append(f"{where or 'value'} ({type(value).__name__})")
    return repr(value)


def _key(key: Any) -> str | int | float | bool | None:
    """A dict key as JSON takes it: an enum's value, else its string."""
    converted = plain(key)
    return converted if type(converted) in _KEYS else str(converted)


def first_unplain(value: Any, where: str = "") -> tuple[str, Any] | None:
    """The path and value of the first part of ``value`` that is not plain data (tuples
    count as lists), or None when all of it is; non-finite floats are plain."""
    kind = type(value)
    if kind in _SCALARS:
        return None
    if kind is dict:
        for k, v in value.items():
            if type(k) not in _KEYS:
                return f"{where}.{k}" if where else str(k), k
            if type(v) not in _SCALARS:
                found = first_unplain(v, f"{where}.{k}" if where else str(k))
                if found is not None:
                    return found
        return None
    if kind is list or kind is tuple:
        for i, v in enumerate(value):
            if type(v) not in _SCALARS:
                found = first_unplain(v, f"{where}[{i}]")
                if found is not None:
                    return found
        return None
    return where or "value", value
