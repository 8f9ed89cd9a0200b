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

Calibration follows the router (:func:`routed_hooks`): each expert's matrices see the tokens
the router sent to that expert, as transformers' experts forward computes them.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Callable, Collection, Sequence
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
    "routed_hooks",
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
    cls = type(module)
    if parametrize.is_parametrized(module):  # parametrize subclasses it in its own module
        cls = cls.__bases__[0]
    if cls.__module__.startswith("torch."):
        return False
    return "expert" in cls.__name__.lower() or "expert" in name.lower()


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


# the routing argument of transformers' experts forward (``experts(hidden_states, top_k_index,
# top_k_weights)``), by the names its MoE blocks pass it under
_ROUTING = ("top_k_index", "router_indices", "selected_experts", "topk_indices")
_WEIGHTS = ("top_k_weights", "routing_weights", "router_scores", "topk_weights")
Record = Callable[[ExpertStack, int, torch.Tensor], None]


def routed_hooks(
    stacks: Sequence[ExpertStack], record: Record, wanted: Collection[str] | None = None
) -> list[Any]:
    """Make the experts modules of ``stacks`` hand each expert's matrices the inputs the router
    sent that expert, on every call; returns handles whose ``remove()`` undoes it.

    transformers calls every fused experts module as ``experts(hidden_states (tokens, hidden),
    top_k_index (tokens, k), top_k_weights (tokens, k))``, whichever kernel then runs it (eager
    loop, ``grouped_mm``, ``batched_mm``): expert ``e`` reads the rows of ``hidden_states``
    whose ``top_k_index`` holds ``e`` (an index past the last expert is a sentinel no expert
    reads). Those rows are the input of its up/gate matrices; its down matrix reads the gated
    intermediate. For a layout known here (``gate_up_proj`` or ``up_proj``, ``down_proj``) the
    module runs transformers' eager experts loop meanwhile (:class:`_RoutedForward`), which
    computes that intermediate once for the output and the record alike; otherwise a hook
    records the up/gate inputs only (the down matrices' experts then count as never reached).
    For each call, ``record(stack, expert, x)`` gets ``x`` (tokens, in) of every expert with
    tokens, ``wanted`` (target names, ``stack.name[expert]``) limiting which.
    """
    by_module: dict[int, list[ExpertStack]] = {}
    for stack in stacks:  # every stack of a module: the down input is computed from the up
        by_module.setdefault(id(stack.module), []).append(stack)
    handles: list[Any] = []
    for group in by_module.values():
        module = group[0].module
        by_param = {s.param: s for s in group}
        known = any(_is_down(p) for p in by_param) and (
            "gate_up_proj" in by_param or ("up_proj" in by_param and hasattr(module, "act_fn"))
        )
        # an instance-level forward is someone's wrapper (accelerate's offload hooks): kept
        if (
            known
            and "forward" not in module.__dict__
            and not getattr(module, "has_post_expert_norm", False)
        ):
            handles.append(_RoutedForward(group, record, wanted))
        else:
            hook = functools.partial(_route_inputs, group, record, wanted)
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


