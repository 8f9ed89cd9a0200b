"""Where the hemorrhage starts: per-block drift, attention entropy, attribution, check() lines."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pytest_hemorrhage.blame import Diagnosis, diagnose, explain
from pytest_hemorrhage.modifications import Modification, register_modification

EXAMPLES = Path(__file__).parent.parent / "examples" / "flips"
ARGS = ("--hemorrhage-model=hemorrhage-tiny", "--hemorrhage-tokens=1024", "-p", "no:cacheprovider")


@dataclass(frozen=True, kw_only=True)
class LogitShift(Modification):
    """Test-only: changes nothing inside the blocks, only the logits after them."""

    amount: float = 1.0


@register_modification("test.logit_shift", LogitShift)
def _logit_shift(config, model, patch, context):
    patch.logits_processors.append(lambda ids, logits: logits * (1 + config.amount))


def test_identical_model_has_no_drift(harness):
    d = diagnose(harness, [("prune.magnitude", {"sparsity": 0.0})])  # a no-op
    assert [b.drift_l2 for b in d.blocks] == [0.0] * 4
    assert [b.drift_cos for b in d.blocks] == [0.0] * 4
    assert all(v == 0 for b in d.blocks for v in b.sublayers.values())
    assert [b.attn_entropy_shift for b in d.blocks] == [0.0] * 4  # eager attention measured
    assert d.begins is None and d.most is None
    assert d.lines()[0].startswith("no block's hidden states drift")


@pytest.mark.parametrize("k", [1, 2])
def test_drift_begins_at_the_only_modified_block(harness, k):
    d = diagnose(harness, [("quant.rtn", {"bits": 2, "include": (f"*.layers.{k}.*",)})])
    assert d.begins == k
    assert [b.drift_l2 for b in d.blocks[:k]] == [0.0] * k
    assert all(b.drift_l2 > 0.01 for b in d.blocks[k:])
    assert d.lines()[0].startswith(f"hemorrhage begins at block {k} (")
    assert d.tokens == 2 * harness.settings.seq_len


def test_added_and_removed_blocks_are_paired(harness):
    grown = diagnose(harness, [("expand.layers", {"positions": (1,)})])
    assert [b.label for b in grown.blocks] == ["0", "1", "1'", "2", "3"]
    assert [b.drift_l2 for b in grown.blocks[:2]] == [0.0, 0.0]
    assert grown.begins == 2 and grown.lines()[0].startswith("hemorrhage begins at block 1' (")
    shrunk = diagnose(harness, [("prune.layers", {"indices": (1,)})])
    assert [b.index for b in shrunk.blocks] == [0, 2, 3]
    assert shrunk.blocks[0].drift_l2 == 0 and shrunk.blocks[shrunk.begins].index == 2
    assert any("removed: 1)" in line for line in shrunk.lines())


def test_change_after_the_blocks_shows_no_drift(harness):
    r = harness.measure([("test.logit_shift", {"amount": 1.0})])
    assert r.metrics["kl_mean"] > 0
    d = diagnose(harness, r)
    assert d.begins is None
    assert "acts after the blocks" in explain(harness, r)[0]


# -- attribution ---------------------------------------------------------------------------
# On a harness of 4 windows: attribution re-runs the model about twice per modified block.


@pytest.fixture(scope="module")
def small(tiny, make_harness):
    return make_harness(tiny, tokens=512)


def _kl(harness, *stages):
    return harness.measure(list(stages)).metrics["kl_mean"]


def _rtn(*blocks):
    return ("quant.rtn", {"bits": 2, "include": tuple(f"*.layers.{b}.*" for b in blocks)})


def test_attribution_splits_the_measured_kl_mean_block_by_block(small):
    """rtn rounds each layer on its own: restricting it with include= keeps its meaning, so
    the parts can be checked against independent measurements of blocks 1, 2 and 1+2."""
    r = small.measure([_rtn(1, 2)])
    total, alone1, alone2 = r.metrics["kl_mean"], _kl(small, _rtn(1)), _kl(small, _rtn(2))
    d = diagnose(small, r, attribution=True)
    assert d.attribution and d.kl_mean == total and d.kl_outside is None
    # the decomposition: block 1 first, then block 2 on top of it; the parts sum to kl_mean
    assert [b.kl_added for b in d.blocks] == pytest.approx(
        [0, alone1, total - alone1, 0], rel=1e-12, abs=0
    )
    assert sum(b.kl_added for b in d.blocks) == pytest.approx(total, rel=1e-12)
    assert [b.share for b in d.blocks] == pytest.approx(
        [0, alone1 / total, 1 - alone1 / total, 0], rel=1e-12, abs=0
    )
    # one-block figures: each block's edits alone, and their ratio to the whole kl_mean
    assert [b.kl_mean for b in d.blocks] == pytest.approx([0, alone1, alone2, 0], rel=1e-12)
    assert [b.kl_ratio for b in d.blocks] == pytest.approx(
        [0, alone1 / total, alone2 / total, 0], rel=1e-12
    )
    assert alone1 + alone2 != pytest.approx(total, rel=0.01)  # blocks interact: not a split
    most = max(d.blocks, key=lambda b: b.kl_added)
    assert d.most == most.index
    first = d.lines()[0]
    assert first.endswith(
        f"; block {most.index} adds the most to kl_mean "
        f"(+{most.kl_added:.2f}, {most.share:.0%} of {total:.2f})"
    )
    assert "contributes" not in first and "outside" not in first
    assert any(
        line.startswith(
            f"kl_mean {total:.2f} by block (each block's edits added to "
            "those before it; the parts sum to kl_mean): 0:+0.00 1:+"
        )
        for line in d.lines()
    )
    assert any(
        line.startswith(
            "one-block kl_mean (each block's edits alone; ratio to the "
            f"whole): 0:0.00 (0.00x) 1:{alone1:.2f} ({alone1 / total:.2f}x)"
        )
        for line in d.lines()
    )
    # stored for the JSON report, and reused by explain() without recomputing
    stored = r.details["blame"]
    assert json.loads(json.dumps(stored))["blocks"][2]["kl_added"] == d.blocks[2].kl_added
    assert Diagnosis.from_dict(stored).lines() == d.lines() == explain(small, r)


def test_attribution_of_a_one_block_change(small):
    d = diagnose(
        small, [("quant.rtn", {"bits": 2, "include": ("*.layers.2.mlp.*",)})], attribution=True
    )
    assert [b.share for b in d.blocks] == [0.0, 0.0, 1.0, 0.0]
    assert [b.kl_ratio for b in d.blocks] == [0.0, 0.0, 1.0, 0.0]
    assert d.begins == 2 and max(d.blocks[2].sublayers, key=d.blocks[2].sublayers.get) in (
        "mlp.down_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
    )


_WEIGHTS: dict[str, dict[str, torch.Tensor]] = {}


@dataclass(frozen=True, kw_only=True)
class FixedWeights(Modification):
    """Test-only: the targets' weights become the tensors stored under ``key``."""

    key: str = ""


