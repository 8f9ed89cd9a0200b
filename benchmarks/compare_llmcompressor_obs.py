"""GPTQ and SparseGPT (quant/gptq.py, prune/sparsegpt.py) against llm-compressor on the bundled
model.

Same model, same calibration windows (the harness's 16 windows of 128 tokens, unshuffled, one
window per forward as llm-compressor's default), same settings (damp 0.01, 128-column blocks,
sequential block by block). Prints, per layer:
  * GPTQ W4 group 128, asymmetric, act_order off and on: the share of identical integers
    (centered, ``round(w / scale)``, so the grids' offsets do not matter) and of identical
    scales. llm-compressor computes every group's grid from the weights before GPTQ runs
    and groups by original column under act_order ("weight"/"static"), i.e. this project's
    ``static_groups=True``; the default (grids as the algorithm reaches each group, the reference
    implementation's) is compared too, for what that choice changes.
  * SparseGPT 50% and 2:4: the share of identical mask entries.
and the cost of a first apply next to llm-compressor's ``oneshot``, both relative to one
forward pass over the calibration windows.

llm-compressor pins transformers <= 5.17, so it runs in its own virtualenv:
    python -m venv /tmp/llmc && /tmp/llmc/bin/pip install torch==2.13.0 llmcompressor
    /tmp/llmc/bin/python -m benchmarks.compare_llmcompressor_obs   # from the checkout's root
"""

from __future__ import annotations

import copy
import logging
import time
import warnings

from benchmarks.common import calibration_pass, side_by_side

GPTQ_CASES = [
    ("act_order off", {"act_order": False}, None),
    ("act_order on", {"act_order": True}, "weight"),
]
SPARSE_CASES = [("50%", {"sparsity": 0.5}, "0:0"), ("2:4", {"n": 2, "m": 4}, "2:4")]


def _centered(weight, scale, g_idx):
    """``round(w / scale)`` per weight: the integer relative to the zero point."""
    return (weight.float() / scale.float()[:, g_idx]).round()


def _mine(harness, name, params):
    """(seconds for a first apply + restore, {layer: (weight, scale or None, g_idx or None)})."""
    from pytest_hemorrhage.modifications import make

    harness.memo.clear()  # a first apply: no Hessian or result from earlier configs
    config = make(name, params)
    targets = config.targets(harness.model)
    start = time.perf_counter()
    with harness.modified([config]):
        seconds = time.perf_counter() - start
        out = {}
        for t in targets:
            fn = t.module.parametrizations.weight[0].fn
            state = next(
                c.cell_contents for c in fn.__closure__ if isinstance(c.cell_contents, dict)
            )
            out[t.name] = (
                t.weight.detach().clone(),
                state.get("scale"),
                None if "g_idx" not in state else state["g_idx"].long(),
            )
    return seconds, out


def _theirs(loaded, windows, modifier):
    """(seconds of llm-compressor's oneshot, {layer: (weight, scale, zero_point)})."""
    from datasets import Dataset
    from llmcompressor import oneshot

    model = copy.deepcopy(loaded.model)
    data = Dataset.from_dict(
        {"input_ids": windows.tolist(), "attention_mask": [[1] * windows.shape[1]] * len(windows)}
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oneshot(
            model=model,
            dataset=data,
            recipe=modifier,
            num_calibration_samples=len(windows),
            max_seq_length=windows.shape[1],
            shuffle_calibration_samples=False,
            pipeline="sequential",
        )
    seconds = time.perf_counter() - start
    out = {}
    for name, module in model.named_modules():
        if (
            name.startswith("model.layers.")
            and hasattr(module, "weight")
            and module.weight.dim() == 2
        ):
            out[name] = (
                module.weight.detach().clone(),
                getattr(module, "weight_scale", None),
                getattr(module, "weight_zero_point", None),
            )
    return seconds, out


def _gptq_modifier(actorder):
    from llmcompressor.modifiers.quantization import GPTQModifier

    weights = {
        "num_bits": 4,
        "type": "int",
        "symmetric": False,
        "strategy": "group",
        "group_size": 128,
    }
    return GPTQModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
        ignore=["lm_head"],
        actorder=actorder,
        dampening_frac=0.01,
        block_size=128,
    )


