"""Architecture search over MoE and hybrid models: the block axes, exact total / active counts, active-param targets."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_minitron import MinitronPruneConfig, get_layout, prune_model
from hf_minitron.counting import active_params, count_params
from hf_minitron.search import BLOCK_SEARCH_AXES, SearchResult, default_search_space, enumerate_shapes, search_architectures, search_axes
from hf_minitron.search.counting import _ParamCounter

from conftest import random_batches, tiny_llama
from test_moe_hybrid import NAMES, _one_thread, make, parts_of, scores_for  # noqa: F401 (fixture)


def _numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_blockwise_counts_equal_full_builds(name):
    """The search's block-wise counter (few meta builds) equals a full meta build of every shape it counts."""
    model = make(name)
    layout = get_layout(model)
    source = layout.read_sizes(model.config)
    scores = scores_for(model)
    space = default_search_space(source)
    assert [a for a in BLOCK_SEARCH_AXES if a in space] == [a for a in BLOCK_SEARCH_AXES if a in source]
    shapes = enumerate_shapes(source, space, layout=layout, layer_parts=parts_of(model))
    assert shapes and all(s[a] <= source[a] for s in shapes for a in search_axes(source))
    counter = _ParamCounter(model.config, layout)
    counter.prepare(shapes)
    assert counter.builds < len(shapes)
    step = max(1, len(shapes) // 12)  # a spread of shapes (every axis varies across the sample)
    base = MinitronPruneConfig()
    for s in shapes[::step] + shapes[-1:]:
        kept = counter.kept_layers(s, base, scores)
        assert counter(s, kept) == counter.exact(s, kept), (name, s)
    # and the pruned model of the smallest shape pruning accepts has exactly that count (OLMoE builds q/k norms
    # hidden_size wide, so heads x head_dim must stay hidden_size; a hybrid must keep an attention layer)
    for s in reversed(shapes):
        try:
            pruned = prune_model(copy.deepcopy(model), MinitronPruneConfig(**{a: s[a] for a in search_axes(source)}), importance=scores)
        except ValueError:
            continue
        assert counter(s, counter.kept_layers(s, base, scores)) == (_numel(pruned), active_params(pruned)), name
        break
    else:
        raise AssertionError(f"no shape of {name} prunes")


def test_search_leaves_out_shapes_stock_transformers_would_not_rebuild():
    model = make("olmoe")  # q_norm / k_norm are hidden_size wide: heads x head_dim must equal hidden_size
    space = {"num_hidden_layers": [4], "hidden_size": [64, 48, 32], "num_attention_heads": [8, 6, 4], "num_key_value_heads": [2]}
    result = search_architectures(model, None, 0.7, tolerance=0.3, search_space=space, max_candidates=6, selection="closest")
    assert len(result) >= 2
    assert all(c.sizes["num_attention_heads"] * c.sizes["head_dim"] == c.sizes["hidden_size"] for c in result)
    for c in result:
        prune_model(copy.deepcopy(model), c.config, importance=scores_for(model))  # every candidate prunes


def test_moe_search_respects_an_active_params_budget():
    model = make("qwen2_moe")  # dense + MoE layers (decoder_sparse_step=2) with a shared expert
    source_total, source_active = _numel(model), active_params(model)
    assert source_active < source_total
    budget = int(0.7 * source_active)
    space = {"num_hidden_layers": [4], "num_attention_heads": [8], "num_key_value_heads": [2], "intermediate_size": [96, 64],
             "hidden_size": [64, 48]}
    result = search_architectures(
        model, scores_for(model), target_params=None, target_active_params=budget, tolerance=0.1, search_space=space,
        max_candidates=3, eval_dataset=random_batches(num=2, seed=5),
    )
    assert result.target_params is None and result.target_active_params == budget
    assert result.source_active_params == source_active
    for c in result:
        assert abs(c.active_params / budget - 1) <= 0.1 and c.active_deviation == pytest.approx(c.active_params / budget - 1)
        assert {"num_experts", "moe_intermediate_size", "shared_expert_intermediate_size"} <= set(c.config.to_dict())
        assert c.name.startswith(f"L4-H{c.sizes['hidden_size']}-A8/2-F") and "-E" in c.name and "-S" in c.name
        assert c.zero_shot_loss is not None and torch.isfinite(torch.tensor(c.zero_shot_loss))
    # the expert axes really were searched: some candidate prunes experts or their width
    assert any(c.sizes["num_experts"] < 8 or c.sizes["moe_intermediate_size"] < 32 for c in result)
    best = prune_model(copy.deepcopy(model), result.best.config, importance=scores_for(model))
    assert (_numel(best), active_params(best)) == (result.best.num_params, result.best.active_params)
    table = result.to_table()
    assert "experts" in table and "active params" in table and "Δ active target" in table and "Δ target" not in table


def test_both_targets_bound_total_and_active(tmp_path):
    model = make("mixtral")
    total, active = _numel(model), active_params(model)
    space = {"num_hidden_layers": [4, 3], "num_attention_heads": [8], "num_key_value_heads": [2]}
    result = search_architectures(
        model, None, target_params=0.6, target_active_params=0.75, tolerance=0.08, search_space=space, max_candidates=4,
    )
    assert result.ranked_by == "param_distance"
    for c in result:
        assert abs(c.num_params / round(0.6 * total) - 1) <= 0.08 and abs(c.active_params / round(0.75 * active) - 1) <= 0.08
        assert c.num_params == count_params(model, c.sizes) and c.active_params == active_params(model, c.sizes)
    # both windows bind: fewer shapes satisfy both than either one alone
    alone = [
        search_architectures(model, None, tolerance=0.08, search_space=space, max_candidates=4, **kw).num_within_tolerance
        for kw in (dict(target_params=0.6), dict(target_params=None, target_active_params=0.75))
    ]
    assert result.num_within_tolerance < min(alone)
    loaded = SearchResult.load(result.save(tmp_path / "search"))
    assert [(c.name, c.active_params, c.kept_layers) for c in loaded] == [(c.name, c.active_params, c.kept_layers) for c in result]


def test_hybrid_search_over_depth_and_mamba_heads_keeps_the_ranked_layers():
    """Nemotron-H's layers hold different blocks: the count of a shallower shape depends on which layers are kept, so
    the search ranks them with the importance scores, as pruning does; the winner's pruned model has that count."""
    model = make("nemotron_h")  # Mamba, MoE, attention, MLP, Mamba, attention
    scores = scores_for(model)
    source_active = active_params(model)
    space = {"num_hidden_layers": [6, 5, 4], "hidden_size": [64, 48], "num_attention_heads": [8], "num_key_value_heads": [2],
             "intermediate_size": [96], "moe_intermediate_size": [32], "shared_expert_intermediate_size": [48]}
    result = search_architectures(
        model, scores, target_params=None, target_active_params=int(0.6 * source_active), tolerance=0.15,
        search_space=space, max_candidates=4, eval_dataset=random_batches(num=2, seed=5),
    )
    assert "mamba_num_heads" in result.best.config.to_dict() and "-M" in result.best.name
    assert any(c.sizes["num_hidden_layers"] < 6 for c in result) and any(c.sizes["mamba_num_heads"] < 8 for c in result)
    for c in result:
        pruned = prune_model(copy.deepcopy(model), c.config, importance=scores)
        assert pruned.minitron_provenance["kept"]["layers"] == c.kept_layers
        assert (_numel(pruned), active_params(pruned)) == (c.num_params, c.active_params), c.name
        assert abs(c.active_params / result.target_active_params - 1) <= 0.15


def test_search_bad_inputs():
    dense = tiny_llama()
    with pytest.raises(ValueError, match=r"num_experts.*do not apply"):
        search_architectures(dense, None, 0.6, search_space={"num_experts": [4]})
    with pytest.raises(ValueError, match="target_active_params"):
        search_architectures(dense, None, None)
    with pytest.raises(ValueError, match="fractional `target_active_params`"):
        search_architectures(make("mixtral"), None, None, target_active_params=1.5)
    hybrid = make("nemotron_h")
    with pytest.raises(ValueError, match="layers hold different blocks.*calibration_data"):
        search_architectures(hybrid, None, 0.7, search_space={"num_hidden_layers": [6, 5]})
    # a fixed depth needs no scores to count
    result = search_architectures(hybrid, None, None, target_active_params=0.8, tolerance=0.2, search_space="width", max_candidates=2)
    assert all(c.sizes["num_hidden_layers"] == 6 for c in result)


def test_recipe_arguments_take_the_block_targets_and_an_active_search_target():
    from hf_minitron.pipeline import MinitronRecipeArguments

    config = MinitronRecipeArguments(num_experts=4, moe_intermediate_size=16, mamba_num_heads=4).prune_config()
    assert (config.num_experts, config.moe_intermediate_size, config.mamba_num_heads, config.hidden_size) == (4, 16, 4, None)
    assert MinitronRecipeArguments(search=True, target_active_params=0.5).prune_config().num_experts is None
    with pytest.raises(ValueError, match="target_active_params"):
        MinitronRecipeArguments(search=True).prune_config()
