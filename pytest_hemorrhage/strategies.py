"""Hypothesis strategies for modification parameters.

Every strategy shrinks toward the gentlest modification (less sparsity, MORE bits, smaller
groups), so a falsifying example that hypothesis reports is the breaking point itself::

    @pytest.mark.hemorrhage(ppl_increase=0.10)
    @given(sparsity=sparsities(max_value=0.9))
    def test_wanda_budget(hemorrhage, sparsity):
        hemorrhage.check(hemorrhage.measure("prune.wanda", sparsity=sparsity))

Continuous parameters are drawn on a grid (``resolution``), not as free floats: hypothesis
shrinks floats toward "simple" numbers (0.5, 0.75) rather than toward the smallest failing one,
while it shrinks a bounded integer to the exact smallest failing value.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from .errors import HemorrhageError
from .explore.domains import (
    CHOICES,
    DOMAINS,
    MODIFICATION_DOMAINS,
    MODIFICATION_PARAMS,
    Domain,
    accepts,
    domain_for,
    valid_range,
)
from .explore.hypothesis import cached_estimate, register_profiles
from .modifications import registry

if TYPE_CHECKING:
    from .modifications import Modification

__all__ = [
    "CHOICES",
    "DOMAINS",
    "MODIFICATION_DOMAINS",
    "MODIFICATION_PARAMS",
    "Domain",
    "accepts",
    "bit_widths",
    "domain_for",
    "group_sizes",
    "modifications",
    "near_threshold",
    "nm_patterns",
    "prune_configs",
    "quant_configs",
    "sparsities",
    "valid_range",
]


def _grid(lo: float, hi: float, resolution: float, *, toward: str) -> SearchStrategy[float]:
    """Multiples of ``resolution`` in [lo, hi], shrinking toward ``toward`` ("lo" or "hi")."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise HemorrhageError(f"need finite min_value <= max_value, got {lo!r} and {hi!r}")
    if not resolution > 0:
        raise HemorrhageError(f"resolution={resolution!r} must be positive, e.g. 0.01")
    steps = math.floor((hi - lo) / resolution + 1e-9)
    digits = max(0, -math.floor(math.log10(resolution)) + 2)
    if toward == "lo":
        return st.integers(0, steps).map(lambda i: round(lo + i * resolution, digits))
    return st.integers(0, steps).map(lambda i: round(hi - i * resolution, digits))


def sparsities(
    *, min_value: float = 0.0, max_value: float = 1.0, resolution: float = 0.01
) -> SearchStrategy[float]:
    """Fractions in [min_value, max_value] on a grid, shrinking toward ``min_value``.

    Args:
        min_value: gentlest fraction drawn.
        max_value: harshest fraction drawn.
        resolution: grid step, which is also how precisely a falsifying example locates
            the breaking point.
    """
    if min_value < 0 or max_value > 1:
        raise HemorrhageError(
            f"sparsities(min_value={min_value}, max_value={max_value}): "
            "a sparsity is a fraction in [0, 1]"
        )
    return _grid(min_value, max_value, resolution, toward="lo")


def bit_widths(
    *, min_value: int = 1, max_value: int = 8, choices: Sequence[int] | None = None
) -> SearchStrategy[int]:
    """Bits per weight, shrinking toward the MOST bits (the gentlest quantization).

    Args:
        min_value: fewest bits drawn.
        max_value: most bits drawn (where shrinking goes).
        choices: the widths a quantizer supports, e.g. (1, 2, 3, 4, 8); overrides the range.
    """
    if choices is not None:
        widths = sorted({int(b) for b in choices}, reverse=True)
        if not widths:
            raise HemorrhageError("bit_widths(choices=...) needs at least one width")
        return st.sampled_from(widths)
    if not 1 <= min_value <= max_value:
        raise HemorrhageError(
            f"bit_widths(min_value={min_value}, max_value={max_value}): "
            "need 1 <= min_value <= max_value"
        )
    return st.integers(0, max_value - min_value).map(lambda i: max_value - i)


