"""Long windows in bounded memory, and damage by position: the head scored over chunks of
positions (pytest_hemorrhage/forward.py), metrics per position bucket, budgets over a range of
positions."""

from __future__ import annotations

import resource
import tempfile

import pytest
import torch

from pytest_hemorrhage import forward
from pytest_hemorrhage.budget import Budget
from pytest_hemorrhage.errors import HemorrhageError
from pytest_hemorrhage.forward import split_forward

RTN = [("quant.rtn", {"bits": 3})]


def _same(a, b) -> None:
    assert a.metrics.keys() == b.metrics.keys()
    for metric, value in a.metrics.items():
        assert value == pytest.approx(b.metrics[metric], rel=1e-6, abs=1e-9), metric
        if a.stderr[metric] is not None:
            assert a.stderr[metric] == pytest.approx(b.stderr[metric], rel=1e-6), metric


@pytest.mark.parametrize(
    "stages", [RTN, [("decode.repetition_penalty", {"value": 1.3})]], ids=["rtn", "penalty"]
)
def test_chunks_of_positions_score_what_whole_windows_score(
    tiny, make_harness, monkeypatch, stages
):
    """Windows cut into chunks of 50 positions (a window's chunks one sampling unit; a
    processor sees each position's own past), and whole windows from one forward pass, give
    the same result: same metrics and standard errors within float32 round-off, the same
    per-position buckets."""
    harness = make_harness(tiny, tokens=1024, cache_dir=tempfile.mkdtemp())
    whole_batch = harness.measure(stages)  # the tiny vocabulary: a batch of windows per chunk
    monkeypatch.setattr(forward, "HEAD_CHUNK_BYTES", 50 * 4 * harness.vocab)
    assert forward.chunk_rows(harness.vocab) == 50
    sizes = [c.logits.shape[:2] for c in harness.chunks()]
    assert sizes[:3] == [(1, 50), (1, 50), (1, 27)]  # 127 scored positions per window
    chunked = harness.measure(stages)
    monkeypatch.setattr("pytest_hemorrhage.harness.split_forward", lambda model, ids: None)
    whole_logits = harness.measure(stages)
    for other in (chunked, whole_logits):
        _same(whole_batch, other)
        assert [b["tokens"] for b in other.positions] == [
            b["tokens"] for b in whole_batch.positions
        ]


def test_a_head_the_split_does_not_know_falls_back_to_whole_logits(tiny):
    from transformers import LlamaForCausalLM

    class Doubled(LlamaForCausalLM):
        def forward(self, input_ids=None, logits_to_keep=0, **kwargs):
            out = super().forward(input_ids=input_ids, logits_to_keep=logits_to_keep, **kwargs)
            out.logits = out.logits * 2
            return out

    model = Doubled(tiny.model.config).eval()
    model.load_state_dict(tiny.model.state_dict())
    ids = torch.arange(40).reshape(2, 20)
    with torch.inference_mode():
        assert split_forward(model, ids) is None  # the last position's check caught it
        calls = []
        hook = model.register_forward_pre_hook(lambda *_: calls.append(1))
        assert split_forward(model, ids) is None and calls == []  # not run twice per batch
        hook.remove()
        split = split_forward(tiny.model, ids)
        assert split is not None
        full = tiny.model(input_ids=ids, use_cache=False).logits
        assert torch.equal(split.head(split.hidden), full)


def test_non_finite_logits_do_not_cost_a_model_its_split(tiny, make_harness):
    """A modification that overflows (2,000 bit flips) makes NaN logits, by the split head as
    by the model's own: the check still holds, and the model keeps its split for the next
    measure (remembered as unsplittable, it would score whole logits for good)."""
    import copy

    model = copy.deepcopy(tiny.model)
    harness = make_harness(model, tiny.tokenizer, spec="bundled-copy", tokens=2048)
    flipped = harness.measure([("fault.bitflip", {"count": 2000})])
    assert flipped.nonfinite > 0  # NaN reached the logits
    assert model not in forward._UNSPLIT
    with torch.inference_mode():
        assert split_forward(model, harness.windows.eval[:2]) is not None


def test_metrics_by_position_bucket_add_up_to_the_whole(harness):
    result = harness.measure(RTN)
    assert [b["positions"] for b in result.positions] == [[1, 16], [16, 64], [64, 128]]
    tokens = [b["tokens"] for b in result.positions]
    assert tokens == [15 * 16, 48 * 16, 64 * 16] and sum(tokens) == result.tokens
    weighted = sum(b["metrics"]["kl_mean"] * b["tokens"] for b in result.positions)
    assert weighted / result.tokens == pytest.approx(result.metrics["kl_mean"], rel=1e-9)
    assert all(b["stderr"]["kl_mean"] > 0 for b in result.positions)
    # the first positions (little context) are not the late ones: buckets tell them apart
    kl = [b["metrics"]["kl_mean"] for b in result.positions]
    assert len(set(kl)) == 3


