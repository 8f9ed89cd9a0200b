"""Plain-text descriptions every renderer shares (terminal, HTML): one wording per idea."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..environment import describe_changes, drift_warning
from ..stats import upper_bound

__all__ = [
    "DEFAULT_METRICS",
    "UNTOUCHED_NOTED",
    "compared_value",
    "describe_fallbacks",
    "describe_modification",
    "describe_touched",
    "describe_untouched",
    "drift_notes",
    "environment_change",
    "run_environment",
    "shared_environment_change",
]

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


# a weight modification leaving more than this share of the block weights unchanged without
# include/exclude gets a line in the summary (a gate passing on weights it never touched)
UNTOUCHED_NOTED = 0.05


def describe_touched(record: Mapping[str, Any]) -> str:
    """What a result's stages touched (``details["touched"]``), one line: ``touched 99.8% of
    the block weights (221,184 of 221,696 parameters); unchanged: model.layers.*.mlp.gate.weight``,
    or ``touched no weights: it changes decoding``; with a quantized KV cache among the stages,
    also which layers' caches and how the windows were scored. Empty when not recorded."""
    details = record.get("details") or {}
    touched = details.get("touched")
    if not isinstance(touched, Mapping):
        return ""
    if touched.get("share") is None:
        changes = [c for c in touched.get("changes", ()) if c not in ("weights", "structure")]
        line = f"touched no weights: it changes {' and '.join(changes)}" if changes else ""
    else:
        untouched = touched.get("untouched") or []
        line = (
            f"touched {_share(touched['share'])} of the block weights "
            f"({touched['parameters']:,} of {touched['of']:,} parameters)"
            + (f"; unchanged: {', '.join(untouched)}" if untouched else "")
        )
    cache = details.get("kv_cache")
    if line and isinstance(cache, Mapping) and "quantized_layers" in cache:
        line += (
            f"; KV cache quantized in {len(cache['quantized_layers'])} of {cache['layers']} "
            f"layers, scored {cache.get('scoring', 'in chunks through the cache')}"
        )
    return line


def describe_untouched(record: Mapping[str, Any]) -> str:
    """The summary's line for a weight modification that left more than ``UNTOUCHED_NOTED`` of
    the block weights unchanged though no ``include``/``exclude`` chose its targets (structured
    pruning changes part of the blocks by design and is not noted); empty otherwise."""
    touched = (record.get("details") or {}).get("touched")
    if not isinstance(touched, Mapping) or touched.get("share") is None:
        return ""
    if touched.get("targeted") or "weights" not in touched.get("changes", ()):
        return ""
    left = 1 - touched["share"]
    if left <= UNTOUCHED_NOTED:
        return ""
    shown = touched.get("untouched") or []
    names = ", ".join(shown[:3]) + (f" and {len(shown) - 3} more" if len(shown) > 3 else "")
    return (
        f"{record['modification']} left {_share(left)} of the block weights unchanged ({names}): "
        "its measures do not cover them; pass include=/exclude= to say that is meant"
    )


def _share(x: float) -> str:
    """A percentage that does not round a partial share to 0% or 100%."""
    text = f"{x:.0%}"
    if text in ("0%", "100%") and 0 < x < 1:
        text = (
            f"{x:.1%}"
            if f"{x:.1%}" not in ("0.0%", "100.0%")
            else ("<0.1%" if x < 0.5 else ">99.9%")
        )
    return text


def run_environment(report: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The environment this run measured in: its first result's (or exploration's), from the
    report's ``environments``; None when nothing was measured or none was recorded."""
    environments = report.get("environments") or {}
    for record in [*report.get("results", []), *report.get("explorations", [])]:
        key = record.get("environment")
        if isinstance(key, str) and key in environments:
            return environments[key]
    return None


def drift_notes(report: Mapping[str, Any]) -> list[str]:
    """With ``--hemorrhage-reference``: the line saying the reference was built under another
    environment than this run's (or that the file does not say), else nothing."""
    data = report.get("data") or {}
    if "reference_environment" not in data:
        return []
    key = data["reference_environment"]
    built = (report.get("environments") or {}).get(key) if isinstance(key, str) else None
    line = drift_warning(built, run_environment(report))
    return [line] if line else []


def environment_change(record: Mapping[str, Any]) -> str | None:
    """What changed in a compared result's environment since the old report's, described
    (``environment.describe_changes``); None when the result was not matched."""
    comparison = record.get("comparison") or {}
    if not comparison.get("matched"):
        return None
    return describe_changes(comparison.get("environment"))


def shared_environment_change(results: list[Mapping[str, Any]]) -> str | None:
    """The environment change every matched result shares (a run's usual case: one line for
    all), None when they differ or none matched."""
    found = {environment_change(r) for r in results} - {None}
    return found.pop() if len(found) == 1 else None
