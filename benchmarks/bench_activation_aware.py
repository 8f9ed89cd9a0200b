"""Cost of the calibrated modifications of issue 10 (AWQ, ASVD, Taylor head/channel importance,
SliceGPT), side by side in one run on the bundled model.

For each: time of the first apply (calibration included, session memo empty) / time of one
forward pass over the calibration windows (issue 10's target for AWQ: <= 3x plus the per-layer
searches); time of a second apply + restore in the session (memo warm) / one forward pass over
the evaluation windows (target: <= 0.1x once calibration is cached); and the same in a second
session reading the disk cache (a new harness, empty memo, same cache directory: AWQ's scales
are stored there; the others recompute, their "disk" column is a first apply). Each ratio is
the median over ``--rounds`` rounds of the two sides timed back to back in the same round.
Exits non-zero when the cached target is missed.

Run: python -m benchmarks.bench_activation_aware [--rounds N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from benchmarks.common import Targets, calibration_pass, forward_pass, side_by_side

SETTINGS = [
    ("quant.rtn", {"bits": 4}),  # no calibration, for scale
    ("quant.awq", {"bits": 4}),
    ("lowrank.svd", {"rank_ratio": 0.5}),
    ("lowrank.asvd", {"rank_ratio": 0.5}),
    ("prune.channels", {"fraction": 0.25, "importance": "taylor"}),
    ("prune.heads", {"fraction": 0.25, "importance": "taylor"}),
    ("prune.slicegpt", {"fraction": 0.25}),
]


def run(rounds: int) -> None:
    from pytest_hemorrhage.harness import Harness
    from pytest_hemorrhage.loading import load_model
    from pytest_hemorrhage.settings import Settings

    loaded = load_model("hemorrhage-tiny", device="cpu")
    cache = Path(tempfile.mkdtemp())
    settings = Settings.defaults(model=loaded.spec, cache_dir=cache)
    harness = Harness(loaded, settings)
    plain = Harness(loaded, Settings.defaults(model=loaded.spec))  # no disk cache: first applies
    calibration = harness.context.calibration_windows()
    evaluation = harness.windows.eval
    passes = {
        "calibration": lambda: calibration_pass(harness, calibration),
        "evaluation": lambda: forward_pass(harness),
    }
    alone = side_by_side(passes, rounds)
    print(
        f"one forward pass: calibration windows {alone.median('calibration') * 1e3:.0f} ms "
        f"({len(calibration)} windows), evaluation windows {alone.median('evaluation') * 1e3:.0f} "
        f"ms ({len(evaluation)} windows)"
    )
    print(
        f"{'modification':55s} {'first/cal-fwd':>14s} {'memo/eval-fwd':>14s} {'disk/eval-fwd':>14s}"
    )
    targets = Targets()
    for name, params in SETTINGS:
        stage = (name, params)

        def first(stage: tuple = stage) -> None:
            plain.memo.clear()
            with plain.modified([stage]):
                pass

        def memo(stage: tuple = stage) -> None:
            with harness.modified([stage]):
                pass

        def second_session(stage: tuple = stage) -> None:
            with Harness(loaded, settings).modified([stage]):
                pass

        memo()  # warm: the session memo, and the disk cache (AWQ's scales) for "disk"
        timing = side_by_side(
            passes
            | {
                "first": first,
                "memo": memo,
                "harness": lambda: Harness(loaded, settings),  # a harness alone, subtracted
                "disk": second_session,
            },
            rounds,
        )
        disk = statistics.median(
            (r["disk"] - r["harness"]) / r["evaluation"] for r in timing.each_round()
        )
        cached = timing.ratio("memo", "evaluation")
        label = f"{name} {params}"
        print(
            f"{label:55s} {timing.ratio('first', 'calibration'):14.2f} {cached:14.3f} "
            f"{disk:14.3f} {targets.at_most(f'{label}: memo/eval-fwd', cached, 0.1)}"
        )
    targets.finish()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of timing (medians)")
    run(parser.parse_args().rounds)
