"""Devices: startup checks, one CUDA device per xdist worker, accelerate device maps and offload."""

from __future__ import annotations

import pytest
import torch

from pytest_hemorrhage.devices import (
    check_device,
    check_map_devices,
    parse_device_map,
    unplaced,
    worker_device,
)
from pytest_hemorrhage.errors import HemorrhageError
from pytest_hemorrhage.modifications import registry
from pytest_hemorrhage.settings import Settings

TWO_GPUS = ["cpu", "cuda:0", "cuda:1"]


def test_worker_device_assignment():
    assert [worker_device(f"gw{i}", 2) for i in range(5)] == [
        "cuda:0",
        "cuda:1",
        "cuda:0",
        "cuda:1",
        "cuda:0",
    ]
    assert worker_device("gw5", 3) == "cuda:2"
    assert worker_device("gw1", 1) is None  # one device: every worker shares it
    assert worker_device(None, 4) is None  # not under xdist
    assert worker_device("master", 4) is None


def test_check_devices_assigns_the_worker_its_device(monkeypatch):
    """The device count simulated: workers gw0..gw3 on two CUDA devices."""
    from pytest_hemorrhage.devices import check_devices

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    settings = Settings.defaults(model="hemorrhage-tiny")
    got = [check_devices(settings, f"gw{i}").device for i in range(4)]
    assert got == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert check_devices(settings, None).device == "auto"
    assert check_devices(Settings.defaults(model="x", device="cpu"), "gw1").device == "cpu"


@pytest.mark.parametrize(
    ("device", "devices", "says"),
    [
        ("cuda", ["cpu"], "the devices that exist are cpu (torch sees no CUDA device)"),
        ("cuda:3", TWO_GPUS, "the devices that exist are cpu, cuda:0, cuda:1"),
        ("mps", TWO_GPUS, "--hemorrhage-device=mps: no such device here"),
    ],
)
def test_missing_device_names_the_ones_that_exist(device, devices, says):
    with pytest.raises(HemorrhageError, match="no such device") as info:
        check_device(device, devices)
    assert says in str(info.value)
    check_device("cuda:1", TWO_GPUS)
    check_device("cuda", TWO_GPUS)


def test_device_map_parsing_and_devices():
    assert parse_device_map("auto") == "auto"
    assert parse_device_map('{"model": 0, "lm_head": "cpu"}') == {"model": 0, "lm_head": "cpu"}
    for bad in ("everywhere", "[1, 2]", "{}", '{"model": true}'):
        with pytest.raises(HemorrhageError, match="device-map"):
            parse_device_map(bad)
    with pytest.raises(HemorrhageError, match="'lm_head' is mapped to 2, which does not exist"):
        check_map_devices({"model": 0, "lm_head": 2}, TWO_GPUS)
    check_map_devices({"model": "cuda:1", "lm_head": "disk"}, TWO_GPUS)
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "lm_head.weight"]
    assert unplaced({"model.embed_tokens": 0, "lm_head": "cpu"}, names) == [names[1]]
    assert unplaced({"": "cpu"}, names) == []


def test_bad_devices_are_usage_errors_at_startup(pytester):
    pytester.makepyfile("def test_x(hemorrhage):\n    pass\n")
    cases = [
        (
            ["--hemorrhage-device=cuda"],
            "--hemorrhage-device=cuda: no such device here; the "
            "devices that exist are cpu (torch sees no CUDA device)",
        ),
        (["--hemorrhage-device=mps"], "--hemorrhage-device=mps: no such device here*"),
        (
            ["--hemorrhage-device-map", '{"model": 1}'],
            "*'model' is mapped to 1, which does not "
            "exist here; the devices that exist are cpu (and disk)",
        ),
        (
            ["--hemorrhage-device-map", '{"model.embed_tokens": "cpu", "lm_head": "cpu"}'],
            "*leaves 39 weight(s) of hemorrhage-tiny on no device (model.layers.0.self_attn.q_proj"
            ".weight, * and 36 more); map every module*",
        ),
    ]
    if torch.cuda.is_available():
        cases = cases[2:]
    for args, line in cases:
        result = pytester.runpytest_inprocess("--hemorrhage-model=hemorrhage-tiny", *args)
        assert result.ret == pytest.ExitCode.USAGE_ERROR, args
        result.stderr.fnmatch_lines([f"ERROR: {line}"])


# -- accelerate offload on the bundled model ---------------------------------------------------


@pytest.fixture(scope="module")
def offloaded(tiny, make_harness):
    """The bundled model with accelerate's disk offload forced by a small max_memory: the
    embedding and the first block in CPU memory, the rest on disk (meta in the model)."""
    pytest.importorskip("accelerate")
    from pytest_hemorrhage.loading import load_model

    loaded = load_model(
        "hemorrhage-tiny", device="cpu", device_map="auto", max_memory={"cpu": 2_000_000}
    )
    return make_harness(loaded, tokens=1024), make_harness(tiny, tokens=1024)