def group_sizes(
    *, min_value: int = 16, max_value: int = 256, per_row: bool = False
) -> SearchStrategy[int]:
    """Powers of two in [min_value, max_value], shrinking toward the smallest (gentlest) group.

    Args:
        min_value: smallest group of input channels sharing a scale.
        max_value: largest group.
        per_row: also draw 0 (one scale per output row, the coarsest), as the harshest value.
    """
    if not 1 <= min_value <= max_value:
        raise HemorrhageError(
            f"group_sizes(min_value={min_value}, max_value={max_value}): "
            "need 1 <= min_value <= max_value"
        )
    sizes = [
        2**k for k in range(math.ceil(math.log2(min_value)), math.floor(math.log2(max_value)) + 1)
    ]
    if not sizes:
        raise HemorrhageError(f"group_sizes: no power of two in [{min_value}, {max_value}]")
    return st.sampled_from(sizes + ([0] if per_row else []))


def nm_patterns(
    *, min_m: int = 4, max_m: int = 8, max_sparsity: float = 0.75
) -> SearchStrategy[tuple[int, int]]:
    """Semi-structured N:M patterns ``(n, m)``: keep n weights of every m consecutive inputs.

    Ordered gentlest first, which is where shrinking goes: lower sparsity 1 - n/m first, then
    larger m (4:8 is gentler than 2:4: the same sparsity, more freedom where to prune).

    Args:
        min_m: smallest group (powers of two from here).
        max_m: largest group.
        max_sparsity: largest sparsity 1 - n/m drawn.
    """
    ms = [m for m in (2**k for k in range(1, 8)) if min_m <= m <= max_m]
    patterns = sorted(
        ((n, m) for m in ms for n in range(1, m) if 1 - n / m <= max_sparsity),
        key=lambda nm: (1 - nm[0] / nm[1], -nm[1]),
    )
    if not patterns:
        raise HemorrhageError(
            f"nm_patterns(min_m={min_m}, max_m={max_m}, max_sparsity="
            f"{max_sparsity}): no pattern; widen the bounds"
        )
    return st.sampled_from(patterns)


def _param_strategy(name: str, param: str) -> SearchStrategy[Any] | None:
    """The strategy for one parameter of ``name``, restricted to values its config accepts."""
    if param in CHOICES:
        valid = [v for v in CHOICES[param] if accepts(name, {param: v})]
        return st.sampled_from(valid) if valid else None
    domain = domain_for(name, param)
    if domain is None:
        return None
    if param == "bits":
        valid = [b for b in range(int(domain.lo), int(domain.hi) + 1) if accepts(name, {param: b})]
        return bit_widths(choices=valid) if valid else None
    if param == "group_size":
        return group_sizes(min_value=int(domain.lo), max_value=int(domain.hi)).filter(
            lambda g: accepts(name, {param: g})
        )
    if domain.hi is None:
        return None  # model-dependent upper bound (layers): ask the caller for it
    lo, hi = valid_range(name, param, domain)
    if domain.integer:
        strategy = st.integers(0, int(hi - lo))
        return strategy.map(
            (lambda i: int(lo) + i) if domain.increasing else (lambda i: int(hi) - i)
        )
    return _grid(lo, hi, domain.resolution, toward="lo" if domain.increasing else "hi")


def _explored(name: str) -> list[str | tuple[str, str]]:
    """The parameters of ``name`` that modifications() draws (others keep their defaults)."""
    fields = _fields(name)
    explored = MODIFICATION_PARAMS.get(name)
    if explored is None:
        explored = tuple(p for p in fields if domain_for(name, p) or p in CHOICES)
    return [
        p
        for p in explored
        if (all(q in fields for q in p) if isinstance(p, tuple) else p in fields)
    ]


def _fields(name: str) -> dict[str, dataclasses.Field[Any]]:
    config_cls, _ = registry.get(name)
    return {
        f.name: f for f in dataclasses.fields(config_cls) if f.name not in ("include", "exclude")
    }


