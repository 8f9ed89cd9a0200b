"""The compact reference's KL error on a trained 32k-vocabulary model (issue 12, item 1).

``benchmarks/bench_reference.py`` measures the storage on a stand-in (the bundled model's
512-token distributions split into 32k/128k Zipf parts). This one measures it on a realistic
distribution: a small Llama trained here, with a 32,000-token byte-level BPE vocabulary, on the
bundled corpus.

1. Tokenizer: byte-level BPE (``tokenizers``) trained on ``assets/corpus/train.txt`` with
   vocab_size 32,000. The corpus yields fewer merges than that (every pre-tokenized word
   becomes one token first), so the rest of the 32,000 are reserved special tokens
   (``<|reserved_N|>``, as Llama 3 reserves its own): the model's head has 32,000 outputs, the
   reserved ones never seen in training, like a real model's unused tokens.
2. Model: LlamaForCausalLM (hidden 128, 2 layers, tied 32k head), initialized and trained from
   our own seeded generators (global RNG untouched) for a fixed number of AdamW steps; the
   validation perplexity is printed against the add-one unigram's. Cached under ``--cache``
   (keyed by the corpus and the recipe), so reruns skip the tokenizer and the training.
3. Per modification, through Harness.measure on the first ``--windows`` windows of valid.txt
   (default 64: the plugin's default 8,192 tokens): the compact storage (the default top-K)
   against the exact one (``topk`` = vocabulary: every probability in float32) and against
   KL computed in float64 from the full logits (the truth: float32 log-probs round by ~1e-7
   nats per entry, which a kl_mean of ~1e-6 feels). Printed: bytes per token of each storage,
   the mass the top K cover, kl_mean truth, the exact storage's relative error, the compact
   storage's kl_mean and relative error (target: within 1%), its spread over ``--seeds``
   tail-sampling seeds (mean, sd, largest |error|; seed 0 is the harness's own), the error with
   FORMAT 4's head (the log-probs themselves in float16, same draws) and with the tail taken
   as one outcome (no tail samples), and whether ppl_increase, nll_increase,
   top1_disagreement and delta_p_mean are identical between the two storages. The first
   row, an unmodified model (temperature 1.0), shows each storage's floor in nats.

The 128k case is not trained (its distribution would not be realistic: see bench_reference.py
for the Zipf stand-in); its bytes per token are printed, which do not depend on the
distribution.

Exits non-zero when the target is missed.

Run: python -m benchmarks.bench_reference_bpe [--cache DIR] [--windows 64] [--seeds 3] [--steps 500]
(first run ~10 min on 2 busy cores, most of it training; then ~2-3 min)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path

from benchmarks.common import ROOT, Targets

VOCAB = 32_000
EOS = "<|endoftext|>"
SEQ_LEN = 128
SEED = 0
MODEL = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}
BATCH = 8  # windows of SEQ_LEN per training step
PEAK_LR = 5e-3
WARMUP = 0.1  # share of the steps
MODIFICATIONS = [
    ("quant.rtn", {"bits": 8}),
    ("quant.rtn", {"bits": 4}),
    ("quant.rtn", {"bits": 3}),
    ("prune.magnitude", {"sparsity": 0.3}),
    ("prune.magnitude", {"sparsity": 0.5}),
    ("decode.temperature", {"value": 1.3}),
]
EXACT_NAMES = ("ppl_increase", "nll_increase", "top1_disagreement", "delta_p_mean")
CORPUS = ROOT / "pytest_hemorrhage" / "assets" / "corpus"


def train_tokenizer(text: str):
    """Byte-level BPE with VOCAB entries: the corpus's merges, then reserved tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        min_frequency=0,  # every merge the corpus has: as many learned tokens as it yields
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.split("\n\n"), trainer=trainer)
    learned = tok.get_vocab_size()
    tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(VOCAB - learned)])
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=EOS,
        model_max_length=MODEL["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    return fast, learned


def encode(tokenizer, text: str):
    import torch

    return torch.tensor(tokenizer.backend_tokenizer.encode(text).ids, dtype=torch.long)


def perplexity(model, ids) -> float:
    """Token-level perplexity over non-overlapping SEQ_LEN windows of ``ids``."""
    import torch

    n = len(ids) // SEQ_LEN
    windows = ids[: n * SEQ_LEN].view(n, SEQ_LEN)
    total = 0.0
    with torch.inference_mode():
        for rows in windows.split(16):
            logits = model(input_ids=rows, use_cache=False).logits[:, :-1].float()
            total += torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), rows[:, 1:].flatten(), reduction="sum"
            ).item()
    return math.exp(total / (n * (SEQ_LEN - 1)))


