"""Where the model runs: ``--hemorrhage-device`` checked against the devices that exist, one
device per pytest-xdist worker, and ``--hemorrhage-device-map`` (accelerate) parsed and checked.

Every check here runs at startup, so a device that does not exist is one usage error naming the
ones that do, not a torch assertion in every test.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .errors import HemorrhageError

__all__ = [
    "MAP_KEYWORDS",
    "available",
    "check_device",
    "check_map_devices",
    "execution_device",
    "offloaded_modules",
    "offloaded_value",
    "parse_device_map",
    "state_tensors",
    "unplaced",
    "worker_device",
]

MAP_KEYWORDS = ("auto", "balanced", "balanced_low_0", "sequential")
_WORKER = re.compile(r"^gw(\d+)$")


def available() -> list[str]:
    """The devices torch can use here: ``cpu``, ``cuda:0`` ..., ``mps``."""
    import torch

    found = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        found.append("mps")
    return found


def check_device(device: str, devices: list[str] | None = None) -> None:
    """Refuse ``device`` (``cpu``, ``cuda``, ``cuda:N``, ``mps``) unless it is among
    ``devices`` (default: :func:`available`), naming the ones that exist."""
    if device in ("auto", "cpu"):
        return
    devices = available() if devices is None else devices
    cuda = [d for d in devices if d.startswith("cuda:")]
    ok = (device == "cuda" and cuda) or device in devices
    if not ok:
        raise HemorrhageError(
            f"--hemorrhage-device={device}: no such device here; the devices that exist are "
            f"{', '.join(devices)}" + ("" if cuda else " (torch sees no CUDA device)")
        )


def worker_device(workerid: str | None, cuda_devices: int) -> str | None:
    """The device of pytest-xdist worker ``workerid`` (``gwN``) under ``--hemorrhage-device=
    auto``: ``cuda:(N mod count)`` when there are several CUDA devices; None (keep ``auto``)
    otherwise, and outside xdist."""
    match = _WORKER.match(workerid or "")
    if match is None or cuda_devices < 2:
        return None
    return f"cuda:{int(match.group(1)) % cuda_devices}"


def parse_device_map(text: str) -> str | dict[str, Any]:
    """``--hemorrhage-device-map``: a keyword accelerate knows, or a JSON object mapping module
    names to devices (a CUDA index, ``cuda:N``, ``cpu``, ``disk``, ``mps``)."""
    if text in MAP_KEYWORDS:
        return text
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict) or not value:
        raise HemorrhageError(
            f"--hemorrhage-device-map={text}: give {', '.join(MAP_KEYWORDS[:2])}, or a JSON "
            'object mapping module names to devices, e.g. {"model.embed_tokens": 0, '
            '"model.layers": 1, "model.norm": 1, "lm_head": "cpu"}'
        )
    for name, device in value.items():
        if not isinstance(name, str) or not isinstance(device, (int, str)) or device is True:
            raise HemorrhageError(
                f"--hemorrhage-device-map: {name!r}: {device!r} is not a device (a CUDA index, "
                "cuda:N, cpu, disk or mps)"
            )
    return value


def check_map_devices(device_map: str | dict[str, Any], devices: list[str] | None = None) -> None:
    """Refuse a JSON device map naming a device that does not exist here."""
    if isinstance(device_map, str):
        return
    devices = available() if devices is None else devices
    for name, device in device_map.items():
        canonical = f"cuda:{device}" if isinstance(device, int) else device
        if canonical == "cuda":
            canonical = "cuda:0"
        if canonical != "disk" and canonical not in devices:
            raise HemorrhageError(
                f"--hemorrhage-device-map: {name!r} is mapped to {device!r}, which does not "
                f"exist here; the devices that exist are {', '.join(devices)} (and disk)"
            )


def unplaced(device_map: dict[str, Any], names: list[str]) -> list[str]:
    """The parameter and buffer ``names`` that no key of ``device_map`` covers (a key covers
    itself and everything under it; ``""`` covers the whole model)."""
    keys = list(device_map)
    return [n for n in names if not any(k == "" or n == k or n.startswith(k + ".") for k in keys)]


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
