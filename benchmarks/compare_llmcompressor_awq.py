"""AWQ (quant.awq) and SmoothQuant (quant.w8a8 smooth=True) against llm-compressor on the bundled
model: same model, same calibration windows (the harness's 16 windows of 128 tokens,
unshuffled), same settings. The sibling of compare_llmcompressor_obs.py (GPTQ, SparseGPT).

AWQ, W4 group 128 with a zero point (llm-compressor's W4A16_ASYM, AWQ's official setting), its
``duo_scaling=False`` (the paper's activation-only scale ``mean|x|**alpha``; its default also
divides by a weight term). Neither side searches a clipping range (llm-compressor's AWQ has no
clipping search in this version, so there is nothing to switch off). Grids: this project tries
``alpha = i/20`` for i < 20 (the official code's); llm-compressor ``i/(n_grid-1)``, run with
``n_grid=21``: the same 20 values plus alpha = 1. Printed per group of layers reading one input:
the alpha each side chose, the largest relative difference of the two sides' per-channel mean
|x| (llm-compressor calibrates block by block on the outputs of the blocks before as already
smoothed and quantized; this project on the unmodified model), and per layer the share of
identical quantized integers (``round(w s / scale)`` on each side's own grid).

Why the alphas can differ: the objective. llm-compressor minimizes the MSE of the output of the
layers' common parent (the whole attention block for q/k/v, through the softmax; the MLP for
gate/up), this project the summed output error of the group's own layers, ``||X (W - Q)^T||^2``
(exact for o_proj/down_proj, a proxy for q/k/v and gate/up). Where the alphas agree, the
integers must agree up to float rounding of the inputs: that is the tolerance checked here.

SmoothQuant, W8A8 (int8 weights per output row, int8 activations per token), alpha 0.5:
the per-channel smoothing factors compared on q/k/v and gate/up (the layers llm-compressor
smooths: it folds ``1/s`` into the norm before them; this project divides the input of every
target, o_proj and down_proj included). Both share one factor per group of layers reading one
input (``quant.smooth_groups``). The activation range differs on purpose, and the figures show
by how much: llm-compressor's is ``max x - min x`` (this project's ``max|x|``, SmoothQuant's
paper) and its weight range ``2 max|W|`` (this project's ``max|W|``); at alpha 0.5 the factors
2 cancel when the activations are symmetric.

Measured (llm-compressor 0.14.0.1, 2 CPU threads):
  * AWQ: the per-channel mean |x| agrees exactly on every group (gap 0.0000): both calibrate on
    the same inputs. Same alpha in 5 of 16 groups; where they agree, 1.0000 of the integers are
    identical (the tolerance: none). All 4 down_proj groups agree (0.40/0.20/0.15/0.20): there
    the two objectives are the same (the MLP's output is down_proj's). q/k/v and gate/up differ
    by the objective (e.g. 0.20 vs 0.45, 0.25 vs 0.65 for q/k/v), 0.90-0.99 identical integers;
    o_proj is not smoothed by llm-compressor on this model (grouped-query attention: v_proj's
    64 outputs cannot absorb o_proj's 128 scales; "4 mappings were skipped due to incompatible
    shapes"), which this project's parametrization does (0.81-0.93 identical integers to its
    RTN). 0.9721 of all integers identical. First apply times, one thread on both sides:
    ``python -m benchmarks.bench_obs --llmcompressor`` (two threads straggle on a loaded
    machine).
  * SmoothQuant: with each side's own definitions the factors differ by a median 2.8-4.8%
    (the activation range alone: max|x| is 1.06-1.10x half of max - min); 0.40 of the int8
    weights identical (that and the grid, max / 127 here, max / 127.5 there). Fed
    llm-compressor's activation range, ``quant.smooth_scales`` reproduces its factors to
    2.4e-7 and, on its grid, 1.0000 of the int8 weights. (Before factors were shared per
    group, each layer used its own max|W|: v_proj's factors were 38-80% off, 0.28 identical.)

llm-compressor pins transformers <= 5.17, so it runs in its own virtualenv:
    python -m venv /tmp/llmc && /tmp/llmc/bin/pip install torch==2.13.0 llmcompressor
    /tmp/llmc/bin/python -m benchmarks.compare_llmcompressor_awq [--smoothquant-only]
"""

from __future__ import annotations

import time

from benchmarks.compare_llmcompressor_obs import _theirs, setup

GRID = 20  # this project's alphas i / 20, i < 20; llm-compressor's n_grid=21 adds alpha = 1


