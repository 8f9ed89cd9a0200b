"""GGUF's block types, llama.cpp's per-tensor mixtures, and the ``quant.gguf`` config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ....errors import HemorrhageError
from ...registry import Modification

__all__ = [
    "BITS_PER_WEIGHT",
    "BLOCK",
    "BLOCK_TYPES",
    "GGUF_TYPES",
    "MIXTURES",
    "QK_K",
    "Gguf",
    "fallback_type",
]

QK_K = 256
# bits per weight of each block type: bytes per block * 8 / weights per block
BITS_PER_WEIGHT = {
    "Q8_0": 34 * 8 / 32,
    "Q6_K": 210 * 8 / 256,
    "Q5_1": 24 * 8 / 32,
    "Q5_K": 176 * 8 / 256,
    "Q5_0": 22 * 8 / 32,
    "Q4_1": 20 * 8 / 32,
    "Q4_K": 144 * 8 / 256,
    "Q4_0": 18 * 8 / 32,
    "Q3_K": 110 * 8 / 256,
    "Q2_K": 84 * 8 / 256,
    "F16": 16.0,
}
BLOCK = {
    "Q8_0": 32,
    "Q5_1": 32,
    "Q5_0": 32,
    "Q4_1": 32,
    "Q4_0": 32,
    "F16": 1,
    "Q6_K": QK_K,
    "Q5_K": QK_K,
    "Q4_K": QK_K,
    "Q3_K": QK_K,
    "Q2_K": QK_K,
}
BLOCK_TYPES = ("Q8_0", "Q6_K", "Q5_1", "Q5_K", "Q5_0", "Q4_1", "Q4_K", "Q4_0", "Q3_K", "Q2_K")
# llama.cpp's per-tensor mixtures (llama_ftype) and the block type each starts from
MIXTURES = {"Q5_K_M": "Q5_K", "Q4_K_M": "Q4_K", "Q3_K_M": "Q3_K", "Q2_K": "Q2_K"}
# every `type` name, gentlest first (bits per weight of the type or of the mixture's base type)
GGUF_TYPES = (
    "Q8_0",
    "Q6_K",
    "Q5_1",
    "Q5_K_M",
    "Q5_K",
    "Q5_0",
    "Q4_1",
    "Q4_K_M",
    "Q4_K",
    "Q4_0",
    "Q3_K_M",
    "Q3_K",
    "Q2_K",
)
# llama.cpp's tensor_type_fallback: a row length the block size does not divide
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


@dataclass(frozen=True, kw_only=True)
class Gguf(Modification):
    """llama.cpp GGUF quantization, bit-exact with its block formats.

    Args:
        type: a block type (Q8_0, Q6_K, Q5_1, Q5_K, Q5_0, Q4_1, Q4_K, Q4_0, Q3_K, Q2_K) or one of
            llama.cpp's per-tensor mixtures (Q5_K_M, Q4_K_M, Q3_K_M, and Q2_K: llama.cpp's
            ``LLAMA_FTYPE_MOSTLY_Q2_K``, what ``llama-quantize ... Q2_K`` writes, is itself a
            mixture: attn_v, attn_output and ffn_down get Q3_K or Q4_K). The names llama.cpp
            also knows as file types (Q8_0, Q6_K, Q5_x, Q4_x, Q2_K) follow its per-tensor rules,
            which for the former change only the output head; Q5_K, Q4_K and Q3_K are block
            types here (``llama-quantize`` reads them as aliases of the _M mixtures).
        pure: every tensor in the block type ``type`` names, as ``llama-quantize --pure``
            (``type="Q2_K", pure=True`` is the plain Q2_K block format).
        embeddings: quantize the input token embedding too, with llama.cpp's type for
            ``token_embd``, as ``llama-quantize`` does (a tied head and embedding are one
            tensor, given the output head's type, as in llama.cpp).
        head: quantize the output head too, with llama.cpp's type for ``output`` (Q6_K, or
            Q8_0 for Q8_0 files and widths K-quants do not divide), as ``llama-quantize`` does.
        activations: round each quantized matmul's inputs as llama.cpp's CPU kernels do (to
            Q8_0 blocks for the legacy types, Q8_K for the K-quants, F16 for F16 tensors:
            ``runtime.py``), so the measure is the file's damage as llama.cpp runs it, not
            only its weights'. False: the dequantized weights with float activations. Fused
            mixture-of-experts weights (quantized per expert, as llama.cpp's ``ffn_*_exps``):
            the input of the up/gate projections is rounded, the down projections' (computed
            inside transformers' experts forward) is not.

    The defaults measure what ``llama-quantize`` writes as llama.cpp's CPU backend runs it;
    ``embeddings=False, head=False, activations=False`` measures the block weights alone.

    A row length the block size does not divide gets llama.cpp's fallback type (Q2_K, Q3_K ->
    Q4_0; Q4_K -> Q5_0; Q5_K -> Q5_1; Q6_K -> Q8_0; F16 when 32 does not divide it either);
    ``plan()`` lists every tensor's type; the result's ``details["fallbacks"]["quant.gguf"]``
    names the tensors that fell back, and the terminal and HTML reports say so once.
    """

    # each expert's matrix of a fused expert weight, as llama.cpp quantizes ffn_*_exps
    per_expert: ClassVar[bool | None] = True
    type: str = "Q4_K_M"
    pure: bool = False
    embeddings: bool = True
    head: bool = True
    activations: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.type not in GGUF_TYPES:
            raise HemorrhageError(
                f"{self.name}: type={self.type!r} is not a GGUF type this supports; use one of "
                f"{', '.join(GGUF_TYPES)}"
            )
        for field in ("pure", "embeddings", "head", "activations"):
            if type(getattr(self, field)) is not bool:  # 1.0 == True would pass check_choice
                raise HemorrhageError(
                    f"{self.name}: {field}={getattr(self, field)!r} is not valid; choose one of "
                    "True, False"
                )

    @property
    def base_type(self) -> str:
        """The block type ``type`` starts from."""
        return MIXTURES.get(self.type, self.type)


def fallback_type(qtype: str, width: int) -> str:
    """llama.cpp's tensor_type_fallback: the type a row of ``width`` gets when asked ``qtype``."""
    if width % BLOCK[qtype] == 0:
        return qtype
    fallback = _FALLBACK.get(qtype, "F16")
    return fallback if width % BLOCK[fallback] == 0 else "F16"
