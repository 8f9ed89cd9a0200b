"""``--hemorrhage-candidate`` and ``measure_model``: separately produced models gated against the
baseline (a ``.gguf`` file, a saved directory, quantized or not, a hub id, ``module:factory``).

A ``http://`` or ``https://`` URL is a served model (``runtimes/endpoint.py``): nothing loads,
its prompt log-probabilities are scored (:func:`load_endpoint`). A candidate loads as the baseline
does (``loading``), except a ``.gguf`` file, which runs in
llama.cpp itself (``runtimes/llama_cpp.py``: the file as users run it) or, with
``--hemorrhage-gguf-runtime=transformers`` or without llama-cpp-python under ``auto``, in
transformers, which dequantizes it. Its tokenizer is read from the file by transformers either
way, so its vocabulary is checked as every candidate's. Errors name ``--hemorrhage-candidate``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import HemorrhageError, first_line
from .loading import CAUSAL, LoadedModel, check_spec, kind, load_model, quiet
from .runtimes import llama_cpp_available
from .runtimes.endpoint import Endpoint, check_reachable, is_endpoint

__all__ = [
    "candidate_label",
    "check_candidate",
    "endpoint_options",
    "load_candidate",
    "load_endpoint",
]

_CANDIDATE_SPECS = (
    "a .gguf file, a directory saved with save_pretrained, a hub id or package.module:factory"
)


def _as_candidate(exc: HemorrhageError) -> HemorrhageError:
    """A baseline loading error, worded for ``--hemorrhage-candidate``."""
    return HemorrhageError(str(exc).replace("--hemorrhage-model=", "--hemorrhage-candidate=", 1))


def candidate_label(spec: str) -> str:
    """A candidate's default label: the directory or file name, else the spec itself."""
    path = Path(spec).expanduser()
    if spec.endswith(".gguf") or path.is_dir():
        return path.name or spec
    return spec


def check_candidate(spec: str) -> None:
    """Cheap startup check of one ``--hemorrhage-candidate`` (no torch, no download; a
    served model's URL must answer)."""
    if is_endpoint(spec):
        url, _ = endpoint_options(spec)
        check_reachable(url)
        return
    if spec.endswith(".gguf"):
        if not Path(spec).expanduser().is_file():
            raise HemorrhageError(
                f"--hemorrhage-candidate={spec}: no such file; give {_CANDIDATE_SPECS}"
            )
        return
    if kind(spec) == "missing":
        raise HemorrhageError(
            f"--hemorrhage-candidate={spec}: no such file or directory; give {_CANDIDATE_SPECS}"
        )
    try:
        check_spec(spec)
    except HemorrhageError as exc:
        raise _as_candidate(exc) from None


def load_candidate(
    spec: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    gguf_runtime: str = "auto",
    context: int = 512,
) -> LoadedModel:
    """Load a candidate causal LM: a ``.gguf`` file in ``gguf_runtime`` (see the module
    docstring; ``context``: the longest window llama.cpp will be given), anything else as
    :func:`load_model` loads the baseline; a quantized checkpoint loads through its
    ``quantization_config`` (compressed-tensors, bitsandbytes, HQQ, torchao, ...), which needs
    that library installed."""
    check_candidate(spec)
    if not spec.endswith(".gguf"):
        try:
            return load_model(
                spec,
                device=device,
                dtype=dtype,
                trust_remote_code=trust_remote_code,
                allow_pickle=allow_pickle,
                as_kind=CAUSAL,
            )
        except HemorrhageError as exc:
            raise _as_candidate(exc) from None
        except ImportError as exc:  # a quantization_config whose library is not installed
            raise HemorrhageError(
                f"--hemorrhage-candidate={spec}: its quantization format needs a library that is "
                f"not installed ({first_line(exc)}); pip install 'pytest-hemorrhage[gate]'"
            ) from None
    with quiet():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(spec).expanduser()
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        torch_dtype = torch.float32 if dtype == "auto" else getattr(torch, dtype)
        where = f"--hemorrhage-candidate={spec}"
        llama = gguf_runtime == "llama.cpp" or (gguf_runtime == "auto" and llama_cpp_available())
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            if not llama:
                model = AutoModelForCausalLM.from_pretrained(
                    str(path.parent), gguf_file=path.name, dtype=torch_dtype
                )
        except ImportError as exc:
            raise HemorrhageError(
                f"{where}: reading GGUF needs the gguf package ({first_line(exc)}); "
                "pip install 'pytest-hemorrhage[gate]'"
            ) from None
        except Exception as exc:  # any parse or architecture failure: one line, no traceback
            raise HemorrhageError(
                f"{where}: transformers cannot load this GGUF file ({type(exc).__name__}: "
                f"{first_line(exc)}); convert a supported architecture, or give the "
                "save_pretrained directory instead"
            ) from None
    if llama:
        from .runtimes.llama_cpp import LlamaCppModel

        try:
            model = LlamaCppModel(path, context)
        except ValueError as exc:  # llama.cpp's loader says only that it failed
            raise HemorrhageError(
                f"--hemorrhage-candidate={spec}: llama.cpp cannot load this file "
                f"({first_line(exc)}); check it with llama.cpp's llama-cli, or pass "
                "--hemorrhage-gguf-runtime=transformers"
            ) from None
    else:
        model = model.to(device).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec)


_ENDPOINT_OPTIONS = {
    "model": str,
    "logprobs": int,
    "protocol": str,
    "concurrency": int,
    "timeout": float,
    "retries": int,
}


def endpoint_options(spec: str) -> tuple[str, dict[str, Any]]:
    """A served model's spec split into its base URL and the options after ``#``, e.g.
    ``http://127.0.0.1:8000/v1#model=llama&logprobs=100`` (a fragment: never sent)."""
    url, _, fragment = spec.partition("#")
    options: dict[str, Any] = {}
    for item in filter(None, fragment.split("&")):
        key, _, value = item.partition("=")
        if key not in _ENDPOINT_OPTIONS:
            raise HemorrhageError(
                f"--hemorrhage-candidate={spec}: unknown option {key!r} after '#'; give "
                f"{', '.join(f'{k}=...' for k in _ENDPOINT_OPTIONS)} joined by '&'"
            )
        try:
            options[key] = _ENDPOINT_OPTIONS[key](value)
        except ValueError:
            raise HemorrhageError(
                f"--hemorrhage-candidate={spec}: {key}={value!r} is not "
                f"{'an integer' if _ENDPOINT_OPTIONS[key] is int else 'a number'}"
            ) from None
    return url, options


def load_endpoint(spec: str, tokenizer: Any, **options: Any) -> Endpoint:
    """A served model's base URL as a candidate: options from the spec's ``#`` part
    (:func:`endpoint_options`), ``options`` (:class:`Endpoint`'s keywords: ``model``,
    ``logprobs``, ``protocol``, ``concurrency``, ``timeout``, ``retries``) over them."""
    url, given = endpoint_options(spec)
    check_reachable(url)
    return Endpoint(url, tokenizer, **{**given, **options})
