"""quant.w8a8 on torch's int8 GEMM next to the float32 emulation it replaced, in one run.

The emulation (before issue 11) converted the int8 weight to float32 on every call and ran
``F.linear`` over integer-valued floats: exact only while in_features * 127**2 < 2**24. The int8
path runs ``torch._int_mm`` with int32 accumulation (exact at any width). For each layer shape,
on 2048 tokens taken 1024 at a time (``chunk_rows``' floor), side by side:
  time          median of ``--repeat`` rounds, the two paths back to back in each
  peak          tensor bytes allocated during the call and alive at its peak
                (``common.Allocations``), output included, over the float32 weight's bytes
  exact         whether the accumulator equals the int64 dot product on same-sign data (the
                worst case for float32 sums)
Then the bundled model: a forward pass over the evaluation windows with quant.w8a8 applied, each
way (its widths, 128 and 384, are exact both ways: there only time differs).

Exits non-zero when the int8 path's accumulator is not exact.

Run: python -m benchmarks.bench_w8a8 [--repeat N] [--threads N]
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from benchmarks.common import Allocations, Rounds, Targets, forward_pass, side_by_side

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (in, out): Llama-7B's q/o, gate/up, down
TOKENS, ROWS = 2048, 1024


@contextmanager
def built_as(cls: type) -> Iterator[None]:
    """Inside: quant.w8a8 builds ``cls`` for its layers (its handler builds whichever class
    the name ``W8A8Linear`` holds); the class is put back on exit."""
    from pytest_hemorrhage.modifications.quant import w8a8

    base = w8a8.W8A8Linear
    w8a8.W8A8Linear = cls
    try:
        yield
    finally:
        w8a8.W8A8Linear = base


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


def layers(repeat: int, targets: Targets) -> None:
    import torch

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
        pair = {
            "int8": W8A8Linear(weight, None, None, rows=ROWS),
            "emulated": emulated(weight, None, None, rows=ROWS),
        }
        with torch.inference_mode():
            timing = side_by_side({key: lambda m=m, x=x: m(x) for key, m in pair.items()}, repeat)
            row = []
            for key, layer in pair.items():
                with Allocations(x.device) as alloc:
                    layer(x)
                row.append((timing.median(key), alloc.peak / (weight.numel() * 4)))
        exact = _exact(pair["int8"], x)
        verdict = targets.check(f"{k} -> {n}: the int8 GEMM's accumulator is exact", exact)
        (ti, pi), (te, pe) = row
        print(
            f"{k:5d} -> {n:5d}{'':23} {ti * 1e3:6.1f}ms {pi:7.3f} {exact!s:>6}         "
            f"{te * 1e3:6.1f}ms {pe:7.3f} {_exact(pair['emulated'], x)!s:>6}   "
            f"{timing.ratio('int8', 'emulated'):5.2f}x  {verdict}"
        )


def model(repeat: int) -> None:
    import time

    import torch

    import pytest_hemorrhage.modifications.quant.w8a8 as w8a8
    from pytest_hemorrhage.harness import Harness
    from pytest_hemorrhage.loading import load_model
    from pytest_hemorrhage.settings import Settings

    h = Harness(load_model("hemorrhage-tiny", device="cpu"), Settings.defaults(tokens=2048))
    int8 = w8a8.W8A8Linear
    labels = {"int8 GEMM": int8, "float emulation": _emulated(int8)}
    inner: dict[str, list[float]] = {label: [] for label in labels}  # the forward alone

    def applied(label: str) -> None:
        with built_as(labels[label]), h.modified([("quant.w8a8", {})]):
            start = time.perf_counter()
            forward_pass(h)
            inner[label].append(time.perf_counter() - start)

    with torch.inference_mode():
        applied("int8 GEMM")  # warm up: calibration statistics are computed once per session
        inner["int8 GEMM"].clear()
        timing = side_by_side(
            {"baseline": lambda: forward_pass(h)}
            | {label: lambda label=label: applied(label) for label in labels},
            repeat,
        )
    forward = Rounds({"baseline": timing.seconds["baseline"], **inner})
    kls = {}
    for label, cls in labels.items():
        with built_as(cls):
            kls[label] = h.measure([("quant.w8a8", {})]).metrics["kl_mean"]
    base = forward.median("baseline")
    print(f"\nbundled model, forward over the windows: baseline {base * 1e3:.1f}ms")
    for label in labels:
        print(
            f"  quant.w8a8 on the {label:16s} {forward.median(label) * 1e3:7.1f}ms "
            f"({forward.ratio(label, 'baseline'):.2f}x the baseline), kl_mean {kls[label]:.3e}"
        )
    ratio = forward.ratio("int8 GEMM", "float emulation")
    print(f"  int8 GEMM / emulation time: {ratio:.2f}x")


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    targets = Targets()
    layers(args.repeat, targets)
    model(args.repeat)
    targets.finish()


if __name__ == "__main__":
    main()
