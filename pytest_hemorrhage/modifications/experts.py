"""Mixture-of-experts weights stored fused: one 3-D parameter holding every expert's matrix.

transformers 5 keeps a MoE layer's experts as ``gate_up_proj`` / ``down_proj`` parameters of
shape ``(experts, out, in)``, or ``(experts, in, out)`` where the module computes ``x @ w``
(GPT-OSS, Llama 4), not as ``nn.Linear`` modules. Here each expert's matrix is a weight like
any linear layer's: a :class:`~.registry.Target` with an ``expert`` index, seen as
``(out, in)`` so that per-row and per-group methods group along the input dimension as they do
for a linear layer, and parametrized by :class:`ExpertEdit`, which applies one function per
expert to the stacked parameter (the original stays untouched and comes back exactly).

Patterns name an expert parameter by its dotted name (``model.layers.0.mlp.experts.down_proj``)
or its module's (``model.layers.0.mlp.experts``); a trailing index selects experts:
``*.experts.gate_up_proj[3]``, ``*.experts[0-3,7]``, ``*[5]``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "ExpertEdit",
    "ExpertStack",
    "cache_per_call",
    "expert_stacks",
    "format_indices",
    "matches_expert",
    "stored",
]

_INDEXED = re.compile(r"(.*)\[(\d+(?:-\d+)?(?:,\d+(?:-\d+)?)*)\]")


@dataclass(frozen=True)
class ExpertStack:
    """One parameter holding every expert's matrix, ``(experts, out, in)`` or, ``transposed``,
    ``(experts, in, out)``."""

    name: str  # dotted parameter name
    module: nn.Module
    param: str
    transposed: bool
    count: int  # experts

    @property
    def module_name(self) -> str:
        return self.name.rpartition(".")[0]


def stored(module: nn.Module, param: str) -> torch.Tensor:
    """The tensor ``module.param`` is stored in: the original under a parametrization."""
    if parametrize.is_parametrized(module, param):
        return module.parametrizations[param].original
    return getattr(module, param)


def _names(module: nn.Module) -> list[str]:
    names = list(module._parameters)
    if parametrize.is_parametrized(module):
        names += [n for n in module.parametrizations if n not in names]
    return names


def _is_expert_module(name: str, module: nn.Module) -> bool:
    # torch's own layers (Conv1d's 3-D weight) are never experts; the rest by the name
    # transformers gives every experts class and attribute (``*Experts``, ``.experts``)
    if type(module).__module__.startswith("torch."):
        return False
    return "expert" in type(module).__name__.lower() or "expert" in name.lower()


def expert_stacks(model: nn.Module, within: str = "") -> list[ExpertStack]:
    """Every fused expert parameter under the module named ``within`` (all: ``""``), in model
    order: 3-D floating-point parameters of a mixture-of-experts module."""
    hidden = _hidden_size(model)
    out = []
    for name, module in model.named_modules():
        if within and not name.startswith(within + "."):
            continue
        if not _is_expert_module(name, module):
            continue
        for param in _names(module):
            tensor = stored(module, param)
            if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3:
                continue
            if not tensor.is_floating_point():
                continue
            out.append(
                ExpertStack(
                    f"{name}.{param}" if name else param,
                    module,
                    param,
                    _transposed(module, param, tuple(tensor.shape), hidden),
                    tensor.shape[0],
                )
            )
    return out


def _hidden_size(model: nn.Module) -> int | None:
    config: Any = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    size = getattr(config, "hidden_size", None)
    return size if isinstance(size, int) else None


def _transposed(module: nn.Module, param: str, shape: tuple[int, ...], hidden: int | None) -> bool:
    """Whether ``module.param`` is stored ``(experts, in, out)``.

    transformers' ``@use_experts_implementation`` declares it (``is_transposed``: GPT-OSS);
    a module with ``input_size``/``output_size`` (JetMoE) says it by its shape; otherwise the
    hidden size is the input of the up/gate projections and the output of the down one (Llama
    4's undeclared ``(experts, hidden, 2 * intermediate)``). Undecided: ``(experts, out, in)``
    as ``nn.Linear``.
    """
    declared = getattr(module, "is_transposed", None)
    if isinstance(declared, bool):
        return declared
    rows, cols = shape[1:]
    sizes = getattr(module, "input_size", None), getattr(module, "output_size", None)
    if all(isinstance(s, int) for s in sizes) and sizes[0] != sizes[1]:
        return (rows, cols) == sizes
    if hidden is None or rows == cols:
        return False
    if "down" in param or param == "w2":  # the output is the hidden state
        return cols == hidden
    return rows == hidden


def _indices(text: str) -> set[int]:
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def matches_expert(pattern: str, stack: ExpertStack, index: int) -> bool:
    """Whether ``pattern`` names expert ``index`` of ``stack``: a glob of the parameter's or
    its module's name, optionally followed by expert indices (``[3]``, ``[0-3,7]``)."""
    indexed = _INDEXED.fullmatch(pattern)
    if indexed:
        pattern = indexed.group(1)
        if index not in _indices(indexed.group(2)):
            return False
    return fnmatch.fnmatchcase(stack.name, pattern) or fnmatch.fnmatchcase(
        stack.module_name, pattern
    )


def format_indices(indices: set[int]) -> str:
    """``[3]``, ``[0-2,5]``: expert indices in the syntax patterns take."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return "[" + ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) + "]"


Fn = Callable[[torch.Tensor], torch.Tensor]


class ExpertEdit(nn.Module):
    """A parametrization of a fused expert parameter: per expert, a function of its
    ``(out, in)`` matrix; experts without one pass through unchanged.

    An edit holds one function per expert: a later function for an expert that already has one
    goes into a new edit registered after it (``Patch.parametrize``), so each expert's
    functions run in the order they were given.
    """

    def __init__(self, transposed: bool) -> None:
        super().__init__()
        self.transposed = transposed
        self.fns: dict[int, Fn] = {}

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        pieces = list(w.unbind(0))
        for index, fn in self.fns.items():
            m = pieces[index]
            pieces[index] = fn(m.t()).t() if self.transposed else fn(m)
        return torch.stack(pieces)


def cache_per_call(module: nn.Module) -> list[Any]:
    """Hook ``module`` so that its parametrized tensors are computed once per call of it;
    returns the hook handles (to remove).

    transformers' eager experts loop reads the whole stacked parameter once per routed expert
    (``self.gate_up_proj[expert_idx]``); under an :class:`ExpertEdit` each read would run every
    expert's function again. ``torch.nn.utils.parametrize.cached`` for the duration of the call
    keeps one evaluation: one layer's experts, released when the call returns (or raises).
    """
    opened: list[Any] = []

    def enter(module: nn.Module, args: Any) -> None:
        context = parametrize.cached()
        context.__enter__()
        opened.append(context)

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        if opened:
            opened.pop().__exit__(None, None, None)

    return [
        module.register_forward_pre_hook(enter),
        module.register_forward_hook(leave, always_call=True),
    ]