def _config_strategy(
    name: str, params: Mapping[str, SearchStrategy[Any]], fixed: Mapping[str, Any]
) -> SearchStrategy[Modification]:
    """Configs of ``name``: the explored parameters drawn, ``params`` as given, ``fixed`` kept."""
    given = set(params) | set(fixed)
    drawn: dict[str, SearchStrategy[Any]] = {}
    for p in _explored(name):
        if p == ("n", "m"):
            if not {"n", "m"} & given:
                drawn["n,m"] = nm_patterns()
            continue
        if isinstance(p, tuple) or p in given:
            continue
        strategy = _param_strategy(name, p)
        if strategy is None:
            raise HemorrhageError(
                f"modifications(): no known values for {name}'s parameter {p!r}; pass "
                f"params={{'{name}': {{'{p}': <strategy>}}}} or {p}=<value>"
            )
        drawn[p] = strategy
    drawn.update(params)
    covered = given | {q for k in drawn for q in k.split(",")}
    missing = [
        p
        for p, f in _fields(name).items()
        if p not in covered
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise HemorrhageError(
            f"modifications(): no known values for {name}'s required parameter(s) "
            f"{', '.join(missing)}; pass params={{'{name}': {{'{missing[0]}': <strategy>}}}}"
        )

    @st.composite
    def build(draw: Callable[[SearchStrategy[Any]], Any]) -> Modification:
        values = dict(fixed)
        for key, strategy in drawn.items():
            value = draw(strategy)
            if key == "n,m":
                values["n"], values["m"] = value
            else:
                values[key] = value
        try:
            return registry.make(name, values)
        except HemorrhageError:
            from hypothesis import reject

            reject()  # a combination the config rejects (e.g. group size vs. bits)
            raise

    return build()


def modifications(
    *,
    names: Sequence[str] | None = None,
    params: Mapping[str, Mapping[str, SearchStrategy[Any]]] | None = None,
    **fixed: Any,
) -> SearchStrategy[Modification]:
    """Configs of registered modifications with valid parameters, ready for ``measure()``.

    Args:
        names: the modifications to draw from (default: every registered one whose
            parameters have known values); the first one is where shrinking goes.
        params: per name, strategies for parameters to use instead of the built-in domains,
            e.g. ``{"my.scale": {"factor": st.floats(0, 2)}}``.
        **fixed: parameter values used as they are by every modification that has them,
            e.g. ``include=("*.mlp.*",)``.

    Example:
        >>> @given(config=modifications(names=["quant.rtn", "prune.magnitude"]))
        ... def test_any(hemorrhage, config):
        ...     hemorrhage.check(hemorrhage.measure(config))
    """
    params = params or {}
    for name in params:
        registry.get(name)  # unknown name: the registry's error lists the registered ones
    strategies = []
    for name in registry.names() if names is None else names:
        known = set(_fields(name)) | {"include", "exclude"}
        try:
            strategies.append(
                _config_strategy(
                    name, params.get(name, {}), {k: v for k, v in fixed.items() if k in known}
                )
            )
        except HemorrhageError:
            if names is not None:
                raise
            # by default, leave out what needs values we cannot guess (layers to drop, ...)
    if not strategies:
        raise HemorrhageError("modifications(): no modification to draw from; pass names=[...]")
    return st.one_of(strategies)


def quant_configs(
    *,
    names: Sequence[str] | None = None,
    min_bits: int = 1,
    max_bits: int = 8,
    params: Mapping[str, Mapping[str, SearchStrategy[Any]]] | None = None,
    **fixed: Any,
) -> SearchStrategy[Modification]:
    """Configs of the registered quantizers (``quant.*``), bits in [min_bits, max_bits].

    Args:
        names: the quantizers (default: every registered ``quant.*``).
        min_bits: fewest bits drawn.
        max_bits: most bits drawn (where shrinking goes).
        params: as for :func:`modifications`.
        **fixed: as for :func:`modifications`.
    """
    names = list(names) if names is not None else _family("quant.")
    bits = {}
    for name in names:
        if _has_field(name, "bits"):
            valid = [b for b in range(min_bits, max_bits + 1) if accepts(name, {"bits": b})]
            if not valid:
                raise HemorrhageError(
                    f"quant_configs: {name} accepts no bit width in [{min_bits}, {max_bits}]"
                )
            bits[name] = {"bits": bit_widths(choices=valid)}
    return modifications(names=names, params=_merge(bits, params), **fixed)


def prune_configs(
    *,
    names: Sequence[str] | None = None,
    max_sparsity: float = 1.0,
    params: Mapping[str, Mapping[str, SearchStrategy[Any]]] | None = None,
    **fixed: Any,
) -> SearchStrategy[Modification]:
    """Configs of the registered pruners (``prune.*``), sparsity up to ``max_sparsity``.

    Args:
        names: the pruners (default: every registered ``prune.*`` whose parameters have
            known values).
        max_sparsity: largest sparsity (or fraction) drawn.
        params: as for :func:`modifications`.
        **fixed: as for :func:`modifications`.
    """
    explicit = names is not None
    names = list(names) if explicit else _family("prune.")
    ours = {}
    for name in names:
        for param in ("sparsity", "fraction"):
            if _has_field(name, param):
                lo, hi = valid_range(name, param, DOMAINS[param], hi=max_sparsity)
                ours[name] = {param: sparsities(min_value=lo, max_value=hi)}
    merged = _merge(ours, params)
    if not explicit:
        names = [n for n in names if _buildable(n, merged.get(n, {}), fixed)]
    return modifications(names=names, params=merged, **fixed)


def _family(prefix: str) -> list[str]:
    return [n for n in registry.names() if n.startswith(prefix)]


def _buildable(name: str, params: Mapping[str, Any], fixed: Mapping[str, Any]) -> bool:
    try:
        _config_strategy(name, params, fixed)
    except HemorrhageError:
        return False
    return True


def _has_field(name: str, param: str) -> bool:
    config_cls, _ = registry.get(name)
    return any(f.name == param for f in dataclasses.fields(config_cls))


def _merge(
    ours: Mapping[str, Mapping[str, Any]], theirs: Mapping[str, Mapping[str, Any]] | None
) -> dict[str, dict[str, Any]]:
    out = {k: dict(v) for k, v in ours.items()}
    for name, strategies in (theirs or {}).items():
        out.setdefault(name, {}).update(strategies)
    return out


def near_threshold(
    name: str,
    param: str,
    *,
    lo: float | None = None,
    hi: float | None = None,
    width: float | None = None,
    estimate: float | None = None,
    **fixed: Any,
) -> SearchStrategy[Any]:
    """Values of ``param`` concentrated around this model's threshold, covering the range.

    Half of the draws fall within ``width`` of the threshold estimated for this model, data,
    modification and the test's budget (by an earlier ``find_threshold`` or a falsifying
    example, in this session or a previous one: estimates persist in the plugin's cache
    directory); the other half, and every draw while no estimate exists, cover [lo, hi].
    Under derandomized settings (the ``hemorrhage-ci`` profile) only ``estimate`` is used, not
    a persisted one, which would make the examples depend on what earlier runs found.
    Shrinking still goes to the gentlest value, so a falsifying example is the breaking point.

    Args:
        name: the modification, e.g. ``"prune.wanda"``.
        param: the parameter drawn, e.g. ``"sparsity"``.
        lo: gentlest/smallest value (default: the parameter's domain).
        hi: largest value (default: the parameter's domain).
        width: half-width of the concentrated window (default: 5% of the range, at least one
            grid step).
        estimate: use this estimate instead of the cached one.
        **fixed: the other parameters the test measures with (they select the estimate).
    """
    domain = domain_for(name, param) or Domain(0.0, 1.0)
    lo, hi = valid_range(name, param, domain, lo, hi, fixed=fixed)
    step = domain.resolution
    if domain.integer:  # the values the config accepts (e.g. hqq has no 7 bits)
        grid = [v for v in range(int(lo), int(hi) + 1) if accepts(name, {**fixed, param: v})]
    else:
        digits = max(0, -math.floor(math.log10(step)) + 2)
        grid = [
            round(lo + i * step, digits) for i in range(math.floor((hi - lo) / step + 1e-9) + 1)
        ]
    if not domain.increasing:
        grid.reverse()  # index 0 is always the gentlest value: shrinking goes there
    steps = len(grid) - 1
    half = max(1, round((width if width is not None else 0.05 * (hi - lo)) / step))

    def value(i: int) -> Any:
        return grid[i]

    def index(v: float) -> int:
        return min(range(len(grid)), key=lambda i: abs(grid[i] - v))

    @st.composite
    def draw_near(draw: Callable[[SearchStrategy[Any]], Any]) -> Any:
        center = estimate
        if center is None and not settings.default.derandomize:  # the running test's settings
            center = cached_estimate(name, param, fixed)
        if center is not None and draw(st.booleans()):
            c = index(center)
            return value(draw(st.integers(max(0, c - half), min(steps, c + half))))
        return value(draw(st.integers(0, steps)))

    return draw_near()


register_profiles()  # so that settings.load_profile("hemorrhage-ci") works after this import
