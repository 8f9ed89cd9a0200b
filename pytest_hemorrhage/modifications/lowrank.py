"""Low-rank approximation: every target weight replaced by its truncated SVD.

``lowrank.svd`` truncates ``W`` itself; ``lowrank.asvd`` (Yuan et al. 2023) truncates
``W diag(s)`` with ``s`` the inputs' mean magnitude per channel to the power ``alpha``, then
folds ``diag(1/s)`` back: the error is then weighted towards the channels that carry large
activations, which is what the layer's output error depends on.

Memory. Keeping the SVD factors of a layer (``k * (out + in)`` numbers) costs more than the
weight itself at the ranks people use (80-95% kept), and recomputing the SVD on every forward
is far too slow. Instead, the truncated weight is computed on each use as a projection of the
original weight, ``W_k = P W`` (or ``W P``), onto the span of its top-``k`` singular vectors
on the smaller side of ``W``; when fewer vectors are dropped than kept, ``W_k = W - P' W``
with ``P'`` the projection onto the dropped ones. A ``j``-dimensional subspace of R^p is
stored in graph coordinates, ``span([I; X])`` after a row permutation, so it costs
``j * (p - j) <= p^2 / 4 <= out * in / 4`` numbers (plus p row indices): at most a quarter of
the layer's own weight whatever the rank (float32; for 16-bit weights, 16-bit X where float32
would not fit). The price is two thin matrix products per layer and use, plus one SVD per
layer at the first apply of a config in a session: the subspaces of the last four configs are
memoized (at most a quarter of the targets' weight bytes each), so a repeated apply does no SVD.
"""

from __future__ import annotations

import ctypes
import functools
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from .calibration import RoutedCalibration, routed_statistics
from .handler import Context
from .registry import Modification, Patch, Target, register_modification
from .validate import check_number

__all__ = ["ASVD", "LowRank", "Subspace", "asvd_scale", "kept_rank", "rebuild", "truncate"]

_RECENT = 4  # configs whose subspaces the session memo keeps


@dataclass(frozen=True, kw_only=True)
class LowRank(Modification):
    """Replace every target weight (out, in) by its best rank-``k`` approximation (truncated SVD).

    Args:
        rank_ratio: fraction of each layer's full rank ``min(out, in)`` that is KEPT,
            in (0, 1]: ``k = max(1, round(rank_ratio * min(out, in)))``. 1.0 changes nothing;
            0.8 is what the paper calls a 20% rank reduction. Damage grows as it shrinks.
    """

    per_expert: ClassVar[bool | None] = True  # each expert of a fused expert weight
    rank_ratio: float = 0.8

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self, "rank_ratio", 0.0, 1.0, lo_open=True)


@dataclass(frozen=True, kw_only=True)
class ASVD(LowRank, RoutedCalibration):
    """Activation-aware SVD (Yuan et al. 2023): truncate ``W diag(s)``, fold ``diag(1/s)`` back.

    ``s_j = mean|x_j| ** alpha`` over the calibration tokens of the layer's input channel j
    (ASVD's "absmean" scaling). Every layer keeps the same share of its rank (ASVD's
    sensitivity-based rank allocation is not done), so ``lowrank.asvd`` against
    ``lowrank.svd`` at one ``rank_ratio`` isolates the scaling. An expert's matrix is scaled
    by the tokens the router sent that expert; under ``min_expert_tokens`` of them, plain SVD.

    Args:
        rank_ratio: fraction of each layer's full rank ``min(out, in)`` that is KEPT, in (0, 1].
        alpha: strength of the activation scaling, 0-1: 0 is plain SVD; ASVD's default 0.5.
        min_expert_tokens: routed calibration tokens an expert needs (see
            ``RoutedCalibration``).
    """

    fallback: ClassVar[str] = "lowrank.svd"
    alpha: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self, "alpha", 0.0, 1.0)


def kept_rank(rank_ratio: float, shape: tuple[int, ...]) -> int:
    """Singular values kept for a weight of ``shape`` (out, in)."""
    full = min(shape)
    return min(full, max(1, round(rank_ratio * full)))


