"""Command-line options and ini keys, parsed once into frozen Settings."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import HemorrhageError

__all__ = ["OPTIONS", "Option", "Settings"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _count(text: str) -> int:
    return 0 if text in ("0", "auto") else _positive_int(text)


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices and not (text.startswith("cuda:") and "cuda" in choices):
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(choices)}")
        return text

    return parse


@dataclass(frozen=True)
class Option:
    """One ``--hemorrhage-NAME`` option, also readable as ini key ``hemorrhage_NAME``."""

    name: str
    help: str
    default: Any = None
    type: Callable[[str], Any] | None = str
    metavar: str | None = None
    multiple: bool = False  # repeatable on the command line; one value a line in the ini

    @property
    def flag(self) -> bool:
        return self.type is None

    @property
    def ini(self) -> str:
        return "hemorrhage_" + self.name.replace("-", "_")


OPTIONS = [
    Option(
        "model",
        "Baseline model: a directory saved with save_pretrained, a hub id, "
        "package.module:factory returning a model or (model, tokenizer), or hemorrhage-tiny "
        "(the bundled model). Default: none (hemorrhage tests are skipped).",
        metavar="SPEC",
    ),
    Option(
        "data",
        "Evaluation text: a .txt file, a .jsonl file with a 'text' field, a .jsonl file of "
        "conversations ('messages', rendered with the chat template; docs/chat.md), or a "
        "directory of .txt files. Default: the bundled held-out corpus.",
        metavar="PATH",
    ),
    Option(
        "chat-template",
        "Jinja chat template file that renders chat data (a .jsonl file of 'messages'), for "
        "a baseline tokenizer without one or to try another. Default: the tokenizer's own.",
        metavar="PATH",
    ),
    Option(
        "chat-roles",
        "Roles whose tokens chat data scores, comma-separated (assistant, user, system, tool, "
        "template) or all; the other tokens are context. Default: assistant.",
        ("assistant",),
        _names,
        "ROLES",
    ),
    Option(
        "device",
        "Device for the model: auto, cpu, cuda, cuda:N or mps. Default: auto (cuda if "
        "available; under pytest-xdist with several CUDA devices, worker i gets device "
        "i mod count).",
        "auto",
        _choice("auto", "cpu", "cuda", "mps"),
        "DEVICE",
    ),
    Option(
        "device-map",
        "Spread the model over devices with accelerate: auto, balanced, or a JSON object "
        "mapping module names to devices (a GPU index, cpu or disk), e.g. "
        '\'{"model.embed_tokens": 0, "model.layers": 1, "lm_head": "cpu"}\'. '
        "Modifications that cannot act on offloaded weights are refused. Default: none.",
        metavar="MAP",
    ),
    Option(
        "dtype",
        "Weights dtype: auto, float32, float16 or bfloat16. Default: auto "
        "(float32 on CPU, the checkpoint's dtype on GPU).",
        "auto",
        _choice("auto", "float32", "float16", "bfloat16"),
        "DTYPE",
    ),
    Option(
        "seq-len",
        "Tokens per evaluation window, up to the baseline's context. Default: 128.",
        128,
        _positive_int,
        "N",
    ),
    Option(
        "beyond-context",
        "Allow windows (--hemorrhage-seq-len) longer than the baseline's context, to measure "
        "context extension (context.rope_scaling) past it; the baseline itself is then scored "
        "where it was not trained. Default: off (a longer window is a usage error).",
        type=None,
    ),
    Option(
        "tokens",
        "Evaluation budget in tokens (rounded down to whole windows). Default: 8192.",
        8192,
        _positive_int,
        "N",
    ),
    Option(
        "batch-size",
        "Windows per forward pass. Default: auto (up to 64; the head runs over position chunks).",
        0,
        _count,
        "N",
    ),
    Option(
        "topk",
        "Baseline log-probs stored per token. Default: auto (all of them up to "
        "512 tokens of vocabulary, else 124: 1 KB per token).",
        0,
        _count,
        "K",
    ),
    Option(
        "calibration-windows",
        "Windows of calibration data for data-aware modifications "
        "(wanda, gradient, smoothing), disjoint from the evaluation windows. Default: 16.",
        16,
        _positive_int,
        "N",
    ),
    Option(
        "early-stop",
        "Score windows in a seeded order and stop a measure as soon as every budgeted metric's "
        "verdict is statistically settled (at the budget's confidence, or 0.95; sequential "
        "test with alpha spending); --hemorrhage-tokens becomes the maximum. Default: off.",
        type=None,
    ),
    Option(
        "seed", "Seed for every random draw (noise, faults, sampling). Default: 0.", 0, int, "N"
    ),
    Option("report", "Write the JSON report to PATH. Default: no report.", metavar="PATH"),
    Option(
        "html",
        "Write the release report, one self-contained HTML page, to PATH. Default: none.",
        metavar="PATH",
    ),
    Option(
        "plot",
        "Write PNGs into DIR (needs matplotlib): each measured curve, each failed check's blame, "
        "each result's metrics by position. Default: no plots.",
        metavar="DIR",
    ),
    Option(
        "generate",
        "Also compute the generation metrics (gen_mismatch, "
        "gen_first_divergence) for every measure, not only when a budget names them.",
        type=None,
    ),
    Option(
        "gen-prompts",
        "Prompts for the generation metrics, drawn evenly from the evaluation text. Default: 16.",
        16,
        _positive_int,
        "N",
    ),
    Option(
        "gen-prompt-tokens", "Tokens per generation prompt. Default: 32.", 32, _positive_int, "N"
    ),
    Option("gen-tokens", "Tokens generated per prompt. Default: 32.", 32, _positive_int, "N"),
    Option(
        "tasks",
        "Multiple-choice task file(s) (.jsonl with context, choices, answer), "
        "comma-separated, each a named task. Default: none (the bundled cloze task when a "
        "budget names a task metric).",
        metavar="PATHS",
    ),
    Option(
        "cache-dir",
        "Where baseline references are cached. Default: .hemorrhage_cache beside .pytest_cache.",
        metavar="DIR",
    ),
    Option(
        "no-cache",
        "Compute the baseline reference without reading or writing the cache.",
        type=None,
    ),
    Option(
        "candidate",
        "A separately produced model to gate against the baseline (repeatable; ini: one a "
        "line): a .gguf file, a directory saved with save_pretrained (quantized checkpoints load "
        "through their quantization_config), a hub id or package.module:factory. Tests that "
        "use the hemorrhage_candidate fixture run once per candidate.",
        (),
        metavar="SPEC",
        multiple=True,
    ),
    Option(
        "gguf-runtime",
        "What runs a .gguf candidate: llama.cpp (in-process, llama-cpp-python: the file as "
        "users run it, activations rounded by its kernels), transformers (its dequantized "
        "weights in float), or auto (llama.cpp when installed). Every result names the "
        "runtime. Default: auto.",
        "auto",
        _choice("auto", "llama.cpp", "transformers"),
        "NAME",
    ),
    Option(
        "save-reference",
        "Write the baseline's reference for this data and these settings to PATH, for "
        "--hemorrhage-reference runs without the baseline model.",
        metavar="PATH",
    ),
    Option(
        "reference",
        "Use the reference saved in PATH by --hemorrhage-save-reference; --hemorrhage-model "
        "becomes optional (without it, candidates are gated and baseline tests are skipped).",
        metavar="PATH",
    ),
    Option(
        "compare",
        "Compare every result with the matching one (test id, modification, params; candidates "
        "by label) of an earlier JSON report, e.g. the last release's.",
        metavar="REPORT",
    ),
    Option(
        "compare-fail",
        "Fail a compared result that worsened beyond these increases, comma-separated: "
        "metric:N% (relative) or metric:X (absolute), e.g. kl_mean:10%,top1_disagreement:0.005.",
        metavar="EXPR",
    ),
    Option(
        "trust-remote-code", "Allow a hub model's own Python code to run when loading.", type=None
    ),
    Option(
        "allow-pickle", "Allow loading pickle (*.bin) checkpoints, which can run code.", type=None
    ),
]


@dataclass(frozen=True)
class Settings:
    """Everything the options and ini keys decide for one run."""

    model: str | None
    data: Path | None
    chat_template: Path | None
    chat_roles: tuple[str, ...]
    device: str
    device_map: str | None
    dtype: str
    seq_len: int
    beyond_context: bool
    tokens: int
    batch_size: int
    topk: int
    calibration_windows: int
    early_stop: bool
    seed: int
    report: Path | None
    html: Path | None
    plot: Path | None
    generate: bool
    gen_prompts: int
    gen_prompt_tokens: int
    gen_tokens: int
    tasks: tuple[Path, ...]
    candidate: tuple[str, ...]
    gguf_runtime: str
    save_reference: Path | None
    reference: Path | None
    compare: Path | None
    compare_fail: str | None
    cache_dir: Path | None
    trust_remote_code: bool
    allow_pickle: bool
    budget: str  # the ini default budget, e.g. "ppl_increase=0.05 kl_mean=0.02"

    @classmethod
    def defaults(cls, **overrides: Any) -> Settings:
        """The command-line defaults with ``overrides``, for use outside pytest."""
        values = {o.name.replace("-", "_"): (False if o.flag else o.default) for o in OPTIONS}
        values.pop("no_cache")
        values.update(tasks=(), budget="", cache_dir=None)
        return cls(**{**values, **overrides})

    @classmethod
    def from_config(cls, config: Any) -> Settings:
        """Read the command line, falling back to ini values, then to the defaults."""
        values: dict[str, Any] = {}
        for option in OPTIONS:
            value = config.getoption(option.ini)
            if value is None:
                raw = config.getini(option.ini)
                if option.flag:
                    value = bool(raw)
                elif option.multiple:
                    value = list(raw or ())
                elif raw not in (None, ""):
                    try:
                        value = option.type(raw)
                    except argparse.ArgumentTypeError as exc:
                        raise HemorrhageError(f"ini {option.ini}: {exc}") from None
                else:
                    value = option.default
            values[option.name.replace("-", "_")] = value
        paths_root = config.rootpath
        for key in (
            "data",
            "chat_template",
            "report",
            "html",
            "plot",
            "save_reference",
            "reference",
            "compare",
        ):
            if values[key]:
                values[key] = Path(values[key])
        values["tasks"] = tuple(Path(p) for p in (values["tasks"] or "").split(",") if p)
        values["candidate"] = tuple(
            spec
            if Path(spec).expanduser().exists() or not (paths_root / spec).exists()
            else str(paths_root / spec)  # ini values are relative to the rootdir
            for spec in values["candidate"] or ()
        )
        model = values["model"]
        if model and not Path(model).is_dir() and (paths_root / model).is_dir():
            model = str(paths_root / model)  # ini values are relative to the rootdir
        cache_dir = values.pop("cache_dir")
        if values.pop("no_cache"):
            cache_dir = None
        elif cache_dir is None:
            cache_dir = paths_root / _pytest_cache_dir(config).parent / ".hemorrhage_cache"
        return cls(
            **{
                **values,
                "model": model,
                "cache_dir": cache_dir and Path(cache_dir),
                "budget": config.getini("hemorrhage_budget") or "",
            }
        )


def _pytest_cache_dir(config: Any) -> Path:
    try:
        return Path(config.getini("cache_dir"))
    except ValueError:  # the cacheprovider plugin is disabled
        return Path(".pytest_cache")
