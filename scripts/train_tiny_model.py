#!/usr/bin/env python
"""Train the bundled tiny Llama model (and its byte-level BPE tokenizer).

Reads ``pytest_hemorrhage/assets/corpus/{train,valid}.txt`` (built by
``scripts/make_corpus.py``) and writes a ``transformers`` model directory
(config.json, generation_config.json, model.safetensors, tokenizer files,
TRAINING.md) to ``pytest_hemorrhage/assets/tiny-llama/`` by default.

Everything is deterministic: fixed seeds, ``torch.use_deterministic_algorithms``
and a fixed thread count, so running the script twice on the same machine gives
bit-identical weights.

Usage::

    python scripts/train_tiny_model.py [--steps N] [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import (  # noqa: E402
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
CORPUS_DIR = REPO_ROOT / "pytest_hemorrhage" / "assets" / "corpus"
DEFAULT_OUT = REPO_ROOT / "pytest_hemorrhage" / "assets" / "tiny-llama"

EOS = "<|endoftext|>"
VOCAB_SIZE = 512
SEQ_LEN = 128
SEED = 1234

MODEL_KW = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    hidden_act="silu",
    initializer_range=0.02,
    tie_word_embeddings=False,
    attention_bias=False,
    mlp_bias=False,
)

# The corpus is small (~280k tokens), so the model overfits quickly: with this
# schedule validation PPL is best around 700 steps (~9 epochs) and gets worse
# with longer training (1200 steps: 16.4, 1600: 22.3, 2000: 30.6).
DEFAULT_STEPS = 700
BATCH_SIZE = 32
PEAK_LR = 3e-3
MIN_LR_RATIO = 0.1
WARMUP_STEPS = 100
WEIGHT_DECAY = 0.1
BETAS = (0.9, 0.95)
GRAD_CLIP = 1.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(2)


# --------------------------------------------------------------------------- tokenizer
def train_tokenizer(train_text: str) -> PreTrainedTokenizerFast:
    """Byte-level BPE: 1 special token + 256 byte symbols + 255 merges = 512."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Paragraph-sized chunks keep the word counts identical to whole-file training.
    tok.train_from_iterator(train_text.split("\n\n"), trainer=trainer)
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    assert tok.token_to_id(EOS) == 0
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=EOS,
        model_max_length=MODEL_KW["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )


def encode(tokenizer: PreTrainedTokenizerFast, text: str) -> torch.Tensor:
    # The backend tokenizer avoids the "longer than model_max_length" warning;
    # it is what tokenizer(text, add_special_tokens=False) does.
    ids = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------- eval
@torch.no_grad()
def perplexity(model: LlamaForCausalLM, ids: torch.Tensor, seq_len: int = SEQ_LEN) -> float:
    """Token-level PPL over non-overlapping windows; every next-token position is scored."""
    model.eval()
    total_nll, total_tokens = 0.0, 0
    n_full = len(ids) // seq_len
    batches = [ids[: n_full * seq_len].view(n_full, seq_len)]
    if len(ids) - n_full * seq_len >= 2:
        batches.append(ids[n_full * seq_len :][None])  # trailing partial window
    for batch in batches:
        for rows in batch.split(16):
            logits = model(input_ids=rows, use_cache=False).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), rows[:, 1:].reshape(-1), reduction="sum"
            )
            total_nll += nll.item()
            total_tokens += rows[:, 1:].numel()
    return math.exp(total_nll / total_tokens)


# --------------------------------------------------------------------------- train
def lr_at(step: int, steps: int) -> float:
    if step < WARMUP_STEPS:
        return PEAK_LR * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return PEAK_LR * (MIN_LR_RATIO + (1.0 - MIN_LR_RATIO) * cosine)


def train_model(
    train_ids: torch.Tensor,
    steps: int,
    log_every: int = 100,
    valid_ids: torch.Tensor | None = None,
    eval_every: int = 0,
) -> tuple[LlamaForCausalLM, float]:
    config = LlamaConfig(
        **MODEL_KW,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        use_cache=True,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).float()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": WEIGHT_DECAY},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=PEAK_LR,
        betas=BETAS,
        eps=1e-8,
        foreach=False,
    )
    gen = torch.Generator().manual_seed(SEED)
    n_starts = len(train_ids) - SEQ_LEN - 1
    model.train()
    t0 = time.perf_counter()
    running, last_loss = 0.0, float("nan")
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps)
        starts = torch.randint(0, n_starts, (BATCH_SIZE,), generator=gen)
        batch = torch.stack([train_ids[s : s + SEQ_LEN] for s in starts.tolist()])
        out = model(input_ids=batch, labels=batch, use_cache=False)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        running += out.loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            last_loss = running / ((step % log_every) + 1)
            print(
                f"step {step + 1:5d}/{steps}  loss {last_loss:.4f}  "
                f"lr {lr_at(step, steps):.2e}  {time.perf_counter() - t0:6.1f}s",
                flush=True,
            )
            running = 0.0
        if eval_every and valid_ids is not None and (step + 1) % eval_every == 0:
            print(f"  valid ppl @ {step + 1}: {perplexity(model, valid_ids):.4f}", flush=True)
            model.train()
    model.eval()
    return model, last_loss


def unigram_perplexity(train_ids: torch.Tensor, valid_ids: torch.Tensor) -> float:
    counts = torch.bincount(train_ids, minlength=VOCAB_SIZE).double() + 1.0  # add-one
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[valid_ids].mean().item())


