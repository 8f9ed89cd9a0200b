"""Pruning modifications against their definitions, by effect on the bundled model, and the
gradient/Wanda mitigations on a copy of it given outlier channels."""

from __future__ import annotations

import copy

import pytest
import torch
from bit_identity import assert_restored, snapshot
from harnesses import build_harness

from pytest_hemorrhage.errors import HemorrhageError
from pytest_hemorrhage.modifications import Patch, apply, make
from pytest_hemorrhage.modifications.prune.structured import block_similarity
from pytest_hemorrhage.modifications.prune.unstructured import taylor_scores
from pytest_hemorrhage.modifications.registry import Target, is_conv1d
from pytest_hemorrhage.modifications.state import pack_bits, unpack_bits

LAYER = "model.layers.1.mlp.down_proj"  # a layer whose rows are long enough to rank (384 inputs)


# --- fixtures ----------------------------------------------------------------------------------


OUTLIER_SCALE = 30.0
_READERS = {
    "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
}


def rescale_channels(model, channels, alpha=OUTLIER_SCALE):
    """Function-preserving outliers: RMSNorm weight of ``channels`` times alpha, the input
    columns of every linear reading that norm divided by alpha (in place, on ``model``)."""
    with torch.no_grad():
        for layer in model.model.layers:
            for norm, readers in _READERS.items():
                getattr(layer, norm).weight[list(channels)] *= alpha
                for reader in readers:
                    layer.get_submodule(reader).weight[:, list(channels)] /= alpha
    return model


@pytest.fixture(scope="module")
def outlier_channels(harness):
    """The 8 residual channels the bundled model reads most (sum over the linears reading a
    norm of ||W[:, j]|| * ||X_j||): where outlier features sit in real LLMs."""
    from pytest_hemorrhage.modifications.calibration import input_stats

    stats = input_stats(harness.model, harness.context)
    importance = torch.zeros(harness.model.config.hidden_size)
    for i, layer in enumerate(harness.model.model.layers):
        for reader in (r for readers in _READERS.values() for r in readers):
            weight = layer.get_submodule(reader).weight.detach()
            importance += weight.norm(dim=0) * stats[f"model.layers.{i}.{reader}"].l2
    return tuple(importance.topk(8).indices.tolist())


@pytest.fixture(scope="module")
def most_read_outliers(tiny, outlier_channels):
    """The bundled model with outliers on the channels it reads most (same function), in its
    own harness (conftest's ``outliers`` puts them on fixed channels)."""
    model = rescale_channels(copy.deepcopy(tiny.model), outlier_channels)
    return build_harness(model, tiny.tokenizer, spec="tiny-outliers", tokens=2048)


def _ppl_increase(harness, name, **params):
    return harness.measure([(name, params)]).metrics["ppl_increase"]


def _weight(harness, name):
    """(out, in) effective weight of a linear layer."""
    module = harness.model.get_submodule(name)
    w = module.weight.detach()
    return w.t() if is_conv1d(module) else w


def _pruned_by_hand(scores, sparsity):
    """Bool (out, in): the round(sparsity * in) lowest scores of every row."""
    k = round(sparsity * scores.shape[1])
    pruned = torch.zeros_like(scores, dtype=torch.bool)
    pruned.scatter_(1, scores.argsort(dim=1, stable=True)[:, :k], True)
    return pruned


def _calibration_input_norms(harness, name):
    """||X_j||_2 over the calibration windows, collected by a hook on ``name``."""
    total = []

    def record(module, args):
        total.append(args[0].detach().reshape(-1, args[0].shape[-1]).square().sum(0))

    handle = harness.model.get_submodule(name).register_forward_pre_hook(record)
    try:
        with torch.no_grad():
            harness.context.logits(harness.context.calibration_windows())
    finally:
        handle.remove()
    return torch.stack(total).sum(0).sqrt()


def _taylor_by_hand(harness, name):
    """sum_w |W ⊙ dL_w/dW| by autograd on the weight parameter, one window at a time."""
    module = harness.model.get_submodule(name)
    weight = module.weight
    transposed = is_conv1d(module)
    total = torch.zeros_like(weight)
    for window in harness.context.calibration_windows():
        ids = window[None]
        logits = harness.context.logits(ids)[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[0, 1:])
        (grad,) = torch.autograd.grad(loss, weight)
        total += (weight.detach() * grad).abs()
    return total.t() if transposed else total


# --- (a) against the definitions ---------------------------------------------------------------


