"""A ``.gguf`` candidate measured by llama.cpp itself, in-process (``llama-cpp-python``).

transformers dequantizes a GGUF file and computes in float: the damage of the weights alone.
llama.cpp also rounds every quantized matmul's activations (Q8_0 / Q8_K) and keeps its KV cache
in F16, so the file as users run it can measure several times worse (2.8x at Q8_0 on the bundled
model). :class:`LlamaCppModel` runs the file in llama.cpp and returns the logits of every
position, so the harness scores it exactly as it scores a torch model.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import HemorrhageError
from . import LLAMA_EXTRA

__all__ = ["LlamaCppModel"]


def _digest(path: Path) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.digest()


class LlamaCppModel(nn.Module):
    """A GGUF file in llama.cpp: ``forward(ids)`` (batch, seq) -> float32 logits (batch, seq,
    vocab), each row evaluated from an empty context, no BOS added (the ids are the baseline's).

    Args:
        path: the ``.gguf`` file.
        context: the longest row it will be given (llama.cpp's ``n_ctx``).
        threads: CPU threads (default: torch's intra-op thread count, as the baseline runs).
        batch: tokens per llama.cpp decode call (``n_batch``; default: the whole row).
    """

    def __init__(
        self, path: str | Path, context: int, threads: int | None = None, batch: int | None = None
    ) -> None:
        super().__init__()
        try:
            import llama_cpp
        except ImportError:
            raise HemorrhageError(
                f"{path}: measuring a GGUF file in llama.cpp needs llama-cpp-python; pip install "
                f"'{LLAMA_EXTRA}' (CMAKE_ARGS='-DGGML_NATIVE=OFF' builds it portably), or "
                "pass --hemorrhage-gguf-runtime=transformers to measure its dequantized weights"
            ) from None
        self.path = Path(path)
        self.threads = threads or torch.get_num_threads()
        self.batch = batch or context
        self.version = llama_cpp.__version__
        self.llm = llama_cpp.Llama(
            model_path=str(self.path),
            n_ctx=context,
            n_batch=self.batch,
            n_ubatch=self.batch,
            n_threads=self.threads,
            n_threads_batch=self.threads,
            logits_all=True,
            verbose=False,
        )
        # where the harness puts the inputs (the CPU): llama.cpp holds the weights itself
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)
        # the file's content hash as state, so the candidate's fingerprint is the file's
        self.register_buffer("digest", torch.tensor(list(_digest(self.path)), dtype=torch.uint8))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = []
        for row in ids.tolist():
            self.llm.reset()
            self.llm.eval(row)
            rows.append(torch.from_numpy(self.llm.scores[: len(row)].copy()))
        return torch.stack(rows).float()

    def describe(self) -> dict[str, Any]:
        """What ran it, for ``Result.details["runtime"]``."""
        return {
            "name": "llama.cpp",
            "package": f"llama-cpp-python {self.version}",
            "threads": self.threads,
            "batch": self.batch,
            "file": os.fspath(self.path),
        }