def _routing(
    count: int, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor, torch.Tensor]]] | None:
    """The experts call's ``hidden_states`` (tokens, hidden) and, per expert with tokens, its
    index, its rows and their flat top-k slots; None if the call does not read as one."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    index = args[1] if len(args) > 1 else next((kwargs[k] for k in _ROUTING if k in kwargs), None)
    if not isinstance(hidden, torch.Tensor) or not isinstance(index, torch.Tensor):
        return None
    hidden = hidden.reshape(-1, hidden.shape[-1])
    flat = index.detach().reshape(-1)
    k = len(flat) // len(hidden)
    # one stable sort: each expert's slots contiguous, in token order
    order = torch.argsort(flat, stable=True)
    sizes = torch.bincount(flat, minlength=count)[:count].tolist()
    slots = order.split([*sizes, len(order) - sum(sizes)])
    return hidden, [(e, slots[e] // k, slots[e]) for e in range(count) if sizes[e]]


def _route_inputs(
    stacks: list[ExpertStack],
    record: Record,
    wanted: Collection[str] | None,
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    """The pre-hook of an experts module of a layout not known here: up/gate inputs only."""
    routing = _routing(stacks[0].count, args, kwargs)
    if routing is None:
        return
    hidden, experts = routing
    with torch.no_grad():
        for expert, rows, _ in experts:
            for stack in stacks:
                if not _is_down(stack.param) and _wants(wanted, stack, expert):
                    record(stack, expert, hidden[rows].detach())


def _wants(wanted: Collection[str] | None, stack: ExpertStack, expert: int) -> bool:
    return wanted is None or f"{stack.name}[{expert}]" in wanted


class _RoutedForward:
    """An experts module's forward while calibration follows its router: transformers' eager
    experts loop (each expert on its routed rows, its output weighted by the router and summed
    per token), recording each expert's inputs as it computes them. A hook beside the module's
    own kernel would have to compute every routed token's up projection a second time for the
    down matrices' inputs (about half the experts' cost, ``bench_experts``)."""

    def __init__(
        self, stacks: list[ExpertStack], record: Record, wanted: Collection[str] | None
    ) -> None:
        self.stacks, self.record, self.wanted = stacks, record, wanted
        self.module = stacks[0].module
        self.by_param = {s.param: s for s in stacks}
        self.down = next(s for s in stacks if _is_down(s.param))
        self.module.forward = self

    def remove(self) -> None:
        if self.module.__dict__.get("forward") is self:
            del self.module.forward

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        routing = _routing(self.down.count, args, kwargs)
        weights = (
            args[2] if len(args) > 2 else next((kwargs[k] for k in _WEIGHTS if k in kwargs), None)
        )
        if routing is None or not isinstance(weights, torch.Tensor):
            # not called as transformers calls experts: its own forward, nothing recorded
            # (the experts then count as never reached, and fall back)
            return type(self.module).forward(self.module, *args, **kwargs)
        hidden, experts = routing
        weights = weights.reshape(-1)
        out = torch.zeros_like(hidden)
        with parametrize.cached():  # one evaluation of an edited parameter per call
            for expert, rows, slots in experts:
                x = hidden[rows]
                for stack in self.stacks:
                    if not _is_down(stack.param) and _wants(self.wanted, stack, expert):
                        self.record(stack, expert, x.detach())
                gated = _gated(self.module, self.by_param, expert, x)
                if gated is None:  # not reached: routed_hooks picks known layouts
                    raise TypeError(f"{type(self.module).__name__}: no up projection")
                if _wants(self.wanted, self.down, expert):
                    self.record(self.down, expert, gated.detach())
                y = _expert_linear(self.down, expert, gated) * weights[slots, None]
                out.index_add_(0, rows, y.to(out.dtype))
        return out


def _is_down(param: str) -> bool:
    return "down" in param or param == "w2"


def _expert_linear(stack: ExpertStack, expert: int, x: torch.Tensor) -> torch.Tensor:
    """``x`` through expert ``expert`` of ``stack`` (and its ``_bias`` parameter if any)."""
    w = getattr(stack.module, stack.param)[expert]
    y = x.to(w.dtype) @ (w if stack.transposed else w.t())
    bias = getattr(stack.module, f"{stack.param}_bias", None)
    return y if not isinstance(bias, torch.Tensor) else y + bias[expert]


def _gated(
    module: nn.Module, by_param: dict[str, ExpertStack], expert: int, x: torch.Tensor
) -> torch.Tensor | None:
    """What expert ``expert``'s down matrix reads for inputs ``x``, computed as transformers'
    experts forwards do (every kernel: ``_apply_gate`` of the fused gate/up output, GPT-OSS's
    clamped interleaved halves included, or the activation of the gate times the up); None for
    a layout not known here."""
    if "gate_up_proj" in by_param:
        out = _expert_linear(by_param["gate_up_proj"], expert, x)
        apply_gate = getattr(module, "_apply_gate", None)
        if callable(apply_gate):
            return apply_gate(out)
        gate, up = out.chunk(2, dim=-1)
        return module.act_fn(gate) * up
    if "up_proj" in by_param and hasattr(module, "act_fn"):
        up = _expert_linear(by_param["up_proj"], expert, x)
        if "gate_proj" in by_param:
            return module.act_fn(_expert_linear(by_param["gate_proj"], expert, x)) * up
        return module.act_fn(up)
    return None
