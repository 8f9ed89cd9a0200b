"""Do one-sided 95% upper bounds hold their level? Coverage by simulation (issue 12, item 0).

The bundled model is scored once per modification on a long evaluation set: every window of
128 tokens of the bundled corpus's train split (~2,200 windows, ~280k tokens). That set is then
split at random into disjoint evaluation sets of the default size (64 windows, 8,192 tokens),
many times over; each set's ``value + 1.645 * stderr`` is compared with the value on the
whole long set. Coverage is the share of sets whose bound reaches it: >= 95% is the target.

Printed per modification and metric, side by side:
  * ``token``: the standard errors that treat tokens as independent (what the plugin used
    before; for ``kl_p99`` the binomial order-statistic interval, for ``kl_max`` the
    closed-form bootstrap of the maximum);
  * ``window``: the plugin's standard errors now (``metrics.summarize``: windows as the
    sampling unit; ``kl_max`` has none and a budget refuses ``confidence`` on it);
  * ``se ratio``: mean window-level / token-level standard error.

Per-token statistics are cached (``--cache``) so that re-runs only resample.

Run: python benchmarks/bench_coverage.py [--sets-per-split 34] [--splits 30] [--windows 64]
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import fields
from pathlib import Path

MODIFICATIONS = [
    ("quant.rtn", {"bits": 3}),
    ("quant.rtn", {"bits": 4}),
    ("prune.magnitude", {"sparsity": 0.5}),
    ("prune.magnitude", {"sparsity": 0.3}),
]
Z95 = 1.6448536269514722


def pool_stats(mods, seq_len: int, max_windows: int | None, cache: Path | None):
    """(reference, {modification: TokenStats}) on the whole train split, cached on disk."""
    import torch

    import pytest_hemorrhage
    from pytest_hemorrhage.harness import Harness
    from pytest_hemorrhage.loading import load_model
    from pytest_hemorrhage.metrics import TokenStats, token_stats
    from pytest_hemorrhage.reference import FORMAT, Reference
    from pytest_hemorrhage.settings import Settings

    train = Path(pytest_hemorrhage.__file__).parent / "assets" / "corpus" / "train.txt"
    tokens = (max_windows or 10**6) * seq_len
    path = None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        path = cache / f"coverage-f{FORMAT}-s{seq_len}-t{tokens}.pt"
    state = torch.load(path, weights_only=True) if path and path.exists() else {}
    harness = None
    for name, params in mods:
        key = f"{name}{sorted(params.items())}"
        if key in state and "reference" in state:
            continue
        if harness is None:
            loaded = load_model("hemorrhage-tiny", device="cpu")
            settings = Settings.defaults(
                model="hemorrhage-tiny", data=str(train), tokens=tokens, seq_len=seq_len
            )
            harness = Harness(loaded, settings)
            state["reference"] = {
                f.name: getattr(harness.reference, f.name) for f in fields(Reference)
            }
        start = time.perf_counter()
        reference = harness.reference
        with harness.modified([(name, params)]) as patch:
            parts, row = [], 0
            for logits, targets in harness.batches(patch.logits_processors):
                parts.append(token_stats(logits, reference.rows(row, row + len(targets))))
                row += len(targets)
        stats = TokenStats.cat(parts)
        state[key] = {f.name: getattr(stats, f.name) for f in fields(TokenStats)}
        print(f"scored {key} on {len(harness.windows.eval)} windows "
              f"in {time.perf_counter() - start:.0f} s", flush=True)
        if path is not None:
            torch.save(state, path)
    reference = Reference(**state["reference"])
    return reference, {
        (name, f"{sorted(params.items())}"): TokenStats(**state[f"{name}{sorted(params.items())}"])
        for name, params in mods
    }


def subset(obj, idx):
    """The rows ``idx`` of a TokenStats or Reference (its per-token fields)."""
    return type(obj)(
        **{
            f.name: None if getattr(obj, f.name) is None else getattr(obj, f.name)[idx]
            for f in fields(obj)
        }
    )


def token_level(stats, reference):
    """The standard errors as computed before: every token an independent draw."""
    import torch

    from pytest_hemorrhage.metrics import summarize

    values, se = summarize(
        subset(stats, slice(None)).__class__(
            **{**{f.name: getattr(stats, f.name) for f in fields(stats)},
               "window": torch.arange(len(stats.kl))}
        ),
        reference,
    )
    # kl_p99: the binomial order-statistic interval of the old _quantile_se
    s = stats.kl.double().sort().values
    n = s.numel()
    spread = math.sqrt(n * 0.99 * 0.01)
    lo, hi = max(0, math.floor(n * 0.99 - spread)), min(n - 1, math.ceil(n * 0.99 + spread))
    se["kl_p99"] = (s[hi] - s[lo]).item() / 2
    # kl_max: the closed-form bootstrap of the maximum (old _max_se)
    top = stats.kl.double().topk(min(n, 64)).values
    below = ((n - torch.arange(len(top) + 1, dtype=torch.float64)) / n) ** n
    weight = below[:-1] - below[1:]
    weight[-1] += below[-1]
    mean = (weight * top).sum()
    se["kl_max"] = (weight * (top - mean) ** 2).sum().sqrt().item()
    return values, se


def coverage(stats, reference, windows: int, splits: int, seed: int):
    """Per metric: (token-level coverage, window-level coverage, mean SE ratio, sets)."""
    import torch

    from pytest_hemorrhage.metrics import summarize

    full, _ = summarize(stats, reference)
    count = int(stats.window.max()) + 1
    rows_of = [[] for _ in range(count)]
    for i, w in enumerate(stats.window.tolist()):
        rows_of[w].append(i)
    g = torch.Generator().manual_seed(seed)
    hits = {m: [0, 0] for m in full}
    ratio = {m: [] for m in full}
    sets = 0
    for _ in range(splits):
        order = torch.randperm(count, generator=g).tolist()
        for k in range(count // windows):
            chosen = order[k * windows : (k + 1) * windows]
            idx = torch.tensor([i for w in chosen for i in rows_of[w]])
            part, ref = subset(stats, idx), subset(reference, idx)
            values, se = summarize(part, ref)
            _, token_se = token_level(part, ref)
            sets += 1
            for m, truth in full.items():
                hits[m][0] += values[m] + Z95 * token_se[m] >= truth
                if se[m] is not None:
                    hits[m][1] += values[m] + Z95 * se[m] >= truth
                    if token_se[m]:
                        ratio[m].append(se[m] / token_se[m])
    return {
        m: (
            hits[m][0] / sets,
            None if not ratio[m] and m == "kl_max" else hits[m][1] / sets,
            sum(ratio[m]) / len(ratio[m]) if ratio[m] else math.nan,
        )
        for m in full
    }, sets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=64, help="windows per evaluation set")
    parser.add_argument("--splits", type=int, default=30, help="random partitions of the pool")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--pool", type=int, default=None, help="windows in the pool (all)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/hemorrhage-bench-coverage"))
    args = parser.parse_args()

    reference, pools = pool_stats(MODIFICATIONS, args.seq_len, args.pool, args.cache)
    windows_in_pool = int(next(iter(pools.values())).window.max()) + 1
    print(f"pool: {windows_in_pool} windows x {args.seq_len - 1} scored tokens; evaluation "
          f"sets of {args.windows} windows; one-sided 95% upper bounds")
    for (name, params), stats in pools.items():
        table, sets = coverage(stats, reference, args.windows, args.splits, seed=0)
        print(f"\n{name} {params}  ({sets} sets; binomial SE of a coverage near 95%: "
              f"{math.sqrt(0.95 * 0.05 / sets):.3f})")
        print(f"  {'metric':<18} {'token':>7} {'window':>7} {'se ratio':>9}")
        for metric, (before, after, ratio) in table.items():
            shown = "refused" if after is None else f"{after:.3f}"
            print(f"  {metric:<18} {before:7.3f} {shown:>7} {ratio:9.2f}")


if __name__ == "__main__":
    main()
