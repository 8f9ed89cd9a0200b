"""Modification registry: a frozen, self-validating config class plus the handler that applies it.

A handler never writes into the model's tensors. It records every change on a `Patch`
(parametrizations, module swaps, attribute sets) and `Patch.undo()` puts the original objects
back, so the baseline is restored bit for bit without ever copying its weights.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import HemorrhageError
from .coverage import BlockWeight, block_weights, starred, touched_record
from .experts import ExpertEdit, ExpertStack, cache_per_call, expert_stacks, matches_expert, stored
from .handler import Context

__all__ = [
    "LogitsProcessor",
    "Modification",
    "Patch",
    "Target",
    "apply",
    "get",
    "make",
    "names",
    "names_by_expert_support",
    "register_modification",
    "replace_blocks",
]


@dataclass(frozen=True, kw_only=True)
class Modification:
    """Base of every modification config.

    Args:
        include: glob patterns of module names to modify, replacing the default targets
            (the linear layers and fused expert weights inside the transformer blocks), e.g.
            ``("*.mlp.*",)``. A mixture-of-experts weight stored as one 3-D parameter is named
            by the parameter (``model.layers.0.mlp.experts.gate_up_proj``) or its module
            (``model.layers.0.mlp.experts``), and one or some experts by a trailing index:
            ``("*.experts.gate_up_proj[3]",)``, ``("*.experts[0-3,7]",)``, ``("*experts*",)``.
        exclude: glob patterns of module names to leave alone, e.g. ``("*.layers.0.*",)``;
            the same syntax.

    A subclass says how it treats fused expert weights (``per_expert``) and what it changes
    (``changes``), for the touched share every result reports (``details["touched"]``).
    """

    name: ClassVar[str] = ""
    # True: each expert's (out, in) matrix of a fused expert weight is a target (the handler
    # only reads Target.weight and calls Patch.parametrize). False: a selection that reaches
    # fused expert weights is refused in one line. None: they are never its targets (it picks
    # its own structures: heads, channels).
    per_expert: ClassVar[bool | None] = False
    # "weights" (a share of the block weights left unchanged without include/exclude is
    # noted in the summary), "structure" (structured pruning: changes part of the blocks by
    # design), or what it changes instead of weights, as the reports word it: "decoding",
    # "the KV cache", "the block list (adds copies)"
    changes: ClassVar[str] = "weights"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for field in ("include", "exclude"):
            value = getattr(self, field)
            if isinstance(value, str):
                object.__setattr__(self, field, (value,))
            elif not all(isinstance(p, str) for p in value):
                raise HemorrhageError(
                    f"{self.name}: {field}={value!r} must be glob patterns of module names, "
                    f"e.g. {field}=('*.mlp.*',)"
                )
            else:
                object.__setattr__(self, field, tuple(value))

    def params(self) -> dict[str, Any]:
        """Every parameter, JSON-ready; empty targeting patterns left out."""
        return {
            f.name: _jsonable(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if not (f.name in ("include", "exclude") and not getattr(self, f.name))
        }

    def to_dict(self) -> dict[str, Any]:
        """Name plus parameters, for reports."""
        return {"name": self.name, **self.params()}

    def targets(self, model: nn.Module) -> list[Target]:
        """The weight matrices this modification edits, in model order."""
        return select_targets(model, self.include, self.exclude, self.name, self.per_expert)


Handler = Callable[[Any, nn.Module, "Patch", "Context"], None]
# processor(ids, logits) -> logits: ids (batch, L) the tokens seen, logits (batch, T, vocab) with
# T <= L the logits at the last T positions (logits[:, j] follows ids[:, :L - T + j + 1]).
LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_REGISTRY: dict[str, tuple[type[Modification], Handler]] = {}


def register_modification(name: str, config: type[Modification]) -> Callable[[Handler], Handler]:
    """Register ``handler(config, model, patch, context)`` under ``name``.

    Example:
        >>> @dataclass(frozen=True, kw_only=True)
        ... class Scale(Modification):
        ...     factor: float = 1.0
        >>> @register_modification("my.scale", Scale)
        ... def scale(config, model, patch, context):
        ...     for t in config.targets(model):
        ...         patch.parametrize(t, lambda w: w * config.factor)
    """

    def decorate(handler: Handler) -> Handler:
        existing = _REGISTRY.get(name, (None, handler))[1]
        if _qualname(existing) != _qualname(handler):  # a re-imported module may re-register
            raise HemorrhageError(
                f"modification {name!r} is already registered by {_qualname(existing)}; "
                "choose another name"
            )
        config.name = name
        _REGISTRY[name] = (config, handler)
        return handler

    return decorate


def _qualname(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def names() -> list[str]:
    """Every registered modification name, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> tuple[type[Modification], Handler]:
    """The config class and handler registered under ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise HemorrhageError(
            f"unknown modification {name!r}; registered: {', '.join(sorted(_REGISTRY))}"
        ) from None


def make(name: str | Modification, params: Mapping[str, Any] | None = None) -> Modification:
    """Build and validate the config for ``name`` from keyword parameters."""
    if isinstance(name, Modification):
        return dataclasses.replace(name, **params) if params else name
    config_cls, _ = get(name)
    known = [f.name for f in dataclasses.fields(config_cls)]
    unknown = sorted(set(params or {}) - set(known))
    if unknown:
        raise HemorrhageError(
            f"{name}: unknown parameter(s) {', '.join(unknown)}; valid: {', '.join(known)}"
        )
    try:
        return config_cls(**(params or {}))
    except TypeError as exc:  # missing required parameter
        raise HemorrhageError(f"{name}: {exc}; valid parameters: {', '.join(known)}") from None


def apply(config: Modification, model: nn.Module, patch: Patch, context: Context) -> None:
    """Apply one modification, recording every change on ``patch``; ``patch.details["touched"]``
    then says what share of the block weights the stages so far changed (``coverage.py``)."""
    _, handler = get(config.name)
    patch.stages.append(config)
    handler(config, model, patch, context)
    patch.details["touched"] = patch.touched()


@dataclass(frozen=True)
class Target:
    """A weight matrix to modify: a linear layer's, or one expert's matrix of a fused expert
    parameter (``expert`` its index, ``name`` ending in ``[expert]``); ``weight`` is always
    (out_features, in_features)."""

    name: str
    module: nn.Module
    transposed: bool  # GPT-2's Conv1D stores (in, out); so do GPT-OSS's experts
    param: str = "weight"
    expert: int | None = None

    @property
    def weight(self) -> torch.Tensor:
        w = getattr(self.module, self.param)
        if self.expert is not None:
            w = w[self.expert]
        return w.t() if self.transposed else w

    @property
    def base(self) -> str:
        """``name`` without the expert index: the module's, or the fused parameter's."""
        return self.name if self.expert is None else self.name.rpartition("[")[0]


def is_conv1d(module: nn.Module) -> bool:
    # by name: transformers is not imported here, and parametrize subclasses the class
    return any(c.__name__ == "Conv1D" for c in type(module).__mro__)


def is_linear(module: nn.Module) -> bool:
    """A dense float linear layer (nn.Linear or GPT-2's Conv1D), parametrized or not.

    Kernel-quantized layers that subclass nn.Linear (bitsandbytes) hold integer weights and
    are not targets of a later stage.
    """
    if not (isinstance(module, nn.Linear) or is_conv1d(module)):
        return False
    if parametrize.is_parametrized(module, "weight"):
        weight = module.parametrizations.weight.original
    else:
        weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.is_floating_point()


def blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer blocks: the ModuleList holding most of the parameters."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise HemorrhageError(
            f"{type(model).__name__}: no transformer blocks (nn.ModuleList) found; "
            "pass include=(...) patterns naming the layers to modify"
        )
    return max(lists, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))


def replace_blocks(patch: Patch, prefix: str, new: list[nn.Module], sources: list[int]) -> None:
    """Swap the block list at ``prefix`` for ``new`` (blocks dropped, duplicated or reordered).

    ``sources[i]`` is the index ``new[i]`` had before. Keeps transformers' conventions, through
    ``patch`` so that undo restores them: every ``layer_idx`` equals its block's position (the
    KV cache has one slot per block), and ``config.num_hidden_layers`` / ``layer_types`` match.
    """
    old = patch.model.get_submodule(prefix)
    for position, block in enumerate(new):
        for module in block.modules():
            index = getattr(module, "layer_idx", None)
            if isinstance(index, int) and index != position:
                patch.setattr(module, "layer_idx", position)
    patch.swap_module(prefix, nn.ModuleList(new))
    cfg: Any = getattr(patch.model, "config", None)
    if cfg is not None and isinstance(getattr(cfg, "num_hidden_layers", None), int):
        # transformers runs layers[:num_hidden_layers] and sizes its KV caches from the config
        patch.setattr(cfg, "num_hidden_layers", cfg.num_hidden_layers + len(new) - len(old))
        layer_types = getattr(cfg, "layer_types", None)
        if isinstance(layer_types, (list, tuple)) and all(i < len(layer_types) for i in sources):
            patch.setattr(cfg, "layer_types", type(layer_types)(layer_types[i] for i in sources))


def select_targets(
    model: nn.Module,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    what: str = "",
    experts: bool | None = False,
) -> list[Target]:
    """Weight matrices matching ``include`` (default: inside the blocks) and not ``exclude``:
    linear layers, and with ``experts`` each expert's matrix of the fused expert weights
    (``experts=False``: selecting any of them is refused, naming them and what works)."""
    chosen = [
        Target(n, m, is_conv1d(m))
        for n, m in _linears(model, include)
        if not any(fnmatch.fnmatchcase(n, p) for p in exclude)
    ]
    stacks = [
        (stack, picked)
        for stack in _stacks(model, include)
        if (picked := _experts_chosen(stack, include, exclude))
    ]
    if stacks and experts is False:
        raise HemorrhageError(_refusal(model, what, [s for s, _ in stacks]))
    if stacks and experts:
        order = {id(m): i for i, (_, m) in enumerate(model.named_modules())}
        chosen += [
            Target(f"{s.name}[{i}]", s.module, s.transposed, s.param, i)
            for s, picked in stacks
            for i in picked
        ]
        chosen.sort(key=lambda t: order[id(t.module)])  # stable: experts after their module's
    if not chosen:
        example = next((n for n, m in model.named_modules() if is_linear(m)), "?")
        raise HemorrhageError(
            f"{what}: no linear layer matches include={include!r} exclude={exclude!r}; "
            f"layer names look like {example!r}"
        )
    return chosen


def _linears(model: nn.Module, include: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    if include:
        return [
            (n, m)
            for n, m in model.named_modules()
            if is_linear(m) and any(fnmatch.fnmatchcase(n, p) for p in include)
        ]
    prefix, _ = blocks(model)
    return [(n, m) for n, m in model.named_modules() if is_linear(m) and n.startswith(prefix + ".")]


def _stacks(model: nn.Module, include: tuple[str, ...]) -> list[ExpertStack]:
    return expert_stacks(model) if include else expert_stacks(model, blocks(model)[0])


def _experts_chosen(
    stack: ExpertStack, include: tuple[str, ...], exclude: tuple[str, ...]
) -> list[int]:
    return [
        i
        for i in range(stack.count)
        if (not include or any(matches_expert(p, stack, i) for p in include))
        and not any(matches_expert(p, stack, i) for p in exclude)
    ]


def _refusal(model: nn.Module, what: str, stacks: list[ExpertStack]) -> str:
    """One line: ``what`` cannot modify these fused expert weights; what can."""
    try:
        prefix, layers = blocks(model)
        weights = list(block_weights(prefix, layers).values())
    except HemorrhageError:
        prefix, weights = "", []
    patterns = dict.fromkeys(starred(prefix, s.name) for s in stacks)
    stacked = sum(w.numel for w in weights if w.experts and w.pattern in patterns)
    total = sum(w.numel for w in weights)
    size = f", {stacked / total:.0%} of the block weights" if total else ""
    able = ", ".join(n for n in names_by_expert_support() if n != what)
    return (
        f"{what}: cannot modify the mixture-of-experts weights stored as 3-D parameters "
        f"({', '.join(patterns)}{size}) expert by expert; per-expert methods: {able}; or pass "
        "exclude=('*experts*',) to modify the other weights only"
    )


def names_by_expert_support() -> list[str]:
    """The registered modifications that modify fused expert weights expert by expert."""
    return sorted(n for n, (config, _) in _REGISTRY.items() if config.per_expert)


class _Edit(nn.Module):
    """A weight function as the nn.Module that torch.nn.utils.parametrize requires."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], transposed: bool) -> None:
        super().__init__()
        self.fn, self.transposed = fn, transposed

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.fn(w.t()).t() if self.transposed else self.fn(w)