def test_wanda_prunes_the_lowest_weight_times_input_norm_within_each_row(harness):
    w = _weight(harness, LAYER).clone()
    norms = _calibration_input_norms(harness, LAYER)
    expected = _pruned_by_hand(w.abs() * norms, 0.5)
    with harness.modified([("prune.wanda", {"sparsity": 0.5})]):
        pruned = _weight(harness, LAYER) == 0
    assert torch.equal(pruned, expected)
    assert (pruned.sum(1) == w.shape[1] // 2).all()  # exactly half of every row
    # not the same as magnitude within rows: the input norms reorder the weights
    assert not torch.equal(pruned, _pruned_by_hand(w.abs(), 0.5))


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_gradient_prunes_the_lowest_taylor_score_within_each_row(which, harness, gpt2):
    h, name = (harness, LAYER) if which == "llama" else (gpt2, "transformer.h.1.attn.c_attn")
    expected = _pruned_by_hand(_taylor_by_hand(h, name), 0.6)
    flags = {n: p.requires_grad for n, p in h.model.named_parameters()}
    with h.modified([("prune.gradient", {"sparsity": 0.6})]):
        pruned = _weight(h, name) == 0
        assert not h.model.training
    # GPT-2 has dropout 0.1: scores taken in train mode would not match the eval-mode ones
    assert torch.equal(pruned, expected)
    assert (pruned.sum(1) == round(0.6 * pruned.shape[1])).all()
    # scoring leaves no gradient state behind
    assert all(p.grad is None for p in h.model.parameters())
    assert {n: p.requires_grad for n, p in h.model.named_parameters()} == flags


def test_gradient_scores_need_no_trainable_parameters(gpt2):
    """With every parameter frozen the scores are the same, and the flags stay frozen."""
    targets = make("prune.gradient").targets(gpt2.model)
    trainable = taylor_scores(gpt2.model, gpt2.context, targets)
    params = list(gpt2.model.parameters())
    try:
        for p in params:
            p.requires_grad_(False)
        frozen = taylor_scores(gpt2.model, gpt2.context, targets)
        assert not any(p.requires_grad for p in params)
    finally:
        for p in params:
            p.requires_grad_(True)
    for name, scores in trainable.items():
        torch.testing.assert_close(frozen[name], scores)


@pytest.mark.parametrize(
    ("n", "m", "score"), [(2, 4, "magnitude"), (4, 8, "magnitude"), (1, 4, "wanda")]
)
def test_nm_keeps_the_n_largest_of_every_m_consecutive_inputs(harness, n, m, score):
    w = _weight(harness, LAYER).clone()
    scores = w.abs() * (_calibration_input_norms(harness, LAYER) if score == "wanda" else 1)
    with harness.modified([("prune.nm", {"n": n, "m": m, "score": score})]):
        kept = _weight(harness, LAYER) != 0
    groups_kept = kept.view(w.shape[0], -1, m)
    assert (groups_kept.sum(-1) == n).all()
    groups = scores.view(w.shape[0], -1, m)
    lowest_kept = torch.where(groups_kept, groups, torch.inf).amin(-1)
    highest_dropped = torch.where(groups_kept, -torch.inf, groups).amax(-1)
    assert (lowest_kept > highest_dropped).all()


def test_bit_packing_round_trips():
    keep = torch.rand(7, 13, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_bits(keep)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 2)
    assert torch.equal(unpack_bits(packed, 13), keep)


def test_heads_zero_query_rows_and_output_columns_and_shared_kv_only_when_unread(harness):
    attention = harness.model.model.layers[1].self_attn
    d = attention.head_dim
    with harness.modified([("prune.heads", {"heads": [(1, 0)]})]):
        q, k, o = attention.q_proj.weight, attention.k_proj.weight, attention.o_proj.weight
        assert (q[:d] == 0).all() and (q[d:] != 0).all()
        assert (o[:, :d] == 0).all() and (o[:, d:] != 0).all()
        assert (k != 0).all()  # kv head 0 is still read by query head 1
    with harness.modified([("prune.heads", {"heads": [(1, 0), (1, 1)]})]):
        k, v = attention.k_proj.weight, attention.v_proj.weight
        assert (k[:d] == 0).all() and (v[:d] == 0).all() and (k[d:] != 0).all()
        assert (harness.model.model.layers[0].self_attn.q_proj.weight != 0).all()


def test_fraction_of_heads_and_channels_prunes_the_least_important_per_block(harness):
    with harness.modified([("prune.heads", {"fraction": 0.5})]):
        for layer in harness.model.model.layers:
            a = layer.self_attn
            zero_heads = (a.o_proj.weight == 0).all(0).view(-1, a.head_dim).all(1)
            assert int(zero_heads.sum()) == a.config.num_attention_heads // 2
    with harness.modified([("prune.channels", {"fraction": 0.5})]):
        for layer in harness.model.model.layers:
            mlp = layer.mlp
            dead = (mlp.down_proj.weight == 0).all(0)
            assert int(dead.sum()) == mlp.down_proj.weight.shape[1] // 2
            assert torch.equal((mlp.gate_proj.weight == 0).all(1), dead)
            assert torch.equal((mlp.up_proj.weight == 0).all(1), dead)


def test_zeroed_heads_and_channels_equal_their_removal_despite_biases(gpt2):
    """Zeroing the producing rows changes nothing beyond removing the consumer columns."""
    ids = gpt2.windows.eval[:2]
    model = gpt2.model
    for name, params, consumer, cols in [
        ("prune.heads", {"heads": [(0, 1), (1, 3)]}, "attn.c_proj", {0: (16, 32), 1: (48, 64)}),
        ("prune.channels", {"fraction": 0.25, "importance": "weight"}, "mlp.c_proj", None),
    ]:
        with gpt2.modified([(name, params)]):
            pruned = gpt2.context.logits(ids)
            dead = {i: (_weight(gpt2, f"transformer.h.{i}.{consumer}") == 0).all(0) for i in (0, 1)}
        if cols:
            for i, (a, b) in cols.items():
                assert dead[i][a:b].all() and int(dead[i].sum()) == b - a
        with gpt2.modified([]) as patch:
            for i, columns in dead.items():
                module = model.get_submodule(f"transformer.h.{i}.{consumer}")
                patch.parametrize(
                    Target(f"c{i}", module, True), lambda w, c=columns: torch.where(c, 0, w)
                )
            only_columns = gpt2.context.logits(ids)
        torch.testing.assert_close(pruned, only_columns, rtol=1e-5, atol=1e-5)


def test_layers_drop_blocks_and_renumber_the_rest(harness):
    model = harness.model
    similarity = block_similarity(model, harness.context)
    most_similar = max(range(4), key=lambda i: similarity[i])
    blocks = list(model.model.layers)
    with harness.modified([("prune.layers", {"count": 1})]):
        kept = list(model.model.layers)
        assert kept == [b for i, b in enumerate(blocks) if i != most_similar]
        assert model.config.num_hidden_layers == 3
        assert [b.self_attn.layer_idx for b in kept] == [0, 1, 2]
        # so that generation with a KV cache sized from the config still works
        prompt = harness.windows.eval[:1, :8]
        cached = model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=True)
        uncached = model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=False)
        assert torch.equal(cached, uncached)
    assert list(model.model.layers) == blocks and model.config.num_hidden_layers == 4
    assert [b.self_attn.layer_idx for b in blocks] == [0, 1, 2, 3]
    with harness.modified([("prune.layers", {"count": 2, "selection": "last"})]):
        assert list(model.model.layers) == blocks[:2]
    with harness.modified(
        [("prune.layers", {"count": 1, "exclude": ("*.layers.3.*",), "selection": "last"})]
    ):
        assert list(model.model.layers) == blocks[:2] + blocks[3:]