def _alpha(scale, mean, grid: int) -> float:
    """The grid alpha whose normalized ``mean**alpha`` is closest to ``scale``."""
    best, best_gap = -1.0, float("inf")
    for i in range(grid + 1):
        s = mean.float().pow(i / grid).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        gap = float((s - scale.float()).abs().max() / scale.float().abs().max())
        if gap < best_gap:
            best, best_gap = i / grid, gap
    return best


def _awq_theirs(loaded, windows):
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.pipelines.cache import IntermediatesCache

    chosen = {}  # smooth layer name -> (balance layer names, scales, x_mean)
    real = AWQModifier._compute_best_scale

    def record(self, mapping, fp16_outputs, orig_layer_weights):
        scales = real(self, mapping, fp16_outputs, orig_layer_weights)
        x_sum, count = self._smooth_activation_stats[mapping.smooth_name]
        chosen[mapping.smooth_name] = (tuple(mapping.balance_names), scales, x_sum / count)
        return scales

    AWQModifier._compute_best_scale = record
    # its grid search pins the cached block inputs, which fails without an accelerator
    pin = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, batch_index: None
    try:
        recipe = [
            AWQModifier(duo_scaling=False, n_grid=GRID + 1),
            QuantizationModifier(targets=["Linear"], scheme="W4A16_ASYM", ignore=["lm_head"]),
        ]
        seconds, weights = _theirs(loaded, windows, recipe)
    finally:
        AWQModifier._compute_best_scale = real
        IntermediatesCache.pin_memory = pin
    return seconds, weights, chosen


def _smoothquant_theirs(loaded, windows):
    from llmcompressor.core import active_session
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    chosen = []  # (balance layer names, activation ranges, scales)
    real = SmoothQuantModifier._calculate_smoothing_scales

    def record(self, balance_layers, activation_scales):
        scales = real(self, balance_layers, activation_scales)
        names = {id(m): n for n, m in active_session().state.model.named_modules()}
        chosen.append(
            ([names[id(m)] for m in balance_layers], activation_scales.clone(), scales.clone())
        )
        return scales

    SmoothQuantModifier._calculate_smoothing_scales = record
    try:
        recipe = [
            SmoothQuantModifier(smoothing_strength=0.5),
            QuantizationModifier(targets=["Linear"], scheme="W8A8", ignore=["lm_head"]),
        ]
        seconds, weights = _theirs(loaded, windows, recipe)
    finally:
        SmoothQuantModifier._calculate_smoothing_scales = real
    return seconds, weights, chosen


def _awq(harness, loaded, windows, forward) -> None:
    import torch

    from pytest_hemorrhage.modifications import make
    from pytest_hemorrhage.modifications.calibration import input_stats
    from pytest_hemorrhage.modifications.quant.awq import awq_scales, input_grams
    from pytest_hemorrhage.modifications.quant.rtn import quant_grid

    theirs_s, theirs, chosen = _awq_theirs(loaded, windows)
    config = make("quant.awq", {"bits": 4, "group_size": 128, "symmetric": False, "grid": GRID})
    targets = config.targets(harness.model)
    harness.memo.clear()
    start = time.perf_counter()
    with harness.modified([config]):
        mine_s = time.perf_counter() - start
    scales = awq_scales(harness.model, harness.context, config, targets)
    stats = input_stats(harness.model, harness.context)
    weights = {t.name: t.weight.detach().float() for t in targets}
    print("\nAWQ W4 g128 zero point, no clipping: alpha chosen (mine / theirs), mean|x| gap")
    print(f"{'group':58s} {'alpha':>11s} {'mean|x|':>8s}  identical integers per layer")
    by_members = {members: (s, mean) for members, s, mean in chosen.values()}
    same_alpha = same_int = total = 0
    agreeing = []
    for group in input_grams(harness.model, harness.context, targets):
        names = group.members
        mean = stats[names[0]].abs_mean
        theirs_scale, theirs_mean = by_members.get(tuple(names), (None, None))
        mine_alpha = _alpha(scales[names[0]], mean, GRID)
        if theirs_scale is None:  # llm-compressor has no mapping for this group (GQA's o_proj)
            theirs_scale, theirs_alpha, gap = torch.ones_like(mean), None, float("nan")
        else:
            theirs_alpha = _alpha(theirs_scale, theirs_mean, GRID)
            gap = float(((theirs_mean - mean).abs() / mean.clamp_min(1e-6)).max())
        cells = []
        for name in names:
            w = weights[name]
            g = torch.arange(w.shape[1]) // 128
            mine_int = _centered_rtn(w * scales[name], quant_grid, g)
            tw, tscale, _ = theirs[name]
            theirs_int = (tw.float() / tscale.float()[:, g]).round()
            share = (mine_int == theirs_int).float().mean().item()
            cells.append(f"{name.rsplit('.', 1)[1]} {share:.4f}")
            if theirs_alpha is not None and theirs_alpha == mine_alpha:
                agreeing.append(share)
            same_int += (mine_int == theirs_int).sum().item()
            total += mine_int.numel()
        same_alpha += theirs_alpha == mine_alpha
        label = f"{names[0].rsplit('.', 2)[0]}: {', '.join(n.rsplit('.', 1)[1] for n in names)}"
        theirs_label = "-" if theirs_alpha is None else f"{theirs_alpha:.2f}"
        print(f"{label:58s} {mine_alpha:.2f} / {theirs_label:>4s} {gap:8.4f}  {'  '.join(cells)}")
    groups = len(input_grams(harness.model, harness.context, targets))
    print(
        f"same alpha in {same_alpha}/{groups} groups; identical integers: "
        f"{same_int / total:.4f} of all, min {min(agreeing, default=float('nan')):.4f} per layer "
        "where the alphas agree"
    )
    print(
        f"first apply: this project {mine_s:.2f} s ({mine_s / forward:.1f}x one forward over "
        f"the calibration windows), llm-compressor {theirs_s:.2f} s ({theirs_s / forward:.1f}x)"
    )


