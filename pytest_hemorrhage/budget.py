"""``@pytest.mark.hemorrhage(**budget)`` -> a validated Budget; one failure line per violation."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .embeddings import EMBEDDING_METRICS
from .errors import HemorrhageError
from .metrics import EXTRA_METRICS, METRICS, NO_STDERR, position_range, token_metric
from .stats import upper_bound

if TYPE_CHECKING:
    from .metrics import Result

__all__ = ["OPTIONS", "Budget", "parse_ini"]

OPTIONS = {"confidence": "fail only when the one-sided upper confidence bound exceeds the budget"}


@dataclass(frozen=True)
class Budget:
    """Maximum tolerated value per metric.

    Args:
        limits: metric name -> maximum.
        confidence: if set (e.g. 0.95), a metric fails only when its one-sided upper bound
            ``value + z * stderr`` exceeds the maximum; otherwise the point estimate is used.
            A metric that never has a standard error (``kl_max``) is refused with it; one
            whose measurement lacks it (too few windows, items or prompts) fails, saying so.
    """

    limits: dict[str, float] = field(default_factory=dict)
    confidence: float | None = None

    @classmethod
    def parse(cls, kwargs: Mapping[str, Any], *, where: str) -> Budget:
        """Validate marker-style keyword arguments; ``where`` names the test for errors.

        ``positions={"8192:": {"kl_mean": 0.05}}`` budgets token metrics over a range of
        positions (Python's slice of the tokens of context a prediction had: ``"8192:"``,
        ``":1024"``, ``"1024:8192"``); the result names them ``kl_mean[8192:]``, the form the
        ini ``hemorrhage_budget`` takes too."""
        limits: dict[str, float] = {}
        confidence = None
        for key, value in _flat(kwargs, where):
            if key == "confidence":
                if not _number(value) or not 0.5 <= value < 1:
                    raise HemorrhageError(
                        f"{where}: confidence={value!r} must be a number in "
                        "[0.5, 1), e.g. confidence=0.95"
                    )
                confidence = float(value)
            elif not token_metric(key) and key not in EXTRA_METRICS | EMBEDDING_METRICS.keys():
                if key != position_range(key)[0]:  # a range of a metric without positions
                    raise HemorrhageError(
                        f"{where}: {key}: only token metrics are measured by position "
                        f"({', '.join(METRICS)})"
                    )
                valid = ", ".join([*METRICS, *EXTRA_METRICS, *EMBEDDING_METRICS, *OPTIONS])
                raise HemorrhageError(
                    f"{where}: can't have {key!r} in the hemorrhage budget; valid keys: "
                    f"{valid}, positions"
                )
            elif not _number(value) or value < 0 or math.isnan(value):
                raise HemorrhageError(
                    f"{where}: {key}={value!r} must be a non-negative number "
                    "(the largest tolerated value)"
                )
            else:
                limits[key] = float(value)
        return cls(limits, confidence)._bounded(where)

    def merged(self, override: Budget) -> Budget:
        """This budget with ``override``'s keys taking precedence."""
        confidence = override.confidence if override.confidence is not None else self.confidence
        return Budget({**self.limits, **override.limits}, confidence)._bounded(
            "hemorrhage budget (the ini hemorrhage_budget with the test's markers)"
        )

    def _bounded(self, where: str) -> Budget:
        """Self, unless ``confidence`` asks for a bound on a metric that has none."""
        unbounded = [m for m in self.limits if position_range(m)[0] in NO_STDERR]
        if self.confidence is not None and unbounded:
            metric = unbounded[0]
            raise HemorrhageError(
                f"{where}: confidence={self.confidence:g} can't bound {metric}: the largest "
                "per-token value of one evaluation set says nothing about the largest of "
                f"another, so no upper bound on {metric} holds its level. Budget kl_p99 "
                f"(which has one) instead of {metric}, or check {metric} in a test without "
                "confidence"
            )
        return self

    def upper(self, result: Result, metric: str) -> float:
        """The value compared with the budget: point estimate, or upper confidence bound
        (infinite when the measurement has no standard error to bound it with); the one rule,
        :func:`~pytest_hemorrhage.stats.upper_bound`, that every summary shows too.

        Exact when the result's standard errors are calibrated at this confidence
        (``Result.level``; a measure made for this budget is), else scaled linearly."""
        return upper_bound(result.metrics[metric], result.stderr.get(metric), self.confidence)

    def violations(self, result: Result) -> list[str]:
        """One line per violated metric, e.g.
        ``kl_mean: 0.0412 > 0.0200 (baseline ppl 8.41, modified ppl 9.01)``."""
        context = f"baseline ppl {result.baseline_ppl:.2f}, modified ppl {result.modified_ppl:.2f}"
        texts = result.details.get("texts")  # an encoder's measure: no perplexity, no logits
        if texts is not None:
            context = f"{texts} texts embedded"
        lines = []
        if result.nonfinite:
            lines.append(
                f"non-finite outputs: {result.nonfinite} of {result.tokens} tokens got "
                f"nan/inf logits ({context})"
                if texts is None
                else f"non-finite outputs: {result.nonfinite} of {texts} texts got nan/inf "
                "embeddings"
            )
        for metric, limit in self.limits.items():
            if metric not in result.metrics:
                lines.append(f"{metric}: not measured by {result.modification}")
                continue
            bound = self.upper(result, metric)
            value = result.metrics[metric]
            if self.confidence is not None and result.stderr.get(metric) is None:
                lines.append(
                    f"{metric}: {value:.4f} has no standard error, so its {self.confidence:.0%} "
                    "upper bound is unknown (a standard error needs at least 2 windows, task "
                    f"items or prompts); measure more of them or drop confidence ({context})"
                )
                continue
            if math.isnan(bound) or bound > limit:
                shown = f"{value:.4f}"
                if self.confidence is not None and bound != value:
                    shown += f" (upper {self.confidence:.0%} bound {bound:.4f})"
                lines.append(f"{metric}: {shown} > {limit:.4f} ({context})")
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {**self.limits, **({"confidence": self.confidence} if self.confidence else {})}