def test_dropping_a_block_equals_running_without_it(gpt2):
    ids = gpt2.windows.eval[:1]
    model = gpt2.model
    with gpt2.modified([("prune.layers", {"indices": [0]})]):
        dropped = gpt2.context.logits(ids)
    with torch.no_grad():
        tr = model.transformer
        x = tr.wte(ids) + tr.wpe(torch.arange(ids.shape[1])[None])
        by_hand = model.lm_head(tr.ln_f(tr.h[1](x)))
    torch.testing.assert_close(dropped, by_hand, rtol=1e-5, atol=1e-5)


# --- restore and errors ------------------------------------------------------------------------

ALL = [
    ("prune.wanda", {"sparsity": 0.5}),
    ("prune.gradient", {"sparsity": 0.5}),
    ("prune.nm", {"n": 2, "m": 4, "score": "wanda"}),
    ("prune.heads", {"fraction": 0.5}),
    ("prune.channels", {"fraction": 0.5}),
    ("prune.layers", {"count": 1}),
    ("prune.heads", {"fraction": 0.3, "scope": "global", "importance": "weight"}),
    ("prune.channels", {"fraction": 0.3, "scope": "global", "importance": "weight"}),
]


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_every_pruning_restores_the_model_bit_for_bit(which, harness, gpt2):
    h = harness if which == "llama" else gpt2
    ids = h.windows.eval[:1]
    with torch.no_grad():
        baseline = h.context.logits(ids)
    before = snapshot(h.model)
    stages = [[stage] for stage in ALL]
    # composed, each stage scored on the output of the ones before
    stages.append([ALL[0], ALL[2], ALL[1], ALL[3]])
    for stage in stages:
        with h.modified(stage), torch.no_grad():
            assert not torch.equal(h.context.logits(ids), baseline), stage  # it changed something
        assert_restored(h.model, before)


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("prune.wanda", {"sparsity": 1.5}, r"sparsity=1\.5 .*use a number in \[0\.0, 1\.0\]"),
        ("prune.gradient", {"sparsity": -0.1}, r"sparsity=-0\.1 .*use a number"),
        ("prune.nm", {"n": 5, "m": 4}, r"n=5 .*use an integer in \[1, 4\]"),
        ("prune.nm", {"score": "taylor"}, r"score='taylor' .*choose one of 'magnitude', 'wanda'"),
        ("prune.heads", {"fraction": 0.5, "heads": [(0, 1)]}, r"fraction=0\.5 and heads.*pass one"),
        ("prune.heads", {"heads": [(0, -1)]}, r"heads=.*\(layer, head\) pairs"),
        ("prune.heads", {"fraction": 2}, r"fraction=2 .*use a number"),
        (
            "prune.channels",
            {"importance": "random"},
            r"importance='random' .*'activation', 'weight'",
        ),
        ("prune.layers", {"count": 1, "indices": [2]}, r"count=1 and indices=\(2,\).*pass one"),
        ("prune.layers", {"selection": "first"}, r"selection='first' .*'importance', 'last'"),
    ],
)
def test_bad_parameters_name_the_value_and_the_fix(name, params, match):
    with pytest.raises(HemorrhageError, match=match):
        make(name, params)


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("prune.layers", {"count": 4}, r"count=4 .*use count <= 3"),
        ("prune.layers", {"indices": [7]}, r"indices=\(7,\) names block 7 .*0\.\.3"),
        ("prune.heads", {"heads": [(0, 9)]}, r"\(0, 9\) .*head < 4"),
        ("prune.nm", {"n": 1, "m": 3}, r"has 128 inputs, not a multiple of m=3"),
    ],
)
def test_parameters_that_do_not_fit_the_model_are_refused(harness, name, params, match):
    before = snapshot(harness.model)
    with pytest.raises(HemorrhageError, match=match):
        harness.measure([(name, params)])
    assert_restored(harness.model, before)