def train_model(train_ids, steps: int):
    """The Llama trained from seeded generators only: init, batches (no dropout)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, **MODEL)
    model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    matrices = [p for p in model.parameters() if p.dim() > 1]
    vectors = [p for p in model.parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0}],
        lr=PEAK_LR,
        betas=(0.9, 0.95),
    )
    warmup = max(1, int(WARMUP * steps))
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        progress = max(0.0, (step - warmup) / max(1, steps - warmup))
        lr = PEAK_LR * min((step + 1) / warmup, 0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(train_ids) - SEQ_LEN, (BATCH,), generator=gen)
        batch = torch.stack([train_ids[s : s + SEQ_LEN] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 25 == 0 or step + 1 == steps:
            print(
                f"  step {step + 1}/{steps} loss {loss.item():.3f} "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    return model.eval()


def trained(cache: Path, steps: int) -> tuple[Path, dict]:
    """The cached model directory for this corpus and recipe, trained first if absent."""
    import torch

    text = (CORPUS / "train.txt").read_text(encoding="utf-8")
    valid = (CORPUS / "valid.txt").read_text(encoding="utf-8")
    recipe = json.dumps([VOCAB, MODEL, BATCH, PEAK_LR, WARMUP, SEED, steps, torch.__version__])
    key = hashlib.blake2b((recipe + text + valid).encode(), digest_size=8).hexdigest()
    where = cache / key
    stamp = where / "bench.json"
    if stamp.exists():
        return where, json.loads(stamp.read_text())
    t0 = time.perf_counter()
    tokenizer, learned = train_tokenizer(text)
    train_ids, valid_ids = encode(tokenizer, text), encode(tokenizer, valid)
    print(
        f"training: BPE {learned} learned tokens + {VOCAB - learned} reserved = {VOCAB}; "
        f"{len(train_ids)} training tokens, {steps} steps of {BATCH}x{SEQ_LEN}",
        flush=True,
    )
    model = train_model(train_ids, steps)
    counts = torch.bincount(train_ids, minlength=VOCAB).double() + 1  # add-one unigram
    unigram = math.exp(-(counts / counts.sum()).log()[valid_ids].mean().item())
    info = {
        "learned": learned,
        "valid_ppl": perplexity(model, valid_ids),
        "unigram_ppl": unigram,
        "train_tokens": len(train_ids),
        "train_s": time.perf_counter() - t0,
        "threads": torch.get_num_threads(),
    }
    model.save_pretrained(where)
    tokenizer.save_pretrained(where)
    stamp.write_text(json.dumps(info))  # last: a half-written directory is trained again
    return where, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--cache", type=Path, default=Path.home() / ".cache/pytest-hemorrhage/bench-bpe32k"
    )
    parser.add_argument("--windows", type=int, default=64, help="evaluation windows of 128")
    parser.add_argument("--steps", type=int, default=500, help="training steps")
    parser.add_argument("--seeds", type=int, default=3, help="tail-sampling seeds for the spread")
    args = parser.parse_args()

    import torch

    from pytest_hemorrhage.harness import Harness
    from pytest_hemorrhage.loading import load_model
    from pytest_hemorrhage.metrics import token_stats
    from pytest_hemorrhage.reference import DEFAULT_TOPK, Reference, storage_bytes
    from pytest_hemorrhage.settings import Settings

    where, info = trained(args.cache, args.steps)
    print(
        f"model {where}: BPE vocabulary {VOCAB} ({info['learned']} learned from the corpus, "
        f"the rest reserved), {info['train_tokens']} training tokens, trained in "
        f"{info['train_s']:.0f} s on {info['threads']} threads; validation perplexity "
        f"{info['valid_ppl']:.1f} vs add-one unigram {info['unigram_ppl']:.1f}",
        flush=True,
    )
    loaded = load_model(str(where), device="cpu")
    common = {"model": loaded.spec, "tokens": args.windows * SEQ_LEN, "seq_len": SEQ_LEN}
    compact = Harness(loaded, Settings.defaults(**common))
    exact = Harness(loaded, Settings.defaults(**common, topk=VOCAB))
    assert compact.vocab == VOCAB and compact.topk == DEFAULT_TOPK and exact.topk == VOCAB
    n = len(compact.reference.targets)
    per_token = {h: storage_bytes(h.reference) / n for h in (compact, exact)}
    covered = 1 - compact.reference.tail_mass.double().mean().item()
    print(
        f"{n} scored tokens ({args.windows} windows of valid.txt); bytes per token: compact "
        f"{per_token[compact]:.0f}, exact {per_token[exact]:.0f}; the top {DEFAULT_TOPK} cover "
        f"{covered:.3f} of the mass on average",
        flush=True,
    )
    # per batch: the baseline's logits, and compact references drawn with other seeds (the
    # harness's own is seed 0) and with no tail samples (the tail as one outcome); each draw
    # sorts every row's tail, the slowest step here
    base = [lg.float().flatten(0, 1) for lg, *_ in compact.chunks()]
    targets = [t for _, t, *_ in compact.chunks()]

    def build(**kwargs):
        return [
            Reference.from_logprobs(torch.log_softmax(lg, -1), t, DEFAULT_TOPK, **kwargs)
            for lg, t in zip(base, targets, strict=True)
        ]

    drawn = [build(seed=seed) for seed in range(1, args.seeds)]
    one = build(tail_samples=0)
    # FORMAT 4's head: the log-probs themselves in float16 (the harness's draws otherwise)
    f16, row = [], 0
    for lg in base:
        ref = compact.reference.rows(row, row + len(lg))
        row += len(lg)
        values = torch.log_softmax(lg, -1).gather(-1, ref.topk_idx.long())
        f16.append(dataclasses.replace(ref, topk_logp=values.half().float()))

    print(
        f"\n{'modification':<32} {'kl truth':>10} {'exact err':>9} {'compact':>10} {'rel err':>8} "
        f"{f'over {args.seeds} seeds':>20} {'f16 head':>8} {'1-outcome':>9} {'exact metrics':>13}"
    )
    worst = 0.0
    for name, params in [("decode.temperature", {"value": 1.0}), *MODIFICATIONS]:
        stages = [(name, params)]
        r_compact, r_exact = compact.measure(stages), exact.measure(stages)
        truth, seeds, grouped, rounded = [], [[] for _ in drawn], [], []
        with compact.modified(stages) as patch:
            batches = compact.chunks(patch.logits_processors)
            for b, (logits, *_) in enumerate(batches):
                logits = logits.flatten(0, 1)
                # from the logits: float32 log-probs moved a 6e-7-nat kl_mean by 1.6%
                lp = torch.log_softmax(base[b].double(), -1)
                lq = torch.log_softmax(logits.double(), -1)
                truth.append((lp.exp() * (lp - lq)).sum(-1))
                del lp, lq
                for s, refs in enumerate(drawn):
                    seeds[s].append(token_stats(logits, refs[b]).kl)
                grouped.append(token_stats(logits, one[b]).kl)
                rounded.append(token_stats(logits, f16[b]).kl)
        kl_truth = torch.cat(truth).mean().item()
        label = name + "(" + ", ".join(f"{k}={v}" for k, v in params.items()) + ")"
        same = all(r_compact.metrics[k] == r_exact.metrics[k] for k in EXACT_NAMES)
        diff = max(abs(r_compact.metrics[k] - r_exact.metrics[k]) for k in EXACT_NAMES)
        verdict = "identical" if same else f"diff {diff:.1e}"
        kl_f16 = torch.cat(rounded).double().mean().item()
        if kl_truth == 0:  # the unmodified model: the storage's floor, in nats
            print(
                f"{label:<32} {0:10.1e} {r_exact.metrics['kl_mean']:9.1e} "
                f"{r_compact.metrics['kl_mean']:10.1e} {'(floor)':>8} {'':>20} {kl_f16:8.1e} "
                f"{'':>9} {verdict:>13}",
                flush=True,
            )
            continue
        err = r_compact.metrics["kl_mean"] / kl_truth - 1
        others = [torch.cat(s).double().mean().item() / kl_truth - 1 for s in seeds]
        errs = torch.tensor([err, *others])
        worst = max(worst, errs.abs().max().item())
        one_err = torch.cat(grouped).double().mean().item() / kl_truth - 1
        spread = f"{errs.mean():+.2%}±{errs.std():.2%} max {errs.abs().max():.2%}"
        print(
            f"{label:<32} {kl_truth:10.4e} {r_exact.metrics['kl_mean'] / kl_truth - 1:+9.2%} "
            f"{r_compact.metrics['kl_mean']:10.4e} {err:+8.2%} {spread:>20} "
            f"{kl_f16 / kl_truth - 1:+8.2%} {one_err:+9.2%} "
            f"{verdict:>13}",
            flush=True,
        )
    targets = Targets()
    verdict = targets.at_most("largest |relative error| of the compact kl_mean", worst, 0.01)
    print(
        f"\nlargest |relative error| of the compact kl_mean, any seed: {worst:.2%} "
        f"(target <= 1%: {verdict})"
    )
    rows = torch.log_softmax(
        torch.randn(4, 128_256, generator=torch.Generator().manual_seed(SEED)), -1
    )
    big = Reference.from_logprobs(rows, rows.argmax(-1), DEFAULT_TOPK)
    print(
        f"128,256 vocabulary: {storage_bytes(big) / 4:.0f} bytes per token (the fields do not "
        "depend on the distribution; no model is trained at 128k here, so no KL error is "
        "claimed for it)"
    )
    targets.finish()


if __name__ == "__main__":
    main()
