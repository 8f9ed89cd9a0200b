"""Plain-text descriptions every renderer shares (terminal, HTML): one wording per idea."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..stats import upper_bound

__all__ = ["DEFAULT_METRICS", "compared_value", "describe_fallbacks", "describe_modification"]

DEFAULT_METRICS = ("ppl_increase", "kl_mean")  # shown for results measured without a budget


def describe_modification(name: str, params: Mapping[str, Any]) -> str:
    """``quant.rtn(bits=8, group_size=64)``; a composition (``params["stages"]``) as its
    stages joined by arrows: ``prune.wanda(sparsity=0.5) → quant.rtn(bits=4)``."""
    if name == "candidate":  # measure_model: the artifact's label says what it is
        return f"candidate {params.get('label', '?')}"
    stages = params.get("stages")
    if isinstance(stages, list):
        return " → ".join(
            describe_modification(s.get("name", "?"), {k: v for k, v in s.items() if k != "name"})
            for s in stages
        )
    return f"{name}({', '.join(f'{k}={v}' for k, v in params.items())})"


def describe_fallbacks(record: Mapping[str, Any]) -> list[str]:
    """What a result's modifications applied other than asked (``details["fallbacks"]``, e.g.
    GGUF types a layer's width does not allow), one line per modification:
    ``quant.gguf fallbacks: Q4_K -> Q5_0 for model.layers.{0..3}.*``."""
    fallbacks = (record.get("details") or {}).get("fallbacks") or {}
    return [
        f"{name} fallbacks: {info['summary']}"
        for name, info in fallbacks.items()
        if isinstance(info, Mapping) and info.get("summary")
    ]


def compared_value(record: Mapping[str, Any], metric: str) -> float | None:
    """What the record's budget compares for ``metric``, as ``Budget.upper`` does (both are
    :func:`~pytest_hemorrhage.stats.upper_bound`): the value, or with ``confidence`` its upper
    bound ``value + z * stderr`` (infinite without a standard error). None when the metric was
    not measured (or, after the JSON round trip, was not finite)."""
    value = (record.get("metrics") or {}).get(metric)
    if value is None:
        return None
    confidence = (record.get("budget") or {}).get("confidence")
    return upper_bound(value, (record.get("stderr") or {}).get(metric), confidence or None)
