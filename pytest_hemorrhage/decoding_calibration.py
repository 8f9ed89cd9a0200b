"""Decoding calibration, the seed paper's mitigation: fit a decoding for the modified model that
brings its next-token distribution back toward the baseline's.

The fit minimizes the mean KL(baseline || modified) (the ``kl_mean`` definition, see
``metrics.token_stats``) over the *calibration* windows, disjoint from the evaluation windows on
which the result is then measured, so the reported gain is not fitted to the data it is read on.
KL is convex in the inverse temperature, so a golden-section search over log-temperature finds
the optimum; with ``top_p=True`` it is repeated for each nucleus mass of a grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .errors import HemorrhageError
from .metrics import Result, token_stats
from .modifications.registry import Modification, iter_configs, make
from .reference import Reference

if TYPE_CHECKING:
    from .handle import Handle
    from .harness import Harness

__all__ = ["TOP_P_GRID", "DecodingCalibration", "calibrate_decoding"]

TOP_P_GRID = (0.8, 0.9, 0.95, 0.99, 1.0)
_LOGITS_BYTES = 512 << 20  # calibration logits kept in memory (caps the positions for big vocabs)


@dataclass
class DecodingCalibration:
    """A decoding fitted so that a modified model's next-token distribution matches the
    baseline's, and its effect measured on the evaluation windows.

    Attributes:
        temperature: divide the modified model's logits by this.
        top_p: nucleus mass kept after the temperature, or None when not fitted.
        before: the target measured on the evaluation windows.
        after: the target followed by the calibrated decoding, on the evaluation windows.
        calibration_kl: mean KL on the calibration windows, (before, after).
        modification: the target's stages plus ``decode.temperature`` (and ``decode.top_p``):
            ``hemorrhage.measure(calibration.modification)`` measures the calibrated model.
    """

    temperature: float
    top_p: float | None
    before: Result
    after: Result
    calibration_kl: tuple[float, float]
    modification: list[Modification] = field(repr=False)

    @property
    def kl_before(self) -> float:
        return self.before.metrics["kl_mean"]

    @property
    def kl_after(self) -> float:
        return self.after.metrics["kl_mean"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "calibration_kl": list(self.calibration_kl),
            "kl_mean": [self.kl_before, self.kl_after],
            "modification": [c.to_dict() for c in self.modification],
        }


def calibrate_decoding(
    hemorrhage: Handle | Harness,
    target: Any,
    *,
    top_p: bool = False,
    windows: int | None = None,
    temperatures: tuple[float, float] = (0.05, 20.0),
) -> DecodingCalibration:
    """Fit a temperature (and optionally a top-p) that minimizes KL(baseline || modified).

    Args:
        hemorrhage: the test's ``hemorrhage`` fixture (both measurements are then recorded for
            the report under the test's budget) or a ``Harness``.
        target: a measured ``Result``, a modification name, a config, ``(name, params)``, or a
            list of stages as ``measure`` takes.
        top_p: also fit a nucleus mass from ``TOP_P_GRID``.
        windows: calibration windows; default ``--hemorrhage-calibration-windows``.
        temperatures: the search interval.

    Returns:
        The fitted decoding with the target's hemorrhage before and after it.
    """
    harness = getattr(hemorrhage, "harness", hemorrhage)
    measure = hemorrhage.measure
    lo, hi = temperatures
    if not 0 < lo < hi < math.inf:
        raise HemorrhageError(
            f"calibrate_decoding: temperatures={temperatures!r} must be an "
            "interval (low, high) with 0 < low < high, e.g. (0.05, 20.0)"
        )
    stages, before = _stages(target)
    baseline, modified = _calibration_data(harness, stages, windows)
    temperature, nucleus = _fit(baseline, modified, math.log(lo), math.log(hi), top_p)
    kl_before = _kl(baseline, modified)
    kl_after = _kl(baseline, _decode(modified, temperature, nucleus))
    calibrated = [*stages, _make("decode.temperature", {"value": temperature})]
    if nucleus is not None and nucleus < 1:
        calibrated.append(_make("decode.top_p", {"p": nucleus}))
    if before is None:
        before = measure(stages)
    after = measure(calibrated)
    return DecodingCalibration(
        temperature, nucleus if top_p else None, before, after, (kl_before, kl_after), calibrated
    )


def _make(name: str, params: dict[str, Any]) -> Modification:
    return make(name, params)


def _stages(target: Any) -> tuple[list[Modification], Result | None]:
    """The target's configs, and its measurement when it is a Result."""
    if isinstance(target, Result):
        if not target.configs:
            raise HemorrhageError(
                "calibrate_decoding: this Result carries no modification to "
                "re-apply; pass the modification itself"
            )
        return list(target.configs), target
    if isinstance(target, str):
        target = [(target, {})]
    elif isinstance(target, Modification):
        target = [target]
    elif (
        isinstance(target, tuple)
        and len(target) == 2
        and isinstance(target[0], str)
        and isinstance(target[1], dict)
    ):
        target = [target]  # one (name, params) stage
    elif not isinstance(target, Sequence) or not target:
        raise HemorrhageError(
            f"calibrate_decoding: target={target!r} is not a modification; "
            "pass a Result, a name, a config, (name, params) or a stage list"
        )
    return list(iter_configs(target)), None


