"""Do one-sided 95% upper bounds hold their level? Coverage by simulation (issue 12, item 0).

The bundled model is scored once per modification on a long evaluation set: every window of
128 tokens of the bundled corpus's train split (2,185 windows, ~280k tokens). That set is then
split at random into disjoint evaluation sets of the default size (64 windows, 8,192 tokens),
many times over; each set's ``value + z * stderr`` (z = 1.645 at 95%) is compared with the
value on the whole long set. Coverage is the share of sets whose bound reaches it: >= 95% is
the target. Its standard error comes from the spread of the per-split coverages (the sets of
one split are disjoint, so not independent draws).

Printed per modification and metric, side by side:
  * ``token``: normal bounds with standard errors that treat tokens as independent (what the
    plugin did first; for ``kl_max`` the closed-form bootstrap of the maximum);
  * ``window``: normal bounds with window-level (CR1) standard errors (commit b3e3a68);
  * ``now``: the plugin's bounds (``stats.mean_se``/``quantile_se`` at ``--level``, what
    ``summarize`` returns: window-level, with the studentized quantile corrected for the
    windows' skewness and kurtosis, ``stats.studentized_quantile``; ``kl_max`` has none and a
    budget refuses ``confidence`` on it), with its standard error;
  * ``width``: mean width of the ``now`` bound over the ``window`` one.

``--level`` and ``--windows`` check other bounds the plugin relies on, e.g. early stopping's
first look: ``--windows 8 --level 0.98333`` (one of three looks at 1 - 0.05 / 3). Lower
bounds (``value - z * stderr``, what early stopping's "over" verdicts use) are printed with
``--lower``.

The windows are all 127 scored tokens long, so a mean metric's window-level bound is computed
from the windows' means (the same numbers as from their tokens, checked on the first set
against ``summarize``), which keeps thousands of splits fast; ``kl_p99`` uses the tokens.
Per-token statistics are cached (``--cache``) so that re-runs only resample. The reference is
stored exactly at the bundled model's 512-token vocabulary, so the cache does not depend on
the top-K storage format.

Exits non-zero when the lowest coverage misses the target.

Run: python -m benchmarks.bench_coverage [--splits 1500] [--windows 64] [--level 0.95]
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import fields
from pathlib import Path
from statistics import NormalDist

from benchmarks.common import Targets

MODIFICATIONS = [
    ("quant.rtn", {"bits": 3}),
    ("quant.rtn", {"bits": 4}),
    ("prune.magnitude", {"sparsity": 0.5}),
    ("prune.magnitude", {"sparsity": 0.3}),
]


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
            for logits, targets, *_ in harness.chunks(patch.logits_processors):
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


MEANS = ("nll_increase", "kl_mean", "top1_disagreement", "delta_p_mean")
COLUMNS = ("token", "window", "now", "scaled")


def per_token(stats, reference):
    """(windows, tokens) tensors of each mean metric's per-token values, and the KL's."""
    count = int(stats.window.max()) + 1
    rows = {
        "nll_increase": stats.nll.double() - reference.targets_nll.double(),
        "kl_mean": stats.kl.double(),
        "top1_disagreement": stats.disagree.double(),
        "delta_p_mean": reference.target_logp.exp().double() - stats.p_target.double(),
    }
    return {m: x.reshape(count, -1) for m, x in rows.items()}


def bounds(tokens, chosen, level: float, lower: bool):
    """Per metric: the token-level, plain window-level and calibrated one-sided bounds of the
    evaluation set made of windows ``chosen``, and the set's value (upper bounds; lower ones
    with ``lower``)."""
    import torch

    from pytest_hemorrhage.stats import cluster_mean, mean_se, quantile_se

    z = NormalDist().inv_cdf(level)
    sign = -1.0 if lower else 1.0
    out = {}
    for metric in MEANS:
        x = tokens[metric][chosen]
        value, se = mean_se(x.mean(1), None, level)  # equal windows: a mean of window means
        _, se95 = mean_se(x.mean(1), None)
        _, window_se, _ = cluster_mean(x.mean(1), None)
        token_se = x.std().item() / math.sqrt(x.numel())
        out[metric] = (value, *(value + sign * z * s for s in (token_se, window_se, se, se95)))
    # ppl_increase: the bound exp(nll + z se) - 1 (summarize's ppl SE is defined to give it)
    nll = out["nll_increase"]
    out["ppl_increase"] = (math.expm1(nll[0]), *(math.expm1(b) for b in nll[1:]))
    kl = tokens["kl_mean"][chosen]
    window = torch.arange(len(chosen)).repeat_interleave(kl.shape[1])
    kl = kl.reshape(-1)
    value, se = quantile_se(kl, 0.99, window, level)
    _, se95 = quantile_se(kl, 0.99, window)
    ordered = kl.sort().values
    normal = []
    for unit in (torch.arange(kl.numel()), window):
        _, s_f, _ = cluster_mean((kl <= value).double(), unit)
        edge = 0.99 + sign * z * s_f
        inside = 0 <= edge <= 1
        normal.append(at(ordered, edge) if inside else sign * math.inf)
    out["kl_p99"] = (value, *normal, value + sign * z * se, value + sign * z * se95)
    return out


def at(ordered, q: float) -> float:
    """Quantile ``q`` of sorted values, interpolated linearly as ``torch.quantile`` does."""
    position = q * (len(ordered) - 1)
    below = min(int(position), len(ordered) - 1)
    above = min(below + 1, len(ordered) - 1)
    return (ordered[below] + (ordered[above] - ordered[below]) * (position - below)).item()


def coverage(stats, reference, windows: int, splits: int, seed: int, level: float, lower: bool):
    """Per metric: (token, window, now) coverage of the full-set value by the one-sided bounds,
    now's standard error over splits, and the mean ratio of now's width to window's."""
    import torch

    from pytest_hemorrhage.metrics import summarize

    full, _ = summarize(stats, reference)
    tokens = per_token(stats, reference)
    count = len(tokens["kl_mean"])
    g = torch.Generator().manual_seed(seed)
    metrics = [m for m in full if m != "kl_max"]
    per_split = {m: {c: [] for c in COLUMNS} for m in metrics}
    widen = {m: [] for m in metrics}
    sets = 0
    for split in range(splits):
        order = torch.randperm(count, generator=g)
        hits = {m: dict.fromkeys(COLUMNS, 0) for m in metrics}
        k_sets = count // windows
        for k in range(k_sets):
            chosen = order[k * windows : (k + 1) * windows]
            got = bounds(tokens, chosen, level, lower)
            if split == 0 and k == 0:
                _check_against_summarize(stats, reference, chosen, got, level, lower)
            for m in metrics:
                value, *column = got[m]
                for c, bound in zip(COLUMNS, column, strict=True):
                    hits[m][c] += bound <= full[m] if lower else bound >= full[m]
                if abs(column[1] - value) > 0:
                    widen[m].append(abs(column[2] - value) / abs(column[1] - value))
        sets += k_sets
        for m in metrics:
            for c in COLUMNS:
                per_split[m][c].append(hits[m][c] / k_sets)
    table = {}
    for m in metrics:
        now = torch.tensor(per_split[m]["now"], dtype=torch.float64)
        table[m] = (
            *(sum(per_split[m][c]) / splits for c in COLUMNS),
            now.std().item() / math.sqrt(splits) if splits > 1 else math.nan,
            sum(widen[m]) / len(widen[m]) if widen[m] else math.nan,
        )
    return table, sets


