"""SliceGPT (Ashkboos et al. 2024): rotate the residual stream onto its principal components,
then delete the least significant ones, shrinking the hidden dimension of every block.

RMSNorm (without its weight) commutes with an orthogonal rotation of its input, so once each
norm's weight is folded into the linears that read it, the residual stream can be expressed in
any orthonormal basis Q: embeddings become ``E Q``, readers ``W diag(g) Q``, writers ``Q^T W``.
Block ``l`` works in the basis ``Q_l`` of the principal components of its own input on the
calibration windows; the residual stream entering it is carried over from block ``l - 1``'s
basis by ``Q_{l-1}^T Q_l`` (SliceGPT's shortcut matrices), and the final norm gets its own basis
for the output head. Keeping the first ``(1 - fraction) * hidden`` columns of every Q deletes
the rest; with ``fraction=0`` the model computes the same function (to float rounding).
The norms keep dividing by the original width (SliceGPT's RMSN), so that the sliced stream
keeps the scale the weights were trained for.

Everything sliced is a new, smaller module swapped in through the patch (embedding, q/k/v/o,
MLP projections, norms, head) plus a pre-hook per block for the shortcut matrix; undo puts the
originals back. The new weights cost ``1 - fraction`` of the replaced ones while applied.

Differences from the reference implementation: one basis per block (SliceGPT has one for the
attention and one for the MLP input of each block), and the PCA is taken on the unsliced
model's residual stream rather than on the outputs of the already-sliced earlier blocks.

Supported: RMSNorm models whose norms compute ``w * x / rms(x)`` (Llama) or
``(1 + w) * x / rms(x)`` (Gemma), told apart by what the norm makes of a constant input, with
separate q/k/v or fused ``qkv_proj`` (Phi-3) or multi-head latent attention's
``q_a_proj``/``kv_a_proj_with_mqa`` (DeepSeek) reading the residual stream, and
``gate_proj``/``up_proj``, fused ``gate_up_proj`` or ``up_proj`` MLPs. Refused, in one line
naming the blocker and the pruning methods that do apply: LayerNorm models (GPT-2, OPT, ...:
they need an exact LayerNorm-to-RMSNorm conversion first, not implemented), norms on the
sublayers' outputs (Gemma 2/3, OLMo 2: a norm between a writer and the residual stream cannot
be folded into a sliced writer), and mixtures of experts stored as 3-D parameters (the
rotation rewrites linear layers only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...errors import HemorrhageError
from ..calibration import calibration_forwards
from ..handler import Context
from ..registry import Modification, Patch, blocks, is_linear, register_modification
from ..validate import check_number
from .layouts import alternatives, fused_experts

__all__ = ["SliceGPT", "SlicedRMSNorm", "residual_covariances"]

_ATTENTION_READERS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.qkv_proj",),  # Phi-3
    ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"),  # multi-head latent attention
    ("self_attn.q_proj", "self_attn.kv_a_proj_with_mqa"),  # the same, without a low-rank query
)
_WRITERS = ("self_attn.o_proj", "mlp.down_proj")
_MLP_READERS = (("mlp.gate_proj", "mlp.up_proj"), ("mlp.gate_up_proj",), ("mlp.up_proj",))
_NORMS = ("input_layernorm", "post_attention_layernorm")  # read by the attention, the MLP


@dataclass(frozen=True, kw_only=True)
class SliceGPT(Modification):
    """Delete ``fraction`` of the residual stream's dimensions after a PCA rotation.

    Slices the whole model (every block, the embedding and the head): ``include`` and
    ``exclude`` do not apply.

    Args:
        fraction: share of the hidden dimension removed, in [0, 1); 0 rotates without deleting.
    """

    fraction: float = 0.25

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self, "fraction", 0.0, 1.0, hi_open=True)
        if self.include or self.exclude:
            raise HemorrhageError(
                f"{self.name}: include/exclude are not supported: slicing the residual stream "
                "changes every layer that reads or writes it; drop include=/exclude="
            )


class SlicedRMSNorm(nn.Module):
    """RMSNorm without weight over a sliced stream, dividing by the original width.

    Args:
        width: the hidden size before slicing (the mean's denominator).
        eps: the original norm's epsilon.
        rotate: optional (kept, kept) matrix applied to the input first (a change of basis).
    """

    def __init__(self, width: int, eps: float, rotate: torch.Tensor | None = None) -> None:
        super().__init__()
        self.width, self.eps = width, eps
        self.register_buffer("rotate", rotate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotate is not None:
            x = x @ self.rotate.to(x.dtype)
        h = x.float()
        variance = h.square().sum(-1, keepdim=True) / self.width
        return (h * torch.rsqrt(variance + self.eps)).to(x.dtype)


@dataclass(frozen=True)
class _Layout:
    embed: str
    final_norm: str
    head: str
    prefix: str
    count: int
    readers: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]  # per block: attention's, MLP's


def _layout(model: nn.Module, what: str) -> _Layout:
    """Where the model reads and writes its residual stream; refuses in one line what the
    rotation cannot rewrite (see the module docstring), naming the methods that apply."""
    prefix, layers = blocks(model)
    base = prefix.rpartition(".")[0]
    embed, final_norm, head = f"{base}.embed_tokens", f"{base}.norm", "lm_head"

    def refuse(reason: str) -> HemorrhageError:
        return HemorrhageError(
            f"{what}: {type(model).__name__}: {reason}; use "
            f"{alternatives(model, 'prune.slicegpt')} instead"
        )

    norms = [
        {n: m for n, m in block.named_children() if "norm" in type(m).__name__.lower()}
        for block in layers
    ]
    final = dict(model.named_modules()).get(final_norm)
    every = [*layers.modules(), *([final] if final is not None else [])]  # BERT's nest deeper
    layer_norms = sorted(
        {type(m).__name__ for m in every if "norm" in type(m).__name__.lower() and not _is_rms(m)}
    )
    if layer_norms:
        raise refuse(
            f"it normalizes its residual stream with {', '.join(layer_norms)}, which the "
            "rotation cannot pass through (an exact LayerNorm-to-RMSNorm conversion would be "
            "needed first, which is not implemented)"
        )
    extra = sorted({n for b in norms for n in b} - set(_NORMS))
    if extra:
        raise refuse(
            f"its blocks have norms other than a Llama-style {' and '.join(_NORMS)} "
            f"({', '.join(extra)}): norms on the sublayers' outputs, which sit between a writer "
            "and the residual stream and cannot be folded into a sliced writer"
        )
    readers = []
    for index, block in enumerate(layers):
        name = f"{prefix}.{index}"
        experts = fused_experts(block)
        if experts:
            raise refuse(
                f"the MLP of block {name!r} is a mixture of experts stored as 3-D parameters "
                f"({', '.join(experts)}), which the rotation does not rewrite (linear layers "
                "only)"
            )
        attention = next((r for r in _ATTENTION_READERS if _all_present(block, r)), None)
        mlp = next((r for r in _MLP_READERS if _all_present(block, r)), None)
        if attention is None or mlp is None or not _all_present(block, _WRITERS):
            linears = ", ".join(n for n, m in block.named_modules() if is_linear(m))
            raise refuse(
                f"block {name!r} reads and writes its residual stream through layers "
                f"({linears}) other than those the rotation rewrites (q/k/v_proj, qkv_proj or "
                "q_a_proj/kv_a_proj_with_mqa, and o_proj; gate/up_proj, gate_up_proj or "
                "up_proj, and down_proj)"
            )
        for norm in _NORMS:
            if norm not in norms[index]:
                raise refuse(f"block {name!r} has no {norm} before the layers reading it")
            if _gain(norms[index][norm]) is None:
                raise refuse(f"its norm {name}.{norm} is an RMSNorm of another formula")
        readers.append((attention, mlp))
    missing = [n for n in (embed, final_norm, head) if not _has(model, n)]
    if missing:
        raise refuse(
            f"it has no {', '.join(missing)} (the embedding, final norm and output head the "
            "rotation rewrites)"
        )
    if _gain(model.get_submodule(final_norm)) is None:
        raise refuse(f"its norm {final_norm} is an RMSNorm of another formula")
    return _Layout(embed, final_norm, head, prefix, len(layers), tuple(readers))


def _is_rms(norm: nn.Module) -> bool:
    return type(norm).__name__.endswith("RMSNorm")


def _all_present(block: nn.Module, names: tuple[str, ...]) -> bool:
    return all(_has(block, n) for n in names)


def _eps(norm: nn.Module) -> float:
    return getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))


def _gain(norm: nn.Module) -> torch.Tensor | None:
    """The per-channel gain ``g`` of an RMSNorm computing ``g * x / rms(x)``, in float64: its
    weight ``w`` (Llama) or ``1 + w`` (Gemma), whichever its output on a constant input
    matches; None for any other formula."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return None
    probe = torch.ones(1, 1, len(weight), dtype=weight.dtype, device=weight.device)
    with torch.no_grad():  # the class's forward: no hook runs (accelerate's would reload it)
        out = type(norm).forward(norm, probe).double().flatten()
    w, scale = weight.detach().double(), (1 + _eps(norm)) ** -0.5
    error, gain = min(((out - g * scale).abs().max().item(), i) for i, g in enumerate((w, 1 + w)))
    tolerance = 8 * torch.finfo(weight.dtype).eps * max(1.0, out.abs().max().item())
    return (w, 1 + w)[gain] if error <= tolerance else None


# Stages that change the block structure or widths SliceGPT's rotation is computed for.
_STRUCTURAL = ("expand.layers", "prune.layers", "prune.heads", "prune.channels", "prune.slicegpt")


def _check_order(context: Context) -> None:
    """Refuse, before anything changes, a composition where an earlier stage changed the
    blocks or widths the rotation would be computed for."""
    earlier = [c.name for c in context.applied if c.name in _STRUCTURAL]
    if earlier:
        raise HemorrhageError(
            f"prune.slicegpt after {earlier[0]}: the rotation is computed for the model's own "
            "blocks and widths; put prune.slicegpt before structural stages in a composition"
        )


def _check_rewritable(model: nn.Module, layout: _Layout) -> None:
    """Refuse, before anything changes, a layer an earlier stage swapped for a kernel
    (bitsandbytes, w8a8, ...) whose float weight is gone."""
    names = [
        f"{layout.prefix}.{i}.{n}"
        for i, (attention, mlp) in enumerate(layout.readers)
        for n in (*attention, *_WRITERS, *mlp)
    ]
    for name in [layout.embed, layout.head, *names]:
        module = model.get_submodule(name)
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            raise HemorrhageError(
                f"prune.slicegpt: {name} is a {type(module).__name__} (an earlier stage swapped "
                "it for a kernel without a float weight); put prune.slicegpt before "
                "quantization stages in a composition"
            )


def _has(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


def residual_covariances(model: nn.Module, context: Context) -> list[torch.Tensor]:
    """``X^T X`` (float64, CPU) of the residual stream entering each block and the final norm,
    over the calibration windows. Memoized per model state."""

    def compute() -> list[torch.Tensor]:
        layout = _layout(model, "prune.slicegpt")
        _, layers = blocks(model)
        sums: list[Any] = [0] * (layout.count + 1)

        def record(index: int):
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                x = args[0] if args else kwargs["hidden_states"]
                flat = x.detach().double().reshape(-1, x.shape[-1])
                sums[index] = sums[index] + (flat.T @ flat).cpu()

            return hook

        handles = [
            layer.register_forward_pre_hook(record(i), with_kwargs=True)
            for i, layer in enumerate(layers)
        ]
        final = model.get_submodule(layout.final_norm)
        handles.append(final.register_forward_pre_hook(record(layout.count), with_kwargs=True))
        calibration_forwards(context, handles)
        return sums

    return context.memo(("prune.slicegpt", context.applied), compute)


def _principal(covariance: torch.Tensor, kept: int) -> torch.Tensor:
    """The ``kept`` leading eigenvectors (columns, descending eigenvalue) of ``covariance``."""
    _, vectors = torch.linalg.eigh(covariance)
    return vectors.flip(-1)[:, :kept]


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Module) -> nn.Linear:
    """A new nn.Linear holding ``weight`` (out, in), in ``like``'s dtype and device."""
    w = like.weight
    layer = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype
    )
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer.train(like.training)


