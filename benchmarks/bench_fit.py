"""Does s0 +- s0_stderr of the phase-transition fit hold its stated 68.3%? Coverage by simulation.

Synthetic sweeps of a known piecewise law (power law up to s0, exponential above; the law
``explore.fit.fit_phase_transition`` fits) with lognormal noise, many times per configuration:
points per sweep (8, 12, 20), noise (5%, 15%, 25% in log space) and two shapes (a sharp kink,
and a gentle one the noise can hide). Among the fits that report a transition, coverage is the
share whose ``s0 +- s0_stderr`` contains the true s0; printed with its binomial standard error,
the share of sweeps that reported a transition, and the mean half-width.

Run: python -m benchmarks.bench_fit [--sweeps 300]
"""

from __future__ import annotations

import argparse
import math
import time

SHAPES = {  # name: (x range, s0, b, c, prefactor)
    "sharp (s0=0.40, b=2, c=20)": ((0.05, 0.9), 0.40, 2.0, 20.0, 1.0),
    "gentle (s0=0.55, b=1.5, c=9)": ((0.1, 0.9), 0.55, 1.5, 9.0, 0.2),
}
POINTS = (8, 12, 20)
NOISE = (0.05, 0.15, 0.25)
STATED = 0.6826894921370859  # s0 +- s0_stderr: a 68.3% interval


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweeps", type=int, default=300, help="noisy sweeps per configuration")
    args = parser.parse_args()

    import numpy as np

    from pytest_hemorrhage.explore.fit import fit_phase_transition

    start = time.perf_counter()
    print(f"coverage of s0 +- s0_stderr (stated {STATED:.3f}), {args.sweeps} sweeps each")
    print(
        f"  {'shape':<30} {'points':>6} {'noise':>5} {'fits':>5} {'coverage':>8} {'+-SE':>6} "
        f"{'half-width':>10}"
    )
    hits_all = fits_all = 0
    worst = (math.inf, "")
    for shape, ((lo, hi), s0, b, c, scale) in SHAPES.items():
        for n in POINTS:
            x = np.linspace(lo, hi, n)
            truth = scale * np.where(x <= s0, x**b, s0**b * np.exp(c * (x - s0)))
            for noise in NOISE:
                rng = np.random.default_rng(0)
                hits = fits = 0
                widths = []
                for _ in range(args.sweeps):
                    res = fit_phase_transition(x, truth * np.exp(rng.normal(0.0, noise, n)))
                    if res.s0 is None or res.s0_stderr is None:
                        continue
                    fits += 1
                    hits += abs(res.s0 - s0) <= res.s0_stderr
                    widths.append(res.s0_stderr)
                if not fits:
                    print(f"  {shape:<30} {n:>6} {noise:>5.2f} {0:>5}  (no transition reported)")
                    continue
                p = hits / fits
                se = math.sqrt(p * (1 - p) / fits)
                print(
                    f"  {shape:<30} {n:>6} {noise:>5.2f} {fits:>5} {p:>8.3f} {se:>6.3f} "
                    f"{sum(widths) / fits:>10.4f}",
                    flush=True,
                )
                hits_all, fits_all = hits_all + hits, fits_all + fits
                if fits >= 30 and p < worst[0]:
                    worst = (p, f"{shape}, {n} points, noise {noise}")
    p = hits_all / fits_all
    print(
        f"all: {hits_all}/{fits_all} = {p:.3f} +- {math.sqrt(p * (1 - p) / fits_all):.3f}; "
        f"lowest (>= 30 fits): {worst[0]:.3f} ({worst[1]}); {time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
