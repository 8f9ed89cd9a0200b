"""Cost of the calibrated modifications of issue 10 (AWQ, ASVD, Taylor head/channel importance,
SliceGPT), side by side in one run on the bundled model.

For each: time of the first apply (calibration included, session memo empty) / time of one
forward pass over the calibration windows (issue 10's target for AWQ: <= 3x plus the per-layer
searches), and time of a second apply (memo warm) / one forward pass over the evaluation
windows (target: <= 0.1x once calibration is cached).

Run: python benchmarks/bench_activation_aware.py
"""

from __future__ import annotations

import time

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
    harness = Harness(loaded, Settings.defaults(model=loaded.spec))
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
    print(f"{'modification':55s} {'first/cal-fwd':>14s} {'cached/eval-fwd':>16s}")
    for name, params in SETTINGS:

        def apply(stage: tuple = (name, params)) -> None:
            with harness.modified([stage]):
                pass

        def first(stage: tuple = (name, params)) -> None:
            harness.memo.clear()
            apply(stage)

        t_first = _seconds(first)
        t_cached = _seconds(apply)
        label = f"{name} {params}"
        print(f"{label:55s} {t_first / t_cal:14.2f} {t_cached / t_eval:16.3f}")


if __name__ == "__main__":
    run()
