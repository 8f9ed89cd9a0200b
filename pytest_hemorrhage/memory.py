"""Will a measure at the requested window fit? Estimated from the baseline's config alone,
before any weight is read, and refused in one line when it will not.

A long window costs memory in the model's body: every layer's hidden states, MLP intermediate
and attention, for a batch of windows at once. The head and the log-softmax run over position
chunks (``forward.HEAD_CHUNK_BYTES`` of float32 logits each), so they cost the same at any
window. The estimate adds the weights, the host copy the exact restore keeps of a small model
(``baseline.RESTORE_COPY_BYTES``) and the reference (at most ``REFERENCE_BYTES_PER_TOKEN``), and
is meant as an upper bound: ``benchmarks/bench_memory.py`` measures the real peaks beside it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import HemorrhageError

if TYPE_CHECKING:
    from .settings import Settings

__all__ = [
    "REFERENCE_BYTES_PER_TOKEN",
    "RUNTIME_BYTES",
    "Estimate",
    "attention_of",
    "available_bytes",
    "check_window",
    "estimate_measure",
    "parameter_count",
]

# The scoring holds about three arrays of one position chunk's logits at once (logits,
# log-probabilities, the reference's comparison or a processor's copy).
_HEAD_COPIES = 3
# What the reference may keep per scored token (its top-k log-probs and tail samples).
REFERENCE_BYTES_PER_TOKEN = 1024
# What a measure holds beside its tensors of known size: the tokenized text, the kernels'
# workspaces, the allocator's slack (bench_memory measures it at small windows).
RUNTIME_BYTES = 32 << 20
# model_type of families whose MLP has no gate (two matrices, not three)
_UNGATED = frozenset(
    {"gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "gpt_bigcode", "phi", "starcoder2"}
)
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


@dataclass(frozen=True)
class Estimate:
    """The peak bytes of one measure, by part; ``host`` parts stay in host memory whatever the
    device (the restore copy, the reference)."""

    weights: int
    activations: int  # the body's, for one batch of windows
    head: int  # one position chunk of the head and log-softmax
    reference: int
    restore_copy: int
    batch_size: int
    runtime: int = RUNTIME_BYTES

    @property
    def device_bytes(self) -> int:
        return self.weights + self.activations + self.head + self.runtime

    @property
    def host_bytes(self) -> int:
        return self.reference + self.restore_copy

    @property
    def total(self) -> int:
        return self.device_bytes + self.host_bytes

    def parts(self) -> str:
        """``weights 0.2 GB, activations 1.1 GB (batch of 1), ...``."""
        return (
            f"weights {_gb(self.weights)}, activations {_gb(self.activations)} (batch of "
            f"{self.batch_size}), head chunks {_gb(self.head)}, reference "
            f"{_gb(self.reference)}, restore copy {_gb(self.restore_copy)}"
        )


def _gb(size: int) -> str:
    return f"{size / 1e9:,.1f} GB" if size >= 100e6 else f"{size / 1e6:.0f} MB"


def _int(config: Any, *names: str, default: int = 0) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return default


def _widths(config: Any) -> dict[str, int]:
    hidden = _int(config, "hidden_size", "n_embd", "d_model")
    heads = _int(config, "num_attention_heads", "n_head", default=1)
    head_dim = _int(config, "head_dim", default=max(1, hidden // heads))
    intermediate = _int(
        config, "moe_intermediate_size", "intermediate_size", "n_inner", "ffn_dim"
    ) or (4 * hidden)
    experts = _int(config, "num_local_experts", "num_experts", "n_routed_experts", default=1)
    return {
        "vocab": _int(config, "vocab_size", default=1),
        "hidden": hidden,
        "layers": _int(config, "num_hidden_layers", "n_layer", "num_layers", default=1),
        "heads": heads,
        "kv_heads": _int(config, "num_key_value_heads", "num_kv_heads", default=heads),
        "head_dim": head_dim,
        "intermediate": intermediate,
        "experts": experts,
        # the experts each token passes through, whose intermediates exist at once
        "active_experts": min(experts, _int(config, "num_experts_per_tok", default=experts)),
        "mlps": 2 if getattr(config, "model_type", "") in _UNGATED else 3,
    }


def parameter_count(config: Any) -> int:
    """The parameters a decoder of ``config``'s widths holds: embeddings, head (unless tied),
    attention and MLP matrices (every expert's), norms; biases are left out (a fraction of a
    percent)."""
    w = _widths(config)
    attention = w["hidden"] * w["head_dim"] * (2 * w["heads"] + 2 * w["kv_heads"])
    mlp = w["mlps"] * w["hidden"] * w["intermediate"] * w["experts"]
    tied = bool(getattr(config, "tie_word_embeddings", False))
    return (
        w["vocab"] * w["hidden"] * (1 if tied else 2)
        + w["layers"] * (attention + mlp + 2 * w["hidden"])
        + w["hidden"]
    )


def estimate_measure(
    config: Any,
    *,
    seq_len: int,
    batch_size: int,
    tokens: int,
    dtype_bytes: int,
    restore_copy_limit: int,
) -> Estimate:
    """The peak bytes of a measure of a causal LM of ``config`` at ``seq_len``-token windows,
    ``batch_size`` windows per forward pass, ``tokens`` evaluation tokens, weights and
    activations of ``dtype_bytes`` each; a model of at most ``restore_copy_limit`` bytes keeps
    a host copy for the exact restore.

    Per token of a batch, the body holds at its peak: the residual stream, the normed input and
    the attention output (3 hidden widths), queries, keys and values with their rotated copies,
    the heads' output, the MLP's gate, up and product (4 intermediate widths; of a mixture,
    those of the experts a token passes) and every layer's keys and values (the cache
    ``quant.kv_cache`` scores with; a plain measure keeps none, so there it is margin).
    Attention itself: SDPA's flash and memory-efficient kernels take O(window) memory, plus a
    boolean window x window mask past a sliding window; eager attention
    (``attn_implementation="eager"``) holds a window x window score matrix per head, in the
    model's dtype and again in float32 for the softmax.
    """
    from .forward import HEAD_CHUNK_BYTES  # imports torch

    w = _widths(config)
    windows = max(tokens // seq_len, 1)
    batch_size = min(batch_size, windows)  # a batch holds at most the windows there are
    weights = parameter_count(config) * dtype_bytes
    per_token = (
        3 * w["hidden"]
        + 2 * w["head_dim"] * (w["heads"] + 2 * w["kv_heads"])
        + w["heads"] * w["head_dim"]
        + 4 * w["intermediate"] * w["active_experts"]
        + 2 * w["layers"] * w["kv_heads"] * w["head_dim"]
    ) * dtype_bytes
    activations = batch_size * seq_len * per_token
    if attention_of(config) == "eager":
        activations += batch_size * w["heads"] * seq_len * seq_len * (2 * dtype_bytes + 4)
    elif _sliding_window(config) < seq_len:  # SDPA is handed a window x window boolean mask
        activations += batch_size * seq_len * seq_len
    return Estimate(
        weights=weights,
        activations=activations,
        head=_HEAD_COPIES * min(HEAD_CHUNK_BYTES, batch_size * seq_len * w["vocab"] * 4),
        reference=windows * seq_len * REFERENCE_BYTES_PER_TOKEN,
        restore_copy=weights if weights <= restore_copy_limit else 0,
        batch_size=batch_size,
    )


def attention_of(config: Any) -> str:
    """The attention implementation a model of ``config`` will run: the config's choice, else
    ``sdpa`` where its transformers class supports it (as transformers picks), else ``eager``."""
    chosen = getattr(config, "_attn_implementation", None)
    if chosen:
        return str(chosen)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except (KeyError, ValueError):
        return "sdpa"  # custom code: its own attention, assumed linear in the window
    return "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"


def _sliding_window(config: Any) -> int | float:
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or getattr(config, "use_sliding_window", True) is False:
        return math.inf
    return window


def available_bytes(device: str) -> tuple[int, str] | None:
    """What ``device`` can still take, and where that figure comes from: a CUDA device's free
    memory (``torch.cuda.mem_get_info``), else the host's (Linux ``MemAvailable``, capped by
    the cgroup's limit in a container). None where it cannot be told."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return None  # the device check at startup names that
        index = int(device.partition(":")[2] or torch.cuda.current_device())
        free, _ = torch.cuda.mem_get_info(index)
        return free, f"{device} has {_gb(free)} free"
    if device != "cpu":
        return None
    host = _host_available()
    return None if host is None else (host[0], f"this machine has {_gb(host[0])} {host[1]}")