@register_modification("test.fixed_weights", FixedWeights)
def _fixed_weights(config, model, patch, context):
    stored = _WEIGHTS[config.key]
    for t in config.targets(model):
        patch.parametrize(t, lambda w, new=stored[t.name]: new.clone())


def _alone_as_applied(harness, stages, block):
    """kl_mean of the baseline with block ``block``'s weights as the whole-model application
    of ``stages`` left them: the one-block figure that keeps the modification's meaning."""
    with harness.modified(stages):
        _WEIGHTS[repr(stages)] = {
            t.name: t.module.weight.detach().clone() for t in FixedWeights().targets(harness.model)
        }
    return _kl(
        harness, ("test.fixed_weights", {"key": repr(stages), "include": (f"*.layers.{block}.*",)})
    )


@pytest.mark.parametrize(
    "stage",
    [
        # the threshold is taken over blocks 1 and 2 together: block 2 alone would set its own
        (
            "prune.magnitude",
            {"sparsity": 0.6, "scope": "global", "include": ("*.layers.1.*", "*.layers.2.*")},
        ),
        # the flipped bits are drawn over blocks 1 and 2: a re-run on block 2 alone would draw anew
        (
            "fault.bitflip",
            {"count": 10, "seed": 2, "include": ("*.layers.1.mlp.*", "*.layers.2.mlp.*")},
        ),
    ],
    ids=["global-threshold", "bitflip-positions"],
)
def test_one_block_reruns_keep_the_modifications_meaning(small, stage):
    expected = [_alone_as_applied(small, [stage], b) for b in (1, 2)]
    restricted = dict(stage[1], include=(stage[1]["include"][1],))  # a new draw or threshold
    assert math.isfinite(expected[1])
    assert _kl(small, (stage[0], restricted)) != pytest.approx(expected[1], rel=0.01)
    r = small.measure([stage])
    d = diagnose(small, r, attribution=True)
    assert [b.kl_mean for b in d.blocks[1:3]] == pytest.approx(expected, rel=1e-12)
    assert d.blocks[1].kl_added == pytest.approx(expected[0], rel=1e-12)
    assert sum(b.kl_added for b in d.blocks) == pytest.approx(r.metrics["kl_mean"], rel=1e-12)


def test_swapped_modules_are_replayed(small):
    """w8a8 swaps each linear for an int8 module: re-runs swap the same modules in again."""
    w8a8 = ("quant.w8a8", {"smooth": False, "include": ("*.layers.1.*", "*.layers.3.*")})
    r = small.measure([w8a8])
    d = diagnose(small, r, attribution=True)
    alone = [
        _kl(small, ("quant.w8a8", dict(w8a8[1], include=(f"*.layers.{b}.*",)))) for b in (1, 3)
    ]
    assert d.attribution and alone[0] > 0 and alone[1] > 0
    assert [d.blocks[b].kl_mean for b in (1, 3)] == pytest.approx(alone, rel=1e-12)
    assert sum(b.kl_added for b in d.blocks) == pytest.approx(r.metrics["kl_mean"], rel=1e-12)


