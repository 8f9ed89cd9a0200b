"""Parameter checks shared by the modification configs: errors name the value and the fix."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..errors import HemorrhageError

__all__ = ["check_choice", "check_int", "check_number"]


def check_number(
    config: Any, field: str, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False
) -> None:
    """``getattr(config, field)`` is a real number in the given interval."""
    value = getattr(config, field)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (lo < value if lo_open else lo <= value) and (value < hi if hi_open else value <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise HemorrhageError(
            f"{config.name}: {field}={value!r} is out of range; use a number in {interval}"
        )


def check_int(config: Any, field: str, lo: int, hi: int | None = None) -> None:
    """``getattr(config, field)`` is an integer in [lo, hi]."""
    value = getattr(config, field)
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value < lo
        or (hi is not None and value > hi)
    ):
        bound = f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}"
        raise HemorrhageError(f"{config.name}: {field}={value!r} is out of range; use {bound}")


def check_choice(config: Any, field: str, choices: Iterable[Any]) -> None:
    """``getattr(config, field)`` is one of ``choices``."""
    value, choices = getattr(config, field), list(choices)
    if value not in choices:
        raise HemorrhageError(
            f"{config.name}: {field}={value!r} is not valid; "
            f"choose one of {', '.join(map(repr, choices))}"
        )