def test_a_position_budget_is_measured_over_its_range_only(harness):
    budget = Budget.parse(
        {"positions": {"64:": {"kl_mean": 1.0}, ":16": {"kl_mean": 1.0}}}, where="t"
    )
    result = harness.measure(RTN, budget=budget)
    late = next(b for b in result.positions if b["positions"] == [64, 128])
    early = next(b for b in result.positions if b["positions"] == [1, 16])
    assert result.metrics["kl_mean[64:]"] == pytest.approx(late["metrics"]["kl_mean"], rel=1e-12)
    assert result.metrics["kl_mean[:16]"] == pytest.approx(early["metrics"]["kl_mean"], rel=1e-12)
    assert result.stderr["kl_mean[64:]"] == pytest.approx(late["stderr"]["kl_mean"], rel=1e-12)
    # the two halves of the window make up the whole: 63 positions, then 64, per window
    halves = Budget.parse(
        {"positions": {":64": {"kl_mean": 1.0}, "64:": {"kl_mean": 1.0}}}, where="t"
    )
    split = harness.measure(RTN, budget=halves).metrics
    weighted = (63 * split["kl_mean[:64]"] + 64 * split["kl_mean[64:]"]) / 127
    assert weighted == pytest.approx(split["kl_mean"], rel=1e-9)
    assert split["kl_mean[64:]"] != pytest.approx(split["kl_mean"], rel=1e-3)
    tight = Budget.parse({"positions": {"64:": {"kl_mean": 0.0}}}, where="t")
    assert tight.violations(result)[0].startswith("kl_mean[64:]: ")


def test_a_position_budget_outside_the_window_names_the_window(harness):
    budget = Budget.parse({"positions": {"8192:": {"kl_mean": 0.1}}}, where="t")
    with pytest.raises(HemorrhageError, match=r"kl_mean\[8192:\].*windows of 128 tokens"):
        harness.measure(RTN, budget=budget)


POSITION_BUDGET = """
import pytest

@pytest.mark.hemorrhage(kl_mean=10.0, positions={{"{span}": {{"kl_mean": {limit}}}}})
def test_late_positions(hemorrhage):
    hemorrhage.check(hemorrhage.measure("quant.rtn", bits=3))
"""


def test_the_marker_fails_on_a_position_range_alone(pytester):
    """The whole-window budget holds; the late positions' does not: one failure line naming
    the range, through pytest."""
    pytester.makepyfile(test_late=POSITION_BUDGET.format(span="64:", limit=1e-6))
    args = ["--hemorrhage-model=hemorrhage-tiny", "--hemorrhage-tokens=2048", "-p", "no:randomly"]
    result = pytester.runpytest(*args)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*kl_mean[[]64:[]]: 0.* > 0.0000*"])
    assert "kl_mean: " not in result.stdout.str().split("kl_mean[64:]")[0].rsplit("\n", 2)[-1]


def test_early_stopping_decides_on_a_position_budget(tiny, make_harness):
    harness = make_harness(tiny, tokens=4096, early_stop=True)
    budget = Budget.parse({"positions": {"64:": {"kl_mean": 1e-6}}}, where="t")
    stop = harness.measure(RTN, budget=budget).details["early_stop"]
    assert stop["verdicts"] == {"kl_mean[64:]": "over"}
    assert stop["stopped"] and stop["windows"] < stop["windows_max"]


def test_a_long_window_of_a_wide_vocabulary_runs_in_bounded_memory(tiny, make_harness):
    """16,384 tokens of a 128,256-token vocabulary: one window's logits would be 8.4 GB of
    float32 (twice that with a log-softmax copy). Scored a chunk of positions at a time,
    no chunk holds more than HEAD_CHUNK_BYTES of logits, the process grows by far less than
    one window's logits, and the damage is reported up to the last position bucket."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pytest_hemorrhage.data import BUNDLED_CORPUS
    from pytest_hemorrhage.reference import storage_bytes

    length, vocab = 16_384, 128_256
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=length,
        initializer_range=0.25,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
    folder = tempfile.mkdtemp()
    text = f"{folder}/long.txt"
    with open(text, "w") as f:
        f.write(BUNDLED_CORPUS.read_text())  # 43k tokens: two windows
    harness = make_harness(
        model, tiny.tokenizer, seq_len=length, tokens=length, data=text, cache_dir=folder
    )
    largest = []
    chunks = harness.chunks

    def watched(*args, **kwargs):
        for chunk in chunks(*args, **kwargs):
            largest.append(chunk.logits.numel() * chunk.logits.element_size())
            yield chunk

    harness.chunks = watched
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = harness.measure([("decode.temperature", {"value": 1.25})])
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    assert max(largest) <= forward.HEAD_CHUNK_BYTES
    assert len(largest) >= 2 * length // forward.chunk_rows(vocab)  # reference and measure
    assert grown < 2 << 30, f"grew {grown / 2**30:.1f} GiB"  # a window's logits: 7.8 GiB
    assert result.tokens == length - 1
    assert result.positions[-1]["positions"] == [4096, length]
    assert 0 < result.metrics["kl_mean"] < float("inf")
    assert storage_bytes(harness.reference) / result.tokens <= 1024
