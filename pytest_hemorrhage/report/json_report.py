"""``--hemorrhage-report=PATH``: the run as strict JSON (schema in docs/reports.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..metrics import jsonable

__all__ = ["write_json"]


def write_json(report: dict[str, Any], path: Path) -> None:
    """Write ``report`` to ``path`` (directories created); non-finite numbers become null."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(report), indent=2, default=str) + "\n")
