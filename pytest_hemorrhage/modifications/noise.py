"""Random weight perturbations: Gaussian noise and bit flips (hardware faults).

Both are reproducible from a seed and store almost nothing: the noise is drawn again from a
per-layer generator seed every time a weight is used, and a bit flip keeps only the flipped
positions and their bit masks.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import HemorrhageError
from .handler import Context
from .registry import Modification, Patch, register_modification
from .validate import check_int, check_number

__all__ = ["BitFlip", "GaussianNoise", "layer_seed"]


def _check_seed(config: Modification) -> None:
    value = config.seed  # type: ignore[attr-defined]
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise HemorrhageError(
            f"{config.name}: seed={value!r} is not valid; use an integer, or "
            "None for --hemorrhage-seed"
        )


@dataclass(frozen=True, kw_only=True)
class GaussianNoise(Modification):
    """Add Gaussian noise to every target weight: ``W + sigma * std(W) * N(0, 1)``.

    Args:
        sigma: noise scale relative to the standard deviation of each layer's weights
            (0 changes nothing).
        seed: seed of the draws; None (the default) uses ``--hemorrhage-seed``. The same seed
            gives the same noise, hence the same metrics.
    """

    per_expert: ClassVar[bool | None] = True  # each expert of a fused expert weight
    sigma: float = 0.05
    seed: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self, "sigma", 0.0, math.inf, hi_open=True)
        _check_seed(self)


@dataclass(frozen=True, kw_only=True)
class BitFlip(Modification):
    """Flip ``count`` random bits of the stored target weights (a hardware fault model).

    Bits are drawn uniformly, without repetition, over every bit (sign, exponent and mantissa)
    of every target weight, in the weights' own dtype (float32, bfloat16, float16, float64).
    An exponent flip can turn a weight into inf or NaN; the metrics then report the
    non-finite outputs instead of failing.

    Args:
        count: number of bits to flip (0 changes nothing).
        seed: seed of the draw; None (the default) uses ``--hemorrhage-seed``.
    """

    per_expert: ClassVar[bool | None] = True  # each expert of a fused expert weight
    count: int = 10
    seed: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "count", 0)
        _check_seed(self)


def layer_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed for one layer, stable across runs and platforms (unlike ``hash()``)."""
    text = "\x1f".join(map(str, (seed, *parts)))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def _stage_seed(config: Modification, context: Context) -> tuple[int, int]:
    """The seed to use and how many earlier stages of the composition were this modification:
    two noise stages in one composition draw independent noise, not the same noise twice."""
    seed = config.seed if config.seed is not None else context.seed  # type: ignore[attr-defined]
    return seed, sum(c.name == config.name for c in context.applied)


def _noisy(scale: float, seed: int):
    def add_noise(w: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator(device=w.device)
        generator.manual_seed(seed)
        noise = torch.randn(w.shape, generator=generator, device=w.device, dtype=torch.float32)
        return (w.float() + scale * noise).to(w.dtype)

    return add_noise


@register_modification("noise.gaussian", GaussianNoise)
def apply_gaussian(config: GaussianNoise, model: nn.Module, patch: Patch, context: Context) -> None:
    targets = config.targets(model)
    if config.sigma == 0:
        for target in targets:
            patch.touch(target)
        return
    seed, stage = _stage_seed(config, context)
    for target in targets:
        with torch.no_grad():
            std = target.weight.detach().float().std().item()
        patch.parametrize(target, _noisy(config.sigma * std, layer_seed(seed, stage, target.name)))


_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _flipper(positions: torch.Tensor, masks: torch.Tensor):
    def flip(w: torch.Tensor) -> torch.Tensor:
        out = w.clone(memory_format=torch.contiguous_format)
        bits = out.view(-1).view(masks.dtype)
        bits[positions] ^= masks.to(bits.device)
        return out

    return flip


@register_modification("fault.bitflip", BitFlip)
def apply_bitflip(config: BitFlip, model: nn.Module, patch: Patch, context: Context) -> None:
    targets = config.targets(model)
    widths = [t.weight.element_size() * 8 for t in targets]
    sizes = [t.weight.numel() * bits for t, bits in zip(targets, widths, strict=True)]
    total = sum(sizes)
    if config.count > total:
        raise HemorrhageError(
            f"{config.name}: count={config.count} exceeds the {total} bits of "
            "the target weights; use a count <= that"
        )
    for target in targets:  # the draw is over all of them, wherever the flips land
        patch.touch(target)
    if config.count == 0:
        return
    seed, stage = _stage_seed(config, context)
    # sampling an index range draws without repetition in O(count) memory, whatever the size
    drawn = random.Random(layer_seed(seed, stage, "bitflip")).sample(range(total), config.count)
    flat = torch.tensor(sorted(drawn), dtype=torch.int64)
    starts = torch.tensor([0, *sizes]).cumsum(0)
    layer_of = torch.searchsorted(starts[1:], flat, right=True)
    for i in layer_of.unique().tolist():
        local = flat[layer_of == i] - starts[i]
        width = widths[i]
        element, bit = local // width, local % width
        positions, slot = element.unique(return_inverse=True)
        # distinct bits of one element: their sum is their OR
        masks = torch.zeros(len(positions), dtype=torch.int64).scatter_add_(0, slot, 1 << bit)
        if width < 64:  # the unsigned pattern as the signed integer of the same bits
            masks = torch.where(masks >= 1 << (width - 1), masks - (1 << width), masks)
        device = targets[i].weight.device
        patch.parametrize(
            targets[i], _flipper(positions.to(device), masks.to(_INT_VIEW[width // 8]).to(device))
        )
