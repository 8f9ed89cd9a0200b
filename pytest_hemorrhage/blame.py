"""Where the hemorrhage starts: per-block diagnostics of a modified model against the baseline.

One forward pass of the modified model over a few evaluation windows, with hooks on the
transformer blocks, their linear layers and their attention, is compared with the same pass of
the baseline (run once per session and memoized):

- **drift** per block: relative L2 (``||h' - h|| / ||h||`` over all tokens) and mean
  ``1 - cosine`` of the residual stream at the block's output; the relative L2 of every linear
  layer's output inside the block names the sublayer that moves most. Widths above
  ``SKETCH_DIM`` are compared through a fixed random projection to ``SKETCH_DIM`` dimensions
  (Johnson-Lindenstrauss: norms and angles kept to about 5%), so the memoized
  baseline stays small for large models; identical outputs still give exactly 0.
- **attention entropy shift** per block: mean ``|H' - H|`` (nats) of every head's attention
  distribution at every query position. Attention weights exist only in eager attention, so
  both passes switch ``config._attn_implementation`` to ``"eager"`` for their duration
  (through the patch, undone after); models without that switch get no entropy figures.
- **attribution** (only when asked: about two kl_mean measurements per block). The
  modification is applied once to the whole model and the edits it made are captured per module
  from the patch (weight parametrizations, module swaps) together with its logits processors.
  Re-runs then re-apply captured edits only, so a one-block re-run keeps the modification's
  meaning: a global pruning threshold, the bits a fault drew, the calibration a sequential
  quantizer ran through the earlier modified blocks, all stay those of the whole-model
  application. Two figures per block:

  - ``kl_added``: the **decomposition**. Block ``k``'s edits join those of blocks ``0..k-1``
    (the order the model runs them) and ``kl_added`` is the rise in ``kl_mean``; what lies
    outside the blocks (a changed ``lm_head``, logits processing such as ``decode.*`` stages)
    comes last as its own part, ``Diagnosis.kl_outside``. The parts sum to the measured
    ``kl_mean`` (telescoping), so ``share = kl_added / kl_mean`` is a real share; a part can be
    negative when a block's edits cancel damage done before it. The order is a choice: a
    block's interactions with the blocks before it are counted in its part. (A Shapley value
    would average over every order: 2^n measurements; this costs n.)
  - ``kl_mean``: the **one-block** kl_mean, this block's edits alone (no logits processing),
    and ``kl_ratio``, its ratio to the whole modification's kl_mean. One-block figures do not
    add up to the whole: blocks interact.

  The replay of every captured edit must reproduce the measured ``kl_mean``; when it does not
  (a modification that changes something besides weights and modules: attributes, hooks), the
  diagnosis says that attribution does not apply to it instead of showing figures.

When a modification removes or adds blocks (layer pruning, layer expansion), the blocks it kept
are paired with the baseline's by module identity, and an added block ``k'`` is compared with
baseline block ``k``, the one it follows; attribution then does not apply.

An encoder is diagnosed on its first batch of measured texts, padding left out: drift and
attention entropy as above; attribution (a split of ``kl_mean``) is a causal LM's only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .diagnosis import BEGIN_LEVEL, BEGIN_SHARE, BlockDrift, Diagnosis, severity
from .errors import HemorrhageError
from .loading import ENCODER, model_logits
from .metrics import LogitReads, Result, read_logits, score_reads, summarize
from .modifications.registry import Patch, Target, blocks, is_linear

if TYPE_CHECKING:
    from .harness import Harness, Stages
    from .modifications.registry import LogitsProcessor

__all__ = [
    "BEGIN_LEVEL",
    "BEGIN_SHARE",
    "BlockDrift",
    "Diagnosis",
    "diagnose",
    "explain",
    "explain_candidate",
]

SKETCH_DIM = 256
DEFAULT_WINDOWS = 2
# the replay of every captured edit must give the measured kl_mean to this relative precision
# (bit-identical on CPU; GPU kernels may order their sums differently between two runs)
REPLAY_TOLERANCE = 1e-6


def diagnose(
    harness: Any,
    target: Stages | Result,
    *,
    attribution: bool = False,
    windows: int = DEFAULT_WINDOWS,
) -> Diagnosis:
    """Per-block drift (and, if asked, one-at-a-time attribution) of a modification.

    Args:
        harness: the session's Harness (or the ``hemorrhage`` fixture).
        target: what ``measure`` accepts, or a Result (its ``configs`` are re-applied and the
            figures are stored in ``result.details["blame"]`` for the JSON report).
        attribution: also split ``kl_mean`` over the blocks (``kl_added``, ``share``) and
            measure each block's edits alone (``kl_mean``, ``kl_ratio``): about two kl_mean
            measurements per block, see the module's docstring.
        windows: evaluation windows the drift is computed on (one batch); an encoder's is its
            first batch of texts.
    """
    harness = getattr(harness, "harness", harness)
    result = target if isinstance(target, Result) else None
    stages = result.configs if result is not None else target
    if result is not None and not stages:
        raise HemorrhageError(
            f"{result.modification}: the result has no configs to re-apply "
            "(it was not made by measure())"
        )
    inputs = _inputs(harness, windows)
    baseline = harness.context.memo(("blame-baseline", windows), lambda: _baseline(harness, inputs))
    linears = frozenset(key.partition(":")[2] for key in baseline.outputs if ":" in key)
    before = dict(harness.model.named_modules())
    with harness.modified(stages) as patch:
        configs = list(harness.context.applied)
        edits = _edits(harness.model, before, patch) if attribution else None
        modified = _capture(harness.model, inputs, patch, linears)
    diagnosis = _compare(baseline, modified, "+".join(c.name for c in configs), _tokens(inputs))
    if edits is None:
        pass
    elif harness.kind == ENCODER:
        diagnosis.notes.append("(no attribution: it splits kl_mean, which an encoder has not)")
    elif [b.index for b in diagnosis.blocks] != list(range(len(baseline.names))):
        diagnosis.notes.append("(no attribution: it needs the baseline's blocks, unchanged)")
    else:
        total = result.metrics.get("kl_mean") if result is not None else None
        if total is None:
            total = harness.measure(configs).metrics["kl_mean"]
        _attribute(harness, edits, diagnosis, total)
    if result is not None:
        result.details["blame"] = diagnosis.to_dict()  # the recorded report shares this dict
    return diagnosis


def explain(harness: Harness, result: Result) -> list[str]:
    """Lines for a failed ``check()``: where the drift begins and which block bleeds most.

    Reuses ``result.details["blame"]`` when ``diagnose(..., attribution=True)`` already ran;
    the figures stay there for the report (and ``--hemorrhage-plot``'s bar chart).
    """
    if not result.configs:
        return []
    try:
        stored = result.details.get("blame")
        diagnosis = Diagnosis.from_dict(stored) if stored else diagnose(harness, result)
    except Exception as exc:  # a diagnostic must never hide the failure it explains
        return [f"(no blame figures: {type(exc).__name__}: {exc})"]
    lines = diagnosis.lines()
    return lines


def explain_candidate(harness: Harness, candidate: Any, result: Result) -> list[str]:
    """Lines for a failed check of a candidate (``measure_model``): where its drift from the
    baseline begins, blocks matched by module name; or why that cannot be said (no baseline
    model with a reference file alone, another architecture, the candidate released).

    The figures go to ``result.details["blame"]`` as for a modification (no attribution: a
    candidate's edits are not known, only its weights).
    """
    model = None if candidate is None else candidate.model
    if harness.model is None:
        why = "the baseline model is not loaded (a reference file alone); pass --hemorrhage-model"
    elif model is None:
        why = "the candidate was released when another one was loaded"
    else:
        why = _architecture_mismatch(harness.model, model)
    if why:
        return [f"(no blame for the candidate: {why})"]
    try:
        windows = DEFAULT_WINDOWS
        inputs = _inputs(harness, windows)
        baseline = harness.context.memo(
            ("blame-baseline", windows), lambda: _baseline(harness, inputs)
        )
        linears = frozenset(key.partition(":")[2] for key in baseline.outputs if ":" in key)
        patch = Patch(model)  # only the eager-attention switch, undone below
        try:
            device = next(model.parameters()).device
            on_device = {k: v.to(device) for k, v in inputs.items()}
            modified = _capture(model, on_device, patch, linears)
        finally:
            patch.undo()
        diagnosis = _compare(baseline, modified, "candidate", _tokens(inputs))
    except Exception as exc:  # a diagnostic must never hide the failure it explains
        return [f"(no blame figures: {type(exc).__name__}: {exc})"]
    result.details["blame"] = diagnosis.to_dict()
    return diagnosis.lines()


def _architecture_mismatch(baseline: Any, candidate: Any) -> str:
    """Why blocks of the two models cannot be matched by module name; empty when they can."""
    try:
        base_prefix, base_blocks = blocks(baseline)
        cand_prefix, cand_blocks = blocks(candidate)
    except Exception as exc:
        return f"its blocks cannot be found ({type(exc).__name__}: {exc})"
    if (type(baseline).__name__, base_prefix, len(base_blocks)) != (
        type(candidate).__name__,
        cand_prefix,
        len(cand_blocks),
    ):
        return (
            f"its architecture differs ({type(candidate).__name__} with {len(cand_blocks)} "
            f"blocks at {cand_prefix}, the baseline {type(baseline).__name__} with "
            f"{len(base_blocks)} at {base_prefix}), so its blocks cannot be matched by name"
        )
    return ""


# -- capture -------------------------------------------------------------------------------


@dataclass
class _States:
    """Sketched outputs of one forward pass: blocks, linears (``i:name``), attention entropy."""

    prefix: str
    names: list[str]  # block module names
    ids: list[int]  # id() of each block module, to pair blocks when their number changed
    outputs: dict[str, tuple[int, torch.Tensor]]  # key -> (width before sketching, sketch)
    entropy: dict[int, torch.Tensor]


def _inputs(harness: Harness, windows: int) -> dict[str, torch.Tensor]:
    """What the diagnosis runs the model on: ``ids``, the first evaluation windows; or an
    encoder's tokenizer outputs for its first batch of texts."""
    if harness.kind == ENCODER:
        return {k: v.to(harness.device) for k, v in harness.texts.batches[0].items()}
    return {"ids": harness.windows.eval[:windows].to(harness.device)}


def _tokens(inputs: dict[str, torch.Tensor]) -> int:
    mask = inputs.get("attention_mask")
    return inputs["ids"].numel() if mask is None else int(mask.sum())


def _baseline(harness: Harness, inputs: dict[str, torch.Tensor]) -> _States:
    with harness.modified([]) as patch:
        return _capture(harness.model, inputs, patch)


_PROJECTIONS: dict[tuple[int, str], torch.Tensor] = {}


def _sketch(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` (tokens, d) as float32 on CPU, projected to SKETCH_DIM when d is larger."""
    x = x.detach().reshape(-1, x.shape[-1]).float()
    d = x.shape[-1]
    if d > SKETCH_DIM:
        key = (d, str(x.device))
        if key not in _PROJECTIONS:
            g = torch.Generator().manual_seed(d)  # the same projection for both passes
            _PROJECTIONS[key] = (
                torch.randn(d, SKETCH_DIM, generator=g) / math.sqrt(SKETCH_DIM)
            ).to(x.device)
        x = x @ _PROJECTIONS[key]
    return x.cpu()


def _eager(model: Any, patch: Patch) -> bool:
    """Switch to eager attention for the pass (weights exist only there); False if impossible."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current is None:
        return False
    if current != "eager":
        patch.setattr(config, "_attn_implementation", "eager")
    return True


def _capture(
    model: Any,
    inputs: dict[str, torch.Tensor],
    patch: Patch,
    sublayers: frozenset[str] = frozenset(),
) -> _States:
    """Outputs of every block and of its linear layers, or of modules named in ``sublayers``
    (the baseline's linears, possibly swapped for quantized modules), and attention entropy,
    at the real tokens of ``inputs`` (see :func:`_inputs`; an encoder's padding left out)."""
    prefix, layers = blocks(model)
    outputs: dict[str, tuple[int, torch.Tensor]] = {}
    entropy: dict[int, torch.Tensor] = {}
    attention = _eager(model, patch)
    mask = inputs.get("attention_mask")
    real = None if mask is None else mask.bool()
    tokens = (inputs["ids"] if real is None else real).shape[-1]

    def keep(key: str):
        def hook(module: Any, args: Any, out: Any) -> None:
            x = out[0] if isinstance(out, tuple) else out
            outputs[key] = (x.shape[-1], _sketch(x if real is None else x[real]))

        return hook

    def weights(index: int):
        def hook(module: Any, args: Any, out: Any) -> None:
            w = out[1] if isinstance(out, tuple) and len(out) > 1 else None
            if (
                index not in entropy
                and isinstance(w, torch.Tensor)
                and w.dim() == 4
                and w.shape[-1] == w.shape[-2] == tokens
            ):
                h = torch.special.entr(w.float()).sum(-1)  # (batch, heads, queries)
                h = h if real is None else h.transpose(1, 2)[real]  # real queries only
                entropy[index] = h.flatten().cpu()

        return hook

    handles = []
    for i, block in enumerate(layers):
        handles.append(block.register_forward_hook(keep(str(i))))
        for name, module in block.named_modules():
            if name and (is_linear(module) or name in sublayers):
                handles.append(module.register_forward_hook(keep(f"{i}:{name}")))
            elif name and attention:
                handles.append(module.register_forward_hook(weights(i)))
    try:
        with torch.inference_mode():
            if real is None:
                model_logits(model, inputs["ids"])
            else:
                model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return _States(
        prefix,
        [f"{prefix}.{i}" for i in range(len(layers))],
        [id(block) for block in layers],
        outputs,
        entropy,
    )


# -- comparison ----------------------------------------------------------------------------


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    diff, norm = (b - a).norm().item(), a.norm().item()
    if diff == 0 or math.isnan(diff):
        return diff
    return diff / norm if norm > 0 else math.inf


def _cos_drift(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean 1 - cos over rows, as ||a/|a| - b/|b|||^2 / 2 so that equal rows give exactly 0."""
    a, b = a.double(), b.double()
    ua = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    ub = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return ((ua - ub).square().sum(-1) / 2).mean().item()


def _pairs(base: _States, now: _States) -> tuple[list[tuple[int, int, bool]], list[str]]:
    """(baseline block, modified block, added) to compare: by position; or, when the
    modification added or removed blocks, the blocks it kept by module identity, and each
    added block against the baseline block it follows (the same point of the computation)."""
    if len(now.ids) == len(base.ids):
        return [(i, i, False) for i in range(len(base.ids))], []
    index = {block: i for i, block in enumerate(base.ids)}
    pairs: list[tuple[int, int, bool]] = []
    last = None
    for j, block in enumerate(now.ids):
        if block in index:
            last = index[block]
            pairs.append((last, j, False))
        elif last is not None:
            pairs.append((last, j, True))
    removed = sorted(set(range(len(base.ids))) - {i for i, _, added in pairs if not added})
    note = (
        f"(the modification changed the number of blocks, {len(base.ids)} -> "
        f"{len(now.ids)}: figures for the blocks it kept"
        + (
            ", and for each added block k' against baseline block k, which it follows"
            if any(added for *_, added in pairs)
            else ""
        )
        + (f"; removed: {', '.join(map(str, removed))}" if removed else "")
        + ")"
    )
    return pairs, [note]


def _compare(base: _States, now: _States, modification: str, tokens: int) -> Diagnosis:
    pairs, notes = _pairs(base, now)
    if any(base.outputs[str(i)][0] != now.outputs[str(j)][0] for i, j, _ in pairs):
        notes.append(
            "(the modification changed the width of the residual stream: per-block "
            "drift needs the same width, so none is shown)"
        )
        pairs = []
    figures = []
    for i, j, added in pairs:
        a, b = base.outputs[str(i)][1], now.outputs[str(j)][1]
        sub = {}
        for key, (width, before) in base.outputs.items():
            block, _, name = key.partition(":")
            after = now.outputs.get(f"{j}:{name}")
            # a sublayer whose width changed (structured pruning) has nothing to compare with
            if block == str(i) and name and after is not None and after[0] == width:
                sub[name] = _rel_l2(before, after[1])
        shift = change = None
        if i in base.entropy and j in now.entropy:
            delta = now.entropy[j].double() - base.entropy[i].double()
            shift, change = delta.abs().mean().item(), delta.mean().item()
        name = f"{now.prefix}.{j} (added)" if added else base.names[i]
        figures.append(
            BlockDrift(i, name, _rel_l2(a, b), _cos_drift(a, b), sub, shift, change, added=added)
        )
    if base.entropy and not now.entropy:
        notes.append("(the modified model exposes no attention weights: no entropy figures)")
    final = figures[-1].drift_l2 if figures else 0.0
    threshold = min(BEGIN_LEVEL, BEGIN_SHARE * final) if math.isfinite(final) else BEGIN_LEVEL
    begins = next((k for k, f in enumerate(figures) if not f.drift_l2 <= threshold), None)
    most = None
    if begins is not None:
        steps = [
            f.drift_l2 - (figures[k - 1].drift_l2 if k else 0.0) for k, f in enumerate(figures)
        ]
        most = max(range(len(steps)), key=lambda k: severity(steps[k]))
    return Diagnosis(modification, figures, tokens, threshold, begins, most, notes=notes)


# -- attribution ---------------------------------------------------------------------------


@dataclass
class _Change:
    """One captured edit of the whole-model application: ``new`` swapped in at ``name``, or
    the parametrizations ``edits`` (in order) on the weight of the baseline's ``module``."""

    name: str
    module: nn.Module
    new: nn.Module | None = None
    edits: tuple[nn.Module, ...] = ()


@dataclass
class _Edits:
    """What the modification changed, per block, outside the blocks, and on the logits."""

    blocks: list[list[_Change]]
    outside: list[_Change]
    processors: list[LogitsProcessor]


def _edits(model: nn.Module, before: dict[str, nn.Module], patch: Patch) -> _Edits:
    """The edits the applied ``patch`` made, read off the model while it is modified.

    The modules that stand where the baseline's stood (swaps) and the weight parametrizations
    are the edits themselves, not a recipe: re-applying them re-uses the thresholds, drawn
    positions and calibration computed for the whole model. Changes of other kinds (attributes,
    hooks) are not captured; ``_attribute`` detects them by replaying everything.
    """
    prefix, layers = blocks(model)
    per_block: list[list[_Change]] = [[] for _ in layers]
    outside: list[_Change] = []
    swapped: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(s + ".") for s in swapped):
            continue  # the root, or inside a module swapped in whole
        original = before.get(name)
        if original is None:
            continue  # parametrization containers, or a module only a swap brought
        if module is not original:
            change = _Change(name, original, new=module)
            swapped.append(name)
        elif parametrize.is_parametrized(module, "weight"):
            change = _Change(name, module, edits=tuple(module.parametrizations.weight))
        else:
            continue
        head, _, rest = name.removeprefix(prefix + ".").partition(".")
        if name.startswith(prefix + ".") and head.isdigit() and int(head) < len(layers):
            per_block[int(head)].append(change)
        else:
            outside.append(change)
    return _Edits(per_block, outside, list(patch.logits_processors))


def _replay(
    harness: Harness, changes: list[_Change], processors: list[LogitsProcessor] = ()
) -> float:
    """kl_mean of the baseline with only ``changes`` re-applied (and ``processors``)."""
    if not changes and not processors:
        return 0.0  # the baseline itself
    with harness.modified([]) as patch:
        for change in changes:
            if change.new is not None:
                patch.swap_module(change.name, change.new)
            for edit in change.edits:  # a captured parametrization transposes by itself
                patch.parametrize(Target(change.name, change.module, False), edit)
        reference, parts, row = harness.reference, [], 0
        for chunk in harness.chunks(processors):
            rows = reference.rows(row, row + len(chunk.targets))
            parts.append(read_logits(chunk.logits, rows, chunk.window, chunk.position))
            row += len(chunk.targets)
        metrics, _ = summarize(score_reads(LogitReads.cat(parts), reference), reference)
    return metrics["kl_mean"]


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REPLAY_TOLERANCE, abs_tol=1e-12) or (
        math.isnan(a) and math.isnan(b)
    )


def _attribute(harness: Harness, edits: _Edits, diagnosis: Diagnosis, total: float) -> None:
    """Fill the telescoping parts and the one-block figures, or say why they do not apply."""
    every = [c for block in edits.blocks for c in block]
    outside = [c.name for c in edits.outside]
    if edits.processors:
        steps = len(edits.processors)
        outside.append("logits processing" + (f" ({steps} steps)" if steps > 1 else ""))
    replayed = _replay(harness, every + edits.outside, edits.processors)
    if not _same(replayed, total):
        diagnosis.notes.append(
            f"(no attribution for {diagnosis.modification}: re-applying the weight and module "
            f"edits it made gives kl_mean {replayed:.4g}, not the measured {total:.4g}; it "
            "changes something else (attributes, hooks), which a per-block re-run cannot "
            "isolate)"
        )
        return
    prefix, done = 0.0, []
    for figure, block in zip(diagnosis.blocks, edits.blocks, strict=True):
        earlier, done = bool(done), done + block
        if not block:  # nothing edited in this block: nothing to re-run
            now, alone = prefix, 0.0
        else:
            last = len(done) == len(every) and not edits.outside and not edits.processors
            now = replayed if last else _replay(harness, done)
            alone = _replay(harness, block) if earlier else now
        figure.kl_added, figure.kl_mean, prefix = now - prefix, alone, now
    diagnosis.kl_outside = replayed - prefix if outside else None
    diagnosis.outside = outside
    diagnosis.attribution = True
    diagnosis.kl_mean = total
    for figure in diagnosis.blocks:
        figure.kl_ratio = figure.kl_mean / total if total else None
        figure.share = figure.kl_added / total if total else None
    top = max(
        range(len(diagnosis.blocks)),
        key=lambda k: severity(diagnosis.blocks[k].kl_added),
        default=None,
    )
    if top is not None and not diagnosis.blocks[top].kl_added <= 0:
        diagnosis.most = top  # else no block adds to kl_mean: the drift's choice stays
    if outside:
        diagnosis.notes.append(
            f"(outside the blocks: {', '.join(outside)}; its part comes last, after every "
            "block's, and the one-block figures leave it out)"
        )
    if replayed != total:
        diagnosis.notes.append(
            f"(the parts sum to the replayed kl_mean {replayed:.6g}; measured {total:.6g})"
        )
