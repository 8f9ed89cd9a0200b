"""quant.w8a8 on torch's int8 GEMM next to the float32 emulation it replaced, in one run.

The emulation (before issue 11) converted the int8 weight to float32 on every call and ran
``F.linear`` over integer-valued floats: exact only while in_features * 127**2 < 2**24. The int8
path runs ``torch._int_mm`` with int32 accumulation (exact at any width). For each layer shape,
on 2048 tokens taken 1024 at a time (``chunk_rows``' floor), side by side:
  time          best of ``--repeat`` forward calls
  peak          tensor bytes allocated during the call and alive at its peak (torch.profiler,
                as in bench_modifications.py), output included, over the float32 weight's bytes
  exact         whether the accumulator equals the int64 dot product on same-sign data (the
                worst case for float32 sums)
Then the bundled model: a forward pass over the evaluation windows with quant.w8a8 applied, each
way (its widths, 128 and 384, are exact both ways: there only time differs).

Run: python benchmarks/bench_w8a8.py [--repeat N] [--threads N]
"""

from __future__ import annotations

import argparse
from typing import Any

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (in, out): Llama-7B's q/o, gate/up, down
TOKENS, ROWS = 2048, 1024


def _emulated(base: type) -> type:
    """W8A8Linear with the forward it had before: float32 F.linear over integer-valued floats."""
    import torch

    from pytest_hemorrhage.modifications.quant.kernels import by_token_chunks
    from pytest_hemorrhage.modifications.quant.w8a8 import int8_per_row

    class Emulated(base):
        emulated = True

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            weight = self.qweight.float()  # this layer's only, for this call only

            def product(h: torch.Tensor) -> torch.Tensor:
                h = h.float()
                if self.smooth is not None:
                    h = h / self.smooth
                q, x_scale = int8_per_row(h)
                out = torch.nn.functional.linear(q, weight).mul_(x_scale)
                out = out.mul_(self.weight_scale)
                return out if self.bias is None else out.add_(self.bias.float())

            return by_token_chunks(product, x, self.rows, x.dtype)

    return Emulated


def _exact(layer: Any, x: Any) -> bool:
    """Whether the accumulator of ``layer``'s path equals the int64 dot product."""
    import torch

    from pytest_hemorrhage.modifications.quant.w8a8 import int8_matmul, int8_per_row

    q, _ = int8_per_row(x.reshape(-1, x.shape[-1]))
    exact = q.long() @ layer.qweight.long().t()
    if getattr(layer, "emulated", False):
        acc = torch.nn.functional.linear(q, layer.qweight.float()).double()
    else:
        acc = int8_matmul(q.to(torch.int8), layer.qweight).double()
    return bool(torch.equal(acc, exact.double()))


def _side_by_side(fns: list[Any], repeat: int) -> list[float]:
    """Best seconds of each of ``fns``, called in turn ``repeat`` times so that load on the
    (shared) machine affects them alike."""
    import time

    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def layers(repeat: int) -> None:
    import torch
    from bench_modifications import Allocations

    from pytest_hemorrhage.modifications.quant.w8a8 import W8A8Linear

    emulated = _emulated(W8A8Linear)
    print(
        f"layer (in -> out), {TOKENS} tokens      {'int8 GEMM':>32}   {'float emulation':>32}"
        f"   {'time':>6}"
    )
    print(
        f"{'':36} {'time':>8} {'peak/w':>7} {'exact':>6}         "
        f"{'time':>8} {'peak/w':>7} {'exact':>6}   {'ratio':>6}"
    )
    for k, n in SHAPES:
        g = torch.Generator().manual_seed(k + n)
        weight = torch.rand(n, k, generator=g) * 0.5 + 0.5
        x = torch.rand(1, TOKENS, k, generator=g)  # same sign: sums past 2**24
        pair = [cls(weight, None, None, rows=ROWS) for cls in (W8A8Linear, emulated)]
        with torch.inference_mode():
            seconds = _side_by_side([lambda m=m, x=x: m(x) for m in pair], repeat)
            row = []
            for layer, t in zip(pair, seconds, strict=True):
                with Allocations(x.device) as alloc:
                    layer(x)
                row.append((t, alloc.peak / (weight.numel() * 4), _exact(layer, x)))
        (ti, pi, ei), (te, pe, ee) = row
        print(
            f"{k:5d} -> {n:5d}{'':23} {ti * 1e3:6.1f}ms {pi:7.3f} {ei!s:>6}         "
            f"{te * 1e3:6.1f}ms {pe:7.3f} {ee!s:>6}   {ti / te:5.2f}x"
        )


def model(repeat: int) -> None:
    import time

    import torch
    from bench_modifications import _forward

    import pytest_hemorrhage.modifications.quant.w8a8 as quant
    from pytest_hemorrhage.harness import Harness
    from pytest_hemorrhage.loading import load_model
    from pytest_hemorrhage.settings import Settings

    h = Harness(load_model("hemorrhage-tiny", device="cpu"), Settings.defaults(tokens=2048))
    int8, emulated = quant.W8A8Linear, _emulated(quant.W8A8Linear)
    labels = {"int8 GEMM": int8, "float emulation": emulated}

    def forward(cls: type | None) -> None:
        if cls is None:
            _forward(h)
            return
        quant.W8A8Linear = cls  # the handler builds whichever class the name holds
        try:
            with h.modified([("quant.w8a8", {})]):
                start = time.perf_counter()
                _forward(h)
                spent[cls] = min(spent.get(cls, float("inf")), time.perf_counter() - start)
        finally:
            quant.W8A8Linear = int8

    spent: dict[type, float] = {}
    with torch.inference_mode():
        forward(int8)  # warm up: calibration statistics are computed once per session
        base, _, _ = _side_by_side(
            [lambda c=c: forward(c) for c in (None, *labels.values())], repeat
        )
    times = {label: spent[cls] for label, cls in labels.items()}  # the forward alone
    kls = {}
    for label, cls in labels.items():
        quant.W8A8Linear = cls
        try:
            kls[label] = h.measure([("quant.w8a8", {})]).metrics["kl_mean"]
        finally:
            quant.W8A8Linear = int8
    print(f"\nbundled model, forward over the windows: baseline {base * 1e3:.1f}ms")
    for label in times:
        print(
            f"  quant.w8a8 on the {label:16s} {times[label] * 1e3:7.1f}ms "
            f"({times[label] / base:.2f}x the baseline), kl_mean {kls[label]:.3e}"
        )
    print(f"  int8 GEMM / emulation time: {times['int8 GEMM'] / times['float emulation']:.2f}x")


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    layers(args.repeat)
    model(args.repeat)


if __name__ == "__main__":
    main()
