"""Threshold estimates kept on disk, so that ``near_threshold`` starts where the last run broke.

One JSON file in the cache directory, keyed by model, data, modification, parameter and budget.
An estimate is only a hint: an unreadable or unwritable file costs a run its head start, never
a verdict.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..modifications import make

if TYPE_CHECKING:
    from ..budget import Budget
    from ..harness import Harness
    from .fit import Threshold

__all__ = ["ESTIMATES_FILE", "estimate_key", "read_estimates", "save_estimate"]

ESTIMATES_FILE = "thresholds.json"
_ESTIMATES: dict[Path, dict[str, Any]] = {}  # cache file -> its entries, read once per process


def estimate_key(
    harness: Harness, budget: Budget, name: str, param: str, fixed: Mapping[str, Any]
) -> str:
    params = make(name, dict(fixed)).params()  # defaults filled in: one key however it's called
    params.pop(param, None)
    parts = [
        harness.loaded.fingerprint,
        harness.data_fingerprint,
        name,
        param,
        params,
        budget.to_dict(),
    ]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def read_estimates(path: Path) -> dict[str, Any]:
    if path not in _ESTIMATES:
        try:
            _ESTIMATES[path] = json.loads(path.read_text())
        except (OSError, ValueError):
            _ESTIMATES[path] = {}  # none yet, or unreadable: estimates are only a hint
    return _ESTIMATES[path]


def save_estimate(
    harness: Harness,
    budget: Budget,
    name: str,
    param: str,
    fixed: Mapping[str, Any],
    threshold: Threshold,
) -> None:
    cache_dir = harness.settings.cache_dir
    if cache_dir is None or threshold.value is None:
        return
    path = Path(cache_dir) / ESTIMATES_FILE
    key = estimate_key(harness, budget, name, param, fixed)
    entry = {
        "value": threshold.value,
        "bracket": list(threshold.bracket),
        "modification": name,
        "param": param,
        "budget": budget.to_dict(),
        "updated": time.time(),
    }
    read_estimates(path)[key] = entry
    try:
        from filelock import FileLock

        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock", timeout=10):  # xdist workers share the file
            try:
                entries = json.loads(path.read_text())
            except (OSError, ValueError):
                entries = {}
            entries[key] = entry
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
            tmp.replace(path)
    except OSError:
        pass  # an unwritable cache only costs the next run its hint
