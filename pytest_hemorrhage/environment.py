"""Where a reference or a result was measured: the Python, the libraries that compute or load
the numbers, torch's build, the device, the dtype and the thread count. Two runs whose
environments differ can differ in their metrics with no change to the model (drift, not
damage); the reference file, every result and ``--hemorrhage-compare`` say so.

An environment is plain data (a dict; see :func:`measured_in`), recorded once per run, and
named in the JSON report by its content hash (:func:`environment_id`). Versions are read from
the installed distributions (``importlib.metadata``): nothing is imported for this, and a
library installed but unused is still listed, so an environment does not change within a run
as tests import more. Torch's build flags are read only when torch is already imported.

This module imports nothing of the package and may be imported from any layer.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import sys
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = [
    "DRIFT",
    "NOT_RECORDED",
    "PACKAGES",
    "changes",
    "describe_changes",
    "drift_warning",
    "environment_id",
    "measured_in",
]

# What computes or loads the numbers a result holds, by distribution name. Kept short: a
# library that cannot change a logit has no place in a drift report.
PACKAGES = (
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "accelerate",
    "numpy",
    "bitsandbytes",
    "hqq",
    "torchao",
    "compressed-tensors",
    "gguf",
    "llama-cpp-python",
    "pytest-hemorrhage",
)
NOT_RECORDED = "not recorded"  # an environment written before they were recorded
DRIFT = "differences include drift"
_ABSENT = "not installed"


def measured_in(device: Any = None, dtype: Any = None) -> dict[str, Any]:
    """The environment of this process, for a model on ``device`` in ``dtype``.

    Args:
        device: where the model runs (a ``torch.device`` or its name); None: not known here
            (the device is then not recorded).
        dtype: the model's weights' dtype (a ``torch.dtype`` or its name); None: no model in
            this process (gating from a reference file alone).

    Returns:
        ``python``, ``platform``, ``packages`` (distribution -> version, installed ones only),
        ``torch_build`` (compiler, CUDA, cuDNN, MKL, oneDNN, CPU capability, git revision;
        empty when torch is not imported), ``device`` (``type``, ``name``; on CUDA also
        ``capability`` and ``driver``), ``threads`` (torch's intra-op threads) and ``dtype``.
    """
    torch = sys.modules.get("torch")
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "packages": packages,
        "torch_build": _torch_build(torch) if torch is not None else {},
        "device": _device(torch, device),
        "threads": torch.get_num_threads() if torch is not None else None,
        "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
    }


def _torch_build(torch: Any) -> dict[str, Any]:
    """The build flags of torch that change numbers: its compiler, math libraries (MKL, oneDNN),
    CUDA and cuDNN, and the CPU kernels it dispatches to."""
    shown = torch.__config__.show()

    def found(pattern: str) -> str | None:
        match = re.search(pattern, shown, re.MULTILINE)
        return match.group(1) if match else None

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "git": (torch.version.git_version or "")[:12] or None,
        "compiler": found(r"^\s*-\s*((?:GCC|clang|MSVC|Apple clang)[^\n]*)"),
        "cuda": torch.version.cuda,
        "hip": torch.version.hip,
        "cudnn": str(cudnn) if cudnn is not None else None,
        "mkl": found(r"Math Kernel Library Version ([\w.]+)"),
        "onednn": found(r"MKL-DNN v([\w.]+)"),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def _device(torch: Any, device: Any) -> dict[str, Any]:
    """The device's kind and name: the CPU's model, or the GPU's name, compute capability and
    driver."""
    if device is None:
        return {}
    kind = getattr(device, "type", None) or str(device).partition(":")[0]
    if kind == "cuda" and torch is not None and torch.cuda.is_available():
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        major, minor = torch.cuda.get_device_capability(index)
        return {
            "type": "cuda",
            "name": torch.cuda.get_device_name(index),
            "capability": f"{major}.{minor}",
            "driver": _nvidia_driver(),
        }
    if kind == "cpu":
        return {"type": "cpu", "name": _cpu_name()}
    return {"type": kind, "name": None}


def _cpu_name() -> str | None:
    try:  # Linux: the model name, where platform.processor() says only "x86_64"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or None


def _nvidia_driver() -> str | None:
    """The NVIDIA kernel driver's version, from where Linux publishes it (no subprocess)."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    match = re.search(r"Kernel Module\s+([\d.]+)", text)
    return match.group(1) if match else None


def environment_id(environment: Mapping[str, Any]) -> str:
    """A short content hash naming ``environment`` in a report."""
    text = json.dumps(environment, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=6).hexdigest()


def _flat(environment: Mapping[str, Any]) -> dict[str, Any]:
    """``{"torch 2.13.0"...}``-ready pairs: packages by name (absent: not installed), the other
    groups' entries as ``group key``."""
    out: dict[str, Any] = {}
    for key, value in environment.items():
        if key == "packages":
            continue
        if isinstance(value, Mapping):
            group = "torch" if key == "torch_build" else key
            out.update({f"{group} {k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def changes(
    old: Mapping[str, Any] | None, new: Mapping[str, Any] | None
) -> list[dict[str, Any]] | None:
    """What differs from ``old`` to ``new``: ``{"what", "old", "new"}`` per entry, packages
    first in the order recorded (a package on one side only: ``"not installed"`` on the
    other). An entry either side did not record (None: no model or no device known there) is
    not compared.

    Returns:
        The changes ([] when none), or None when either environment was not recorded.
    """
    if not isinstance(old, Mapping) or not isinstance(new, Mapping):
        return None
    found = []
    before, after = old.get("packages") or {}, new.get("packages") or {}
    for name in [*before, *(k for k in after if k not in before)]:
        was, now = before.get(name, _ABSENT), after.get(name, _ABSENT)
        if was != now:
            found.append({"what": name, "old": was, "new": now})
    before, after = _flat(old), _flat(new)
    for key in [*before, *(k for k in after if k not in before)]:
        was, now = before.get(key), after.get(key)
        if was is not None and now is not None and was != now:
            found.append({"what": key, "old": was, "new": now})
    return found


def describe_changes(found: list[dict[str, Any]] | None) -> str:
    """``torch 2.12.0 -> 2.13.0, transformers 5.24.0 -> 5.25.0: differences include drift``;
    ``unchanged``; or ``not recorded``."""
    if found is None:
        return NOT_RECORDED
    if not found:
        return "unchanged"
    return ", ".join(f"{c['what']} {c['old']} -> {c['new']}" for c in found) + f": {DRIFT}"


def drift_warning(reference: Mapping[str, Any] | None, run: Mapping[str, Any] | None) -> str | None:
    """The line that says the reference was built elsewhere than this run measures, so that
    what differs is not all damage; None when nothing that is recorded differs, or when this
    run recorded no environment (it measured nothing)."""
    if run is None:
        return None
    found = changes(reference, run)
    if found is None:
        return (
            "the reference does not record where it was built (a file written before "
            "environments were recorded): differences may include drift; save it again to know"
        )
    if not found:
        return None
    built = ", ".join(f"{c['what']} {c['old']}" for c in found)
    uses = ", ".join(f"{c['what']} {c['new']}" for c in found)
    return f"the reference was built under {built}; this run uses {uses}: {DRIFT}"