def _host_available() -> tuple[int, str] | None:
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            available, source = int(line.split()[1]) * 1024, "available (MemAvailable)"
            break
    else:
        return None
    try:  # cgroup v2: a container's limit, which MemAvailable does not see
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return available, source
    if limit != "max" and int(limit) - used < available:
        return int(limit) - used, "available under its cgroup memory limit"
    return available, source


def check_window(settings: Settings) -> None:
    """Before the baseline loads (no weight read yet): refuse a window longer than its context
    (``loading.check_context``) and a measure the device cannot hold, each in one line naming
    the figures and the fix. A model with no config to read (``module:factory``), a device map
    and an encoder are not estimated."""
    from .loading import CAUSAL, check_context, detect_kind, kind, model_source, quiet

    spec = settings.model
    if spec is None or kind(spec) in ("factory", "missing"):
        return
    with quiet():  # the imports of transformers' model classes warn, as loading's would
        from transformers import AutoConfig

        source = model_source(spec)
        trust = settings.trust_remote_code
        try:
            config = AutoConfig.from_pretrained(source, trust_remote_code=trust)
        except (OSError, ValueError, KeyError):
            return  # loading names what is wrong with it
        check_context(config, spec, settings.seq_len, beyond_context=settings.beyond_context)
        if settings.device_map or detect_kind(source, spec, trust) != CAUSAL:
            return
        _check_memory(config, settings)


