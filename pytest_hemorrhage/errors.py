"""The one exception type for mistakes a user can fix."""

from __future__ import annotations

__all__ = ["HemorrhageError"]


class HemorrhageError(ValueError):
    """Bad input: the message names the value and says what to do instead.

    The plugin reports it as a single line, without a traceback from deep inside torch.
    """
