"""The baseline comes back bit for bit: what its tensors were at load, and how to put them back.

Two checks tell a changed baseline (see ``Harness.check_pristine``): :func:`snapshot` (storage,
shape and version counter of every tensor, identity of every module: no weight read), and a
checksum of every tensor's bits, which also catches writes that leave the version counter alone
(through ``param.data`` or a ``.numpy()`` view). :class:`Baseline` keeps both, and a host copy
of the weights to restore them, or reloads them from the model's spec when the model is larger
than ``RESTORE_COPY_BYTES``.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .settings import Settings

__all__ = ["RESTORE_COPY_BYTES", "Baseline", "baseline_of", "named", "snapshot"]

# Models up to this size keep a host copy of their weights to restore a write made outside
# modified(); larger ones are reloaded from their spec instead (no host memory held).
RESTORE_COPY_BYTES = 1 << 30


def named(changed: list[str]) -> str:
    """The first three names of ``changed`` and how many more."""
    shown = ", ".join(map(str, sorted(changed)[:3]))
    return shown + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")


class Baseline:
    """What the baseline model looked like at load: per tensor its storage and version, and a
    checksum of its bits; and how to put the bits back (a host copy, or a reload)."""

    def __init__(self, model: Any) -> None:
        self.versions = snapshot(model)
        tensors = _tensors(model)
        self.sums = _checksums(tensors)
        # weights accelerate offloaded (meta here) are read from CPU memory or disk per forward
        # pass, where nothing the plugin allows can write them: nothing to copy
        tensors = {k: t for k, t in tensors.items() if not t.is_meta}
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        # a host copy costs the model's bytes of memory; above the limit, reload instead
        self.copy = (
            {k: t.detach().to("cpu", copy=True) for k, t in tensors.items()}
            if size <= RESTORE_COPY_BYTES
            else None
        )

    def changed(self, model: Any) -> list[str]:
        """Names of the tensors whose bits no longer match their checksum."""
        now = _checksums(_tensors(model))
        return [k for k, s in self.sums.items() if s is not None and now.get(k) != s]

    def restore(self, model: Any, settings: Settings) -> str:
        """Write the baseline's bits back into the model's own tensors; say how it went."""
        tensors = {k: t for k, t in _tensors(model).items() if not t.is_meta}
        source: dict[str, torch.Tensor]
        if self.copy is not None:
            source, how = self.copy, "restored from the baseline's host copy"
        else:
            source, how = _reload(settings, tensors), f"reloaded from {settings.model}"
        with torch.no_grad():
            for name, t in tensors.items():
                if name in source and source[name].shape == t.shape:
                    t.copy_(source[name])
        if self.changed(model):
            return "restoring it failed: later measurements would be wrong; restart the run"
        return how


def _reload(settings: Settings, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights of a fresh load of ``settings.model`` on the host, in the model's dtype."""
    from .loading import load_model

    if settings.model is None:
        return {}
    dtype = next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
    loaded = load_model(
        settings.model,
        device="cpu",
        dtype=str(dtype).removeprefix("torch."),
        trust_remote_code=settings.trust_remote_code,
        allow_pickle=settings.allow_pickle,
    )
    return dict(loaded.model.state_dict())


def _tensors(model: Any) -> dict[str, torch.Tensor]:
    return dict(model.state_dict(keep_vars=True))


def _checksums(tensors: dict[str, torch.Tensor]) -> dict[str, int | None]:
    """Per tensor, the wrapping int64 sum of its bits read as 8-byte words (plus its last
    bytes): any change of a value changes it, bar collisions and pure permutations.

    One pass at memory speed (int64 is the width torch sums fastest), one sync per device.
    """
    sums: dict[str, torch.Tensor | None] = {}
    seen: dict[int, str] = {}
    for name, t in tensors.items():
        if id(t) in seen:  # tied weights: read once
            continue
        seen[id(t)] = name
        sums[name] = _bit_sum(t)
    by_device: dict[torch.device, list[str]] = {}
    for name, s in sums.items():
        if s is not None:
            by_device.setdefault(s.device, []).append(name)
    out: dict[str, int | None] = {name: None for name in tensors}
    for names in by_device.values():
        values = torch.stack([sums[n] for n in names]).tolist()  # type: ignore[misc]
        out.update(zip(names, values, strict=True))
    for name, t in tensors.items():
        if out[name] is None and id(t) in seen:
            out[name] = out.get(seen[id(t)])
    return out


def _bit_sum(t: torch.Tensor) -> torch.Tensor | None:
    """The int64 sum of ``t``'s bits as 8-byte words and its trailing bytes; None for tensors
    without plain storage (meta, sparse, quantized, tensor subclasses)."""
    try:
        if t.is_meta or t.layout != torch.strided or t.is_quantized:
            return None
        data = t.detach()
        if type(data) is not torch.Tensor:
            return None
        raw = data.reshape(-1).view(torch.uint8)
        whole = raw.numel() // 8 * 8
        words = raw[:whole]
        if raw.storage_offset() % 8:
            words = words.clone()
        return words.view(torch.int64).sum() + raw[whole:].sum(dtype=torch.int64)
    except (RuntimeError, TypeError):
        return None


_BASELINES: weakref.WeakKeyDictionary[Any, Baseline] = weakref.WeakKeyDictionary()


def baseline_of(model: Any) -> Baseline:
    """The model's :class:`Baseline`, taken at the first call: shared by every harness of
    this model, so that one harness's restore is the others'."""
    if model not in _BASELINES:
        _BASELINES[model] = Baseline(model)
    return _BASELINES[model]


def snapshot(model: Any) -> dict[str, tuple[Any, ...]]:
    """Storage and version of every tensor, identity of every module."""
    tensors = {
        # an offloaded (meta) tensor is a new object after every forward pass (accelerate's
        # hook loads the weight, then puts a fresh meta tensor back): shape and dtype only
        name: (0, 0, tuple(t.shape), t.dtype)
        if t.is_meta
        else (t.data_ptr(), t._version, tuple(t.shape), t.dtype)
        for name, t in model.state_dict(keep_vars=True).items()
    }
    modules = {f"module {name or '<root>'}": (id(m),) for name, m in model.named_modules()}
    return tensors | modules