@pytest.mark.parametrize("name", ["prune.heads", "prune.channels"])
def test_unrecognized_architecture_is_named(name):
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block(), Block()])

    model = Odd()
    # the layers found are named, and only what applies to such a model is suggested
    expected = (
        r"Odd: the \w+ of block 'blocks\.0' \(a, b\) is not a layout .*; use prune\.layers or "
    )
    with pytest.raises(HemorrhageError, match=expected + r"prune\.magnitude instead$"):
        apply(make(name, {"fraction": 0.5}), model, Patch(model), None)


# --- (b) by effect on the bundled model --------------------------------------------------------


def test_at_half_sparsity_structure_costs_more_quality(harness):
    """The paper's ordering at 50%: unstructured < 4:8 < 2:4 < structured (MLP channels)."""
    damage = {
        "unstructured": _ppl_increase(harness, "prune.magnitude", sparsity=0.5),
        "4:8": _ppl_increase(harness, "prune.nm", n=4, m=8),
        "2:4": _ppl_increase(harness, "prune.nm", n=2, m=4),
        "channels": _ppl_increase(harness, "prune.channels", fraction=0.5),
    }
    values = list(damage.values())
    assert values == sorted(values), damage


# --- (c) mitigations where outlier channels exist ----------------------------------------------


def test_rescaling_preserves_the_function(harness, most_read_outliers):
    assert most_read_outliers.reference.ppl == pytest.approx(harness.reference.ppl, rel=1e-4)


@pytest.mark.parametrize("sparsity", [0.5, 0.6])
def test_wanda_and_gradient_survive_outlier_channels_that_break_magnitude(
    most_read_outliers, sparsity
):
    """Magnitude zeroes the shrunken columns that read the outlier channels; the Wanda and
    Taylor scores are invariant to the rescaling and keep them.

    Measured: magnitude 0.38 at 50%, 0.71 at 60%; Wanda 0.15, 0.46; gradient 0.18, 0.50 (the
    same as on the plain model, where magnitude gives 0.13 and 0.38)."""
    magnitude = _ppl_increase(most_read_outliers, "prune.magnitude", sparsity=sparsity)
    for name in ("prune.wanda", "prune.gradient"):
        mitigated = _ppl_increase(most_read_outliers, name, sparsity=sparsity)
        assert mitigated < 0.75 * magnitude, (name, mitigated, magnitude)


