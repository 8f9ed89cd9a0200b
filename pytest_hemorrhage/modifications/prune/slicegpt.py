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
Only RMSNorm models (Llama-style) are supported: LayerNorm models (GPT-2) need an exact
LayerNorm-to-RMSNorm conversion first, which is not implemented, and are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...errors import HemorrhageError
from ..calibration import calibration_forwards
from ..handler import Context
from ..registry import Modification, Patch, blocks, register_modification
from ..validate import check_number

__all__ = ["SliceGPT", "SlicedRMSNorm", "residual_covariances"]

_ATTENTION_READERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_WRITERS = ("self_attn.o_proj", "mlp.down_proj")
_MLP_READERS = (("mlp.gate_proj", "mlp.up_proj"), ("mlp.up_proj",))


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
    mlp_readers: tuple[str, ...]


def _layout(model: nn.Module, what: str) -> _Layout:
    prefix, layers = blocks(model)
    base = prefix.rpartition(".")[0]
    names = dict(model.named_modules())
    embed, norm = f"{base}.embed_tokens", f"{base}.norm"
    head = "lm_head"
    first = layers[0]
    norm_kind = type(getattr(first, "input_layernorm", None) or first).__name__
    mlp = next((r for r in _MLP_READERS if all(_has(first, n) for n in r)), None)
    if (
        not norm_kind.endswith("RMSNorm")
        or any(n not in names for n in (embed, norm, head))
        or mlp is None
        or not all(
            _has(first, n) for n in (*_ATTENTION_READERS, *_WRITERS, "post_attention_layernorm")
        )
    ):
        norms = sorted({type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__})
        raise HemorrhageError(
            f"{what}: {type(model).__name__} (norms: {', '.join(norms) or 'none'}) is not a "
            "Llama-style RMSNorm model this modification can rotate; LayerNorm models (GPT-2) "
            "would need an exact LayerNorm-to-RMSNorm conversion first, which is not "
            "implemented: use prune.channels or prune.heads there"
        )
    return _Layout(embed, norm, head, prefix, len(layers), mlp)


# Stages that change the block structure or widths SliceGPT's rotation is computed for.
_STRUCTURAL = ("expand.layers", "prune.layers", "prune.heads", "prune.channels", "prune.slicegpt")


def _check_rewritable(model: nn.Module, layout: _Layout, context: Context) -> None:
    """Refuse, before anything changes, what an earlier stage made impossible to rotate: a
    structural change, or a layer swapped for a kernel (bitsandbytes, w8a8, ...) whose float
    weight is gone."""
    earlier = [c.name for c in context.applied if c.name in _STRUCTURAL]
    if earlier:
        raise HemorrhageError(
            f"prune.slicegpt after {earlier[0]}: the rotation is computed for the model's own "
            "blocks and widths; put prune.slicegpt before structural stages in a composition"
        )
    _, layers = blocks(model)
    names = [
        f"{layout.prefix}.{i}.{n}"
        for i in range(len(layers))
        for n in (*_ATTENTION_READERS, *_WRITERS, *layout.mlp_readers)
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
    layout = _layout(model, config.name)
    _check_rewritable(model, layout, context)
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
        w = old.weight.detach().double() * gain.double()
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
        new_embed.weight.copy_(embed.weight.detach().double() @ bases[0])
        patch.swap_module(layout.embed, new_embed)
        for index, layer in enumerate(layers):
            name, basis = f"{layout.prefix}.{index}", bases[index]
            for norm_name, readers in (
                ("input_layernorm", _ATTENTION_READERS),
                ("post_attention_layernorm", layout.mlp_readers),
            ):
                norm = layer.get_submodule(norm_name)
                for reader in readers:
                    read(f"{name}.{reader}", basis, norm.weight.detach())
                eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
                patch.swap_module(f"{name}.{norm_name}", SlicedRMSNorm(width, eps))
            for writer in _WRITERS:
                write(f"{name}.{writer}", basis)
            if index:
                rotation = (bases[index - 1].T @ basis).to(embed.weight.dtype)
                handle = layer.register_forward_pre_hook(_shortcut(rotation), with_kwargs=True)
                patch.on_undo(handle.remove)
        final = model.get_submodule(layout.final_norm)
        read(layout.head, bases[-1], final.weight.detach())
        eps = getattr(final, "variance_epsilon", getattr(final, "eps", 1e-6))
        rotation = (bases[-2].T @ bases[-1]).to(embed.weight.dtype)
        patch.swap_module(layout.final_norm, SlicedRMSNorm(width, eps, rotation))
