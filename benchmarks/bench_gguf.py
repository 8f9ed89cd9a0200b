"""quant.gguf's cost, side by side in one run (issue 11's targets).

On the bundled model (every row falls back to a 32-block type there) and on it widened to rows of
256 and 768 by duplication (tests/widened.py, where the K-quants run their scale searches):
  * apply + restore of quant.gguf / one forward pass over the evaluation windows (8192 tokens,
    the default budget). Target: <= 0.5 on the bundled model.
  * bytes held while applied (the packed GGUF blocks; the dequantized weight exists only during
    a forward pass) / the model's bytes. Target: <= 0.25.
  * a forward pass while applied / a plain one: what dequantizing on every use costs (in torch,
    bit for bit gguf's arithmetic; it was gguf's numpy dequantize, ~2x on the bundled model).

Run: python benchmarks/bench_gguf.py
"""

from __future__ import annotations

import statistics
import sys
import time
from collections import Counter
from pathlib import Path

TYPES = ["Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "Q4_1", "Q4_0", "Q3_K_M", "Q2_K"]
TESTS = Path(__file__).resolve().parent.parent / "tests"


def _best(fn, repeat: int = 3) -> float:
    """Fastest of ``repeat`` runs (the machine is shared; the minimum is the least disturbed)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def run(spec: str, widen: bool = False) -> None:
    import torch

    from pytest_hemorrhage.harness import Harness
    from pytest_hemorrhage.loading import LoadedModel, load_model
    from pytest_hemorrhage.modifications import make
    from pytest_hemorrhage.modifications.quant.gguf import Gguf, plan
    from pytest_hemorrhage.settings import Settings

    torch.set_num_threads(1)  # a second thread straggles on a shared machine
    loaded = load_model(spec, device="cpu")
    if widen:  # the K-quants' own scale searches run only where rows are multiples of 256
        sys.path.insert(0, str(TESTS))
        from widened import widened

        spec += " widened to 256/768 (tests/widened.py)"
        loaded = LoadedModel(model=widened(loaded.model), tokenizer=loaded.tokenizer, spec=spec)
    h = Harness(loaded, Settings.defaults(model=loaded.spec))
    model_bytes = sum(p.numel() * p.element_size() for p in h.model.parameters())

    def forward() -> None:
        for _ in h.batches():
            pass

    forward()  # warm up
    base = _best(forward)
    print(
        f"model {spec}: {model_bytes / 2**20:.2f} MiB, {h.windows.eval.numel()} evaluation "
        f"tokens; one forward pass over them {base * 1000:.0f} ms"
    )
    print(
        f"{'type':8s} {'apply+restore/forward':>22s} {'held/model bytes':>17s} "
        f"{'forward applied/plain':>22s}  fallbacks"
    )
    ratios = []
    for qtype in TYPES:
        config = make("quant.gguf", {"type": qtype})
        held = 0

        def apply_restore(config: Gguf = config) -> None:
            nonlocal held
            with h.modified([config]):
                fns = {
                    id(m.parametrizations.weight[0].fn): m.parametrizations.weight[0].fn
                    for m in h.model.modules()
                    if hasattr(m, "parametrizations")
                }
                held = sum(fn.blocks.nbytes for fn in fns.values())

        apply_restore()  # warm up
        ratio = _best(apply_restore) / base
        with h.modified([config]):
            slower = _best(forward) / base  # every use dequantizes the blocks (in torch)
        ratios.append(ratio)
        share = held / model_bytes
        fell = Counter(f"{p.asked}->{p.type}" for p in plan(config, h.model) if p.fell_back)
        fallbacks = ", ".join(f"{k} x{v}" for k, v in fell.items()) or "-"
        over = "" if ratio <= 0.5 and share <= 0.25 else "  OVER"
        print(f"{qtype:8s} {ratio:22.3f} {share:17.3f} {slower:22.2f}  {fallbacks}{over}")
    print(f"median apply+restore/forward {statistics.median(ratios):.3f}")


def main() -> None:
    run("hemorrhage-tiny")
    print()
    run("hemorrhage-tiny", widen=True)


if __name__ == "__main__":
    main()
