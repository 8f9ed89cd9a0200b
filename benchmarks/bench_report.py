"""Time of the HTML release report for 500 results (issue 14's target: < 1 s), side by side with
the JSON report of the same run, and the cost of one curve image (images are drawn per
exploration, never per result).

The 500 results are shaped like a real run's: every metric with its stderr, a two-metric budget,
one in ten over budget with its violation lines and per-block blame of a 24-block model.

Times are medians of ``--rounds`` rounds, the HTML and JSON renders back to back in each. Exits
non-zero when a target is missed.

Run: python -m benchmarks.bench_report [--results N] [--rounds N]
"""

from __future__ import annotations

import argparse
import copy
import json

from benchmarks.common import Targets, side_by_side

METRICS = (
    "ppl_increase",
    "nll_increase",
    "kl_mean",
    "kl_p99",
    "kl_max",
    "top1_disagreement",
    "delta_p_mean",
)


def _blame(blocks: int) -> dict:
    sublayers = (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
    return {
        "modification": "quant.rtn",
        "tokens": 256,
        "threshold": 0.05,
        "begins": 3,
        "most": 7,
        "attribution": False,
        "kl_mean": None,
        "notes": [],
        "levels": {"begin_level": 0.05, "begin_share": 0.1},
        "blocks": [
            {
                "index": i,
                "name": f"model.layers.{i}",
                "drift_l2": 0.02 * i,
                "drift_cos": 0.001 * i,
                "sublayers": {s: 0.01 * (i + k) for k, s in enumerate(sublayers)},
                "attn_entropy_shift": 0.01 * i,
                "attn_entropy_change": -0.005 * i,
                "kl_mean": None,
                "share": None,
                "added": False,
            }
            for i in range(blocks)
        ],
    }


def _report(n: int) -> dict:
    results = []
    for i in range(n):
        over = i % 10 == 0
        scale = 50.0 if over else 1.0
        metrics = {m: scale * 1e-3 * (k + 1) * (1 + i % 7) for k, m in enumerate(METRICS)}
        results.append(
            {
                "nodeid": f"tests/test_release.py::test_bits[{i}]",
                "outcome": "failed" if over else "passed",
                "modification": "quant.rtn",
                "params": {"bits": 8 - i % 6, "group_size": 64, "symmetric": True},
                "metrics": metrics,
                "stderr": {m: v / 20 for m, v in metrics.items()},
                "baseline_ppl": 14.08,
                "modified_ppl": 14.08 * (1 + metrics["ppl_increase"]),
                "tokens": 8128,
                "nonfinite_tokens": 0,
                "stages": [],
                "budget": {"ppl_increase": 0.05, "kl_mean": 0.02},
                "violations": [
                    f"ppl_increase: {metrics['ppl_increase']:.4f} > 0.0500 (...)",
                    f"kl_mean: {metrics['kl_mean']:.4f} > 0.0200 (...)",
                ]
                if over
                else [],
                "details": {"blame": _blame(24)} if over else {},
            }
        )
    return {
        "schema_version": 1,
        "plugin_version": "0.1.0",
        "model": {
            "spec": "hemorrhage-tiny",
            "fingerprint": "0dd0f93f1e0d2930",
            "class": "LlamaForCausalLM",
            "parameters": 918656,
            "dtype": "float32",
            "device": "cpu",
        },
        "data": {
            "source": "bundled corpus",
            "fingerprint": "0d359cd05462fda550699108",
            "seq_len": 128,
            "windows": 64,
            "topk": 512,
        },
        "baseline": {"ppl": 14.08},
        "results": results,
        "explorations": [],
    }


SWEEP = {
    "nodeid": "tests/test_curves.py::test_magnitude",
    "kind": "sweep",
    "modification": "prune.magnitude",
    "param": "sparsity",
    "fixed": {},
    "metric": "ppl_increase",
    "budget": {"ppl_increase": 0.1},
    "points": [
        {"value": v, "x": v, "broke": m > 0.1, "metrics": {"ppl_increase": m}}
        for v, m in [(0.1, 0.0003), (0.3, 0.016), (0.5, 0.12), (0.7, 1.24), (0.9, 10.2)]
    ],
    "fit": {"s0": None, "reason": "too few points", "r2": None},
    "s0": None,
    "s0_stderr": None,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of timing (medians)")
    args = parser.parse_args()
    targets = Targets()

    from pytest_hemorrhage.report.html import render_html

    report = _report(args.results)
    page = render_html(report)  # warm: imports, first-call costs
    timing = side_by_side(
        {"html": lambda: render_html(report), "json": lambda: json.dumps(report, indent=2)},
        args.rounds,
    )
    html_median = timing.median("html")
    print(
        f"{args.results} results ({sum(bool(r['violations']) for r in report['results'])} over "
        f"budget, with blame): page {len(page) / 1e6:.2f} MB"
    )
    print(
        f"  html render   median {html_median:.3f} s   "
        f"(target < 1 s: {targets.at_most('html render (s)', html_median, 1)})"
    )
    print(
        f"  json.dumps    median {timing.median('json'):.3f} s   "
        f"html / json = {timing.ratio('html', 'json'):.1f}x"
    )
    from pytest_hemorrhage.report.terminal import render_results

    for verbose in (False, True):
        what = f"terminal {'-v' if verbose else 'rows'}"
        median = side_by_side(
            {what: lambda v=verbose: render_results(report["results"], width=80, verbose=v)},
            args.rounds,
        ).median(what)
        print(
            f"  {what}   median {median:.3f} s"
            f"   (target < 1 s: {targets.at_most(f'{what} (s)', median, 1)})"
        )

    with_curve = copy.deepcopy(report)
    with_curve["explorations"] = [SWEEP]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("  one curve image: n/a (matplotlib is not installed)")
    else:
        render_html(with_curve)  # warm matplotlib
        curve = side_by_side(
            {"html": lambda: render_html(report), "curve": lambda: render_html(with_curve)}, 3
        )
        print(
            f"  one curve image adds {curve.median('curve') - curve.median('html'):.3f} s "
            f"(per exploration, not per result)"
        )
    targets.finish()


if __name__ == "__main__":
    main()
