"""``quant.*``: weights (and activations, the KV cache) in fewer bits, as users name the methods.

- ``rtn.py``: ``quant.rtn``, ``quant.fp8``, ``quant.dtype`` (parametrized round trips)
- ``kernels.py``: ``quant.bnb_int8``, ``quant.bnb_4bit``, ``quant.hqq`` (the libraries' kernels)
- ``w8a8.py``: ``quant.w8a8`` (int8 matmul, SmoothQuant)
- ``gptq.py``: ``quant.gptq``; ``awq.py``: ``quant.awq`` (calibrated)
- ``gguf/``: ``quant.gguf`` (llama.cpp's formats: quantize, dequantize, per-tensor plan)
- ``torchao.py``: ``quant.torchao``; ``kv_cache.py``: ``quant.kv_cache``

Importing the package registers them.
"""

from __future__ import annotations

from . import awq, gguf, gptq, kernels, kv_cache, rtn, torchao, w8a8  # noqa: F401  (registered on import)

__all__: list[str] = []  # the families register themselves; their modules hold the names