def test_gradient_scores_are_invariant_to_the_rescaling(
    harness, most_read_outliers, outlier_channels
):
    """W' = W / a and dL/dW' = a dL/dW on the rescaled columns: |W' ⊙ dL/dW'| is unchanged."""
    names = [f"model.layers.{i}.{p}" for i in (0, 3) for p in ("self_attn.q_proj", "mlp.up_proj")]
    targets = {
        h: make("prune.gradient", {"include": tuple(names)}).targets(h.model)
        for h in (harness, most_read_outliers)
    }
    windows = harness.context.calibration_windows(4)
    plain = taylor_scores(harness.model, harness.context, targets[harness], windows)
    rescaled = taylor_scores(
        most_read_outliers.model, most_read_outliers.context, targets[most_read_outliers], windows
    )
    columns = list(outlier_channels)
    for name in names:
        a, b = plain[name], rescaled[name]
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4 * float(a.max()))
        # while the weights themselves differ by the factor on those columns
        ratio = _weight(harness, name)[:, columns] / _weight(most_read_outliers, name)[:, columns]
        torch.testing.assert_close(ratio, torch.full_like(ratio, OUTLIER_SCALE))


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_magnitude_scope_layer_prunes_each_layer_alike_global_by_one_threshold(harness, scope):
    """``scope="layer"``: every layer loses exactly its fraction. ``scope="global"``: one
    magnitude threshold for all layers, so the layers' sparsities differ (the bundled model's
    v_proj lose far more than its q_proj) while the total is the fraction."""
    config = make("prune.magnitude", {"sparsity": 0.5, "scope": scope})
    targets = config.targets(harness.model)
    before = {t.name: t.weight.detach().abs().clone() for t in targets}
    with harness.modified(config):
        pruned = {t.name: t.weight.detach() == 0 for t in targets}
    sparsity = {name: mask.double().mean().item() for name, mask in pruned.items()}
    total = sum(int(m.sum()) for m in pruned.values()) / sum(m.numel() for m in pruned.values())
    assert total == pytest.approx(0.5, abs=1e-4)
    largest_pruned = max(before[n][pruned[n]].max().item() for n in pruned)
    smallest_kept = min(before[n][~pruned[n]].min().item() for n in pruned)
    if scope == "layer":
        assert set(sparsity.values()) == {0.5}, sparsity
        assert largest_pruned > smallest_kept  # each layer had its own threshold
    else:
        assert max(sparsity.values()) - min(sparsity.values()) > 0.3, sparsity
        assert largest_pruned <= smallest_kept  # one threshold separates pruned from kept


def test_magnitude_thresholds_are_selected_once_per_model_state_and_selection(tiny, make_harness):
    """Thresholds are memoized per session: a repeated measure reuses them (same bits), while
    an earlier stage (another model state) or other targets select anew."""
    h = make_harness(tiny, tokens=256)
    alone = ("prune.magnitude", {"sparsity": 0.5})
    after_rtn = [("quant.rtn", {"bits": 2, "group_size": 32}), alone]

    def selections() -> int:
        return sum(isinstance(k, tuple) and k[0] == "prune.magnitude" for k in h.memo)

    first = h.measure([alone]).metrics
    assert h.measure([alone]).metrics == first and selections() == 1
    composed = h.measure(after_rtn).metrics
    assert selections() == 2
    h.measure([("prune.magnitude", {"sparsity": 0.5, "include": ("*.mlp.*",)})])
    assert selections() == 3
    # the thresholds after quant.rtn are the quantized weights', not reused from the plain model
    assert make_harness(tiny, tokens=256).measure(after_rtn).metrics == composed


def test_magnitude_prunes_each_conv1d_layer_its_fraction(gpt2):
    """GPT-2's (in, out) weights are ranked in their stored order: the same k per layer."""
    config = make("prune.magnitude", {"sparsity": 0.3})
    with gpt2.modified(config):
        zeros = [(t.weight == 0).double().mean().item() for t in config.targets(gpt2.model)]
    assert zeros == [pytest.approx(0.3, abs=1e-3)] * len(zeros)