def _check_against_summarize(stats, reference, chosen, got, level: float, lower: bool) -> None:
    """The bounds from window means are summarize's own, computed from the set's tokens."""
    import torch

    from pytest_hemorrhage.early_stop import take_windows
    from pytest_hemorrhage.metrics import summarize

    per_window = len(stats.kl) // (int(stats.window.max()) + 1)
    token = (chosen[:, None] * per_window + torch.arange(per_window)).reshape(-1)
    part = type(stats)(
        *(getattr(stats, f)[token] for f in ("kl", "nll", "disagree", "p_target", "finite")),
        window=torch.arange(len(chosen)).repeat_interleave(per_window),
    )
    values, se = summarize(part, take_windows(reference, chosen, per_window), level)
    z = (-1 if lower else 1) * NormalDist().inv_cdf(level)
    for m, (value, _, _, now, _) in got.items():
        assert math.isclose(value, values[m], rel_tol=1e-9, abs_tol=1e-12), m
        if m == "ppl_increase":  # its SE is defined for the upper bound
            continue
        assert math.isclose(now, values[m] + z * se[m], rel_tol=1e-6, abs_tol=1e-12), m


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=64, help="windows per evaluation set")
    parser.add_argument("--splits", type=int, default=1500, help="random partitions of the pool")
    parser.add_argument("--level", type=float, default=0.95, help="one-sided level")
    parser.add_argument("--lower", action="store_true", help="lower bounds instead of upper")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--pool", type=int, default=None, help="windows in the pool (all)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/hemorrhage-bench-coverage"))
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)  # many small reductions: a second thread only adds overhead
    start = time.perf_counter()
    reference, pools = pool_stats(MODIFICATIONS, args.seq_len, args.pool, args.cache)
    windows_in_pool = int(next(iter(pools.values())).window.max()) + 1
    side = "lower" if args.lower else "upper"
    print(
        f"pool: {windows_in_pool} windows x {args.seq_len - 1} scored tokens; evaluation "
        f"sets of {args.windows} windows; one-sided {args.level:.5g} {side} bounds; "
        f"{args.splits} random splits"
    )
    worst = (math.inf, "", 0.0)
    for (name, params), stats in pools.items():
        table, sets = coverage(
            stats, reference, args.windows, args.splits, 0, args.level, args.lower
        )
        binomial = math.sqrt(args.level * (1 - args.level) / sets)
        print(
            f"\n{name} {params}  ({sets} sets; binomial SE of a coverage at {args.level:.5g}: "
            f"{binomial:.4f})"
        )
        print(
            f"  {'metric':<18} {'token':>7} {'window':>7} {'now':>7} {'+-SE':>7} {'width':>6} "
            f"{'scaled':>7}"
        )
        for metric, (token, window, now, scaled, se, ratio) in table.items():
            print(
                f"  {metric:<18} {token:7.4f} {window:7.4f} {now:7.4f} {se:7.4f} {ratio:6.2f} "
                f"{scaled:7.4f}"
            )
            if now < worst[0]:
                worst = (now, f"{name} {params} {metric}", se)
        print(f"  {'kl_max':<18} refused: no bound on a maximum holds its level", flush=True)
    now, where, se = worst
    targets = Targets()
    verdict = targets.at_least(f"lowest coverage ({where})", now, args.level)
    distance = (now - args.level) / se if se else math.copysign(math.inf, now - args.level)
    print(
        f"\nlowest coverage of the plugin's bounds: {now:.4f} +- {se:.4f} ({where}); target "
        f">= {args.level:.5g}: {verdict}; {distance:+.1f} SE from it; "
        f"{time.perf_counter() - start:.0f} s"
    )
    targets.finish()


if __name__ == "__main__":
    main()
