"""Everything that renders a run: terminal tables, JSON, HTML, plots."""

from __future__ import annotations

__all__: list[str] = []