def parse_ini(text: str) -> Budget:
    """``"ppl_increase=0.05 kl_mean=0.02"`` (ini ``hemorrhage_budget``) -> Budget."""
    kwargs: dict[str, Any] = {}
    for item in text.replace(",", " ").split():
        key, sep, value = item.partition("=")
        try:
            kwargs[key] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise HemorrhageError(
                f"hemorrhage_budget: {item!r} is not metric=number, "
                "e.g. hemorrhage_budget = ppl_increase=0.05 kl_mean=0.02"
            )
    return Budget.parse(kwargs, where="hemorrhage_budget")


def _flat(kwargs: Mapping[str, Any], where: str) -> list[tuple[str, Any]]:
    """The marker's keyword arguments with ``positions={range: {metric: limit}}`` spread into
    ``metric[range]`` keys (checked here: a range is ``lo:hi`` in positions); a key that
    already names a range (the ini's ``kl_mean[8192:]``) is checked the same way."""
    flat: list[tuple[str, Any]] = []
    example = 'positions={"8192:": {"kl_mean": 0.05}}'
    for key, value in kwargs.items():
        if key != "positions":
            flat.append((key, value))
            continue
        if not isinstance(value, Mapping):
            raise HemorrhageError(f"{where}: positions={value!r} must be a dict, e.g. {example}")
        for span, limits in value.items():
            if not isinstance(limits, Mapping):
                raise HemorrhageError(
                    f"{where}: positions[{span!r}]={limits!r} must be a dict of metric "
                    f"limits, e.g. {example}"
                )
            flat += [(f"{metric}[{span}]", limit) for metric, limit in limits.items()]
    for key, _ in flat:
        if "[" not in key:
            continue
        metric, lo, hi = position_range(key)
        if metric == key:
            raise HemorrhageError(
                f"{where}: {key!r}: a position range is lo:hi, lo: or :hi in whole numbers, "
                f"e.g. {example}"
            )
        if hi is not None and hi <= lo:
            raise HemorrhageError(f"{where}: {key!r}: the range {lo}:{hi} holds no position")
    return flat


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
