"""quant.w8a8 audited against torch's own int8 paths, as quant.gguf was against llama.cpp.

quant.w8a8 runs its linear layers on ``torch._int_mm`` (int8 x int8, exact int32 sums, then
float32 rescaling by the token's and the row's scale). Each row below builds the layers from
the same weights and the same SmoothQuant factors (quant.w8a8's handler and calibration; only
the layer class differs) and runs them another way:
  float simulation   quant.w8a8's integers multiplied as float32 ``F.linear`` (its path before
                     issue 11): exact while in_features * 127**2 < 2**24, i.e. up to 1040
  torchao            torchao's Int8DynamicActivationInt8Weight on ``W diag(s)`` with its own
                     integers, inputs ``X diag(1/s)``: the path quant.torchao's
                     ``int8_dynamic_activation_int8_weight`` runs (without smoothing)
  torchao, w8a8 ints torchao's kernel on quant.w8a8's int8 weights and scales: only the
                     activations are torchao's
  fbgemm dynamic     ``torch.ao.nn.quantized.dynamic.Linear`` (per-channel qint8 weights,
                     torchao's rule): one asymmetric uint8 scale per input tensor, 7-bit
                     (``reduce_range``), another scheme, shown for scale and not held to
                     the target
and, for smooth=False, quant.torchao itself from the catalogue. Per row: kl_mean against the
baseline, its difference from quant.w8a8's, the time to build the layers, run a forward pass
over the evaluation windows and restore (median of ``--repeat`` rounds, back to back), and how
many of the integers fed to torchao's kernel differ from quant.w8a8's (weights; activations over
the evaluation windows), and how many still differ when quant.w8a8's quantizer takes torchao's
rule (scale max / 127.5, integers in [-128, 127]): what its multiplying by 1 / scale leaves.

Target: every torch int8 path with per-token activations within 5% of quant.w8a8's kl_mean
(the GGUF audit's bar), and the float simulation equal to it where its sums are exact.

Run: python -m benchmarks.bench_w8a8_kernel [--repeat N] [--threads N]
"""

from __future__ import annotations

import argparse
import warnings
from typing import Any

from benchmarks.bench_w8a8 import _emulated, built_as
from benchmarks.common import Rounds, Targets, forward_pass, side_by_side
from benchmarks.models import widened

TOLERANCE = 0.05  # relative kl_mean difference, as for quant.gguf against llama.cpp


class Tally:
    """Integers fed to a kernel that differ from quant.w8a8's (counts and the largest gap), and
    those that still differ when quant.w8a8's quantizer takes torchao's rule (``by_its_rule``)."""

    def __init__(self) -> None:
        self.total = self.differ = self.gap = self.beyond_rule = 0

    def add(self, ours: Any, theirs: Any, by_its_rule: Any) -> None:
        diff = (ours.long() - theirs.long()).abs()
        self.total += diff.numel()
        self.differ += int((diff > 0).sum())
        self.gap = max(self.gap, int(diff.max()))
        self.beyond_rule += int((by_its_rule.long() != theirs.long()).sum())

    def __str__(self) -> str:
        if not self.total:
            return "-"
        return (
            f"{self.differ / self.total:6.2%} (max {self.gap}), {self.beyond_rule / self.total:.3%}"
        )


def by_torchao_rule(x: Any) -> Any:
    """quant.w8a8's per-row quantizer with torchao's symmetric int8 rule: scale
    ``max|row| / 127.5`` (half of 127 - (-128)) and integers clamped to [-128, 127]."""
    scale = x.abs().amax(-1, keepdim=True) / 127.5
    return (x / scale).round().clamp(-128, 127)


def kernel_path() -> str:
    """Which int8 kernel torchao's CPU path takes here, and whether its int32 sums are exact
    (on same-sign operands, where float32 sums would not be)."""
    import torch
    from torchao.kernel import int_scaled_matmul
    from torchao.kernel.intmm import _cpu_is_amx_tile_supported, _cpu_is_vnni_supported

    u8s8 = not _cpu_is_amx_tile_supported() and _cpu_is_vnni_supported()
    a = torch.full((32, 4096), 127, dtype=torch.int8)
    b = torch.full((4096, 16), 127, dtype=torch.int8)
    exact = int_scaled_matmul(a, b, torch.ones(32, 1, dtype=torch.float64))
    exact = bool(torch.equal(exact, (a.long() @ b.long()).double()))
    path = "u8s8 (uint8 activations + 128, minus a column-sum correction)" if u8s8 else "s8s8"
    return f"torchao's CPU int8 kernel here: torch._int_mm, {path}; int32 sums exact: {exact}"


