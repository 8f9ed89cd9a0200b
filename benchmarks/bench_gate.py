"""Gating shipped artifacts: cost of measure_model, memory of reference-only gating, and the
reference file's size, side by side in one run (issue 9's targets).

  * time of ``measure_model`` of a loaded candidate / time of one bare forward pass of the same
    candidate over the same evaluation windows (inference mode, the harness's batches), the
    median over 7 rounds of the two back to back. Target: <= 1.15x.
  * peak resident memory of a reference-only gate (reference file + candidate + measure, the
    baseline never loaded) / peak of loading the candidate alone, each in a fresh process
    after the same imports (``common.PeakMeter``: the kernel's high-water mark), on a
    ~26M-parameter random-init Llama with the bundled tokenizer (the live run, baseline loaded
    too, is shown for contrast). Target: <= 1.25x.
  * reference file bytes per evaluation token, for the bundled model (512-token vocabulary,
    exact storage) and for a 32k vocabulary (top-K storage, Zipf-shaped logits), with the
    relative error of kl_mean that top-K storage implies there. Target: <= 1 KB per token at 32k
    (the vocabulary aside: a file stores it once).

Exits non-zero when a target is missed.

Run: python -m benchmarks.bench_gate
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

from benchmarks.common import (
    ROOT,
    PeakMeter,
    Targets,
    forward_pass,
    in_fresh_process,
    side_by_side,
)
from benchmarks.models import random_llama


def speed(candidate_dir: Path, targets: Targets) -> None:
    from pytest_hemorrhage.candidates import load_candidate
    from pytest_hemorrhage.harness import Harness
    from pytest_hemorrhage.loading import load_model
    from pytest_hemorrhage.settings import Settings

    base = load_model("hemorrhage-tiny", device="cpu")
    harness = Harness(base, Settings.defaults(model="hemorrhage-tiny", device="cpu"))
    _ = harness.reference
    cand = load_candidate(str(candidate_dir), device="cpu")
    params = {"label": "bench"}

    harness.measure_model(cand, params)  # warm
    timing = side_by_side(
        {
            "bare": lambda: forward_pass(harness, model=cand.model),
            "measure": lambda: harness.measure_model(cand, params),
        },
        7,
    )
    ratio = timing.ratio("measure", "bare")
    verdict = targets.at_most(f"{candidate_dir.name}: measure_model/forward", ratio, 1.15)
    print(
        f"{candidate_dir.name}: measure_model {timing.median('measure') * 1e3:.1f} ms, bare "
        f"forward {timing.median('bare') * 1e3:.1f} ms over {harness.windows.eval.numel()} "
        f"tokens -> {ratio:.2f}x (target <= 1.15x: {verdict})"
    )


def peak(mode: str, base: str, cand: str, ref: str) -> int:
    """Peak resident memory of one way to gate (in this fresh process) above its imports."""
    import torch
    import transformers  # noqa: F401  (the same imports in every process)

    from pytest_hemorrhage.candidates import load_candidate
    from pytest_hemorrhage.data import make_windows, read_text
    from pytest_hemorrhage.harness import Harness, auto_batch
    from pytest_hemorrhage.loading import load_model, model_logits
    from pytest_hemorrhage.reference_file import AbsentBaseline, PortableReference
    from pytest_hemorrhage.settings import Settings

    meter = PeakMeter()
    meter.start()
    settings = Settings.defaults(model=None if mode == "reference" else base, device="cpu")
    if mode == "candidate":  # its own footprint in use: loaded, one forward pass over the windows
        loaded = load_candidate(cand, device="cpu")
        ids = make_windows(
            loaded.tokenizer, read_text(None), seq_len=settings.seq_len, tokens=settings.tokens
        ).eval
        batch = auto_batch(settings.seq_len, 512)
        with torch.inference_mode():
            for i in range(0, len(ids), batch):
                model_logits(loaded.model, ids[i : i + batch])
    elif mode == "reference":
        portable = PortableReference.load(ref)
        stand_in = AbsentBaseline("base", portable.baseline["fingerprint"], torch.device("cpu"))
        harness = Harness(stand_in, settings, portable)
        harness.measure_model(load_candidate(cand, device="cpu"), {})
    else:
        harness = Harness(load_model(base, device="cpu"), settings)
        harness.measure_model(load_candidate(cand, device="cpu"), {})
    return meter.peak()


def _peak(mode: str, base: Path, cand: Path, ref: Path) -> int:
    return in_fresh_process(__spec__.name, "--peak", mode, str(base), str(cand), str(ref))


def memory(folder: Path, targets: Targets) -> None:
    import torch

    from pytest_hemorrhage.data import read_text
    from pytest_hemorrhage.harness import Harness
    from pytest_hemorrhage.loading import BUNDLED_MODEL, load_model
    from pytest_hemorrhage.reference_file import PortableReference, text_hash, vocab_list
    from pytest_hemorrhage.settings import Settings

    tiny = load_model("hemorrhage-tiny", device="cpu")
    model = random_llama(
        tiny.tokenizer,
        "random-26m",
        vocab_size=512,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
    ).model
    generator = torch.Generator().manual_seed(1)  # the candidate's perturbation
    model.save_pretrained(folder / "base")
    tiny.tokenizer.save_pretrained(folder / "base")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.002)
    model.save_pretrained(folder / "cand")
    tiny.tokenizer.save_pretrained(folder / "cand")
    params = sum(p.numel() for p in model.parameters())
    del model

    settings = Settings.defaults(model=str(folder / "base"), device="cpu")
    base = load_model(str(folder / "base"), device="cpu")
    harness = Harness(base, settings)
    ref = folder / "base.ref"
    PortableReference(
        harness.reference,
        harness.windows.eval,
        harness.vocab,
        vocab_list(base.tokenizer),
        {"spec": "base", "fingerprint": base.fingerprint},
        {
            "seq_len": settings.seq_len,
            "tokens": settings.tokens,
            "data": "bundled corpus",
            "data_hash": text_hash(read_text(None)),
            "topk": harness.topk,
        },
    ).save(ref)
    del harness, base
    assert BUNDLED_MODEL.exists()
    alone = _peak("candidate", folder / "base", folder / "cand", ref)
    only = _peak("reference", folder / "base", folder / "cand", ref)
    live = _peak("live", folder / "base", folder / "cand", ref)
    mb = 1 / 2**20
    verdict = targets.at_most("reference-only gate / candidate alone (peak)", only / alone, 1.25)
    print(
        f"peak memory above imports ({params / 1e6:.0f}M-parameter model, "
        f"{params * 4 * mb:.0f} MB of weights): candidate loaded + bare forward "
        f"{alone * mb:.0f} MB, "
        f"reference-only gate {only * mb:.0f} MB -> {only / alone:.2f}x (target <= 1.25x: "
        f"{verdict}); live gate with the baseline {live * mb:.0f} MB -> {live / alone:.2f}x"
    )


def size(folder: Path, verdicts: Targets, candidate_path: Path | None = None) -> None:
    import torch

    from pytest_hemorrhage.candidates import load_candidate
    from pytest_hemorrhage.harness import Harness
    from pytest_hemorrhage.loading import load_model
    from pytest_hemorrhage.metrics import TokenStats, summarize, token_stats
    from pytest_hemorrhage.reference import DEFAULT_TOPK, Reference
    from pytest_hemorrhage.reference_file import PortableReference, vocab_list
    from pytest_hemorrhage.settings import Settings

    tiny = load_model("hemorrhage-tiny", device="cpu")
    harness = Harness(tiny, Settings.defaults(model="hemorrhage-tiny", device="cpu"))
    path = folder / "tiny.ref"
    tokens = len(harness.reference.targets)
    bytes_ = PortableReference(
        harness.reference,
        harness.windows.eval,
        harness.vocab,
        vocab_list(tiny.tokenizer),
        {},
        {},
    ).save(path)
    print(f"reference file, bundled model (vocab 512, exact): {bytes_ / tokens:.0f} B/token")

    # 32k vocabulary: Zipf-shaped baseline logits per token, a perturbed "candidate"
    vocab, n, topk = 32000, 2048, DEFAULT_TOPK
    g = torch.Generator().manual_seed(0)
    rank = torch.arange(1, vocab + 1, dtype=torch.float32)
    logits = -1.1 * rank.log() + 0.5 * torch.randn(n, vocab, generator=g)
    logits = logits[:, torch.randperm(vocab, generator=g)]
    logp = torch.log_softmax(logits, -1)
    targets = torch.multinomial(logp.exp(), 1, generator=g).squeeze(1)
    candidate = logits + 0.3 * torch.randn(n, vocab, generator=g)
    exact = Reference.from_logprobs(logp, targets, vocab)
    compact = Reference.from_logprobs(logp, targets, topk)
    kl = {}
    for name, ref in (("exact", exact), ("topk", compact)):
        metrics, _ = summarize(TokenStats.cat([token_stats(candidate, ref)]), ref)
        kl[name] = metrics["kl_mean"]
    windows = targets.reshape(16, -1)
    big = PortableReference(compact, windows, vocab, [f"t{i}" for i in range(vocab)], {}, {})
    bytes_ = big.save(folder / "big.ref")
    vocab_bytes = PortableReference(
        Reference(*(t[:0] for t in (compact.targets, compact.target_logp, compact.top1))),
        windows[:0],
        vocab,
        [f"t{i}" for i in range(vocab)],
        {},
        {},
    ).save(folder / "vocab-only.ref")
    per_token = (bytes_ - vocab_bytes) / n  # the vocabulary is stored once per file
    verdict = verdicts.at_most("reference file at 32k, B/token", per_token, 1024)
    print(
        f"reference file, 32k vocabulary (top-{topk}, {n} tokens): {bytes_ / n:.0f} B/token, "
        f"{per_token:.0f} B/token without the vocabulary, stored once (target <= 1024: "
        f"{verdict}); kl_mean exact {kl['exact']:.5f}, top-{topk} "
        f"{kl['topk']:.5f}: "
        f"{(kl['topk'] - kl['exact']) / kl['exact']:+.2%} (mean baseline mass outside the "
        f"top-{topk}: {compact.tail_mass.mean().item():.3f})"
    )
    assert math.isfinite(kl["topk"])

    # the same top-K storage on real distributions: the bundled model (512 tokens, so the exact
    # KL is known) against its GGUF Q4_0 candidate
    if candidate_path is None:
        return
    candidate = load_candidate(str(candidate_path), device="cpu")
    sums = {"exact": 0.0, "topk": 0.0}
    tails = []
    for (logits, targets, *_), (q, *_) in zip(
        harness.chunks(), harness.chunks(model=candidate.model), strict=True
    ):
        logp = torch.log_softmax(logits.float(), -1).flatten(0, -2)
        for name, k in (("exact", harness.vocab), ("topk", topk)):
            ref = Reference.from_logprobs(logp, targets, k)
            sums[name] += token_stats(q, ref).kl.double().sum().item()
            if ref.tail_mass is not None:
                tails.append(ref.tail_mass)
    tail = torch.cat(tails).mean().item()
    print(
        f"top-{topk} on the bundled model vs its Q4_0 GGUF: kl_mean exact "
        f"{sums['exact'] / tokens:.5f}, top-{topk} {sums['topk'] / tokens:.5f}: "
        f"{(sums['topk'] - sums['exact']) / sums['exact']:+.2%} (mean mass outside the "
        f"top-{topk}: {tail:.4f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peak", nargs=4, help=argparse.SUPPRESS)  # internal: JSON out
    args = parser.parse_args()
    if args.peak:
        print(json.dumps(peak(*args.peak)))
        return

    from examples.gate.build_artifacts import build_gguf
    from pytest_hemorrhage.loading import BUNDLED_MODEL

    targets = Targets()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        q4 = build_gguf(folder / "tiny-q4_0.gguf", "Q4_0", BUNDLED_MODEL)
        speed(q4, targets)
        speed(ROOT / "examples" / "gate" / "artifacts" / "w4a16", targets)
        size(folder, targets, q4)
        memory(folder, targets)
    targets.finish()


if __name__ == "__main__":
    main()
