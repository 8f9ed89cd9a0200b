"""Cost of the calibrated modifications of issue 10 (AWQ, ASVD, Taylor head/channel importance,
SliceGPT), side by side in one run on the bundled model.

For each: time of the first apply (calibration included, session memo empty) / time of one
forward pass over the calibration windows (issue 10's target for AWQ: <= 3x plus the per-layer
searches); time of a second apply + restore in the session (memo warm) / one forward pass over
the evaluation windows (target: <= 0.1x once calibration is cached); and the same in a second
session reading the disk cache (a new harness, empty memo, same cache directory: AWQ's scales
are stored there; the others recompute, their "disk" column is a first apply).

Run: python benchmarks/bench_activation_aware.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

SETTINGS = [
    ("quant.rtn", {"bits": 4}),  # no calibration, for scale
    ("quant.awq", {"bits": 4}),
    ("lowrank.svd", {"rank_ratio": 0.5}),
    ("lowrank.asvd", {"rank_ratio": 0.5}),
    ("prune.channels", {"fraction": 0.25, "importance": "taylor"}),
    ("prune.heads", {"fraction": 0.25, "importance": "taylor"}),
    ("prune.slicegpt", {"fraction": 0.25}),
]


def _seconds(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def run() -> None:
    import torch

    from pytest_hemorrhage.harness import Harness
    from pytest_hemorrhage.loading import load_model
    from pytest_hemorrhage.settings import Settings

    loaded = load_model("hemorrhage-tiny", device="cpu")
    cache = Path(tempfile.mkdtemp())
    settings = Settings.defaults(model=loaded.spec, cache_dir=cache)
    harness = Harness(loaded, settings)
    plain = Harness(loaded, Settings.defaults(model=loaded.spec))  # no disk cache: first applies
    context = harness.context

    def forward(windows: torch.Tensor) -> None:
        with torch.inference_mode():
            for batch in windows.split(8):
                context.logits(batch)

    calibration = context.calibration_windows()
    evaluation = harness.windows.eval
    t_cal = _seconds(lambda: forward(calibration))
    t_eval = _seconds(lambda: forward(evaluation))
    print(
        f"one forward pass: calibration windows {t_cal * 1e3:.0f} ms "
        f"({len(calibration)} windows), evaluation windows {t_eval * 1e3:.0f} ms "
        f"({len(evaluation)} windows)"
    )
    print(
        f"{'modification':55s} {'first/cal-fwd':>14s} {'memo/eval-fwd':>14s} {'disk/eval-fwd':>14s}"
    )
    for name, params in SETTINGS:

        def apply(stage: tuple = (name, params)) -> None:
            with harness.modified([stage]):
                pass

        def first(stage: tuple = (name, params)) -> None:
            plain.memo.clear()
            with plain.modified([stage]):
                pass

        def second_session(stage: tuple = (name, params)) -> None:
            with Harness(loaded, settings).modified([stage]):
                pass

        t_first = _seconds(first)
        t_cached = _seconds(apply)
        t_new = _seconds(lambda: Harness(loaded, settings))  # a harness alone, subtracted
        t_disk = _seconds(second_session) - t_new
        label = f"{name} {params}"
        print(
            f"{label:55s} {t_first / t_cal:14.2f} {t_cached / t_eval:14.3f} {t_disk / t_eval:14.3f}"
        )


if __name__ == "__main__":
    run()