def _kernels(base: type) -> dict[str, type]:
    """W8A8Linear subclasses that keep its construction (integers, scales, smoothing factors)
    and run the product another way."""
    import torch
    from torch import nn
    from torchao.quantization.granularity import PerRow
    from torchao.quantization.quantize_.common import _choose_quant_func_and_quantize_tensor
    from torchao.quantization.quantize_.workflows.int8.int8_tensor import (
        Int8Tensor,
        QuantizeTensorToInt8Kwargs,
    )

    from pytest_hemorrhage.modifications.quant.kernels import by_token_chunks
    from pytest_hemorrhage.modifications.quant.w8a8 import int8_per_row

    act = QuantizeTensorToInt8Kwargs(granularity=PerRow())

    class Torchao(base):
        own_weights = True
        counting = False  # tally the integers (during the measure, not the timing)
        weights, activations = Tally(), Tally()  # over every layer built while counting

        def __init__(self, weight: Any, bias: Any, smooth: Any = None, rows: int = 4096):
            super().__init__(weight, bias, smooth, rows)
            w = weight.detach().float() * (1 if smooth is None else smooth)
            if self.own_weights:
                self.ao = Int8Tensor.from_hp(w, PerRow(), act_quant_kwargs=act)
                if Torchao.counting:
                    Torchao.weights.add(self.qweight, self.ao.qdata, by_torchao_rule(w))
            else:
                scale = self.weight_scale.reshape(-1, 1)
                self.ao = Int8Tensor(
                    self.qweight, scale, [1, w.shape[1]], torch.float32, act_quant_kwargs=act
                )

        def forward(self, x: Any) -> Any:
            def product(h: Any) -> Any:
                h = h.reshape(-1, h.shape[-1]).float()
                if self.smooth is not None:
                    h = h / self.smooth
                if Torchao.counting:
                    theirs = _choose_quant_func_and_quantize_tensor(h, act).qdata
                    Torchao.activations.add(int8_per_row(h)[0], theirs, by_torchao_rule(h))
                bias = None if self.bias is None else self.bias.float()
                return nn.functional.linear(h, self.ao, bias)

            return by_token_chunks(product, x, self.rows, x.dtype).reshape(*x.shape[:-1], -1)

    class TorchaoW8a8Ints(Torchao):
        own_weights = False

    class Fbgemm(base):
        def __init__(self, weight: Any, bias: Any, smooth: Any = None, rows: int = 4096):
            super().__init__(weight, bias, smooth, rows)
            w = weight.detach().float() * (1 if smooth is None else smooth)
            linear = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
            with torch.no_grad():
                linear.weight.copy_(w)
                if bias is not None:
                    linear.bias.copy_(bias.float())
            linear.qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
            with warnings.catch_warnings():  # torch's note that quantized dtypes are deprecated
                warnings.simplefilter("ignore", UserWarning)
                self.fbgemm = torch.ao.nn.quantized.dynamic.Linear.from_float(linear)

        def forward(self, x: Any) -> Any:
            h = x.float() if self.smooth is None else x.float() / self.smooth
            return self.fbgemm(h).to(x.dtype)

    return {
        "quant.w8a8 (int32)": base,
        "float simulation": _emulated(base),
        "torchao": Torchao,
        "torchao, w8a8 ints": TorchaoW8a8Ints,
        "fbgemm dynamic": Fbgemm,
    }


def run(widen: bool, repeat: int, targets: Targets) -> None:
    import torch

    import pytest_hemorrhage.modifications.quant.w8a8 as w8a8
    from pytest_hemorrhage.harness import Harness
    from pytest_hemorrhage.loading import LoadedModel, load_model
    from pytest_hemorrhage.settings import Settings

    loaded = load_model("hemorrhage-tiny", device="cpu")
    if widen:
        spec = loaded.spec + " widened to 256/768"
        loaded = LoadedModel(model=widened(loaded.model), tokenizer=loaded.tokenizer, spec=spec)
    h = Harness(loaded, Settings.defaults(model=loaded.spec))
    base = w8a8.W8A8Linear
    kernels = _kernels(base)
    torchao = kernels["torchao"]

    print(f"\n{loaded.spec}: {h.windows.eval.numel()} evaluation tokens")
    print(
        f"{'smooth':6} {'kernel':20} {'kl_mean':>10} {'vs w8a8':>8} {'time':>9} "
        f"{'weight ints differ, beyond rule':>32} {'activation ints differ, beyond':>32}"
    )
    for smooth in (False, True):
        mods = [("quant.w8a8", {"smooth": smooth})]
        torchao.weights, torchao.activations = Tally(), Tally()
        kls: dict[str, float] = {}
        for label, cls in kernels.items():
            torchao.counting = label == "torchao"
            with built_as(cls):
                kls[label] = h.measure(mods).metrics["kl_mean"]
        torchao.counting = False
        tallies = (str(torchao.weights), str(torchao.activations))
        if not smooth:
            config = ("quant.torchao", {"config": "int8_dynamic_activation_int8_weight"})
            kls["quant.torchao"] = h.measure([config]).metrics["kl_mean"]

        def forward(cls: type, mods: list = mods) -> None:
            with built_as(cls), h.modified(mods):
                forward_pass(h)

        with torch.inference_mode():
            timing: Rounds = side_by_side(
                {label: lambda cls=cls: forward(cls) for label, cls in kernels.items()}, repeat
            )
        ours = kls["quant.w8a8 (int32)"]
        for label, kl in kls.items():
            rel = kl / ours - 1
            ms = f"{timing.median(label) * 1e3:7.0f}ms" if label in timing.seconds else "-"
            ints = ("-", "-")
            if label == "torchao":
                ints = tallies
            elif label == "torchao, w8a8 ints":
                ints = ("0", "as torchao")
            verdict = ""
            what = f"{loaded.spec}, smooth={smooth}, {label}"
            if label == "float simulation":
                verdict = targets.check(f"{what}: equals quant.w8a8", kl == ours, f"{kl} != {ours}")
            elif label not in ("quant.w8a8 (int32)", "fbgemm dynamic"):
                verdict = targets.at_most(f"{what}: |kl_mean / w8a8's - 1|", abs(rel), TOLERANCE)
            print(
                f"{smooth!s:6} {label:20} {kl:10.3e} {rel:+8.2%} {ms:>9} {ints[0]:>32} "
                f"{ints[1]:>32}  {verdict}"
            )


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # a second thread straggles on a shared machine
    targets = Targets()
    print(kernel_path())
    for widen in (False, True):
        run(widen, args.repeat, targets)
    targets.finish()


if __name__ == "__main__":
    main()