class Subspace:
    """A ``j``-dimensional subspace of R^p as ``span(B)``, ``B[rows] = I``, ``B[rest] = X``.

    Stores ``X`` ((p - j) x j) and a permutation of the p rows: no orthonormal basis.

    Args:
        basis: orthonormal columns (p x j) spanning the subspace.
        dtype: dtype to store ``X`` in.
        kept: whether the subspace is the kept (True) or the dropped singular subspace.
    """

    def __init__(self, basis: torch.Tensor, dtype: torch.dtype, kept: bool) -> None:
        p, j = basis.shape
        # LU with partial pivoting picks j rows where the basis is well conditioned; then
        # basis[perm] = [L1; L2] U spans the same space as [I; L2 L1^-1], with |L| <= 1
        lu, pivots = torch.linalg.lu_factor(basis)
        perm = list(range(p))
        for i, swap in enumerate(pivots.tolist()):
            perm[i], perm[swap - 1] = perm[swap - 1], perm[i]
        lower = lu.tril(-1) + torch.eye(p, j, dtype=lu.dtype, device=lu.device)
        x = torch.linalg.solve_triangular(
            lower[:j], lower[j:], upper=False, left=False, unitriangular=True
        )
        index = torch.tensor(perm, dtype=torch.int32, device=basis.device)
        self.rows, self.rest = index[:j], index[j:]
        self.x = x.to(dtype)
        self.kept = kept

    def project(self, w: torch.Tensor) -> torch.Tensor:
        """The orthogonal projection of each column of ``w`` (p x n) onto the subspace."""
        x = self.x.to(w.dtype)
        # P = B (B^T B)^-1 B^T with B^T B = I + X^T X
        gram = torch.eye(x.shape[1], dtype=w.dtype, device=w.device) + x.T @ x
        coef = torch.cholesky_solve(w[self.rows] + x.T @ w[self.rest], torch.linalg.cholesky(gram))
        out = torch.empty_like(w)
        out[self.rows] = coef
        out[self.rest] = x @ coef
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.x, self.rows, self.rest))


def truncate(w: torch.Tensor, rank: int) -> Subspace | None:
    """What ``w`` (out, in) needs to be rebuilt at ``rank``; None when nothing is dropped.

    The subspace lives on the smaller side of ``w`` and is the smaller of the kept and the
    dropped singular subspaces (``Subspace.kept`` tells which).
    """
    out_features, in_features = w.shape
    full = min(out_features, in_features)
    if rank >= full:
        return None
    a = w.detach().to(_compute_dtype(w))
    with _few_threads(a):
        u, _, _ = torch.linalg.svd(a if out_features <= in_features else a.T, full_matrices=False)
    keep = rank <= full - rank  # u's columns come in descending singular value order
    basis = u[:, :rank] if keep else u[:, rank:]
    j = basis.shape[1]
    # float32 X whenever it stays within a quarter of the weight's bytes (always, for float32)
    fits = j * (full - j) * a.element_size() <= w.numel() * w.element_size() / 4
    return Subspace(basis, a.dtype if fits else w.dtype, keep)


@contextmanager
def _few_threads(a: torch.Tensor) -> Iterator[None]:
    """One LAPACK thread for a small SVD, in this thread only: LAPACK's threads synchronize so
    often that on a busy machine (CI runners) a 128 x 384 SVD was measured at 8-60 s with 2
    threads, 10 ms with 1. torch's own thread count is process-wide, so it is left alone; MKL
    (torch's LAPACK on x86) has a thread-local setting, used where it is found."""
    set_local = _mkl_threads_local() if a.device.type == "cpu" and a.numel() < 1 << 20 else None
    if set_local is None:
        yield
        return
    previous = set_local(1)
    try:
        yield
    finally:
        set_local(previous)


@functools.cache
def _mkl_threads_local() -> Callable[[int], int] | None:
    """MKL's ``mkl_set_num_threads_local`` (returns the previous thread-local value, 0 meaning
    "the global setting"), from the MKL linked into torch; None without it."""
    if not torch.backends.mkl.is_available():
        return None
    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        fn = lib.mkl_set_num_threads_local_  # the Fortran entry point: arguments by reference
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.POINTER(ctypes.c_int)]
    return lambda n: fn(ctypes.byref(ctypes.c_int(n)))


