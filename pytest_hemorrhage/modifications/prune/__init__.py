"""``prune.*``: weights set to zero, as users name the methods.

- ``unstructured.py``: ``prune.magnitude``, ``prune.wanda``, ``prune.gradient``, ``prune.nm``
- ``sparsegpt.py``: ``prune.sparsegpt`` (OBS with error compensation)
- ``structured.py``: ``prune.heads``, ``prune.channels``, ``prune.layers`` (on ``layouts.py``)
- ``slicegpt.py``: ``prune.slicegpt`` (rotate and slice the residual stream)

Importing the package registers them.
"""

from __future__ import annotations

from . import slicegpt, sparsegpt, structured, unstructured  # noqa: F401  (registered on import)

__all__: list[str] = []  # the families register themselves; their modules hold the names