def _centered_rtn(w, quant_grid, g_idx):
    """``round(w / scale)`` on ``quant.rtn``'s asymmetric 4-bit grid, group by group."""
    import torch

    out = torch.empty_like(w)
    for group in g_idx.unique().tolist():
        columns = g_idx == group
        scale = quant_grid(w[:, columns], 4, False)[0]
        out[:, columns] = (w[:, columns] / scale[:, None]).round()
    return out


def _smoothquant(harness, loaded, windows) -> None:
    import torch

    from pytest_hemorrhage.modifications.calibration import input_stats
    from pytest_hemorrhage.modifications.quant.w8a8 import int8_per_row, smooth_scales

    _, theirs, chosen = _smoothquant_theirs(loaded, windows)
    stats = input_stats(harness.model, harness.context)
    print(
        "\nSmoothQuant W8A8 alpha 0.5, per layer. s gap: |s_mine / s_theirs - 1|, median / max "
        "over channels, with each side's definitions; act: max|x| / ((max x - min x) / 2), "
        "median; w: max|W_layer| / max|W_group|, median; matched: max s gap when smooth_scales "
        "is fed llm-compressor's definitions (range / 2, the group's weights); identical int8 "
        "weights: each side's s and grid (/127 vs /127.5), and matched s on their grid"
    )
    print(
        f"{'layer':36s} {'s gap':>15s} {'act':>6s} {'w':>6s} {'matched':>8s} {'own':>7s} "
        f"{'matched':>7s}"
    )
    counts = torch.zeros(3)
    for names, ranges, scales in chosen:
        group = [harness.model.get_submodule(n).weight.detach() for n in names]
        group_max = torch.stack([w.abs().amax(0) for w in group]).amax(0)
        matched = smooth_scales(ranges.float() / 2, torch.cat(group), 0.5)
        matched_gap = (matched / scales.float() - 1).abs().max().item()
        for name, w in zip(names, group, strict=True):
            mine = smooth_scales(stats[name].abs_max, torch.cat(group), 0.5)  # quant.w8a8's
            gap = (mine / scales.float() - 1).abs()
            act = (stats[name].abs_max / (ranges.float() / 2)).median().item()
            own = (w.abs().amax(0) / group_max).median().item()
            tw, tscale, _ = theirs[name]
            q_theirs = (tw.float() / tscale.float().reshape(-1, 1)).round()
            q_mine = int8_per_row(w.float() * mine)[0]
            smoothed = w.float() * matched
            q_matched = (smoothed / (smoothed.abs().amax(1, keepdim=True) / 127.5)).round()
            same = torch.tensor(
                [(q_mine == q_theirs).sum(), (q_matched == q_theirs).sum(), q_mine.numel()]
            )
            counts += same
            print(
                f"{name:36s} {gap.median():6.4f} / {gap.max():6.4f} {act:6.3f} {own:6.3f} "
                f"{matched_gap:8.1e} {same[0] / same[2]:7.4f} {same[1] / same[2]:7.4f}"
            )
    print(
        f"identical int8 weight integers on the smoothed layers: {counts[0] / counts[2]:.4f} "
        f"(own definitions and grids), {counts[1] / counts[2]:.4f} (matched)"
    )


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--smoothquant-only", action="store_true", help="skip AWQ (minutes)")
    args = parser.parse_args()

    loaded, harness, windows, forward = setup()
    if not args.smoothquant_only:
        _awq(harness, loaded, windows, forward)
    _smoothquant(harness, loaded, windows)


if __name__ == "__main__":
    main()
