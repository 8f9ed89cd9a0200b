"""Early stopping (--hemorrhage-early-stop) against the full evaluation, side by side in one run.

On the bundled model (64 windows of 128 tokens by default), for several modifications:

1. Real measures: every modification x budget (one metric of kl_mean, top1_disagreement,
   ppl_increase at 0.25, 0.5, 0.8, 1.25, 2 and 4 times the full evaluation's value; with and
   without confidence=0.95) is measured through Harness.measure with early stopping on, and its
   verdict compared with the full evaluation's. Prints how many verdicts differ, against the
   stated rate (1 - confidence, per metric), and the share of tokens used on clear verdicts
   (metric <= 0.5x or >= 2x its budget; target <= 25%) and on close ones.
2. Permutations: the same sequential test (EarlyStop.run, the code the harness runs) over many
   seeded window orders of each modification's per-window statistics, at budgets closer to
   the value (0.7x .. 1.5x), where wrong early verdicts can happen: the measured rate of
   verdicts that differ from the full evaluation's, per budget factor, against the stated rate.

Run: python benchmarks/bench_early_stop.py [--seeds 20] [--tokens 8192]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

MODIFICATIONS = [
    ("quant.rtn", {"bits": 3}),
    ("quant.rtn", {"bits": 4}),
    ("quant.rtn", {"bits": 6}),
    ("prune.magnitude", {"sparsity": 0.3}),
    ("prune.magnitude", {"sparsity": 0.5}),
    ("prune.wanda", {"sparsity": 0.5}),
    ("noise.gaussian", {"sigma": 0.05}),
]
METRICS = ("kl_mean", "top1_disagreement", "ppl_increase")
FACTORS = (0.25, 0.5, 0.8, 1.25, 2.0, 4.0)  # budget / full value
CLOSE_FACTORS = (0.7, 0.8, 0.9, 0.95, 1.05, 1.1, 1.25, 1.5)


def _over(budget, result) -> bool:
    return bool(budget.violations(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20, help="window orders per case (part 2)")
    parser.add_argument("--tokens", type=int, default=8192)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(2)  # a benchmark process of its own: the 2-core CI machine
    from pytest_hemorrhage.budget import Budget
    from pytest_hemorrhage.early_stop import EarlyStop
    from pytest_hemorrhage.harness import Harness
    from pytest_hemorrhage.loading import load_model
    from pytest_hemorrhage.metrics import Result, TokenStats, summarize, token_stats
    from pytest_hemorrhage.settings import Settings

    loaded = load_model("hemorrhage-tiny", device="cpu")
    cache = Path(tempfile.mkdtemp(prefix="bench-early-stop-"))
    common = {"model": "hemorrhage-tiny", "tokens": args.tokens, "cache_dir": cache}
    full = Harness(loaded, Settings.defaults(**common))
    early = Harness(loaded, Settings.defaults(**common, early_stop=True))
    reference = full.reference
    per_window = full.windows.eval.shape[1] - 1
    windows = len(full.windows.eval)

    # 1. real measures
    t0 = time.perf_counter()
    rows, window_stats = [], {}
    for name, params in MODIFICATIONS:
        base = full.measure([(name, params)])
        with full.modified([(name, params)]) as patch:  # per-window stats for part 2
            parts = [
                token_stats(logits, reference.rows(i * per_window, (i + len(logits)) * per_window))
                for i, (logits, _) in zip(
                    range(0, windows, full.batch_size),
                    full.batches(patch.logits_processors),
                    strict=True,
                )
            ]
        window_stats[(name, str(params))] = (TokenStats.cat(parts), base)
        for metric in METRICS:
            for i, factor in enumerate(FACTORS):
                confidence = (None, 0.95)[(i + len(rows)) % 2]
                budget = Budget({metric: base.metrics[metric] * factor}, confidence)
                result = early.measure([(name, params)], budget=budget)
                rows.append(
                    (
                        factor,
                        _over(budget, base),
                        _over(budget, result),
                        result.tokens / base.tokens,
                        result.details["early_stop"]["stopped"],
                    )
                )
        print(f"   {name} {params}: done", flush=True)
    real_s = time.perf_counter() - t0
    differ = sum(a != b for _, a, b, _, _ in rows)
    clear = [r for r in rows if r[0] <= 0.5 or r[0] >= 2]
    close = [r for r in rows if 0.5 < r[0] < 2]
    print(
        f"1. real measures: {len(rows)} early-stopped measures ({len(MODIFICATIONS)} "
        f"modifications x {len(METRICS)} metrics x {len(FACTORS)} budgets, confidence "
        "alternately none and 0.95), "
        f"{windows} windows, {real_s:.0f} s"
    )
    print(
        f"   verdicts that differ from the full evaluation: {differ}/{len(rows)} "
        f"= {differ / len(rows):.3f} (stated rate: <= 0.05 per metric)"
    )
    for label, group in (("clear (<=0.5x or >=2x)", clear), ("close (0.8x, 1.25x)", close)):
        used = torch.tensor([r[3] for r in group])
        print(
            f"   {label}: {len(group)} measures, stopped early {sum(r[4] for r in group)}, "
            f"tokens used mean {used.mean():.3f} max {used.max():.3f} of the full evaluation "
            "(target for clear: <= 0.25)"
        )

    # 2. many window orders at budgets near the value
    t0 = time.perf_counter()
    print(
        f"2. permutations: {args.seeds} seeded window orders per case, budgets at "
        f"{CLOSE_FACTORS} x the full value"
    )
    print(f"   {'factor':>6}  {'cases':>6}  {'differ':>6}  {'rate':>6}  {'tokens used':>11}")
    total = wrong = 0
    for factor in CLOSE_FACTORS:
        cases = differs = 0
        used = []
        for stats, base in window_stats.values():
            for metric in ("kl_mean", "top1_disagreement"):
                for confidence in (None, 0.95):
                    budget = Budget({metric: base.metrics[metric] * factor}, confidence)
                    for seed in range(args.seeds):
                        stop = EarlyStop(budget, windows, per_window, seed)

                        def score(chosen, stats=stats):
                            token = chosen[:, None] * per_window + torch.arange(per_window)
                            token = token.reshape(-1)
                            return [
                                TokenStats(
                                    *(
                                        getattr(stats, f)[token]
                                        for f in ("kl", "nll", "disagree", "p_target", "finite")
                                    ),
                                    window=torch.arange(len(chosen)).repeat_interleave(per_window),
                                )
                            ]

                        got, ref = stop.run(score, reference)
                        metrics, stderr = summarize(got, ref)
                        result = Result("x", {}, metrics, stderr, ref.ppl, 0.0, got.nll.numel())
                        cases += 1
                        differs += _over(budget, result) != _over(budget, base)
                        used.append(got.nll.numel() / base.tokens)
        total, wrong = total + cases, wrong + differs
        print(
            f"   {factor:>6}  {cases:>6}  {differs:>6}  {differs / cases:>6.3f}  "
            f"{sum(used) / len(used):>11.3f}",
            flush=True,
        )
    print(
        f"   all: {wrong}/{total} = {wrong / total:.4f} differ (stated rate: <= 0.05), "
        f"{time.perf_counter() - t0:.0f} s"
    )


if __name__ == "__main__":
    main()