def test_disk_offload_loads_the_same_model(offloaded, tiny):
    harness, _ = offloaded
    placement = harness.model.hf_device_map
    assert "disk" in placement.values() and placement["model.embed_tokens"] == "cpu"
    assert harness.loaded.fingerprint == tiny.fingerprint  # offloaded weights read from disk
    assert harness.device == torch.device("cpu")
    assert any(p.is_meta for p in harness.model.parameters())


@pytest.mark.parametrize(
    "stages",
    [
        [("decode.temperature", {"value": 1.3})],
        [("prune.layers", {"count": 1})],
        [("quant.kv_cache", {})],
        [("quant.rtn", {"bits": 3, "include": ("model.layers.0.*",)})],  # on CPU: works
    ],
    ids=["decode", "structural", "kv_cache", "rtn-on-kept-block"],
)
def test_what_leaves_offloaded_weights_alone_works(offloaded, stages):
    harness, plain = offloaded
    got, want = harness.measure(stages), plain.measure(stages)
    assert got.metrics["kl_mean"] > 0
    for metric in ("kl_mean", "nll_increase", "top1_disagreement"):
        assert got.metrics[metric] == pytest.approx(want.metrics[metric], rel=1e-4, abs=1e-7)
    harness.check_pristine()


@pytest.mark.parametrize(
    "stages",
    [
        [("quant.rtn", {"bits": 4})],
        [("prune.magnitude", {"sparsity": 0.5})],
        [("prune.wanda", {"sparsity": 0.5})],
        [("quant.hqq", {"bits": 4})],
        [("quant.bnb_int8", {})],
    ],
    ids=lambda s: s[0][0],
)
def test_what_touches_offloaded_weights_is_refused(offloaded, stages):
    harness, plain = offloaded
    before = harness.measure([("decode.temperature", {"value": 1.3})]).metrics
    name = stages[0][0]
    with pytest.raises(
        HemorrhageError,
        match=rf"^{name}: refused: .*accelerate offloaded "
        r"model\.layers\.1\..*to CPU memory or disk",
    ):
        harness.measure(stages)
    harness.check_pristine()  # restored exactly: the same measurement as before
    assert harness.measure([("decode.temperature", {"value": 1.3})]).metrics == before


# what measures a disk-offloaded model, everything else being refused in one line
WORKS_OFFLOADED = {
    "context.rope_scaling",  # swaps a module that holds no weight
    "decode.repetition_penalty",
    "decode.sampling",
    "decode.temperature",
    "decode.top_k",
    "decode.top_p",
    "expand.layers",
    "prune.layers",
    "quant.kv_cache",
}


@pytest.mark.parametrize(
    "name",
    [n for n in registry.names() if registry.get(n)[1].__module__.startswith("pytest_hemorrhage.")],
)
def test_every_modification_measures_an_offloaded_model_or_refuses_it(offloaded, name):
    """The whole catalogue with default parameters on disk-offloaded weights: the same figures
    as on one device, or one line naming the modification and the offloaded modules; the
    model restored exactly either way."""
    harness, plain = offloaded
    config = registry.make(name, {})
    if name in WORKS_OFFLOADED:
        got, want = harness.measure([config]), plain.measure([config])
        assert got.metrics["kl_mean"] == pytest.approx(want.metrics["kl_mean"], rel=1e-4, abs=1e-9)
    else:
        with pytest.raises(HemorrhageError, match=rf"^{name}: refused: .*accelerate offloaded "):
            harness.measure([config])
    harness.check_pristine()


def test_cpu_offload_hooks(tiny, make_harness):
    """accelerate.cpu_offload: every weight on meta, loaded from CPU memory per forward pass."""
    accelerate = pytest.importorskip("accelerate")
    from pytest_hemorrhage.loading import LoadedModel, load_model

    model = load_model("hemorrhage-tiny", device="cpu").model
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    loaded = LoadedModel(model=model, tokenizer=tiny.tokenizer, spec="hemorrhage-tiny")
    assert loaded.fingerprint == tiny.fingerprint and loaded.device == torch.device("cpu")
    harness, plain = make_harness(loaded, tokens=1024), make_harness(tiny, tokens=1024)
    decode = [("decode.top_k", {"k": 5})]
    assert harness.measure(decode).metrics["kl_mean"] == pytest.approx(
        plain.measure(decode).metrics["kl_mean"], rel=1e-4
    )
    with pytest.raises(HemorrhageError, match="^quant.rtn: refused"):
        harness.measure([("quant.rtn", {"bits": 4})])
    harness.check_pristine()
