"""Results as plain data: what handlers, candidates' loaders and libraries put in a result
becomes numbers, strings, lists and dicts that xdist can send and JSON can write."""

from __future__ import annotations

import enum
import json
import math
import pathlib
from dataclasses import dataclass

import execnet
import numpy as np
import torch
from transformers.utils.quantization_config import BitsAndBytesConfig, QuantizationMethod

from pytest_hemorrhage.plain import ARRAY_LIMIT, first_unplain, plain


class Level(enum.IntEnum):
    HIGH = 2


@dataclass
class Stats:
    dtype: torch.dtype
    where: pathlib.Path


class Opaque:
    def __repr__(self) -> str:
        return "<opaque>"


def test_library_values_become_plain_data_and_the_rest_its_repr_noted():
    notes: list[str] = []
    value = {
        "method": QuantizationMethod.GGUF,  # a str enum: execnet refused it (issue 24)
        Level.HIGH: Level.HIGH,
        "dtype": torch.bfloat16,
        "device": torch.device("cpu"),
        "shape": torch.Size([2, 3]),
        "scale": torch.tensor([0.5, 2.0]),
        "loss": torch.tensor(1.5),
        "weights": torch.zeros(ARRAY_LIMIT + 1),
        "array": np.arange(3),
        "number": np.float32(0.25),
        "stats": Stats(torch.float16, pathlib.Path("w.bin")),
        "config": BitsAndBytesConfig(load_in_4bit=True),
        "tags": {"b", "a"},
        "pair": (1, (2, "x")),
        "opaque": Opaque(),
        "nan": math.nan,
    }
    out = plain(value, notes, "details")
    assert out["method"] == "gguf" and out[2] == 2
    assert out["dtype"] == "bfloat16" and out["device"] == "cpu" and out["shape"] == [2, 3]
    assert out["scale"] == [0.5, 2.0] and out["loss"] == 1.5
    assert out["array"] == [0, 1, 2] and type(out["number"]) is float
    assert out["stats"] == {"dtype": "float16", "where": "w.bin"}
    assert out["config"]["quant_method"] == "bitsandbytes" and out["config"]["load_in_4bit"]
    assert out["tags"] == ["a", "b"] and out["pair"] == [1, [2, "x"]]
    assert out["opaque"] == "<opaque>" and out["weights"].startswith("tensor(")
    assert math.isnan(out["nan"])  # JSON's writer makes it null; execnet sends it as it is
    assert notes == ["details.weights (Tensor)", "details.opaque (Opaque)"]
    assert first_unplain(out) is None
    assert execnet.loads(execnet.dumps(out))["method"] == "gguf"
    json.dumps(out)


def test_first_unplain_names_the_path_and_value():
    assert first_unplain({"a": [1, {"b": 2.0}], "c": None}) is None
    assert first_unplain({"a": [1, {"b": Level.HIGH}]}) == ("a[1].b", Level.HIGH)
    assert first_unplain({"a": 1, (1, 2): 3}) == ("(1, 2)", (1, 2))
    assert first_unplain(QuantizationMethod.GGUF) == ("value", QuantizationMethod.GGUF)
