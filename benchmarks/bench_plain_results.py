"""Cost of keeping results as plain data (issue 24's target: < 1 ms per result): converting a
result when it is recorded (``plain``, in ``HemorrhageSession.record``) and checking it again
before an xdist worker sends it (``first_unplain``), side by side with ``json.dumps`` of the
same results (what writing the report costs anyway).

The results are bench_report's (every metric with its stderr, one in ten with the per-block
blame of a 24-block model), and the same with library values in ``details`` (an enum, a dtype,
a path, a 64-element tensor, a transformers quantization config), as a candidate's or a
handler's. Times are medians of ``--rounds`` rounds. Exits non-zero when the target is missed.

Run: python -m benchmarks.bench_plain_results [--results N] [--rounds N]
"""

from __future__ import annotations

import argparse
import enum
import json
import pathlib

from benchmarks.bench_report import _report
from benchmarks.common import Targets, side_by_side


class Method(str, enum.Enum):  # as transformers' QuantizationMethod
    GGUF = "gguf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=7, help="rounds of timing (medians)")
    args = parser.parse_args()
    targets = Targets()

    import torch
    from transformers import BitsAndBytesConfig

    from pytest_hemorrhage.plain import first_unplain, plain

    records = _report(args.results)["results"]
    library = [
        {
            **r,
            "details": {
                **r["details"],
                "quant_method": Method.GGUF,
                "dtype": torch.bfloat16,
                "file": pathlib.Path("/models/tiny-q4_k_m.gguf"),
                "scales": torch.linspace(0, 1, 64),
                "config": BitsAndBytesConfig(load_in_4bit=True),
            },
        }
        for r in records
    ]
    converted = [plain(r) for r in library]
    blamed = sum(bool(r["details"]) for r in records)
    timing = side_by_side(
        {
            "plain": lambda: [plain(r) for r in records],
            "plain, library values": lambda: [plain(r) for r in library],
            "first_unplain": lambda: [first_unplain(r) for r in converted],
            "json.dumps": lambda: [json.dumps(r) for r in records],
        },
        args.rounds,
    )
    print(f"{args.results} results ({blamed} with blame of 24 blocks), median per result:")
    for name in ("plain", "plain, library values", "first_unplain", "json.dumps"):
        per_result = timing.median(name) / args.results
        verdict = (
            f"(target < 1 ms: {targets.at_most(f'{name} (s per result)', per_result, 1e-3)})"
            if name != "json.dumps"
            else ""
        )
        ratio = timing.ratio(name, "json.dumps")
        print(f"  {name:22} {per_result * 1e6:7.1f} us   {ratio:4.1f}x json.dumps   {verdict}")
    targets.finish()


if __name__ == "__main__":
    main()