def test_decode_stages_are_a_part_of_their_own(small):
    """A logits stage never raises: it is the last part, and one-block re-runs leave it out."""
    stages = [_rtn(1), ("decode.temperature", {"value": 2.0})]
    r = small.measure(stages)
    d = diagnose(small, r, attribution=True)
    blocks_only = _kl(small, _rtn(1))
    assert [b.kl_mean for b in d.blocks] == pytest.approx([0, blocks_only, 0, 0], rel=1e-12)
    assert [b.kl_added for b in d.blocks] == pytest.approx([0, blocks_only, 0, 0], rel=1e-12)
    total = r.metrics["kl_mean"]
    assert d.outside == ["logits processing"]
    assert d.kl_outside == pytest.approx(total - blocks_only, rel=1e-12)
    assert d.kl_outside > blocks_only  # temperature 2 weighs more here than 2 bits in block 1
    assert sum(b.kl_added for b in d.blocks) + d.kl_outside == pytest.approx(total, rel=1e-12)
    assert ", the edits outside the blocks more (+" in d.lines()[0]
    assert d.lines()[-1].startswith("(outside the blocks: logits processing; its part comes last")
    alone = diagnose(small, [("decode.temperature", {"value": 2.0})], attribution=True)
    assert [b.kl_added for b in alone.blocks] == [0.0] * 4 and alone.most is None
    assert alone.kl_outside == alone.kl_mean > 0


@dataclass(frozen=True, kw_only=True)
class SharperAttention(Modification):
    """Test-only: an attribute edit (attention scaling) that no weight or module captures."""


@register_modification("test.sharper_attention", SharperAttention)
def _sharper_attention(config, model, patch, context):
    attention = model.model.layers[1].self_attn
    patch.setattr(attention, "scaling", attention.scaling * 3)


def test_attribution_says_when_it_does_not_apply(small):
    r = small.measure([("test.sharper_attention", {})])
    assert r.metrics["kl_mean"] > 0.01
    d = diagnose(small, r, attribution=True)
    assert not d.attribution and all(b.kl_added is None and b.kl_mean is None for b in d.blocks)
    assert d.notes[-1] == (
        "(no attribution for test.sharper_attention: re-applying the weight and module edits "
        f"it made gives kl_mean 0, not the measured {r.metrics['kl_mean']:.4g}; it changes "
        "something else (attributes, hooks), which a per-block re-run cannot isolate)"
    )
    assert d.notes[-1] in d.lines() and not any("by block (each" in x for x in d.lines())


def test_failed_check_shows_blame_lines_report_and_plot(pytester):
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.hemorrhage(kl_mean=0.0001)
        def test_two_bits(hemorrhage):
            hemorrhage.check(hemorrhage.measure("quant.rtn", bits=2, include=("*.layers.1.*",)))
        """
    )
    result = pytester.runpytest(*ARGS, "--hemorrhage-report=r.json", "--hemorrhage-plot=plots")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*hemorrhage over budget for quant.rtn*",
            "*kl_mean: * > 0.0001 *",
            "*hemorrhage begins at block 1 (*drift *); block 1 adds the most drift (+*)",
            "*drift by block (relative L2 of the residual stream): 0:0.00 1:*",
        ]
    )
    report = json.loads((pytester.path / "r.json").read_text())
    blame = report["results"][0]["details"]["blame"]
    assert [b["drift_l2"] > 0 for b in blame["blocks"]] == [False, True, True, True]
    assert blame["begins"] == 1 and blame["levels"]["begin_level"] == 0.05
    [plot] = (pytester.path / "plots").glob("blame-quant.rtn-*.png")
    assert plot.stat().st_size > 5000  # a drawn chart, not an empty file


def test_failing_example_shows_blame_lines(pytester):
    """The example stays failing (its strict xfail holds) and its message names the blocks."""
    pytester.makepyfile(test_example=(EXAMPLES / "test_blame_example.py").read_text())
    item = {
        "context": "Return the number of",
        "choices": [" bytes read.", " zebra cloud"],
        "answer": 0,
    }
    (pytester.path / "small.jsonl").write_text(json.dumps(item) + "\n")  # keeps it quick
    result = pytester.runpytest(*ARGS, "--hemorrhage-tasks=small.jsonl", "--runxfail")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*hemorrhage over budget for quant.rtn include=*bits=2*",
            "*kl_mean: * > 0.0100 *",
            "*hemorrhage begins at block *; block * adds the most to kl_mean (+*, *% of *)",
            "*drift by block (relative L2 of the residual stream): 0:*",
            "*kl_mean * by block (each block's edits added to those before it; the parts sum to "
            "kl_mean): 0:*",
            "*one-block kl_mean (each block's edits alone; ratio to the whole): 0:* (*x) 1:*",
        ]
    )
