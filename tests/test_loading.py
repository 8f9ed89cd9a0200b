"""--hemorrhage-model: every kind of spec, and every kind of bad one."""

from __future__ import annotations

import shutil

import pytest

from pytest_hemorrhage.errors import HemorrhageError
from pytest_hemorrhage.loading import BUNDLED_MODEL, check_spec, kind, load_model


def test_spec_kinds(tmp_path):
    assert kind(str(tmp_path)) == "dir"
    assert kind("hemorrhage-tiny") == "bundled"
    assert kind("my_pkg.models:build") == "factory"
    assert kind("meta-llama/Llama-2-7b-hf") == "hub"
    assert kind("./no/such/dir") == "missing"


def test_bundled_model_loads_in_eval_mode_with_a_stable_fingerprint(tiny):
    again = load_model("hemorrhage-tiny", device="cpu")
    assert not tiny.model.training
    assert tiny.fingerprint == again.fingerprint
    assert (
        tiny.tokenizer.decode(tiny.tokenizer("def f(x): return x")["input_ids"])
        == "def f(x): return x"
    )


def test_local_directory_and_factory_load_the_same_weights(tiny, tmp_path, monkeypatch):
    shutil.copytree(BUNDLED_MODEL, tmp_path / "model")
    assert load_model(str(tmp_path / "model"), device="cpu").fingerprint == tiny.fingerprint
    (tmp_path / "factories.py").write_text(
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"def build():\n    d = {str(tmp_path / 'model')!r}\n"
        "    return AutoModelForCausalLM.from_pretrained(d), AutoTokenizer.from_pretrained(d)\n"
    )
    monkeypatch.syspath_prepend(tmp_path)
    assert load_model("factories:build", device="cpu").fingerprint == tiny.fingerprint


def test_changed_weights_change_the_fingerprint(tiny, tmp_path):
    import torch

    model = load_model("hemorrhage-tiny", device="cpu")
    with torch.no_grad():
        next(model.model.parameters()).view(-1)[0] += 1e-3
    from pytest_hemorrhage.loading import fingerprint

    assert fingerprint(model.model, model.tokenizer) != tiny.fingerprint


@pytest.mark.parametrize(
    "files, message",
    [
        ([], "directory has no config.json"),
        (["config.json"], "config.json but no weights (*.safetensors)"),
        (["config.json", "pytorch_model.bin"], "only pickle weights (*.bin)"),
        (["config.json", "model.safetensors"], "no usable tokenizer"),
    ],
)
def test_bad_model_directories_get_clear_errors(tmp_path, files, message):
    for name in files:
        source = BUNDLED_MODEL / name
        (tmp_path / name).write_bytes(source.read_bytes() if source.exists() else b"\0")
    with pytest.raises(
        HemorrhageError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")
    ):
        load_model(str(tmp_path), device="cpu")


def test_startup_checks(monkeypatch):
    with pytest.raises(HemorrhageError, match="no such directory"):
        check_spec("./no/such/dir")
    with pytest.raises(HemorrhageError, match="module 'no_such_module_xyz' cannot be imported"):
        check_spec("no_such_module_xyz:build")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HemorrhageError, match="not in the local hub cache and HF_HUB_OFFLINE"):
        check_spec("nobody-xyz/no-such-model")


def test_truncated_weights_stop_the_session_once_with_one_line(pytester, tmp_path):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(BUNDLED_MODEL, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.parametrize("bits", [2, 4, 8])
        def test_bits(hemorrhage, bits):
            hemorrhage.measure("quant.rtn", bits=bits)
        """
    )
    result = pytester.runpytest(f"--hemorrhage-model={damaged}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    out = result.stdout.str()
    assert out.count("is damaged") == 1  # once, not per test
    result.stdout.fnmatch_lines(
        [
            f"*hemorrhage: --hemorrhage-model={damaged}: its weights file model.safetensors is "
            "damaged (*); save them again with model.save_pretrained(dir), or re-download them*"
        ]
    )
    assert "SafetensorError" not in out and "Traceback" not in out


def test_a_damaged_shard_is_named_with_its_number(tiny, tmp_path):
    """Of a sharded checkpoint, the stop names the damaged file and which shard it is."""
    import re

    tiny.model.save_pretrained(tmp_path, max_shard_size="1MB")
    tiny.tokenizer.save_pretrained(tmp_path)
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) > 2
    shards[1].write_bytes(shards[1].read_bytes()[:-1000])  # truncated: the header overruns it
    with pytest.raises(HemorrhageError) as stop:
        load_model(str(tmp_path), device="cpu")
    assert re.fullmatch(
        rf"--hemorrhage-model={re.escape(str(tmp_path))}: its weights file "
        rf"{shards[1].name} \(shard 2 of {len(shards)}\) is damaged \(.+\); save them again "
        r"with model.save_pretrained\(dir\), or re-download them",
        str(stop.value),
    ), stop.value


def test_loading_shows_no_progress_bar_and_leaves_warnings_and_loggers_alone(capfd):
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    filters = list(warnings.filters)
    levels = {name: logging.getLogger(name).level for name in ("torch.utils._pytree",)}
    load_model("hemorrhage-tiny", device="cpu")
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err + captured.out
    assert warnings.filters == filters
    assert {name: logging.getLogger(name).level for name in levels} == levels
    assert hf_logging.is_progress_bar_enabled()  # the user's setting, as it was


@pytest.mark.parametrize("candidate", ["gguf", "w4a16"])
def test_loading_a_candidate_shows_no_progress_bar_and_puts_tqdm_back(candidate, tmp_path, capfd):
    """transformers dequantizes a GGUF file, and compressed-tensors applies a W4A16 checkpoint's
    scheme, under bars of plain tqdm, which transformers' progress bar setting does not reach."""
    import runpy
    from pathlib import Path

    from tqdm import std

    from pytest_hemorrhage.candidates import load_candidate

    gate = Path(__file__).parent.parent / "examples" / "gate"
    spec = gate / "artifacts" / "w4a16"
    if candidate == "gguf":
        build_gguf = runpy.run_path(str(gate / "build_artifacts.py"))["build_gguf"]
        spec = build_gguf(tmp_path / "tiny.gguf", "Q8_0")
    constructor = vars(std.tqdm)["__init__"]
    capfd.readouterr()
    loaded = load_candidate(str(spec), device="cpu")
    captured = capfd.readouterr()
    assert loaded.spec == str(spec)
    assert "%|" not in captured.err + captured.out  # a tqdm bar: "Converting ...:  50%|#####"
    assert vars(std.tqdm)["__init__"] is constructor  # tqdm as it was, for the user's own bars
