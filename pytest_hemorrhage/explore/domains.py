"""What the exploration knows about each modification parameter: its range, which way damage
grows, and the non-numeric choices, gentlest first.

One table for threshold search, sweeps and the hypothesis strategies alike. A new
modification's parameters go here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import HemorrhageError
from ..modifications import registry
from ..modifications.quant.gguf import GGUF_TYPES

__all__ = [
    "CHOICES",
    "DOMAINS",
    "MODIFICATION_DOMAINS",
    "MODIFICATION_PARAMS",
    "Domain",
    "accepts",
    "domain_for",
    "valid_range",
]


@dataclass(frozen=True)
class Domain:
    """The values a numeric modification parameter takes and which way damage grows.

    Args:
        lo: smallest value.
        hi: largest value; None when it depends on the model (e.g. layers dropped: the
            number of blocks minus one).
        integer: the parameter takes whole values only.
        increasing: damage grows with the value (sparsity); False when it grows as the
            value shrinks (bits).
        resolution: grid step for a continuous parameter (strategies and search tolerance).
        origin: the value that means "no compression", for the phase-transition fit's
            compression axis: ``value - origin`` if increasing, else ``origin - value``
            (bits: 16, so 4 bits is 12 bits removed from a 16-bit baseline).
    """

    lo: float
    hi: float | None
    integer: bool = False
    increasing: bool = True
    resolution: float = 0.01
    origin: float = 0.0

    def gentle(self, lo: float, hi: float) -> float:
        return lo if self.increasing else hi

    def compression(self, value: float) -> float:
        """Distance from no compression, growing with damage (the x of the PTP fit)."""
        return value - self.origin if self.increasing else self.origin - value


# Numeric parameters by name, across modifications. A parameter missing here is searched as a
# fraction in [0, 1] whose damage grows with it, unless the caller says otherwise.
DOMAINS: dict[str, Domain] = {
    "sparsity": Domain(0.0, 1.0),
    "fraction": Domain(0.0, 1.0),
    "sigma": Domain(0.0, 1.0),
    "bits": Domain(1, 8, integer=True, increasing=False, resolution=1, origin=16),
    "group_size": Domain(16, 256, integer=True, resolution=1),
}
# Where one modification's parameter means something else than the name says elsewhere.
MODIFICATION_DOMAINS: dict[tuple[str, str], Domain] = {
    # rank KEPT: damage grows as it shrinks; 1 - rank_ratio is the paper's rank reduction
    ("lowrank.svd", "rank_ratio"): Domain(0.0, 1.0, increasing=False, origin=1.0),
    ("lowrank.asvd", "rank_ratio"): Domain(0.0, 1.0, increasing=False, origin=1.0),
    ("quant.gptq", "bits"): Domain(2, 8, integer=True, increasing=False, resolution=1, origin=16),
    ("prune.layers", "count"): Domain(0, None, integer=True, resolution=1),  # hi: blocks - 1
    ("fault.bitflip", "count"): Domain(0, 1000, integer=True, resolution=1),
    ("decode.top_p", "p"): Domain(0.0, 1.0, increasing=False, origin=1.0),
    ("context.rope_scaling", "factor"): Domain(1.0, 8.0, resolution=0.05, origin=1.0),
}

# Non-numeric parameters by name: the values explored, gentlest first (shrinking goes there).
CHOICES: dict[str, tuple[Any, ...]] = {
    "scope": ("layer", "global"),
    "symmetric": (True, False),
    "quant_type": ("nf4", "fp4"),
    "double_quant": (False, True),
    "format": ("e4m3", "e5m2"),
    "dtype": ("float16", "bfloat16"),  # 10 mantissa bits vs 7: float16 is the gentler
    "score": ("wanda", "magnitude"),
    "selection": ("importance", "last"),
    "smooth": (True, False),
    "importance": ("activation", "taylor", "weight"),  # gentlest first (docs/exploration.md)
    "act_order": (True, False),
    "type": GGUF_TYPES,  # quant.gguf's, gentlest first (mixtures just above their base type)
}

# Which parameters modifications() explores per registered name (the others keep their
# defaults); a registered name missing here explores every field that DOMAINS/CHOICES knows.
# ("n", "m") is drawn jointly by nm_patterns().
MODIFICATION_PARAMS: dict[str, tuple[str | tuple[str, str], ...]] = {
    "quant.rtn": ("bits", "group_size", "symmetric"),
    "quant.hqq": ("bits", "group_size"),
    "quant.bnb_4bit": ("quant_type", "double_quant"),
    "quant.fp8": ("format",),
    "quant.dtype": ("dtype",),
    "prune.magnitude": ("sparsity", "scope"),
    "prune.wanda": ("sparsity",),
    "prune.gradient": ("sparsity",),
    "prune.nm": (("n", "m"),),
    "prune.heads": ("fraction",),
    "prune.channels": ("fraction",),
    "prune.layers": ("count",),
    "noise.gaussian": ("sigma",),
    "quant.awq": ("bits", "group_size", "symmetric"),
    "lowrank.asvd": ("rank_ratio",),  # alpha is no compression axis: damage is least near 0.5
    "prune.slicegpt": ("fraction",),
    "quant.torchao": ("bits", "group_size"),  # the config stays: not every config takes bits
    "quant.gptq": ("bits", "group_size", "symmetric", "act_order"),
    "prune.sparsegpt": ("sparsity",),  # damp stays: near 0 the Hessian can be singular
    "quant.kv_cache": ("bits",),
    "quant.gguf": ("type",),
    "context.rope_scaling": ("factor",),  # type stays: its choices are not one axis
}


def domain_for(name: str, param: str) -> Domain | None:
    """The known domain of modification ``name``'s parameter ``param``, or None."""
    return MODIFICATION_DOMAINS.get((name, param)) or DOMAINS.get(param)


def accepts(name: str, params: Mapping[str, Any]) -> bool:
    """Whether modification ``name``'s config accepts ``params`` (its own validation)."""
    try:
        registry.make(name, dict(params))
    except HemorrhageError:
        return False
    return True


def valid_range(
    name: str,
    param: str,
    domain: Domain,
    lo: float | None = None,
    hi: float | None = None,
    *,
    fixed: Mapping[str, Any] | None = None,
) -> tuple[float, float]:
    """[lo, hi] (the domain's by default), moved in by one grid step at an end that the
    config of ``name`` rejects, e.g. a sparsity that must stay below 1."""
    lo = domain.lo if lo is None else lo
    hi = domain.hi if hi is None else hi
    if hi is None:
        raise HemorrhageError(
            f"{name}: the range of {param!r} depends on the model; pass hi=..., e.g. hi=3"
        )
    if lo > hi:
        raise HemorrhageError(f"{name}: need lo <= hi for {param!r}, got lo={lo}, hi={hi}")
    registry.get(name)  # unknown name: the registry's error, which lists the valid ones
    fixed = dict(fixed or {})
    step = domain.resolution
    if not accepts(name, {**fixed, param: lo}) and accepts(name, {**fixed, param: lo + step}):
        lo = round(lo + step, 12)
    if not accepts(name, {**fixed, param: hi}) and accepts(name, {**fixed, param: hi - step}):
        hi = round(hi - step, 12)
    for end in (lo, hi):
        try:
            registry.make(name, {**fixed, param: end})
        except HemorrhageError as exc:
            raise HemorrhageError(
                f"{exc} (exploring {param} in [{lo}, {hi}]; pass lo=/hi= inside the valid range)"
            ) from None
    return lo, hi
