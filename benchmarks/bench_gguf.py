"""quant.gguf's cost, side by side in one run (issue 11's targets).

On the bundled model (every row falls back to a 32-block type there) and on it widened to rows of
256 and 768 by duplication (``benchmarks.models.widened``, where the K-quants run their scale
searches):
  * apply + restore of quant.gguf / one forward pass over the evaluation windows (8192 tokens,
    the default budget), the median over rounds of the two back to back. Target: <= 0.5 on the
    bundled model.
  * bytes held while applied (the packed GGUF blocks; the dequantized weight exists only during
    a forward pass) / the model's bytes. Target: <= 0.25.
  * a forward pass while applied / a plain one: what dequantizing on every use costs (in torch,
    bit for bit gguf's arithmetic; it was gguf's numpy dequantize, ~2x on the bundled model).
Exits non-zero when a target is missed.

Run: python -m benchmarks.bench_gguf [--rounds N]
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter

from benchmarks.common import Targets, forward_pass, model_bytes, side_by_side
from benchmarks.models import widened

TYPES = ["Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "Q4_1", "Q4_0", "Q3_K_M", "Q2_K"]


def run(spec: str, targets: Targets, rounds: int, widen: bool = False) -> None:
    import torch

    from pytest_hemorrhage.harness import Harness
    from pytest_hemorrhage.loading import LoadedModel, load_model
    from pytest_hemorrhage.modifications import make
    from pytest_hemorrhage.modifications.quant.gguf import Gguf, plan
    from pytest_hemorrhage.settings import Settings

    torch.set_num_threads(1)  # a second thread straggles on a shared machine
    loaded = load_model(spec, device="cpu")
    if widen:  # the K-quants' own scale searches run only where rows are multiples of 256
        spec += " widened to 256/768"
        loaded = LoadedModel(model=widened(loaded.model), tokenizer=loaded.tokenizer, spec=spec)
    h = Harness(loaded, Settings.defaults(model=loaded.spec))
    size = model_bytes(h.model)

    def forward() -> None:
        forward_pass(h)

    forward()  # warm up
    base = side_by_side({"forward": forward}, rounds).median("forward")
    print(
        f"model {spec}: {size / 2**20:.2f} MiB, {h.windows.eval.numel()} evaluation "
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
        timing = side_by_side({"forward": forward, "apply": apply_restore}, rounds)
        ratio = timing.ratio("apply", "forward")
        with h.modified([config]):
            applied = side_by_side({"forward": forward}, rounds)  # every use dequantizes
        slower = applied.median("forward") / timing.median("forward")
        ratios.append(ratio)
        share = held / size
        fell = Counter(f"{p.asked}->{p.type}" for p in plan(config, h.model) if p.fell_back)
        fallbacks = ", ".join(f"{k} x{v}" for k, v in fell.items()) or "-"
        verdicts = [targets.at_most(f"{spec} {qtype}: held/model", share, 0.25)]
        if not widen:  # the target is the bundled model's; widened, the K-quants search scales
            verdicts.append(targets.at_most(f"{spec} {qtype}: apply+restore/forward", ratio, 0.5))
        missed = "" if set(verdicts) == {"ok"} else "  MISSED"
        print(f"{qtype:8s} {ratio:22.3f} {share:17.3f} {slower:22.2f}  {fallbacks}{missed}")
    print(f"median apply+restore/forward {statistics.median(ratios):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of timing (medians)")
    rounds = parser.parse_args().rounds
    targets = Targets()
    run("hemorrhage-tiny", targets, rounds)
    print()
    run("hemorrhage-tiny", targets, rounds, widen=True)
    targets.finish()


if __name__ == "__main__":
    main()