TRAINING_MD = """\
# tiny-llama

A deliberately tiny `LlamaForCausalLM` (RMSNorm, SwiGLU, rotary embeddings,
grouped-query attention) bundled with pytest-hemorrhage as a fast, CPU-friendly
default model. It is trained from scratch by `scripts/train_tiny_model.py` on
`pytest_hemorrhage/assets/corpus/train.txt` (docstrings of the Python standard
library, PSF license; see `../corpus/NOTICE`). It is a test fixture, not a
useful language model.

## Results

| metric | value |
|---|---|
| validation perplexity (valid.txt, {n_valid_tokens} tokens) | **{valid_ppl:.4f}** |
| unigram baseline perplexity (add-one, from train.txt) | {unigram_ppl:.2f} |
| final training loss (mean over the last {log_every} steps) | {train_loss:.4f} |
| parameters | {n_params:,} |
| safetensors SHA-256 | `{sha}` |

Validation perplexity is token-level, over non-overlapping {seq_len}-token
windows of valid.txt (the trailing partial window included), every next-token
position scored.

## Architecture

| setting | value |
|---|---|
| vocab size | {vocab_size} (byte-level BPE: `<|endoftext|>` + 256 bytes + 255 merges) |
| hidden / intermediate | {hidden_size} / {intermediate_size} |
| layers | {num_hidden_layers} |
| attention heads / key-value heads | {num_attention_heads} / {num_key_value_heads} |
| max position embeddings | {max_position_embeddings} |
| tied embeddings | no (separate `lm_head`) |
| dtype | float32 |

## Training

| setting | value |
|---|---|
| training tokens (train.txt) | {n_train_tokens} |
| steps | {steps} |
| batch | {batch_size} x {seq_len} tokens (random windows, seeded) |
| optimizer | AdamW, betas {betas}, weight decay {weight_decay} (matrices), clip {grad_clip} |
| schedule | linear warmup {warmup} steps to {peak_lr:g}, cosine decay to {min_lr:g} |
| seed | {seed}, `torch.use_deterministic_algorithms(True)`, 2 threads |
| wall time | {wall:.0f} s ({machine}, torch {torch_version}) |

The step count is set near the validation optimum: the corpus is small, and
longer runs overfit (same schedule, validation PPL 13.46 at 700 steps, 13.69 at
800, 14.17 at 900, 16.43 at 1200, 22.25 at 1600, 30.64 at 2000 steps).

Reproduce with:

    python scripts/make_corpus.py
    python scripts/train_tiny_model.py --steps {steps}
"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--corpus", type=Path, default=CORPUS_DIR)
    ap.add_argument(
        "--eval-every", type=int, default=0, help="also print validation PPL every N steps"
    )
    args = ap.parse_args(argv)

    seed_everything(SEED)
    t_start = time.perf_counter()
    train_text = (args.corpus / "train.txt").read_text(encoding="ascii")
    valid_text = (args.corpus / "valid.txt").read_text(encoding="ascii")

    tokenizer = train_tokenizer(train_text)
    train_ids = encode(tokenizer, train_text)
    valid_ids = encode(tokenizer, valid_text)
    print(
        f"tokenizer: vocab {len(tokenizer)}; train {len(train_ids)} tokens "
        f"({len(train_text) / len(train_ids):.2f} chars/token), valid {len(valid_ids)} tokens"
    )

    model, train_loss = train_model(
        train_ids, args.steps, valid_ids=valid_ids, eval_every=args.eval_every
    )
    wall = time.perf_counter() - t_start
    n_params = sum(p.numel() for p in model.parameters())

    valid_ppl = perplexity(model, valid_ids)
    unigram_ppl = unigram_perplexity(train_ids, valid_ids)
    print(f"parameters: {n_params:,}")
    print(f"validation perplexity: {valid_ppl:.4f}  (unigram baseline {unigram_ppl:.2f})")
    print(f"wall time: {wall:.1f}s")

    args.out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=0, eos_token_id=0, pad_token_id=0, do_sample=False, max_new_tokens=64
    )
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    # transformers 5 writes its own class name ("TokenizersBackend"); the generic
    # name loads the same tokenizer there and is also understood by transformers 4.x.
    tok_cfg_path = args.out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text(encoding="utf-8"))
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    sha = hashlib.sha256((args.out / "model.safetensors").read_bytes()).hexdigest()
    (args.out / "TRAINING.md").write_text(
        TRAINING_MD.format(
            n_valid_tokens=len(valid_ids),
            n_train_tokens=len(train_ids),
            seq_len=SEQ_LEN,
            valid_ppl=valid_ppl,
            train_loss=train_loss,
            log_every=100,
            unigram_ppl=unigram_ppl,
            n_params=n_params,
            sha=sha,
            steps=args.steps,
            batch_size=BATCH_SIZE,
            betas=BETAS,
            weight_decay=WEIGHT_DECAY,
            grad_clip=GRAD_CLIP,
            warmup=WARMUP_STEPS,
            peak_lr=PEAK_LR,
            min_lr=PEAK_LR * MIN_LR_RATIO,
            seed=SEED,
            wall=wall,
            machine=f"{platform.machine()} CPU",
            torch_version=torch.__version__,
            **{k: v for k, v in MODEL_KW.items() if isinstance(v, int)},
        ),
        encoding="utf-8",
    )
    print(f"model.safetensors sha256: {sha}")
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
