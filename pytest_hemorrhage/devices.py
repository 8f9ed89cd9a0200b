"""Where the model runs: ``--hemorrhage-device`` checked against the devices that exist, one
device per pytest-xdist worker, and ``--hemorrhage-device-map`` (accelerate) parsed and checked.

Every check here runs at startup, so a device that does not exist is one usage error naming the
ones that do, not a torch assertion in every test. Where a loaded model's tensors are (offloaded
or not) is asked of ``placement``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
from typing import TYPE_CHECKING, Any

from .errors import HemorrhageError
from .loading import kind, model_source, quiet

if TYPE_CHECKING:
    from .settings import Settings

__all__ = [
    "ACCELERATE_EXTRA",
    "MAP_KEYWORDS",
    "available",
    "check_device",
    "check_devices",
    "check_map_devices",
    "parse_device_map",
    "unplaced",
    "worker_device",
]

ACCELERATE_EXTRA = "pytest-hemorrhage[accelerate]"

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


def check_devices(settings: Settings, workerid: str | None = None) -> Settings:
    """Startup checks of ``--hemorrhage-device`` and ``--hemorrhage-device-map``; returns the
    settings with this pytest-xdist worker's device (``auto`` with several CUDA devices: worker
    ``gwN`` gets ``cuda:(N mod count)``).

    Refuses a device that does not exist, a device map that does not parse, names a device
    that does not exist, or leaves weights of the model unplaced; each names what exists.
    """
    loads = settings.model or settings.candidate or settings.reference
    if settings.device_map is None and (settings.device == "cpu" or not loads):
        if settings.device in ("auto", "cpu"):
            return settings  # nothing to look up: torch is not even imported
    with quiet():
        import torch

    devices = available()
    check_device(settings.device, devices)
    if settings.device == "auto":
        assigned = worker_device(workerid, torch.cuda.device_count())
        if assigned is not None:
            settings = dataclasses.replace(settings, device=assigned)
    if settings.device_map is None:
        return settings
    device_map = parse_device_map(settings.device_map)
    if importlib.util.find_spec("accelerate") is None:
        raise HemorrhageError(
            f"--hemorrhage-device-map={settings.device_map}: needs accelerate; "
            f"pip install '{ACCELERATE_EXTRA}'"
        )
    check_map_devices(device_map, devices)
    if isinstance(device_map, dict) and settings.model and kind(settings.model) != "factory":
        names = _weight_names(model_source(settings.model), settings)
        missing = unplaced(device_map, names)
        if missing:
            shown = ", ".join(missing[:3]) + (
                f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            )
            raise HemorrhageError(
                f"--hemorrhage-device-map leaves {len(missing)} weight(s) of {settings.model} "
                f"on no device ({shown}); map every module (a key places the module and "
                "everything under it), or use auto"
            )
    return settings


def _weight_names(source: str, settings: Settings) -> list[str]:
    """Names of the model's parameters and buffers, from its config alone (no weights read)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with quiet():
        config = AutoConfig.from_pretrained(source, trust_remote_code=settings.trust_remote_code)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(
                config, trust_remote_code=settings.trust_remote_code
            )
    return [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
