"""Runtimes other than transformers that a candidate can be measured in: llama.cpp in-process
(``llama_cpp.py``). Each gives the harness a module whose forward returns every position's
logits, and says what it ran (``describe()``), which every candidate's result records in
``details["runtime"]``."""

from __future__ import annotations

from typing import Any

__all__ = ["LLAMA_EXTRA", "llama_cpp_available", "runtime_of"]

LLAMA_EXTRA = "pytest-hemorrhage[llama]"


def llama_cpp_available() -> bool:
    """Whether llama-cpp-python is installed (without importing it, or torch)."""
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def runtime_of(model: Any) -> dict[str, Any]:
    """What computes ``model``'s logits: its runtime's own description, else torch's (with
    transformers' version, the weights' device and dtype)."""
    if hasattr(model, "describe"):
        return model.describe()
    import torch
    import transformers

    weight = next(model.parameters(), None)
    return {
        "name": "transformers",
        "package": f"transformers {transformers.__version__}, torch {torch.__version__}",
        "device": str(weight.device) if weight is not None else "cpu",
        "dtype": str(weight.dtype).removeprefix("torch.") if weight is not None else None,
    }
