"""The one exception type for mistakes a user can fix."""

from __future__ import annotations

__all__ = ["HemorrhageError", "first_line"]


class HemorrhageError(ValueError):
    """Bad input: the message names the value and says what to do instead.

    The plugin reports it as a single line, without a traceback from deep inside torch.
    """


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message: enough to act on, no library essay."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
