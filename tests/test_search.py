"""Architecture search (`hf_minitron.search`) on tiny random Llamas: enumeration, exact counts, ranking, errors."""

from __future__ import annotations

import copy
import importlib.util
import itertools
import json

import pytest
import torch

from conftest import random_batches, tiny_llama
from hf_minitron import MinitronPruneConfig, estimate_importance, prune_model
from hf_minitron.architectures import get_layout
from hf_minitron.search import (
    SEARCH_AXES,
    Candidate,
    SearchResult,
    default_search_space,
    enumerate_shapes,
    heldout_loss,
    predict_num_params,
    search_architectures,
    spearman_rho,
)


HAS_DISTILLATION = importlib.util.find_spec("hf_minitron.distillation") is not None


def _numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _scores(model):
    return estimate_importance(model, random_batches(num=2), MinitronPruneConfig(batch_aggregation="l2"))


@pytest.fixture(scope="module")
def untied():
    model = tiny_llama()
    return model, _scores(model)


@pytest.fixture(scope="module")
def tied():
    model = tiny_llama(seed=3, tie_word_embeddings=True)
    return model, _scores(model)


def _sizes(model) -> dict:
    return get_layout(model).read_sizes(model.config)


# ------------------------------------------------------------------------------------------------ enumeration
def _brute_force(source: dict, space: dict) -> set[tuple]:
    group = source["num_attention_heads"] // source["num_key_value_heads"]
    out = set()
    for shape in itertools.product(*(space[a] for a in SEARCH_AXES)):
        s = dict(zip(SEARCH_AXES, shape))
        if any(s[a] > source[a] for a in SEARCH_AXES) or min(shape) < 1:
            continue
        heads, kv = s["num_attention_heads"], s["num_key_value_heads"]
        if heads % kv or heads // kv > group or s["hidden_size"] % heads:
            continue
        out.add(shape)
    return out


def test_enumeration_is_complete_and_valid(untied):
    model, _ = untied
    source = _sizes(model)
    space = {
        "num_hidden_layers": [4, 3, 2],
        "hidden_size": [64, 60, 48, 40, 36],
        "num_attention_heads": list(range(1, 9)),
        "num_key_value_heads": [1, 2],
        "intermediate_size": [128, 96, 40],
    }
    shapes = enumerate_shapes(source, space)
    got = [tuple(s[a] for a in SEARCH_AXES) for s in shapes]
    assert len(got) == len(set(got))
    assert set(got) == _brute_force(source, space)
    assert all(s["head_dim"] == source["head_dim"] for s in shapes)
    # e.g. 60 % 8 != 0, 6 heads with 1 KV head (> 4 per group), 3 heads with 2 KV heads: all excluded
    assert (4, 60, 8, 2, 128) not in got and (4, 48, 6, 1, 128) not in got and (4, 48, 3, 2, 128) not in got
    assert (4, 64, 8, 2, 128) in got and (3, 40, 4, 1, 40) in got

    # The default space is complete too (against the brute force over the same axes)
    default = default_search_space(source)
    assert default["hidden_size"] == [64, 56, 48, 40, 32]
    assert default["num_key_value_heads"] == [2, 1] and default["num_hidden_layers"] == [4, 3, 2]
    got = {tuple(s[a] for a in SEARCH_AXES) for s in enumerate_shapes(source)}
    assert got == _brute_force(source, default)


def test_presets_and_multiple_of(untied):
    model, _ = untied
    source = _sizes(model)
    width = enumerate_shapes(source, "width")
    assert width and {s["num_hidden_layers"] for s in width} == {4}
    depth = enumerate_shapes(source, "depth")
    assert [s["num_hidden_layers"] for s in depth] == [4, 3, 2]
    assert all(s[a] == source[a] for s in depth for a in SEARCH_AXES if a != "num_hidden_layers")
    rounded = enumerate_shapes(source, {"hidden_size": [64, 48, 40, 32], "intermediate_size": [128, 96, 80]}, multiple_of=32)
    assert {s["hidden_size"] for s in rounded} == {64, 32} and {s["intermediate_size"] for s in rounded} == {128, 96}