def _compute_dtype(w: torch.Tensor) -> torch.dtype:
    return torch.promote_types(w.dtype, torch.float32)


def rebuild(w: torch.Tensor, space: Subspace) -> torch.Tensor:
    """The rank-truncated ``w`` (out, in) from the subspace :func:`truncate` returned."""
    transposed = w.shape[0] > w.shape[1]
    a = (w.T if transposed else w).to(_compute_dtype(w))
    projected = space.project(a)
    a = projected if space.kept else a - projected
    return (a.T if transposed else a).to(w.dtype)


def _truncated(
    rank_ratio: float,
    target: Target,
    scale: torch.Tensor | None,
    patch: Patch,
    spaces: dict[str, Subspace | None],
) -> None:
    """Parametrize ``target`` as its truncated SVD, of ``W diag(scale)`` unscaled if given.

    ``spaces`` memoizes the subspace per layer name (computed here on first use)."""
    w = target.weight.detach()
    rank = kept_rank(rank_ratio, w.shape)
    s = None if scale is None else scale.to(w.device, _compute_dtype(w))
    if target.name not in spaces:
        with torch.no_grad():
            spaces[target.name] = truncate(w if s is None else w.to(s.dtype) * s, rank)
    space = spaces[target.name]
    if space is None:  # the full rank: the weight as it is
        patch.touch(target)
        return
    if s is None:
        patch.parametrize(target, lambda w, space=space: rebuild(w, space))
        return

    def scaled(w: torch.Tensor, space: Subspace = space, s: torch.Tensor = s) -> torch.Tensor:
        s = s.to(w.device)
        return (rebuild(w.to(s.dtype) * s, space) / s).to(w.dtype)

    patch.parametrize(target, scaled)


def _subspaces(config: LowRank, context: Context) -> dict[str, Subspace | None]:
    """The session's subspaces for ``config`` after the stages applied before it, per layer.

    The last ``_RECENT`` configs are kept (a sweep's neighbours), each at most a quarter of its
    targets' weight bytes (see :class:`Subspace`): a cached apply costs the parametrizations
    only, no SVD.
    """
    recent: OrderedDict[Any, dict[str, Subspace | None]] = context.memo(
        ("lowrank.recent",), OrderedDict
    )
    key = (config, context.applied)
    if key not in recent:
        recent[key] = {}
        while len(recent) > _RECENT:
            recent.popitem(last=False)
    recent.move_to_end(key)
    return recent[key]


@register_modification("lowrank.svd", LowRank)
def apply_svd(config: LowRank, model: nn.Module, patch: Patch, context: Context) -> None:
    spaces = _subspaces(config, context)
    with parametrize.cached():  # see apply_asvd
        for target in config.targets(model):
            _truncated(config.rank_ratio, target, None, patch, spaces)


def asvd_scale(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """ASVD's per-input-channel scale ``mean|x| ** alpha``, kept away from zero.

    A channel that never fires would get a zero scale and an undefined ``1/s``; the floor
    (1e-6 of the largest scale) leaves such a channel to plain-SVD treatment in effect.
    """
    s = mean_abs.float().pow(alpha)
    return s.clamp_min(1e-6 * float(s.max().clamp_min(1e-30)))


@register_modification("lowrank.asvd", ASVD)
def apply_asvd(config: ASVD, model: nn.Module, patch: Patch, context: Context) -> None:
    targets = config.targets(model)
    stats = routed_statistics(model, context, config, targets, patch, "use lowrank.svd")
    spaces = _subspaces(config, context)
    # each fused expert stack evaluated once: after expert e's edit, reading expert e + 1's
    # weight would rebuild every expert of the stack (its value before this stage is wanted)
    with parametrize.cached():
        for target in targets:
            found = stats[target.name]
            scale = None if found is None else asvd_scale(found.abs_mean, config.alpha)
            _truncated(config.rank_ratio, target, scale, patch, spaces)