class Patch:
    """Undo log of reversible changes to a model.

    Changes are undone last-first; undo runs every step even if one raises, so a handler
    that fails halfway still leaves the original model behind.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.logits_processors: list[LogitsProcessor] = []  # decoding changes, in order
        # parametrize re-seats the original tensor on itself (set_), which bumps its version
        # counter without changing a bit; data_ptr -> version right after the last such bump
        self.reseated: dict[int, int] = {}
        # what handlers report about how they applied, JSON-ready (e.g. GGUF's width fallbacks:
        # {"fallbacks": {"quant.gguf": {...}}}); the harness copies it into Result.details
        self.details: dict[str, Any] = {}
        self.stages: list[Modification] = []  # the configs applied through it (``apply``)
        self._undo: list[Callable[[], None]] = []
        # what the changes touched: stored tensor id -> the experts touched (None: all of it),
        # against the block weights as they were before the first change
        self._touched: dict[int, set[int] | None] = {}
        self._weights: dict[int, BlockWeight] | None = None
        self._cached: set[int] = set()  # expert modules hooked to evaluate once per call

    def parametrize(self, target: Target, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Compute ``target``'s weight as ``fn(weight)`` on every use; the original is kept.

        For one expert of a fused expert parameter, ``fn`` gets and returns that expert's
        (out, in) matrix; the others pass through.
        """
        module, param = target.module, target.param
        original = stored(module, param)
        self.touch(target)
        if target.expert is not None:
            chain = (
                module.parametrizations[param] if parametrize.is_parametrized(module, param) else ()
            )
            last = chain[-1] if len(chain) else None
            if isinstance(last, ExpertEdit) and target.expert not in last.fns:
                last.fns[target.expert] = fn  # this expert's next link: see ExpertEdit
                return
            edit: nn.Module = ExpertEdit(target.transposed)
            edit.fns[target.expert] = fn
            self._cache_per_call(module)
        else:
            edit = _Edit(fn, target.transposed)
        before = original._version
        parametrize.register_parametrization(module, param, edit, unsafe=True)
        # A tensor several modules share (a tied embedding and head) is re-seated once per
        # registration: follow the bumps registrations make, and only those (a write between
        # two of them leaves the recorded version behind, so the harness still sees it).
        ptr = original.data_ptr()
        if original._version != before and self.reseated.get(ptr, before) == before:
            self.reseated[ptr] = original._version

        def undo() -> None:
            if parametrize.is_parametrized(module, param):
                parametrize.remove_parametrizations(module, param, leave_parametrized=False)

        self._undo.append(undo)

    def _cache_per_call(self, module: nn.Module) -> None:
        if id(module) in self._cached:
            return
        self._cached.add(id(module))
        handles = cache_per_call(module)

        def undo() -> None:
            for handle in handles:
                handle.remove()
            self._cached.discard(id(module))

        self._undo.append(undo)

    def touch(self, target: Target) -> None:
        """Count ``target`` as touched without changing it (``parametrize`` and module swaps
        count theirs): a handler whose parameters leave some targets as they are (zero noise,
        a full rank, bit flips drawn over every target that landed elsewhere) still applied
        to them, and the touched share should say so."""
        self._touch(stored(target.module, target.param), target.expert)

    def _touch(self, tensor: torch.Tensor, expert: int | None = None) -> None:
        """Record that ``tensor`` (or its expert ``expert``) changes, for :meth:`touched`."""
        if self._weights is None:  # the first change: the block weights as they were
            try:
                self._weights = block_weights(*blocks(self.model))
            except HemorrhageError:  # no block list: no share to report
                self._weights = {}
        key = id(tensor)
        if expert is None:
            self._touched[key] = None
        elif (experts := self._touched.setdefault(key, set())) is not None:
            experts.add(expert)

    def touched(self) -> dict[str, Any]:
        """What the changes so far touched: ``coverage.touched_record``."""
        return touched_record(self._weights or {}, self._touched, self.stages)

    def swap_module(self, name: str, new: nn.Module) -> nn.Module:
        """Replace the submodule at dotted ``name`` by ``new``; returns the original."""
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        return self.setattr(parent, child, new)

    def setattr(self, obj: object, attr: str, value: object) -> object:
        """Set ``obj.attr = value`` until undo; returns the original value."""
        original = getattr(obj, attr)
        if isinstance(original, nn.Module):  # its weights the new value does not keep change
            kept = {id(p) for p in value.parameters()} if isinstance(value, nn.Module) else set()
            for p in original.parameters():
                if id(p) not in kept:
                    self._touch(p)
        elif isinstance(original, torch.Tensor):
            self._touch(original)
        setattr(obj, attr, value)
        self._undo.append(lambda: setattr(obj, attr, original))
        return original

    def on_undo(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` at undo time, in last-first order with the other changes."""
        self._undo.append(fn)

    def undo(self) -> None:
        errors = []
        while self._undo:
            try:
                self._undo.pop()()
            except Exception as exc:  # keep undoing: every other step must still run
                errors.append(exc)
        self.logits_processors.clear()
        if errors:
            raise errors[0]


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def iter_configs(stages: Any) -> Iterator[Modification]:
    """Normalize a sequence of stages (each a name, a config, or ``(name, {params})``) into
    configs; anything else is an error naming the stage and the expected form."""
    for stage in stages:
        if isinstance(stage, Modification):
            yield stage
        elif isinstance(stage, str):
            yield make(stage)
        elif (
            isinstance(stage, (tuple, list))
            and len(stage) == 2
            and isinstance(stage[0], (str, Modification))
            and isinstance(stage[1], Mapping)
        ):
            yield make(*stage)
        else:
            raise HemorrhageError(
                f"stage {stage!r} is not (name, {{params}}): write e.g. "
                '[("prune.magnitude", {"sparsity": 0.5}), ("quant.rtn", {"bits": 4})], '
                "a name, or a config object"
            )
