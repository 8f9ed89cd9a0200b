"""Scale: ~100M-parameter random-init Llamas at 32k and 128k vocabularies (speed and memory only).

For each vocabulary, on a few windows of the bundled corpus (their token ids are valid in any
larger vocabulary), side by side in one run:
  * measure() of a decoding change (no weight work, so only the scoring shows) / a bare forward
    pass over the same windows in the same batches, in inference mode, through the same
    model_logits (target: <= 1.15). The two run back to back in each of --rounds rounds, and
    the ratio is the median over rounds of the round's ratio, so machine noise hits both
    sides alike. One torch thread by default (--threads): on the shared 2-core machine a
    second thread waits for a busy core at every parallel op and the forward pass alone swung
    2-3x between runs;
  * the most windows whose logits were alive at once during measure() (counted by weak
    references to their storage each time a batch is handed to the scoring) vs the auto batch
    bound: logits are scored per batch and per row block, and a batch's are freed before the
    next forward pass;
  * reference cache bytes per scored token (target: <= 1 KB);
  * peak resident memory of the process after each step;
  * early stopping on a clear verdict (quant.rtn bits=8 with a budget of 4x its kl_mean), on
    --early-windows windows (its first look comes after 1/8 of them, but after no fewer than 8:
    16 windows could not stop before half): tokens used / tokens of the full evaluation
    (target: <= 0.25).

The decoding change is decode.temperature at 1, which adds no pass over the logits (dividing by
1 changes no bit), so the first ratio is the scoring's own cost.

Exits non-zero when a target is missed.

Run: python -m benchmarks.bench_scale [--windows 16] [--early-windows 64] [--rounds 5]
[--threads 1]
"""

from __future__ import annotations

import argparse
import time

from benchmarks.common import Targets, forward_pass, peak_resident_bytes, side_by_side
from benchmarks.models import random_llama

CONFIGS = {
    # 32k: untied head, 10 blocks -> ~91M parameters; 128k: tied head, 6 blocks -> ~112M
    "32k": {"vocab_size": 32_000, "num_hidden_layers": 10, "tie_word_embeddings": False},
    "128k": {"vocab_size": 128_256, "num_hidden_layers": 6, "tie_word_embeddings": True},
}


def _peak_mb() -> float:
    return peak_resident_bytes() / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--early-windows", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: its default)")
    args = parser.parse_args()

    import torch
    from torch.multiprocessing.reductions import StorageWeakRef

    from pytest_hemorrhage.budget import Budget
    from pytest_hemorrhage.harness import Harness
    from pytest_hemorrhage.loading import load_model
    from pytest_hemorrhage.reference import storage_bytes
    from pytest_hemorrhage.settings import Settings

    if args.threads:  # this process's own setting: steadier side-by-side ratios when shared
        torch.set_num_threads(args.threads)

    tokenizer = load_model("hemorrhage-tiny", device="cpu").tokenizer
    seq_len = 128
    targets = Targets()
    for label, extra in CONFIGS.items():
        loaded = random_llama(
            tokenizer,
            f"random-llama-{label}",
            hidden_size=640,
            intermediate_size=1728,
            num_attention_heads=10,
            num_key_value_heads=10,
            max_position_embeddings=seq_len,
            **extra,
        )
        model = loaded.model
        params = sum(p.numel() for p in model.parameters())
        common = {"model": loaded.spec, "tokens": args.windows * seq_len, "seq_len": seq_len}
        harness = Harness(loaded, Settings.defaults(**common))
        print(
            f"{label} vocabulary: {params / 1e6:.0f}M parameters, {len(harness.windows.eval)} "
            f"windows of {seq_len}, auto batch {harness.batch_size} windows, peak RSS "
            f"{_peak_mb():.0f} MB",
            flush=True,
        )

        t0 = time.perf_counter()
        reference = harness.reference
        ref_s = time.perf_counter() - t0
        per_token = storage_bytes(reference) / len(reference.targets)
        verdict = targets.at_most(f"{label}: reference bytes per token", per_token, 1024)
        print(
            f"  reference: {per_token:.0f} bytes per token (target <= 1024: {verdict}), "
            f"{ref_s:.1f} s, "
            f"peak RSS {_peak_mb():.0f} MB",
            flush=True,
        )

        handed = []  # per batch of logits measure() scored: (weak ref to its storage, windows)
        alive = []  # windows of logits alive each time a batch is handed to the scoring
        batches = harness.batches

        def watched(*a, batches=batches, handed=handed, alive=alive, **k):
            for logits, scored in batches(*a, **k):
                handed.append((StorageWeakRef(logits.untyped_storage()), logits.shape[0]))
                alive.append(sum(n for ref, n in handed if not ref.expired()))
                yield logits, scored
                del logits  # the watcher holds none

        stages = [("decode.temperature", {"value": 1.0})]

        def measure(harness=harness, watched=watched, stages=stages):
            harness.batches = watched  # only the measure's batches are watched
            try:
                harness.measure(stages)
            finally:
                del harness.batches

        measure()  # warm-up: first-call imports and allocations, on neither side
        timing = side_by_side(
            {"bare": lambda h=harness: forward_pass(h), "measure": measure}, args.rounds
        )
        ratio = timing.ratio("measure", "bare")
        rounds = [r["measure"] / r["bare"] for r in timing.each_round()]
        most = max(alive)
        mb = most * (seq_len - 1) * harness.vocab * 4 / 2**20
        verdict = targets.at_most(f"{label}: measure/bare forward", ratio, 1.15)
        print(
            f"  measure() {timing.median('measure'):.1f} s / bare forward "
            f"{timing.median('bare'):.1f} s (medians of {args.rounds} rounds, "
            f"{torch.get_num_threads()} thread(s)): ratio {ratio:.2f} "
            f"(rounds {', '.join(f'{r:.2f}' for r in rounds)}; target <= 1.15: {verdict}); "
            "most windows "
            f"of logits alive at once {most} ({mb:.0f} MB; auto batch bound "
            f"{harness.batch_size}), peak RSS {_peak_mb():.0f} MB",
            flush=True,
        )

        del harness, measure, timing  # the next harness's memory is measured
        common["tokens"] = args.early_windows * seq_len
        harness = Harness(loaded, Settings.defaults(**common))
        early = Harness(loaded, Settings.defaults(**common, early_stop=True))
        early.__dict__["reference"] = harness.reference
        stages = [("quant.rtn", {"bits": 8})]
        t0 = time.perf_counter()
        full = harness.measure(stages)
        full_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        stopped = early.measure(stages, budget=Budget({"kl_mean": 4 * full.metrics["kl_mean"]}))
        early_s = time.perf_counter() - t0
        info = stopped.details["early_stop"]
        share = stopped.tokens / full.tokens
        verdict = targets.at_most(f"{label}: early stop, tokens used", share, 0.25)
        print(
            f"  early stop, clear verdict (rtn8, budget 4x kl_mean {full.metrics['kl_mean']:.2e}"
            f", {len(harness.windows.eval)} windows): {stopped.tokens}/{full.tokens} tokens = "
            f"{share:.3f} (target <= 0.25: {verdict}), {early_s:.1f} s vs {full_s:.1f} s; "
            f"{info['reason']}",
            flush=True,
        )
        del model, loaded, harness, early
    targets.finish()


if __name__ == "__main__":
    main()
