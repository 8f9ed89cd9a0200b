"""Do one-sided 95% upper bounds hold their level? Coverage by simulation (issue 12, item 0).

The bundled model is scored once per modification on a long evaluation set: every window of
128 tokens of the bundled corpus's train split (~2,200 windows, ~280k tokens). That set is then
split at random into disjoint evaluation sets of the default size (64 windows, 8,192 tokens),
many times over; each set's ``value + 1.645 * stderr`` is compared with the value on the
whole long set. Coverage is the share of sets whose bound reaches it: >= 95% is the target.

Printed per modification and metric, side by side:
  * ``token``: normal bounds (1.645) with standard errors that treat tokens as independent
    (what the plugin did first; for ``kl_max`` the closed-form bootstrap of the maximum);
  * ``window``: normal bounds with window-level (CR1) standard errors (commit b3e3a68);
  * ``now``: the plugin's bounds (``metrics.summarize``: window-level, with the studentized
    quantile corrected for the windows' skewness and kurtosis, ``metrics._t95``; ``kl_max``
    has none and a budget refuses ``confidence`` on it);
  * ``width``: mean width of the ``now`` bound over the ``window`` one.

Per-token statistics are cached (``--cache``) so that re-runs only resample. The reference is
stored exactly at the bundled model's 512-token vocabulary, so the cache does not depend on
the top-K storage format.

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
    from pytest_hemorrhage.reference import Reference
    from pytest_hemorrhage.settings import Settings

    train = Path(pytest_hemorrhage.__file__).parent / "assets" / "corpus" / "train.txt"
    tokens = (max_windows or 10**6) * seq_len
    path = None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        path = cache / f"coverage-s{seq_len}-t{tokens}.pt"
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
        print(
            f"scored {key} on {len(harness.windows.eval)} windows "
            f"in {time.perf_counter() - start:.0f} s",
            flush=True,
        )
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


def normal_bounds(stats, reference, unit):
    """The one-sided 95% bounds with a normal 1.645 and the plain CR1 standard error over
    ``unit`` (tokens: what the plugin did first; windows: commit b3e3a68)."""
    import torch

    from pytest_hemorrhage.metrics import _cluster

    d = stats.nll.double() - reference.targets_nll.double()
    nll, nll_se, _ = _cluster(d, unit)
    bounds = {
        "ppl_increase": math.exp(nll + Z95 * nll_se) - 1,
        "nll_increase": nll + Z95 * nll_se,
    }
    for metric, x in (
        ("kl_mean", stats.kl),
        ("top1_disagreement", stats.disagree),
        ("delta_p_mean", reference.target_logp.exp().double() - stats.p_target.double()),
    ):
        mean, se, _ = _cluster(x, unit)
        bounds[metric] = mean + Z95 * se
    kl = stats.kl.double()
    value = kl.quantile(0.99).item()
    _, s_f, _ = _cluster((kl <= value).double(), unit)
    top = 0.99 + Z95 * s_f
    bounds["kl_p99"] = math.inf if top > 1 else kl.quantile(top).item()
    # kl_max (tokens only): the closed-form bootstrap of the maximum (old _max_se)
    n = kl.numel()
    best = kl.topk(min(n, 64)).values
    below = ((n - torch.arange(len(best) + 1, dtype=torch.float64)) / n) ** n
    weight = below[:-1] - below[1:]
    weight[-1] += below[-1]
    mean = (weight * best).sum()
    bounds["kl_max"] = kl.max().item() + Z95 * (weight * (best - mean) ** 2).sum().sqrt().item()
    return bounds


COLUMNS = ("token", "window", "now")


def coverage(stats, reference, windows: int, splits: int, seed: int):
    """Per metric: coverage of the token-level, window-level normal and calibrated (now)
    bounds, and the mean ratio of the calibrated to the normal window-level bound's width."""
    import torch

    from pytest_hemorrhage.metrics import summarize

    full, _ = summarize(stats, reference)
    count = int(stats.window.max()) + 1
    rows_of = [[] for _ in range(count)]
    for i, w in enumerate(stats.window.tolist()):
        rows_of[w].append(i)
    g = torch.Generator().manual_seed(seed)
    hits = {m: dict.fromkeys(COLUMNS, 0) for m in full}
    widen = {m: [] for m in full}
    sets = 0
    for _ in range(splits):
        order = torch.randperm(count, generator=g).tolist()
        for k in range(count // windows):
            chosen = order[k * windows : (k + 1) * windows]
            idx = torch.tensor([i for w in chosen for i in rows_of[w]])
            part, ref = subset(stats, idx), subset(reference, idx)
            values, se = summarize(part, ref)
            token = normal_bounds(part, ref, torch.arange(len(idx)))
            window = normal_bounds(part, ref, part.window)
            sets += 1
            for m, truth in full.items():
                hits[m]["token"] += token[m] >= truth
                hits[m]["window"] += window[m] >= truth
                if se[m] is not None:
                    bound = values[m] + Z95 * se[m]
                    hits[m]["now"] += bound >= truth
                    if window[m] > values[m]:
                        widen[m].append((bound - values[m]) / (window[m] - values[m]))
    return {
        m: (
            *(hits[m][c] / sets for c in COLUMNS[:2]),
            None if m == "kl_max" else hits[m]["now"] / sets,
            sum(widen[m]) / len(widen[m]) if widen[m] else math.nan,
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
    print(
        f"pool: {windows_in_pool} windows x {args.seq_len - 1} scored tokens; evaluation "
        f"sets of {args.windows} windows; one-sided 95% upper bounds"
    )
    for (name, params), stats in pools.items():
        table, sets = coverage(stats, reference, args.windows, args.splits, seed=0)
        print(
            f"\n{name} {params}  ({sets} sets; binomial SE of a coverage near 95%: "
            f"{math.sqrt(0.95 * 0.05 / sets):.3f})"
        )
        print(f"  {'metric':<18} {'token':>7} {'window':>7} {'now':>7} {'width':>6}")
        for metric, (token, window, now, ratio) in table.items():
            shown = "refused" if now is None else f"{now:.3f}"
            print(f"  {metric:<18} {token:7.3f} {window:7.3f} {shown:>7} {ratio:6.2f}")


if __name__ == "__main__":
    main()