def _calibration_data(
    harness: Harness, stages: list[Modification], windows: int | None
) -> tuple[Any, torch.Tensor]:
    """The baseline's reference and the modified model's processed logits on the calibration
    windows (positions capped so that the logits stay under ``_LOGITS_BYTES``)."""
    ids = harness.context.calibration_windows(windows)
    positions = max(1, _LOGITS_BYTES // (4 * harness.vocab))
    rows = max(1, min(len(ids), positions // (ids.shape[1] - 1)))
    ids = ids[:rows]

    def forward(processors: Sequence[Any] = ()) -> torch.Tensor:
        return torch.cat(
            [chunk.logits.float().flatten(0, -2) for chunk in harness.chunks(processors, ids)]
        )

    def reference() -> Reference:
        logp = torch.log_softmax(forward(), -1)
        return Reference.from_logprobs(logp, ids[:, 1:].reshape(-1), harness.topk)

    baseline = harness.context.memo(("decoding.calibration", rows), reference)
    with harness.modified(stages) as patch:
        modified = forward(patch.logits_processors)
    return baseline, modified


def _kl(baseline: Any, logits: torch.Tensor) -> float:
    return token_stats(logits, baseline).kl.double().mean().item()


def _decode(logits: torch.Tensor, temperature: float, top_p: float | None) -> torch.Tensor:
    """``logits`` under the temperature then the nucleus, as the decode.* stages apply them."""
    from transformers import TopPLogitsWarper

    scaled = logits / temperature
    return TopPLogitsWarper(top_p)(None, scaled) if top_p is not None and top_p < 1 else scaled


def _fit(
    baseline: Any, logits: torch.Tensor, lo: float, hi: float, top_p: bool
) -> tuple[float, float | None]:
    """(temperature, top_p) minimizing the KL: golden section on log-temperature per top-p;
    the temperature rounded to 4 significant digits, for readable reports."""
    best: tuple[float, float, float | None] | None = None
    for p in TOP_P_GRID if top_p else (None,):
        log_t, value = _golden(
            lambda x, p=p: _kl(baseline, _decode(logits, math.exp(x), p)), lo, hi
        )
        if best is None or value < best[0]:
            best = (value, log_t, p)
    assert best is not None
    return float(f"{math.exp(best[1]):.4g}"), best[2]


def _golden(f: Any, a: float, b: float, tol: float = 1e-4) -> tuple[float, float]:
    """Minimum of a unimodal ``f`` on [a, b]: (argmin, min)."""
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(d)
    return (c, fc) if fc <= fd else (d, fd)
