"""Where a loaded model's tensors are: the device its inputs go to, and the weights accelerate
offloaded (held on the meta device between forward passes, kept in CPU memory or on disk by a
hook) read from where they really are.

These are queries of a model already loaded, below loading and the harness that both ask them;
the checks of ``--hemorrhage-device`` and ``--hemorrhage-device-map`` are in ``devices``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["execution_device", "offloaded_modules", "offloaded_value", "state_tensors"]


def execution_device(model: Any) -> Any:
    """Where inputs go: the device of the model's input embedding as accelerate runs it (its
    hook's execution device when its weights are offloaded), else the first parameter's."""
    import torch

    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    hook = getattr(embed, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    for p in (embed or model).parameters():
        if not p.is_meta:
            return p.device
    return torch.device("cpu")


def offloaded_modules(model: Any) -> dict[int, str]:
    """``id(module) -> name`` of every module whose own weights accelerate offloaded (held on
    the meta device between forward passes, loaded from CPU memory or disk by its hook)."""
    return {
        id(m): name
        for name, m in model.named_modules()
        if any(t.is_meta for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)))
    }


def offloaded_value(model: Any, name: str) -> Any:
    """The value of offloaded parameter or buffer ``name`` (meta in the model), read from the
    CPU memory or disk where accelerate keeps it; None when no hook holds it."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        weights = getattr(h, "weights_map", None)
        if weights is not None and attr in weights:
            return weights[attr]
    return None


def state_tensors(model: Any) -> dict[str, Any]:
    """``model.state_dict()`` with offloaded entries read from where accelerate keeps them."""
    state = dict(model.state_dict())
    for name, t in state.items():
        if t.is_meta:
            value = offloaded_value(model, name)
            if value is not None:
                state[name] = value
    return state
