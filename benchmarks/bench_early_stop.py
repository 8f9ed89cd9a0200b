"""Early stopping (--hemorrhage-early-stop) against the full evaluation, side by side in one run.

On the bundled model (64 windows of 128 tokens by default), for several modifications:

1. Real measures: every modification x budget (one metric of kl_mean, top1_disagreement,
   ppl_increase at 0.25, 0.5, 0.8, 1.25, 2 and 4 times the full evaluation's value; with and
   without confidence=0.95) is measured through Harness.measure with early stopping on, and its
   verdict compared with the full evaluation's. Prints, per case, the share of the tokens used
   and how far the budget lies from the value in the full evaluation's standard errors (r, on
   the scale the test decides on: nll_increase for ppl_increase); then how many verdicts
   differ, against the stated rate (1 - confidence, per metric), and the tokens used on clear
   verdicts (metric <= 0.5x or >= 2x its budget; target <= 25%) with the worst clear case.
   A quarter of the windows has twice the full set's standard error, so a budget r standard
   errors away is r / 2 of them away there: below r = 2 x 1.645 no test at the stated rate
   can settle it at 25% of the tokens more often than not, whatever its looks.
2. Permutations: the same sequential test (EarlyStop.run, the code the harness runs) over many
   seeded window orders of each modification's per-window statistics, for all three metrics
   and budgets from 0.25x to 4x the value, closer ones (0.7x .. 1.5x) included, where wrong
   early verdicts can happen: per budget factor, the rate of verdicts that differ from the full
   evaluation's with its binomial standard error, the tokens used, and the share of orders
   that stopped by a quarter of the tokens; then all factors together against the stated rate.
3. Skewed windows: synthetic evaluations of 64 windows x 32 tokens whose window means are
   gamma-distributed (shape 8 and 1: skewness 0.7 and 2; the bundled model's are 0.3-1.0) with
   exponential tokens around them, the budget at the population mean, so every settled verdict
   is wrong: the rate on each side against the stated 5%, where the bounds' second-order
   correction for skewness runs short.

Targets (the exit status is non-zero when one is missed): the share of differing verdicts in
parts 1 and 2 at most the stated 0.05; of the clear cases that a quarter of the windows can
settle more often than not (r >= 2 x 1.645), more than half settled within 25% of the tokens;
at skewness 0.7, each side's wrong rate at most 0.05 (skewness 2 is shown, not judged: there
the correction runs short). At fewer than 64 windows the first look comes later than a quarter
(no fewer than 8 windows), so the 25% target cannot be met there.

Run: python -m benchmarks.bench_early_stop [--seeds 20] [--tokens 8192] [--runs 3000]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

from benchmarks.common import Targets

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
PERMUTED = (0.25, 0.5, 0.7, 0.8, 0.9, 0.95, 1.05, 1.1, 1.25, 1.5, 2.0, 4.0)
Z95 = 1.6448536269514722
QUARTER = 0.25  # the target share of tokens for a clear verdict


def _over(budget, result) -> bool:
    return bool(budget.violations(result))


def _clear(factor: float) -> bool:
    return factor <= 0.5 or factor >= 2


def _distance(metric: str, metrics: dict, stderr: dict, limit: float) -> float:
    """How many of the full evaluation's standard errors lie between the value and the budget,
    on the scale the sequential test decides on."""
    if metric == "ppl_increase":
        return abs(metrics["nll_increase"] - math.log1p(limit)) / stderr["nll_increase"]
    return abs(metrics[metric] - limit) / stderr[metric]


def _rate(k: int, n: int) -> str:
    """k / n with its binomial standard error and the Wilson 95% upper bound."""
    p = k / n
    z = Z95
    upper = (p + z * z / (2 * n) + z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (
        1 + z * z / n
    )
    return f"{k}/{n} = {p:.4f} +- {math.sqrt(p * (1 - p) / n):.4f} (95% upper bound {upper:.4f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20, help="window orders per case (part 2)")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--runs", type=int, default=3000, help="synthetic evaluations (part 3)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(2)  # a benchmark process of its own: the 2-core CI machine
    from pytest_hemorrhage.budget import Budget
    from pytest_hemorrhage.early_stop import METHOD, EarlyStop
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
    print(f"method: {METHOD}")
    targets = Targets()

    # 1. real measures
    t0 = time.perf_counter()
    rows, window_stats = [], {}
    print(
        f"1. real measures, {windows} windows: tokens used per case (r: the budget's distance "
        "from the value in full-evaluation standard errors; * the verdict differs)"
    )
    print(f"   {'modification':<30} {'metric':<18} " + " ".join(f"{f:>13}x" for f in FACTORS))
    for name, params in MODIFICATIONS:
        base = full.measure([(name, params)])
        with full.modified([(name, params)]) as patch:  # per-window stats for part 2
            parts = [
                token_stats(logits, reference.rows(i * per_window, (i + len(logits)) * per_window))
                for i, (logits, *_) in zip(
                    range(0, windows, full.batch_size),
                    full.chunks(patch.logits_processors),
                    strict=True,
                )
            ]
        window_stats[(name, str(params))] = (TokenStats.cat(parts), base)
        for metric in METRICS:
            cells = []
            for i, factor in enumerate(FACTORS):
                confidence = (None, 0.95)[(i + len(rows)) % 2]
                limit = base.metrics[metric] * factor
                budget = Budget({metric: limit}, confidence)
                result = early.measure([(name, params)], budget=budget)
                used = result.tokens / base.tokens
                r = _distance(metric, base.metrics, base.stderr, limit)
                differ = _over(budget, base) != _over(budget, result)
                rows.append((name, params, metric, factor, differ, used, r))
                cells.append(f"{used:5.3f}{'*' if differ else ' '}(r{r:5.1f})")
            label = f"{name} {','.join(f'{k}={v}' for k, v in params.items())}"
            print(f"   {label:<30} {metric:<18} " + " ".join(cells), flush=True)
    real_s = time.perf_counter() - t0
    differ = sum(r[4] for r in rows)
    clear = [r for r in rows if _clear(r[3])]
    close = [r for r in rows if not _clear(r[3])]
    print(
        f"   {len(rows)} early-stopped measures ({len(MODIFICATIONS)} modifications x "
        f"{len(METRICS)} metrics x {len(FACTORS)} budgets, confidence alternately none and "
        f"0.95), {real_s:.0f} s"
    )
    verdict = targets.at_most("1. real measures: verdicts that differ", differ / len(rows), 0.05)
    print(
        f"   verdicts that differ from the full evaluation: {_rate(differ, len(rows))} "
        f"(stated rate: <= 0.05 per metric: {verdict})"
    )
    for label, group in (("clear (<=0.5x or >=2x)", clear), ("close (0.8x, 1.25x)", close)):
        used = [r[5] for r in group]
        within = sum(u <= QUARTER for u in used)
        print(
            f"   {label}: {len(group)} measures, {within} within {QUARTER:.0%} of the tokens, "
            f"tokens used mean {sum(used) / len(used):.3f} max {max(used):.3f}"
        )
    worst = max(clear, key=lambda r: (r[5], -r[6]))
    print(
        f"   worst clear case: {worst[0]} {worst[1]} {worst[2]} budget {worst[3]}x the value: "
        f"{worst[5]:.3f} of the tokens, r = {worst[6]:.1f}"
    )
    resolvable = [r for r in clear if r[6] >= 2 * Z95]
    settled = sum(r[5] <= QUARTER for r in resolvable)
    verdict = targets.check(
        f"1. settleable clear cases within {QUARTER:.0%} of the tokens",
        settled > len(resolvable) / 2,
        f"{settled} of {len(resolvable)}",
    )
    print(
        f"   clear cases with r >= {2 * Z95:.2f} (settleable at a quarter of the windows more "
        f"often than not): {len(resolvable)}, of which within {QUARTER:.0%} of the tokens: "
        f"{settled} (target: more than half: {verdict})"
    )
    beyond = sorted((r for r in clear if r[5] > QUARTER), key=lambda r: r[6])
    if beyond:
        shown = ", ".join(f"{r[0]} {r[1]} {r[2]} {r[3]}x r={r[6]:.1f}" for r in beyond)
        print(f"   clear cases over {QUARTER:.0%} of the tokens: {shown}")
        print(
            f"   the smallest r settled within {QUARTER:.0%}: "
            f"{min((r[6] for r in clear if r[5] <= QUARTER), default=math.nan):.1f}, the "
            f"largest r not: {max(r[6] for r in beyond):.1f}"
        )

    # 2. many window orders
    t0 = time.perf_counter()
    print(
        f"2. permutations: {args.seeds} seeded window orders per case ({len(window_stats)} "
        f"modifications x {len(METRICS)} metrics x 2 confidences), budgets at {PERMUTED} x "
        "the full value"
    )
    print(
        f"   {'factor':>6}  {'cases':>6}  {'differ':>6}  {'rate':>6}  {'+-SE':>6}  "
        f"{'tokens used':>11}  {'<= 25%':>6}"
    )
    total = wrong = 0
    for factor in PERMUTED:
        cases = differs = quick = 0
        used = []
        for stats, base in window_stats.values():
            for metric in METRICS:
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
                        quick += used[-1] <= QUARTER
        total, wrong = total + cases, wrong + differs
        p = differs / cases
        print(
            f"   {factor:>6}  {cases:>6}  {differs:>6}  {p:>6.4f}  "
            f"{math.sqrt(p * (1 - p) / cases):>6.4f}  {sum(used) / len(used):>11.3f}  "
            f"{quick / cases:>6.3f}",
            flush=True,
        )
    verdict = targets.at_most("2. permutations: verdicts that differ", wrong / total, 0.05)
    print(
        f"   all: {_rate(wrong, total)} differ (stated rate: <= 0.05 per metric: {verdict}), "
        f"{time.perf_counter() - t0:.0f} s"
    )

    # 3. skewed synthetic windows, the budget at the mean
    t0 = time.perf_counter()
    print(f"3. synthetic skewed windows, budget at the mean, {args.runs} evaluations each")
    for shape in (8.0, 1.0):
        wrong_sides = skewed(shape, args.runs)
        shown = ", ".join(f"{side} {_rate(k, args.runs)}" for side, k in wrong_sides.items())
        skewness = 2 / math.sqrt(shape)
        if shape == 8.0:  # judged; at skewness 2 the correction is known to run short
            for side, k in wrong_sides.items():
                what = f"3. skewness {skewness:.1f}: settled {side} wrongly"
                shown += f" ({side}: {targets.at_most(what, k / args.runs, 0.05)})"
        print(f"   skewness {skewness:.1f}: settled wrong {shown}", flush=True)
    print(f"   stated rate: <= 0.05 per side, {time.perf_counter() - t0:.0f} s")
    targets.finish()


def skewed(
    shape: float, runs: int, seed: int = 1, windows: int = 64, per_window: int = 32
) -> dict[str, int]:
    """How often early stopping settles "over" and "under" a budget at the population mean of
    window means drawn from a gamma of ``shape`` (mean 1), exponential tokens around them
    (``runs`` evaluations; tests/test_early_stop.py runs a few)."""
    import torch

    from pytest_hemorrhage.budget import Budget
    from pytest_hemorrhage.early_stop import EarlyStop
    from pytest_hemorrhage.metrics import TokenStats
    from pytest_hemorrhage.reference import Reference

    g = torch.Generator().manual_seed(seed)
    n = windows * per_window
    zeros = torch.zeros(n, dtype=torch.long)
    reference = Reference(targets=zeros, target_logp=torch.zeros(n), top1=zeros)
    budget = Budget({"kl_mean": 1.0})
    wrong = {"over": 0, "under": 0}
    for run in range(runs):
        means = torch._standard_gamma(torch.full((windows,), shape), generator=g) / shape
        kl = (means[:, None] * -torch.rand(windows, per_window, generator=g).log()).flatten()

        def score(chosen, kl=kl):
            token = (chosen[:, None] * per_window + torch.arange(per_window)).flatten()
            m = len(token)
            window = torch.arange(len(chosen)).repeat_interleave(per_window)
            ones = torch.ones(m, dtype=torch.bool)
            return [TokenStats(kl[token], torch.zeros(m), ~ones, torch.ones(m), ones, window)]

        stop = EarlyStop(budget, windows, per_window, seed=run)
        stop.run(score, reference)
        if stop.stopped_at:
            wrong[stop.verdicts["kl_mean"]] += 1
    return wrong


if __name__ == "__main__":
    main()
