"""Long windows at a real vocabulary: a measure of one 16,384-token window of a ~100M-parameter
Llama with a 128,256-token vocabulary against the least any scorer must do (issue 22's speed
and memory targets).

The model (``CONFIG``): hidden 512, 8 layers, MLP 1,376, 8 query / 4 key-value heads, tied
embeddings (the head is the embedding matrix, as in Llama 3.2's small models), float32, on the
CPU; 88.9M parameters, 65.7M of them the embedding. One window of the bundled corpus.

  * time of ``measure`` of a stage that changes no weight (``decode.temperature`` at 1.0: the
    harness's whole path, apply to restore, and no logits processor, dividing by 1 being
    skipped) / time of the bare scorer: the decoder's forward returning hidden states, then
    the head and a log-softmax over chunks of 1,024 positions, nothing else (no targets read,
    nothing kept).
    Side by side in rounds in this process, the median of the per-round ratios. The measure's
    head runs over ``forward.chunk_rows`` positions at a time (printed): each call of the head's
    matrix product has a cost that does not shrink with the chunk (the whole head matrix read
    and packed again), so chunks much shorter than the bare scorer's cost more head time.
    Target: <= 1.15x.
  * peak resident memory of that measure in a fresh process, above what it holds before it
    (the model and the reference; a measure runs without a KV cache), with glibc returning
    freed tensors at once (``common.FREED_AT_ONCE``). Target: <= 0.5 GB (the logits of the
    whole window would be 16,384 x 128,256 x 4 B = 8.4 GB, printed for contrast).
  * the reference's bytes per scored token (``reference.storage_bytes``), built chunk by chunk
    before the timing (its time printed). Target: <= 1,024 B.
  * ``quant.kv_cache`` (4 bits, chunks of 64 and of 1,024 tokens: the least chunk the target
    names and a long one) / the same plain measure, side by side. Target: <= 2x.

One thread (steadier side-by-side ratios on a shared machine, as bench_core). Exits non-zero
when a target is missed.

Run: python -m benchmarks.bench_long_context [--quick] [--seq-len 16384] [--rounds 3]
    (--quick: a 4,096-token window, 2 rounds)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks.common import FREED_AT_ONCE, PeakMeter, Targets, in_fresh_process, side_by_side

VOCAB = 128_256
CONFIG = {
    "vocab_size": VOCAB,
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "tie_word_embeddings": True,
}
BARE_CHUNK = 1024  # positions per head chunk of the bare scorer (the yardstick)
PLAIN = [("decode.temperature", {"value": 1.0})]  # the whole measure path, no weight changed
KV_CHUNKS = (64, 1024)  # quant.kv_cache's chunks, 4 bits
GB = 1e9


def _harness(seq_len: int, cache: Path):
    """The harness over one ``seq_len``-token window of the model (the same weights in every
    process: the reference cached in ``cache`` by one is found by the others)."""
    import torch

    from benchmarks.models import random_llama
    from pytest_hemorrhage.harness import Harness
    from pytest_hemorrhage.loading import load_model
    from pytest_hemorrhage.settings import Settings

    torch.set_num_threads(1)
    tokenizer = load_model("hemorrhage-tiny", device="cpu").tokenizer
    loaded = random_llama(tokenizer, "random-100m-128k", **CONFIG, max_position_embeddings=seq_len)
    settings = Settings.defaults(
        model=loaded.spec,
        seq_len=seq_len,
        tokens=seq_len,
        cache_dir=cache,
        calibration_windows=0,
    )
    return Harness(loaded, settings)


def bare_scorer(model, windows, batch: int) -> None:
    """The least any scorer must do: the body's hidden states, then the head and a
    log-softmax over :data:`BARE_CHUNK` positions at a time (the last position predicts
    nothing)."""
    import torch

    body, head = model.get_decoder(), model.get_output_embeddings()
    with torch.inference_mode():
        for ids in windows.split(batch):
            hidden = body(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
            for start in range(0, hidden.shape[1], BARE_CHUNK):
                torch.log_softmax(head(hidden[:, start : start + BARE_CHUNK]).float(), -1)


def peak(seq_len: int, cache: Path) -> dict[str, float]:
    """In this fresh process: the growth of peak resident memory over one plain measure, the
    model and its (cached) reference loaded before."""
    harness = _harness(seq_len, cache)
    harness.reference  # noqa: B018  (loaded from the cache the timing process filled)
    meter = PeakMeter()
    meter.start()
    harness.measure(PLAIN)
    return {"peak": meter.peak(), "cached": harness.reference_cached}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a 4,096-token window, 2 rounds")
    parser.add_argument("--peak", nargs=2, help=argparse.SUPPRESS)  # internal: JSON out
    args = parser.parse_args()
    if args.peak:
        print(json.dumps(peak(int(args.peak[0]), Path(args.peak[1]))))
        return
    if args.quick:
        args.seq_len, args.rounds = 4096, 2

    from benchmarks.common import model_bytes
    from pytest_hemorrhage.forward import chunk_rows
    from pytest_hemorrhage.reference import storage_bytes

    targets = Targets()
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        harness = _harness(args.seq_len, cache)
        model = harness.model
        params = sum(p.numel() for p in model.parameters())
        windows, seq = harness.windows.eval.shape
        print(
            f"model: {params / 1e6:.1f}M parameters ({model_bytes(model) / GB:.2f} GB float32, "
            f"tied embeddings), vocabulary {VOCAB:,}; {windows} window(s) of {seq:,} tokens, "
            f"batch {harness.batch_size}; 1 thread; {args.rounds} rounds"
        )

        start = time.perf_counter()
        reference = harness.reference
        built = time.perf_counter() - start
        per_token = storage_bytes(reference) / len(reference.targets)
        verdict = targets.at_most("reference B/token", per_token, 1024)
        print(
            f"reference: built in {built:.1f} s, top-{harness.topk}, {per_token:.0f} B per "
            f"scored token (target <= 1024: {verdict})"
        )

        got = in_fresh_process(
            __spec__.name, "--peak", str(args.seq_len), str(cache), env=FREED_AT_ONCE
        )
        whole = windows * (seq - 1) * VOCAB * 4
        verdict = targets.at_most("measure peak beyond the model, GB", got["peak"] / GB, 0.5)
        print(
            f"peak memory of a measure beyond the model and reference: {got['peak'] / GB:.3f} "
            f"GB (target <= 0.5: {verdict}; reference from the cache: {got['cached']}); the "
            f"whole window's logits alone would take {whole / GB:.1f} GB"
        )

        ids = harness.windows.eval
        batch = harness.batch_size
        harness.measure(PLAIN)  # warm: lazy imports, the decoding stage's first use
        timing = side_by_side(
            {
                "bare": lambda: bare_scorer(model, ids, batch),
                "measure": lambda: harness.measure(PLAIN),
            }
            | {
                f"kv_cache {c}": lambda c=c: harness.measure(
                    [("quant.kv_cache", {"bits": 4, "chunk": c})]
                )
                for c in KV_CHUNKS
            },
            args.rounds,
        )
        ratio = timing.ratio("measure", "bare")
        verdict = targets.at_most("measure / bare scorer", ratio, 1.15)
        print(
            f"bare scorer (body, then head + log-softmax over {BARE_CHUNK}-position chunks) "
            f"{timing.median('bare'):.1f} s, measure ({PLAIN[0][0]}) "
            f"{timing.median('measure'):.1f} s, its head over {chunk_rows(VOCAB)}-position "
            f"chunks -> {ratio:.3f}x (target <= 1.15x: {verdict}); "
            f"per round: {', '.join(f'{s:.1f}' for s in timing.seconds['measure'])} s vs "
            f"{', '.join(f'{s:.1f}' for s in timing.seconds['bare'])} s"
        )
        for c in KV_CHUNKS:
            ratio = timing.ratio(f"kv_cache {c}", "measure")
            verdict = targets.at_most(f"quant.kv_cache chunk {c} / plain measure", ratio, 2.0)
            print(
                f"quant.kv_cache, 4 bits, chunk {c}: {timing.median(f'kv_cache {c}'):.1f} s -> "
                f"{ratio:.2f}x the plain measure (target <= 2x: {verdict})"
            )
    targets.finish()


if __name__ == "__main__":
    main()
