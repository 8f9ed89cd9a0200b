"""Where the hemorrhage starts: per-block drift, attention entropy, attribution, check() lines."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

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


def test_attribution_shares_sum_to_one(harness):
    r = harness.measure([("quant.rtn", {"bits": 3})])
    d = diagnose(harness, r, attribution=True)
    shares = [b.share for b in d.blocks]
    assert sum(shares) == pytest.approx(1.0, abs=1e-9)
    assert all(b.kl_mean > 0 for b in d.blocks)
    assert d.kl_mean == r.metrics["kl_mean"]
    most = max(d.blocks, key=lambda b: b.share)
    assert d.most == most.index
    assert f"block {most.index} contributes {most.share:.0%} of kl_mean" in d.lines()[0]
    # stored for the JSON report, and reused by explain() without recomputing
    stored = r.details["blame"]
    assert json.loads(json.dumps(stored))["blocks"][most.index]["share"] == most.share
    assert Diagnosis.from_dict(stored).lines() == d.lines() == explain(harness, r)


def test_attribution_of_a_one_block_change(harness):
    d = diagnose(harness, [("quant.rtn", {"bits": 2, "include": ("*.layers.2.mlp.*",)})],
                 attribution=True)
    assert [b.share for b in d.blocks] == [0.0, 0.0, 1.0, 0.0]
    assert d.begins == 2 and max(d.blocks[2].sublayers, key=d.blocks[2].sublayers.get) in (
        "mlp.down_proj", "mlp.gate_proj", "mlp.up_proj")


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
    result.stdout.fnmatch_lines([
        "*hemorrhage over budget for quant.rtn*",
        "*kl_mean: * > 0.0001 *",
        "*hemorrhage begins at block 1 (*drift *); block 1 adds the most drift (+*)",
        "*drift by block (relative L2 of the residual stream): 0:0.00 1:*",
    ])
    report = json.loads((pytester.path / "r.json").read_text())
    blame = report["results"][0]["details"]["blame"]
    assert [b["drift_l2"] > 0 for b in blame["blocks"]] == [False, True, True, True]
    assert blame["begins"] == 1 and blame["levels"]["begin_level"] == 0.05
    [plot] = (pytester.path / "plots").glob("blame-quant.rtn-*.png")
    assert plot.stat().st_size > 5000  # a drawn chart, not an empty file


def test_failing_example_shows_blame_lines(pytester):
    """The example stays failing (its strict xfail holds) and its message names the blocks."""
    pytester.makepyfile(test_example=(EXAMPLES / "test_blame_example.py").read_text())
    item = {"context": "Return the number of", "choices": [" bytes read.", " zebra cloud"],
            "answer": 0}
    (pytester.path / "small.jsonl").write_text(json.dumps(item) + "\n")  # keeps it quick
    result = pytester.runpytest(*ARGS, "--hemorrhage-tasks=small.jsonl", "--runxfail")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*hemorrhage over budget for quant.rtn include=*bits=2*",
        "*kl_mean: * > 0.0100 *",
        "*hemorrhage begins at block * contributes *% of kl_mean",
        "*drift by block (relative L2 of the residual stream): 0:*",
    ])