def _check_memory(config: Any, settings: Settings) -> None:
    import torch

    from .baseline import RESTORE_COPY_BYTES
    from .harness import auto_batch

    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if settings.dtype != "auto":
        dtype = settings.dtype
    elif device == "cpu":
        dtype = "float32"  # as load_model loads it there
    else:
        dtype = str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")

    def estimate(seq_len: int, batch_size: int = 0) -> Estimate:
        vocab = _widths(config)["vocab"]
        return estimate_measure(
            config,
            seq_len=seq_len,
            batch_size=batch_size or settings.batch_size or auto_batch(seq_len, vocab),
            tokens=settings.tokens,
            dtype_bytes=_BYTES.get(dtype, 4),
            restore_copy_limit=RESTORE_COPY_BYTES,
        )

    needed = estimate(settings.seq_len)
    # (what must fit, into what): on the CPU everything shares the host's memory; on a GPU the
    # restore copy and the reference stay on the host
    limits: list[tuple[Callable[[Estimate], int], tuple[int, str] | None]] = (
        [(lambda e: e.total, available_bytes(device))]
        if device == "cpu"
        else [
            (lambda e: e.device_bytes, available_bytes(device)),
            (lambda e: e.host_bytes, available_bytes("cpu")),
        ]
    )
    for part, room in limits:
        if room is None or part(needed) <= room[0]:
            continue
        fitting = [
            1 << power
            for power in range(7, (settings.seq_len - 1).bit_length())
            if part(estimate(1 << power, 1)) <= room[0]
        ]
        hints = ["lower --hemorrhage-seq-len" + (f" (to {fitting[-1]} or less)" if fitting else "")]
        if needed.batch_size > 1:
            fits = part(estimate(settings.seq_len, 1)) <= room[0]
            hints.append("--hemorrhage-batch-size" + ("=1 (that fits)" if fits else ""))
        raise HemorrhageError(
            f"a {settings.seq_len:,}-token window of {settings.model} needs about "
            f"{_gb(part(needed))} ({needed.parts()}); {room[1]}; "
            + " or ".join(hints)
            + ", or measure on a device with more memory"
        )