def _shortcut(rotation: torch.Tensor):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            args = (args[0] @ rotation.to(args[0].dtype), *args[1:])
        else:
            x = kwargs["hidden_states"]
            kwargs = {**kwargs, "hidden_states": x @ rotation.to(x.dtype)}
        return args, kwargs

    return hook


@register_modification("prune.slicegpt", SliceGPT)
def apply_slicegpt(config: SliceGPT, model: nn.Module, patch: Patch, context: Context) -> None:
    _check_order(context)
    layout = _layout(model, config.name)
    _check_rewritable(model, layout)
    embed = model.get_submodule(layout.embed)
    width = embed.weight.shape[1]
    kept = max(1, width - round(config.fraction * width))
    device = embed.weight.device
    bases = context.memo(  # one eigendecomposition per block and width kept, per session
        ("prune.slicegpt.bases", context.applied, kept, str(device)),
        lambda: [_principal(c, kept).to(device) for c in residual_covariances(model, context)],
    )
    _, layers = blocks(model)

    def read(name: str, basis: torch.Tensor, gain: torch.Tensor) -> None:
        old = model.get_submodule(name)
        w = old.weight.detach().double() * gain.to(old.weight.device)
        bias = None if old.bias is None else old.bias.detach()
        patch.swap_module(name, _linear(w @ basis, bias, old))

    def write(name: str, basis: torch.Tensor) -> None:
        old = model.get_submodule(name)
        w = basis.T @ old.weight.detach().double()
        bias = None if old.bias is None else basis.T @ old.bias.detach().double()
        patch.swap_module(name, _linear(w, bias, old))

    with torch.no_grad():
        new_embed = nn.Embedding(
            embed.num_embeddings,
            kept,
            padding_idx=embed.padding_idx,
            device=device,
            dtype=embed.weight.dtype,
        )
        # the embedding's outputs, not its weight: Gemma's scales them by sqrt(hidden) inside
        table = embed(torch.arange(embed.num_embeddings, device=device))
        new_embed.weight.copy_(table.double() @ bases[0])
        patch.swap_module(layout.embed, new_embed)
        for index, layer in enumerate(layers):
            name, basis = f"{layout.prefix}.{index}", bases[index]
            for norm_name, readers in zip(_NORMS, layout.readers[index], strict=True):
                norm = layer.get_submodule(norm_name)
                gain = _gain(norm)
                for reader in readers:
                    read(f"{name}.{reader}", basis, gain)
                patch.swap_module(f"{name}.{norm_name}", SlicedRMSNorm(width, _eps(norm)))
            for writer in _WRITERS:
                write(f"{name}.{writer}", basis)
            if index:
                rotation = (bases[index - 1].T @ basis).to(embed.weight.dtype)
                handle = layer.register_forward_pre_hook(_shortcut(rotation), with_kwargs=True)
                patch.on_undo(handle.remove)
        final = model.get_submodule(layout.final_norm)
        read(layout.head, bases[-1], _gain(final))
        rotation = (bases[-2].T @ bases[-1]).to(embed.weight.dtype)
        patch.swap_module(layout.final_norm, SlicedRMSNorm(width, _eps(final), rotation))
