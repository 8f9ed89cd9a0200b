"""Memory and time of the quantization modifications, side by side in one run (issue 3's targets).

For each modification on the bundled model (or a ~50M-parameter random-init model of the same
architecture with ``--large``):
  * bytes the modification adds while applied (tensors held by swapped-in modules, and any
    tensor a parametrization keeps) / bytes of the original target weights. Target: at most
    the format's own size (bits/32 of a float32 weight, plus its scales) + 0.1; 0 for the
    parametrized round trips (rtn, fp8, dtype), which hold nothing between forward passes.
  * time of measure() / time of measure() of quant.dtype (the cheapest: a parametrized cast),
    so that the kernels' own cost shows: the median over ``--rounds`` rounds of the two side by
    side.
Exits non-zero when a target is missed.

Run: python -m benchmarks.bench_quant [--large] [--rounds N]
"""

from __future__ import annotations

import argparse

from benchmarks.common import Targets, side_by_side
from benchmarks.models import load

SETTINGS = [
    ("quant.dtype", {"dtype": "bfloat16"}, None),
    ("quant.fp8", {"format": "e4m3"}, None),
    ("quant.rtn", {"bits": 4}, None),
    ("quant.bnb_int8", {}, 8),
    ("quant.bnb_4bit", {"quant_type": "nf4"}, 4),
    ("quant.bnb_4bit", {"quant_type": "nf4", "double_quant": True}, 4),
    ("quant.hqq", {"bits": 4}, 4),
    ("quant.hqq", {"bits": 2}, 2),
    ("quant.w8a8", {"smooth": True}, 8),
]


def _tensors(obj, seen: set[int]):
    """Every tensor reachable from a module's parameters, buffers and quantization state."""
    import torch

    if isinstance(obj, torch.Tensor):
        if id(obj) not in seen:
            seen.add(id(obj))
            yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value, seen)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value, seen)
    elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("bitsandbytes", "hqq"):
        yield from _tensors(vars(obj), seen)


def held_bytes(model, names: set[str]) -> int:
    """Bytes of the tensors held by the modules at ``names`` and below (storage counted once)."""
    storages, total = set(), 0
    for name in names:
        module = model.get_submodule(name)
        seen: set[int] = set()
        for sub in module.modules():
            for t in _tensors(dict(vars(sub)), seen):
                key = t.untyped_storage().data_ptr()
                if t.device.type != "meta" and key not in storages:
                    storages.add(key)
                    total += t.untyped_storage().nbytes()
    return total


def run(large: bool, rounds: int) -> None:
    import torch

    from pytest_hemorrhage.harness import Harness
    from pytest_hemorrhage.modifications import make
    from pytest_hemorrhage.settings import Settings

    torch.set_num_threads(2)
    loaded = load("50m" if large else "tiny")
    h = Harness(loaded, Settings.defaults(tokens=2048))
    h.reference  # noqa: B018
    cheapest = ("quant.dtype", {"dtype": "bfloat16"})
    h.measure([cheapest])  # warm up
    original = {
        t.name: t.weight.numel() * t.weight.element_size()
        for t in make("quant.rtn", {}).targets(h.model)
    }
    weight_bytes = sum(original.values())
    targets = Targets()
    print(
        f"model {loaded.spec}: {len(original)} target layers, {weight_bytes / 2**20:.2f} MiB "
        "of target weights"
    )
    print(f"{'modification':60s} {'added/weights':>13s} {'target':>7s} {'time/dtype':>10s}")
    for name, params, bits in SETTINGS:
        with h.modified([(name, params)]):
            now = {n for n, _ in h.model.named_modules()}
            swapped = {
                n
                for n in original
                if n in now
                and type(h.model.get_submodule(n)).__name__ not in ("Linear", "ParametrizedLinear")
            }
            added = held_bytes(h.model, swapped)
        stage = (name, params)
        timing = side_by_side(
            {"dtype": lambda: h.measure([cheapest]), "this": lambda s=stage: h.measure([s])},
            rounds,
        )
        ratio = added / weight_bytes
        target = 0.0 if bits is None else bits / 32 + 0.1
        label = f"{name} {params}"
        verdict = targets.at_most(f"{label}: added/weights", ratio, target + 1e-9)
        print(
            f"{label:60s} {ratio:13.3f} {target:7.3f} {timing.ratio('this', 'dtype'):9.2f}x "
            f"{verdict}"
        )
    targets.finish()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help="a ~50M-parameter random model")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of timing (medians)")
    args = parser.parse_args()
    run(args.large, args.rounds)


if __name__ == "__main__":
    main()
