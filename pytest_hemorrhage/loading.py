"""``--hemorrhage-model``: a local directory, the bundled model, ``module:factory`` or a hub id."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import HemorrhageError, first_line

__all__ = [
    "BUNDLED_MODEL",
    "BUNDLED_NAME",
    "LoadedModel",
    "check_spec",
    "load_model",
    "model_logits",
    "quiet",
]

BUNDLED_NAME = "hemorrhage-tiny"
BUNDLED_MODEL = Path(__file__).parent / "assets" / "tiny-llama"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass
class LoadedModel:
    """The baseline model under test, in eval mode, with its tokenizer."""

    model: Any
    tokenizer: Any
    spec: str
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        self.fingerprint = fingerprint(self.model, self.tokenizer)

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device


def kind(spec: str) -> str:
    """How ``spec`` is loaded: ``dir``, ``bundled``, ``factory`` or ``hub``."""
    if Path(spec).expanduser().is_dir():
        return "dir"
    if spec == BUNDLED_NAME:
        return "bundled"
    if _FACTORY.match(spec):
        return "factory"
    if _HUB_ID.match(spec) and not spec.startswith("."):
        return "hub"
    return "missing"


def _offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def check_spec(spec: str) -> None:
    """Cheap startup check of ``--hemorrhage-model`` (no torch, no download)."""
    how = kind(spec)
    if how == "missing":
        raise HemorrhageError(
            f"--hemorrhage-model={spec}: no such directory; give a directory saved with "
            f"save_pretrained, a hub id, package.module:factory, or {BUNDLED_NAME}"
        )
    if how == "factory":
        module = spec.partition(":")[0]
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            found = None
        if found is None:
            raise HemorrhageError(
                f"--hemorrhage-model={spec}: module {module!r} cannot be imported; "
                "check the name and that it is on sys.path (e.g. a conftest.py's folder)"
            )
    if how == "hub" and _offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(spec, "config.json"), str):
            raise HemorrhageError(
                f"--hemorrhage-model={spec}: not in the local hub cache and HF_HUB_OFFLINE is "
                "set; download it once with network access, or pass a local directory"
            )


def load_model(
    spec: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> LoadedModel:
    """Load the baseline named by ``spec``, in eval mode, on ``device``."""
    with quiet():
        import torch

        check_spec(spec)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        torch_dtype: Any = "auto" if dtype == "auto" else getattr(torch, dtype)
        if dtype == "auto" and device == "cpu":
            torch_dtype = torch.float32  # half precision matmuls are slow or missing on CPU
        how = kind(spec)
        if how == "factory":
            model, tokenizer = _from_factory(spec)
            if not getattr(model, "hf_device_map", None):
                model = model.to(device)
            if dtype != "auto":
                model = model.to(torch_dtype)
        else:
            source = str(BUNDLED_MODEL) if how == "bundled" else spec
            model = _pretrained(source, spec, torch_dtype, trust_remote_code, allow_pickle)
            model = model.to(device)
            tokenizer = _tokenizer(source, spec, trust_remote_code)
        model.eval()
        return LoadedModel(model=model, tokenizer=tokenizer, spec=spec)


def _pretrained(source: str, spec: str, torch_dtype: Any, trust: bool, allow_pickle: bool) -> Any:
    from transformers import AutoModelForCausalLM

    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise HemorrhageError(
                f"--hemorrhage-model={spec}: directory has no config.json; "
                "save the model with model.save_pretrained(dir)"
            )
        has_safetensors = any(path.glob("*.safetensors"))
        has_pickle = any(path.glob("*.bin")) or any(path.glob("*.pt"))
        if not has_safetensors and not has_pickle:
            raise HemorrhageError(
                f"--hemorrhage-model={spec}: config.json but no weights "
                "(*.safetensors); save them with model.save_pretrained(dir)"
            )
        if not has_safetensors and not allow_pickle:
            raise HemorrhageError(
                f"--hemorrhage-model={spec}: only pickle weights (*.bin), which can run code when "
                "loaded; re-save with safe_serialization=True, or pass --hemorrhage-allow-pickle "
                "if you trust them"
            )
    try:
        return AutoModelForCausalLM.from_pretrained(
            source,
            dtype=torch_dtype,
            trust_remote_code=trust,
            use_safetensors=None if allow_pickle else True,
        )
    except (OSError, ValueError, KeyError) as exc:
        raise HemorrhageError(
            f"--hemorrhage-model={spec}: cannot load it as a causal LM: {first_line(exc)}"
        ) from None
    except Exception as exc:
        if type(exc).__name__ != "SafetensorError":
            raise
        raise HemorrhageError(
            f"--hemorrhage-model={spec}: its weights are damaged ({first_line(exc)}); save "
            "them again with model.save_pretrained(dir), or re-download them"
        ) from None


def _tokenizer(source: str, spec: str, trust: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise HemorrhageError(
            f"--hemorrhage-model={spec}: no usable tokenizer ({first_line(exc)}); save it "
            "beside the model with tokenizer.save_pretrained(dir)"
        ) from None


def _from_factory(spec: str) -> tuple[Any, Any]:
    module_name, _, attr = spec.partition(":")
    factory = getattr(importlib.import_module(module_name), attr, None)
    if not callable(factory):
        raise HemorrhageError(f"--hemorrhage-model={spec}: {module_name} has no callable {attr!r}")
    made = factory()
    model, tokenizer = made if isinstance(made, tuple) else (made, None)
    if tokenizer is None:
        name = getattr(getattr(model, "config", None), "_name_or_path", "")
        if not name:
            raise HemorrhageError(
                f"--hemorrhage-model={spec}: the factory returned no tokenizer; "
                "return (model, tokenizer)"
            )
        tokenizer = _tokenizer(name, spec, False)
    return model, tokenizer


def fingerprint(model: Any, tokenizer: Any) -> str:
    """Content hash of the weights, the architecture and the tokenizer (16 hex digits)."""
    import torch

    h = hashlib.blake2b(digest_size=8)
    h.update(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        settings = {
            k: v
            for k, v in config.to_dict().items()
            if k not in ("_name_or_path", "transformers_version")
        }
        h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            t = tensor.detach().contiguous().cpu()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(
        (
            backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
        ).encode()
    )
    return h.hexdigest()


def model_logits(model: Any, ids: Any) -> Any:
    """Logits (batch, seq, vocab) from a transformers model or a plain module returning them."""
    if hasattr(model, "config"):
        out = model(input_ids=ids, use_cache=False)
    else:
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


# Loggers that third-party imports triggered by a load write to at WARNING level (torch's pytree
# deprecation notes raised while transformers imports torchao, for one).
_NOISY_LOGGERS = ("torch.utils._pytree",)


@contextmanager
def quiet() -> Iterator[None]:
    """Inside: no progress bars from transformers, and the warnings that third-party imports
    and loads raise are not shown. Everything is put back as it was on exit (the user's own
    warnings filters, logger levels and progress bar setting), so only the plugin's own
    imports and loads are quieted, never the user's code."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    bars = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            for logger in loggers:
                logger.setLevel(logging.ERROR)
            from transformers.utils import logging as hf_logging

            bars = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        if bars:
            from transformers.utils import logging as hf_logging

            hf_logging.enable_progress_bar()
