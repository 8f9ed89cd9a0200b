"""Routing hemorrhage on mixture-of-experts models: how often the router sends a token to other
experts once the model is modified.

Quantizing or pruning a MoE model moves the router's inputs (and, when the router itself is a
target, its weights), so a token can leave the experts it was trained to use: damage that the
token metrics see only as a blur. ``routing_flip`` is the share of (token, MoE layer) pairs
whose set of routed experts differs from the baseline's, with the evaluation window as the
sampling unit. A router is the ``gate`` or ``router`` beside an ``experts`` module whose forward
returns the chosen expert indices last (transformers' MoE blocks: Mixtral, Qwen2/3-MoE,
DeepSeek-V3, GPT-OSS, ...); hooks on the routers read them during forward passes over the first
``WINDOWS`` evaluation windows, with every measure of a MoE model (``session.default_extras``).
A MoE model whose routers cannot be read says so in the details.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..stats import mean_se

if TYPE_CHECKING:
    from ..modifications.registry import Patch
    from . import HarnessView

__all__ = ["WINDOWS", "baseline_routes", "routers", "routing_metrics"]

WINDOWS = 8  # evaluation windows whose tokens' routes are compared


def routers(model: nn.Module) -> dict[str, nn.Module]:
    """The routers of ``model``'s MoE blocks by name, in model order (empty: a dense model)."""
    found = {}
    for name, module in model.named_modules():
        parent, _, child = name.rpartition(".")
        if child in ("gate", "router") and parent:
            if hasattr(model.get_submodule(parent), "experts"):
                found[name] = module
    return found


def _routes(model: nn.Module, harness: HarnessView) -> dict[str, torch.Tensor] | str:
    """Per router, the sorted expert indices (tokens, k) over the first windows; a string
    saying why when a router's output holds no indices."""
    found = routers(model)
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in found}
    bad: list[str] = []

    def hook(name: str):
        def read(module: nn.Module, args: Any, out: Any) -> None:
            parts = out if isinstance(out, tuple) else (out,)
            indices = [
                t for t in parts if isinstance(t, torch.Tensor) and not t.is_floating_point()
            ]
            if not indices:
                bad.append(name)
                return
            seen[name].append(indices[-1].reshape(-1, indices[-1].shape[-1]).sort(-1).values.cpu())

        return read

    handles = [m.register_forward_hook(hook(n)) for n, m in found.items()]
    try:
        windows = harness.windows.eval[:WINDOWS]
        device = next(model.parameters()).device
        with torch.inference_mode():
            for i in range(0, len(windows), harness.batch_size):
                model(input_ids=windows[i : i + harness.batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if bad:
        return f"{bad[0]} returns no expert indices (custom routing code): routing_flip unavailable"
    return {name: torch.cat(parts) for name, parts in seen.items()}


def baseline_routes(harness: HarnessView) -> Any:
    """The baseline's routes, once per harness (before any stage is applied)."""
    key = ("routing", WINDOWS)
    if key not in harness.memo:
        harness.memo[key] = _routes(harness.model, harness) if routers(harness.model) else None
    return harness.memo[key]


def routing_metrics(
    harness: HarnessView, patch: Patch
) -> tuple[dict[str, float], dict[str, float | None], dict[str, Any]]:
    """``routing_flip`` of ``patch.model`` against the baseline's routes, per layer in details."""
    base = harness.memo.get(("routing", WINDOWS))
    if base is None:
        return {}, {}, {"routing": "no mixture-of-experts router: routing_flip does not apply"}
    if isinstance(base, str):
        return {}, {}, {"routing": base}
    new = _routes(patch.model, harness)
    if isinstance(new, str) or set(new) != set(base):
        reason = new if isinstance(new, str) else "the candidate's routers are not the baseline's"
        return {}, {}, {"routing": reason}
    tokens = next(iter(base.values())).shape[0]
    per_window = tokens // min(WINDOWS, len(harness.windows.eval))
    flips = torch.stack([(new[n] != base[n]).any(-1) for n in base])  # (layers, tokens)
    unit = (torch.arange(tokens) // per_window).repeat(len(base))
    value, se = mean_se(flips.flatten().double(), unit, harness.level)
    layers = {n: round(f.double().mean().item(), 6) for n, f in zip(base, flips, strict=True)}
    begins = next((n for n, share in layers.items() if share > 0), None)
    details = {"routing": {"layers": layers, "tokens": tokens, "drift_begins": begins}}
    return {"routing_flip": value}, {"routing_flip": se}, details