def _sparse_modifier(structure, sparsity):
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

    return SparseGPTModifier(
        sparsity=sparsity,
        mask_structure=structure,
        targets=["re:model.layers.*"],
        dampening_frac=0.01,
        block_size=128,
    )


def setup():
    """Quiet llm-compressor, load the bundled model; (loaded, harness, calibration windows,
    median seconds of one forward pass over them). Shared with compare_llmcompressor_awq.py."""
    import torch

    from pytest_hemorrhage.harness import Harness
    from pytest_hemorrhage.loading import load_model
    from pytest_hemorrhage.settings import Settings

    torch.set_num_threads(2)
    for quiet in ("llmcompressor", "compressed_tensors"):
        logging.getLogger(quiet).setLevel(logging.ERROR)
    try:
        from loguru import logger

        logger.remove()
    except ImportError:
        pass
    loaded = load_model("hemorrhage-tiny", device="cpu")
    harness = Harness(loaded, Settings.defaults(model=loaded.spec, tokens=2048))
    windows = harness.context.calibration_windows()
    calibration_pass(harness, windows)  # warm up
    forward = side_by_side({"forward": lambda: calibration_pass(harness, windows)}, 3)
    forward = forward.median("forward")
    print(
        f"calibration: {len(windows)} windows x {windows.shape[1]} tokens; one forward pass "
        f"over them {forward * 1000:.0f} ms"
    )
    return loaded, harness, windows, forward


def main() -> None:
    import torch

    loaded, harness, windows, forward = setup()
    costs = []
    for label, extra, actorder in GPTQ_CASES:
        theirs_s, theirs = _theirs(loaded, windows, _gptq_modifier(actorder))
        print(f"\nGPTQ W4 g128 asymmetric, {label}: share of identical integers (scales)")
        print(f"{'layer':36s} {'static_groups':>20s} {'default (dynamic)':>20s}")
        rows = {}
        for static in (True, False):
            params = {
                "bits": 4,
                "group_size": 128,
                "symmetric": False,
                "static_groups": static,
                **extra,
            }
            mine_s, mine = _mine(harness, "quant.gptq", params)
            if static:
                costs.append((f"gptq {label}", mine_s, theirs_s))
            for name, (w, scale, g_idx) in mine.items():
                tw, tscale, _ = theirs[name]
                tg = torch.arange(w.shape[1]) // 128
                same = (_centered(w, scale, g_idx) == _centered(tw, tscale, tg)).float().mean()
                same_scale = torch.isclose(scale, tscale.float(), rtol=1e-6, atol=0).float().mean()
                rows.setdefault(name, []).append(f"{same:.4f} ({same_scale:.3f})")
        for name, cells in rows.items():
            print(f"{name:36s} {cells[0]:>20s} {cells[1]:>20s}")
    for label, params, structure in SPARSE_CASES:
        theirs_s, theirs = _theirs(loaded, windows, _sparse_modifier(structure, 0.5))
        mine_s, mine = _mine(harness, "prune.sparsegpt", params)
        costs.append((f"sparsegpt {label}", mine_s, theirs_s))
        print(f"\nSparseGPT {label}: share of identical mask entries, sparsity mine/theirs")
        for name, (w, _, _) in mine.items():
            tw = theirs[name][0]
            same = ((w != 0) == (tw != 0)).float().mean()
            print(
                f"{name:36s} {same:.4f}   {(w == 0).float().mean():.4f} / "
                f"{(tw == 0).float().mean():.4f}"
            )
    print(
        "\nfirst apply (calibration + solve), seconds and / one forward over the calibration "
        "windows"
    )
    print(f"{'':20s} {'this project':>18s} {'llm-compressor':>18s} {'ratio':>7s}")
    for label, mine_s, theirs_s in costs:
        print(
            f"{label:20s} {mine_s:7.2f} s {mine_s / forward:6.1f}x {theirs_s:7.2f} s "
            f"{theirs_s / forward:6.1f}x {mine_s / theirs_s:6.2f}"
        )


if __name__ == "__main__":
    main()