# -------------------------------------------------------------------------------------------- parameter count
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_word_embeddings": True},
        {"attention_bias": True, "mlp_bias": True},
        {"num_key_value_heads": 8, "tie_word_embeddings": True},  # MHA
        {"num_key_value_heads": 1},  # MQA
    ],
    ids=["untied-gqa", "tied-gqa", "biases", "tied-mha", "mqa"],
)
def test_predicted_params_equal_pruned_model(overrides):
    model = tiny_llama(seed=1, **overrides)
    scores = _scores(model)
    source = _sizes(model)
    assert predict_num_params(model, source) == _numel(model)
    kv, group = source["num_key_value_heads"], source["num_attention_heads"] // source["num_key_value_heads"]
    shapes = [
        dict(source, num_hidden_layers=3, hidden_size=48, intermediate_size=96),  # depth + hidden + MLP
        dict(source, num_hidden_layers=2, num_attention_heads=kv, hidden_size=32),  # one query head per KV group
        dict(source, num_key_value_heads=max(1, kv // 2), num_attention_heads=max(1, kv // 2) * group),  # fewer KV heads
    ]
    for sizes in shapes:
        config = MinitronPruneConfig(**{a: sizes[a] for a in SEARCH_AXES})
        pruned = prune_model(copy.deepcopy(model), config, importance=scores)
        assert predict_num_params(model, config) == predict_num_params(model.config, sizes) == _numel(pruned), sizes


@pytest.mark.parametrize("fixture", ["untied", "tied"])
def test_search_counts_are_exact(fixture, request):
    model, scores = request.getfixturevalue(fixture)
    n = _numel(model)
    result = search_architectures(model, scores, target_params=0.7, max_candidates=5)
    assert len(result) == 5
    for c in result:
        pruned = prune_model(copy.deepcopy(model), c.config, importance=scores)
        assert _numel(pruned) == c.num_params
        assert c.param_fraction == pytest.approx(c.num_params / n)
        assert abs(c.target_deviation) <= 0.05


def test_done_when(untied, tied, tmp_path):
    for model, scores in (untied, tied):
        n = _numel(model)
        result = search_architectures(model, scores, target_params=int(0.6 * n), tolerance=0.05, max_candidates=6, retrain_steps=0)
        assert 3 <= len(result) <= 6 and result.ranked_by == "param_distance"
        assert len({c.shape for c in result}) == len(result)
        for c in result:
            assert abs(c.num_params - int(0.6 * n)) <= 0.05 * int(0.6 * n)
            pruned = prune_model(copy.deepcopy(model), c.config, importance=scores)
            assert _numel(pruned) == c.num_params
            resolved = get_layout(pruned).read_sizes(pruned.config)
            assert all(resolved[a] == c.sizes[a] for a in SEARCH_AXES)
        pruned.save_pretrained(tmp_path / "m")  # a valid, saveable config (transformers 5 checks hidden % heads)


# ------------------------------------------------------------------------------------------------ ranking
def test_zero_shot_ranking_and_determinism(untied):
    model, scores = untied
    before = {k: v.clone() for k, v in model.state_dict().items()}
    held_out = random_batches(num=2, seed=7)
    result = search_architectures(model, scores, target_params=0.6, max_candidates=4, eval_dataset=held_out)
    assert result.ranked_by == "zero_shot_loss" and [c.rank for c in result] == [1, 2, 3, 4]
    losses = [c.zero_shot_loss for c in result]
    assert losses == sorted(losses) and all(loss > 0 for loss in losses)
    # The zero-shot loss is that of the pruned model, and the source model is untouched
    best = prune_model(copy.deepcopy(model), result.best.config, importance=scores)
    from hf_minitron.data import batch_samples, to_samples

    assert heldout_loss(best, batch_samples(to_samples(held_out), 8)) == pytest.approx(losses[0], rel=1e-6)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # Same inputs -> same result; the order of the search-space values does not matter
    space = default_search_space(_sizes(model))
    shuffled = {a: list(reversed(v)) for a, v in space.items()}
    again = search_architectures(model, scores, target_params=0.6, max_candidates=4, eval_dataset=held_out, search_space=shuffled)
    assert [c.name for c in again] == [c.name for c in result]
    assert [c.zero_shot_loss for c in again] == losses


def test_ties_are_broken_deterministically(untied, monkeypatch):
    model, scores = untied
    # Equal losses everywhere: the order falls back to |params - target|, then the larger shape first.
    monkeypatch.setattr("hf_minitron.search.orchestrate.heldout_loss", lambda m, b: 1.0)
    result = search_architectures(model, scores, target_params=0.6, max_candidates=5, eval_dataset=random_batches(num=1))
    keys = [(abs(c.num_params - result.target_params), tuple(-v for v in c.shape)) for c in result]
    assert keys == sorted(keys)
    # Two shapes with the same parameter count: the one with more layers / wider hidden ranks first.
    source = _sizes(model)
    space = {"num_hidden_layers": [4], "hidden_size": [64], "num_key_value_heads": [2], "num_attention_heads": [8, 2],
             "intermediate_size": [48, 80]}
    result = search_architectures(model, scores, target_params=predict_num_params(model, dict(source, num_attention_heads=8, intermediate_size=48)),
                                  tolerance=0.001, search_space=space, eval_dataset=random_batches(num=1))
    assert [c.num_params for c in result] == [result.target_params] * 2
    assert [c.name for c in result] == ["L4-H64-A8/2-F48", "L4-H64-A2/2-F80"]


def test_selection_spread_and_closest(untied):
    model, scores = untied
    closest = search_architectures(model, scores, target_params=0.6, max_candidates=4, selection="closest")
    spread = search_architectures(model, scores, target_params=0.6, max_candidates=4, selection="spread")
    assert closest.num_within_tolerance > 4 and closest[0].name == spread[0].name  # both start at the closest
    d_closest = [abs(c.num_params - closest.target_params) for c in closest]
    assert max(d_closest) <= min(
        abs(c.num_params - closest.target_params) for c in search_architectures(
            model, scores, target_params=0.6, max_candidates=closest.num_within_tolerance, selection="closest")[4:]
    )
    assert len({c.sizes["num_hidden_layers"] for c in spread}) >= len({c.sizes["num_hidden_layers"] for c in closest})


def test_custom_retrain_fn(untied):
    model, scores = untied
    calls = []

    def retrain_fn(student, teacher, train_dataset, max_steps, seed):
        calls.append((teacher is model, len(train_dataset), max_steps, seed))
        assert all(p.requires_grad for p in student.parameters())  # trainable even though the source is frozen
        with torch.no_grad():
            student.lm_head.weight.mul_(0.0)  # uniform predictions: loss = log(vocab)
        return student

    model.requires_grad_(False)
    try:
        result = search_architectures(model, scores, target_params=0.6, max_candidates=3, retrain_steps=7,
                                      train_dataset=random_batches(num=2), eval_dataset=random_batches(num=1, seed=9),
                                      retrain_fn=retrain_fn, seed=3)
        assert not any(p.requires_grad for p in model.parameters())  # the source's flags are restored
    finally:
        model.requires_grad_(True)
    assert calls == [(True, 8, 7, 3)] * 3
    assert result.ranked_by == "retrain_loss"
    assert all(c.retrain_loss == pytest.approx(torch.log(torch.tensor(128.0)).item(), rel=1e-5) for c in result)
    assert all(c.retrain_curve == {7: c.retrain_loss} for c in result)


@pytest.mark.skipif(not HAS_DISTILLATION, reason="hf_minitron.distillation is not available")
@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_short_distillation_smoke(untied, use_lora):
    from _distill_utils import make_tokenizer

    model, scores = untied
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {k: p.requires_grad for k, p in model.named_parameters()}
    result = search_architectures(
        model, scores, target_params=0.6, max_candidates=2, retrain_steps=2, train_dataset=random_batches(num=4),
        eval_dataset=random_batches(num=1, seed=9), use_lora=use_lora, tokenizer=make_tokenizer(),
        retrain_eval_steps=[1], training_kwargs={"use_cpu": True, "learning_rate": 1e-2},
    )
    assert result.ranked_by == "retrain_loss" and result.use_lora is use_lora
    for c in result:
        assert set(c.retrain_curve) == {1, 2} and c.retrain_curve[2] == c.retrain_loss
        assert c.retrain_loss != c.zero_shot_loss
    scores_ = [c.retrain_loss for c in result]
    assert scores_ == sorted(scores_)
    # The teacher (source model) is untouched and keeps its requires_grad flags
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert {k: p.requires_grad for k, p in model.named_parameters()} == grads
    assert "retrain loss @2" in result.to_table() and "loss @1" in result.to_table()


# ------------------------------------------------------------------------------------------------ results I/O
def test_save_load_and_table(untied, tmp_path):
    model, scores = untied
    result = search_architectures(model, scores, target_params=0.6, max_candidates=3, eval_dataset=random_batches(num=1))
    table = result.to_table()
    assert table.count("\n") == 2 + len(result) - 1 and result.best.name in table.splitlines()[2]
    file = result.save(tmp_path / "search")
    data = json.loads(open(file).read())
    assert data["best_config"] == result.best.config.to_dict() and len(data["candidates"]) == 3
    assert MinitronPruneConfig.from_pretrained(str(tmp_path / "search")) == result.best_config
    loaded = SearchResult.load(tmp_path / "search")
    assert [c.to_dict() for c in loaded] == [c.to_dict() for c in result] and loaded.target_params == result.target_params
    assert isinstance(loaded[0], Candidate) and loaded.to_table() == table
    single = result.save(tmp_path / "one.json")
    assert single.endswith("one.json") and SearchResult.load(single).best.name == result.best.name


def test_spearman_rho():
    assert spearman_rho([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman_rho([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman_rho([1.0, 2.0, 3.0], [10.0, 30.0, 20.0]) == pytest.approx(0.5)
    assert spearman_rho([1, 1, 2], [1, 2, 3]) == pytest.approx(0.8660254)


# ------------------------------------------------------------------------------------------------ bad inputs
def test_bad_inputs(untied):
    model, scores = untied
    n = _numel(model)
    with pytest.raises(ValueError, match="larger than the source"):
        search_architectures(model, scores, target_params=n + 1)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        search_architectures(model, scores, target_params=1.5)
    with pytest.raises(TypeError):
        search_architectures(model, scores, target_params="half")
    for tol in (0, 1.0, -0.1, 2):
        with pytest.raises(ValueError, match="tolerance"):
            search_architectures(model, scores, target_params=0.6, tolerance=tol)
    with pytest.raises(ValueError, match="Unknown search axes"):
        search_architectures(model, scores, target_params=0.6, search_space={"hidden": [32]})
    with pytest.raises(ValueError, match="can only shrink"):
        search_architectures(model, scores, target_params=0.6, search_space={"hidden_size": [128]})
    with pytest.raises(ValueError, match="is empty"):
        search_architectures(model, scores, target_params=0.6, search_space={"hidden_size": []})
    with pytest.raises(ValueError, match="no valid shape"):
        search_architectures(model, scores, target_params=0.6, search_space={"hidden_size": [60], "num_attention_heads": [8]})
    # Unreachable target: the message says what to change
    with pytest.raises(ValueError, match="smallest shape .* add smaller values"):
        search_architectures(model, scores, target_params=0.1)
    with pytest.raises(ValueError, match="Widen `tolerance`"):
        search_architectures(model, scores, target_params=0.6, tolerance=0.05, search_space="depth")
    with pytest.raises(ValueError, match="train_dataset"):
        search_architectures(model, scores, target_params=0.6, retrain_steps=2, eval_dataset=random_batches(num=1))
    with pytest.raises(ValueError, match="eval_dataset"):
        search_architectures(model, scores, target_params=0.6, retrain_steps=2, train_dataset=random_batches(num=1))
    with pytest.raises(ValueError, match="retrain_eval_steps"):
        search_architectures(model, scores, target_params=0.6, retrain_steps=2, retrain_eval_steps=[5],
                             train_dataset=random_batches(num=1), eval_dataset=random_batches(num=1))
    with pytest.raises(ValueError, match="multiple_of"):
        search_architectures(model, scores, target_params=0.6, multiple_of=0)
    with pytest.raises(ValueError, match="max_candidates"):
        search_architectures(model, scores, target_params=0.6, max_candidates=0)


def test_whole_float_target_is_a_count(untied):
    """YAML / CLI give floats: 0.6 is a fraction, 48000.0 a count, 1.5 neither."""
    model, scores = untied
    n = _numel(model)
    as_int = search_architectures(model, scores, target_params=int(0.6 * n), max_candidates=3)
    as_float = search_architectures(model, scores, target_params=float(int(0.6 * n)), max_candidates=3)
    assert [c.name for c in as_float] == [c.name for c in as_int] and as_float.target_params == as_int.target_params
    with pytest.raises(ValueError, match="fractional"):
        search_architectures(model, scores, target_params=1.5, max_candidates=3)
