"""A GGUF candidate measured in llama.cpp in-process vs a bare ``Llama.eval`` of the same tokens
(issue 21: <= 1.15x).

The file: the widened bundled model (benchmarks/models.py, rows of 256 and 768: every K-quant
applies) written by ``write_gguf`` as Q4_K. Side by side in one process, per round:

- bare: what any scorer of that file must do, ``Llama.reset`` then ``Llama.eval`` of each
  evaluation window with ``logits_all``, the scores copied out;
- measure: ``Harness.measure_model`` of the same file loaded as a ``--hemorrhage-candidate``
  runs it (``LlamaCppModel``: the same calls, then the logits scored against the reference).

Both on one thread, the same ``n_batch``; the reference is built before timing.

Run: python -m benchmarks.bench_llama_cpp [--rounds 3] [--tokens 4096]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.common import Targets, side_by_side


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--type", default="Q4_K")
    args = parser.parse_args()

    import torch

    from benchmarks.models import widened
    from pytest_hemorrhage.candidates import load_candidate
    from pytest_hemorrhage.harness import Harness
    from pytest_hemorrhage.loading import LoadedModel, load_model
    from pytest_hemorrhage.modifications import make
    from pytest_hemorrhage.modifications.quant.gguf.export import write_gguf
    from pytest_hemorrhage.settings import Settings

    torch.set_num_threads(1)
    tiny = load_model("hemorrhage-tiny", device="cpu")
    model = widened(tiny.model)
    loaded = LoadedModel(model=model, tokenizer=tiny.tokenizer, spec="tiny-wide")
    harness = Harness(loaded, Settings.defaults(model=loaded.spec, tokens=args.tokens))
    path = write_gguf(
        model,
        tiny.tokenizer,
        Path(tempfile.mkdtemp()) / f"{args.type}.gguf",
        make("quant.gguf", {"type": args.type}),
    )
    seq_len = harness.windows.eval.shape[1]
    candidate = load_candidate(str(path), device="cpu", gguf_runtime="llama.cpp", context=seq_len)
    llm = candidate.model.llm
    rows = harness.windows.eval.tolist()
    harness.reference  # noqa: B018  built once, outside the timing

    def bare() -> None:
        for row in rows:
            llm.reset()
            llm.eval(row)
            llm.scores[: len(row)].copy()

    result = harness.measure_model(candidate, {"file": path.name})
    rounds = side_by_side(
        {"bare": bare, "measure": lambda: harness.measure_model(candidate, {})}, args.rounds
    )
    ratio = rounds.ratio("measure", "bare")
    targets = Targets()
    print(
        f"{len(rows)} windows of {seq_len} tokens, {path.name} in llama.cpp "
        f"({candidate.model.describe()['package']}, 1 thread, n_batch {candidate.model.batch}); "
        f"{args.rounds} rounds"
    )
    print(
        f"bare Llama.eval {rounds.median('bare'):.2f} s, measure {rounds.median('measure'):.2f} s"
    )
    print(
        f"measure / bare: {ratio:.3f}x  (target <= 1.15x) {targets.at_most('ratio', ratio, 1.15)}"
    )
    print(f"kl_mean of the file: {result.metrics['kl_mean']:.4g}")
    targets.finish()


if __name__ == "__main__":
    main()
