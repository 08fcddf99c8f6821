"""Exactness of width and depth pruning on tiny Llama models."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_minitron import MinitronPruneConfig, estimate_importance, prune_model
from hf_minitron.pruning import make_plan

from conftest import random_batches, tiny_llama


CALIB = MinitronPruneConfig(num_calibration_samples=16, calibration_batch_size=4)
INPUT = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(7))


def logits(model, ids=INPUT):
    with torch.no_grad():
        return model(ids).logits


def scores_for(model):
    return estimate_importance(model, random_batches(), CALIB, show_progress=False)


@pytest.mark.parametrize("tied", [False, True])
def test_pruning_nothing_reproduces_logits(tied):
    model = tiny_llama(tie_word_embeddings=tied)
    ref = logits(model)
    pruned = prune_model(copy.deepcopy(model), MinitronPruneConfig(), importance=scores_for(model))
    torch.testing.assert_close(logits(pruned), ref, atol=1e-5, rtol=0)
    # Targets equal to the source are also a no-op.
    same = MinitronPruneConfig(hidden_size=64, intermediate_size=128, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=4)
    torch.testing.assert_close(logits(prune_model(copy.deepcopy(model), same, importance=scores_for(model))), ref, atol=1e-5, rtol=0)


def test_full_target_shapes_and_config():
    model = tiny_llama()
    config = MinitronPruneConfig(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=1, num_hidden_layers=3)
    pruned = prune_model(model, config, importance=scores_for(model))
    c = pruned.config
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.num_hidden_layers, c.head_dim) == (48, 96, 4, 1, 3, 8)
    layer = pruned.model.layers[0]
    assert layer.self_attn.q_proj.weight.shape == (32, 48)
    assert layer.self_attn.k_proj.weight.shape == (8, 48)
    assert layer.self_attn.o_proj.weight.shape == (48, 32)
    assert layer.mlp.down_proj.weight.shape == (48, 96)
    assert pruned.lm_head.weight.shape == (128, 48)
    assert pruned.model.embed_tokens.weight.shape == (128, 48)
    assert layer.self_attn.num_key_value_groups == 4
    assert [l.self_attn.layer_idx for l in pruned.model.layers] == [0, 1, 2]
    assert logits(pruned).shape == (2, 12, 128)
    prov = pruned.minitron_provenance
    assert len(prov["kept"]["layers"]) == 3 and prov["source_config"]["hidden_size"] == 64
    assert all(len(h) == 4 for h in prov["kept"]["heads"])


def test_tied_embeddings_stay_tied():
    model = tiny_llama(tie_word_embeddings=True)
    pruned = prune_model(model, MinitronPruneConfig(hidden_size=32), importance=scores_for(model))
    assert pruned.lm_head.weight is pruned.model.embed_tokens.weight
    assert pruned.lm_head.weight.shape == (128, 32)


def test_planted_neurons_are_pruned_without_changing_logits():
    model = tiny_llama()
    dead = [3, 17, 40, 41, 90, 127, 5, 64]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight[dead] = 0
            layer.mlp.up_proj.weight[dead] = 0
    ref = logits(model)
    scores = scores_for(model)
    for i in range(4):
        assert set(torch.argsort(scores.neurons[i])[: len(dead)].tolist()) == set(dead)
    pruned = prune_model(model, MinitronPruneConfig(intermediate_size=128 - len(dead)), importance=scores)
    torch.testing.assert_close(logits(pruned), ref, atol=1e-5, rtol=0)


def test_planted_query_heads_are_pruned_without_changing_logits():
    # Multi-head attention (KV heads = heads) so a zeroed v row-block silences exactly one head.
    model = tiny_llama(num_key_value_heads=8)
    dead = {0: [1, 6, 2, 3], 1: [0, 7, 4, 5], 2: [3, 4, 0, 1], 3: [2, 5, 6, 7]}
    with torch.no_grad():
        for i, heads in dead.items():
            for h in heads:
                model.model.layers[i].self_attn.v_proj.weight[h * 8 : (h + 1) * 8] = 0
    ref = logits(model)
    scores = scores_for(model)
    for i, heads in dead.items():
        assert set(torch.argsort(scores.heads[i])[:4].tolist()) == set(heads)
    # hidden 64 must stay a multiple of the head count: 8 -> 4 heads.
    pruned = prune_model(model, MinitronPruneConfig(num_attention_heads=4, num_key_value_heads=4), importance=scores)
    assert pruned.minitron_provenance["kept"]["kv_heads"][0] == [0, 4, 5, 7]
    torch.testing.assert_close(logits(pruned), ref, atol=1e-5, rtol=0)


def test_planted_gqa_query_heads_within_groups():
    # GQA (2 KV heads, 4 query heads per group): silence one query head per group via its o_proj columns.
    model = tiny_llama()
    dead = [1, 2, 5, 7]  # two heads in group 0 (heads 0-3), two in group 1 (heads 4-7)
    with torch.no_grad():
        for layer in model.model.layers:
            for h in dead:
                layer.self_attn.q_proj.weight[h * 8 : (h + 1) * 8] = 0  # uniform attention, still nonzero output
                layer.self_attn.o_proj.weight[:, h * 8 : (h + 1) * 8] = 0
    ref = logits(model)
    # The o_proj input of a q-zeroed head is not zero, so plant via scores for the selection check...
    scores = scores_for(model)
    scores.heads[:, dead] = -1.0
    pruned = prune_model(model, MinitronPruneConfig(num_attention_heads=4), importance=scores)
    assert pruned.minitron_provenance["kept"]["heads"][0] == [0, 3, 4, 6]
    assert pruned.config.num_key_value_heads == 2 and pruned.model.layers[0].self_attn.num_key_value_groups == 2
    # ...and check the slicing itself is exact (their o_proj columns were zero).
    torch.testing.assert_close(logits(pruned), ref, atol=1e-5, rtol=0)


def test_planted_kv_group_is_pruned_without_changing_logits():
    model = tiny_llama()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight[8:16] = 0  # KV group 1 -> its 4 query heads output zero
    ref = logits(model)
    scores = scores_for(model)
    assert (scores.heads[:, 4:] < 1e-6).all() and (scores.heads[:, :4] > 1e-3).all()
    pruned = prune_model(model, MinitronPruneConfig(num_attention_heads=4, num_key_value_heads=1), importance=scores)
    assert pruned.minitron_provenance["kept"]["kv_heads"] == [[0]] * 4
    torch.testing.assert_close(logits(pruned), ref, atol=1e-5, rtol=0)


def test_planted_layer_is_dropped_without_changing_logits():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    ref = logits(model)
    scores = scores_for(model)
    assert scores.block_importance[2] < 1e-6 < scores.block_importance[[0, 1, 3]].min()
    pruned = prune_model(model, MinitronPruneConfig(num_hidden_layers=3), importance=scores)
    assert pruned.minitron_provenance["kept"]["layers"] == [0, 1, 3]
    torch.testing.assert_close(logits(pruned), ref, atol=1e-5, rtol=0)


def _perplexity(model, batches):
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids in batches:
            out = model(ids, labels=ids)
            n = ids.shape[0] * (ids.shape[1] - 1)
            nll, count = nll + out.loss.item() * n, count + n
    return float(torch.tensor(nll / count).exp())


def test_perplexity_depth_criterion():
    model = tiny_llama()
    config = MinitronPruneConfig(num_hidden_layers=3, depth_criterion="perplexity", num_calibration_samples=16, calibration_batch_size=4)
    batches = random_batches()
    scores = estimate_importance(model, batches, config, show_progress=False)
    # Each entry is the calibration perplexity of the model without that layer.
    for i in range(4):
        without_i = prune_model(copy.deepcopy(model), MinitronPruneConfig(layers_to_drop=[i]))
        assert scores.layer_perplexity[i].item() == pytest.approx(_perplexity(without_i, batches), rel=1e-4)
    pruned = prune_model(copy.deepcopy(model), config, importance=scores)
    dropped = int(scores.layer_perplexity.argmin())
    assert pruned.minitron_provenance["kept"]["layers"] == [i for i in range(4) if i != dropped]


def _zero_residual_channels(model, channels):
    with torch.no_grad():
        model.model.embed_tokens.weight[:, channels] = 0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[channels] = 0
            layer.mlp.down_proj.weight[channels] = 0


@pytest.mark.parametrize("tied", [False, True])
def test_zero_residual_channels_pruned_with_rescaling_are_exact(tied):
    # A negligible epsilon: RMSNorm's eps is the one term that sees the channel count change.
    model = tiny_llama(tie_word_embeddings=tied, rms_norm_eps=1e-12)
    channels = [0, 5, 9, 13, 22, 31, 40, 41, 50, 52, 60, 63, 2, 3, 4, 6]  # 16 of 64
    _zero_residual_channels(model, channels)
    ref = logits(model)
    scores = scores_for(model)
    assert set(torch.argsort(scores.hidden)[:16].tolist()) == set(channels)
    pruned = prune_model(copy.deepcopy(model), MinitronPruneConfig(hidden_size=48), importance=scores)
    # Only RMSNorm's epsilon sees the different channel count.
    torch.testing.assert_close(logits(pruned), ref, atol=1e-4, rtol=1e-4)
    unscaled = prune_model(copy.deepcopy(model), MinitronPruneConfig(hidden_size=48, rescale_norms=False), importance=scores)
    assert (logits(unscaled) - ref).abs().max() > 1e-2  # without rescaling the norms shrink every output


def test_gqa_three_kv_heads_smollm_like():
    model = tiny_llama(hidden_size=72, num_attention_heads=9, num_key_value_heads=3, head_dim=8, tie_word_embeddings=True)
    scores = scores_for(model)
    pruned = prune_model(model, MinitronPruneConfig(hidden_size=48, num_attention_heads=6, intermediate_size=64), importance=scores)
    assert pruned.config.num_key_value_heads == 3 and pruned.model.layers[0].self_attn.num_key_value_groups == 2
    for heads in pruned.minitron_provenance["kept"]["heads"]:
        assert [h // 3 for h in heads] == [0, 0, 1, 1, 2, 2]
    assert logits(pruned).isfinite().all()


def test_generation_with_cache_matches_without_after_depth_pruning():
    model = tiny_llama()
    pruned = prune_model(model, MinitronPruneConfig(layers_to_drop=[0, 2]), importance=None)
    ids = INPUT[:1]
    with_cache = pruned.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    without = pruned.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(with_cache, without)


def test_prune_computes_importance_from_calibration_data():
    model = tiny_llama()
    pruned = prune_model(
        model, MinitronPruneConfig(intermediate_size=64, num_calibration_samples=8, calibration_batch_size=4), calibration_data=random_batches()
    )
    assert pruned.config.intermediate_size == 64
    assert pruned.minitron_provenance["importance"]["num_samples"] == 8


def test_plan_ties_are_deterministic():
    model = tiny_llama()
    scores = scores_for(model)
    scores.neurons.fill_(1.0)
    source = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 8, "num_key_value_heads": 2, "num_hidden_layers": 4, "head_dim": 8}
    plan = make_plan(MinitronPruneConfig(intermediate_size=10), source, scores)
    assert plan.neurons[0] == list(range(10))


def test_head_merge_pairs_follow_the_paper_formula():
    from hf_minitron.pruning.plan import head_merge_pairs

    # One KV group of L=6 heads ranked by score: 3 > 0 > 5 > 1 > 4 > 2; keep K=4 -> {3, 0, 5, 1}.
    scores = torch.tensor([5.0, 3.0, 1.0, 6.0, 2.0, 4.0])
    pairs = head_merge_pairs(scores, kept_heads=[0, 1, 3, 5], kept_kv=[0], group=6)
    # i = K: rank-4 head (1) absorbs rank-5 head (4); i = K-1: rank-3 head (5) absorbs rank-6 head (2).
    assert pairs == [(1, 4), (5, 2)]


def test_head_merge_option_changes_only_the_merged_heads():
    model = tiny_llama()
    scores = scores_for(model)
    plain = prune_model(copy.deepcopy(model), MinitronPruneConfig(num_attention_heads=4), importance=scores)
    merged = prune_model(copy.deepcopy(model), MinitronPruneConfig(num_attention_heads=4, merge_pruned_heads=True), importance=scores)
    merges = merged.minitron_provenance["kept"]["head_merges"][0]
    assert len(merges) == 4  # 2 pairs in each of the 2 KV groups
    kept = merged.minitron_provenance["kept"]["heads"][0]
    q0, q_plain = model.model.layers[0].self_attn.q_proj.weight, plain.model.layers[0].self_attn.q_proj.weight
    q_merged = merged.model.layers[0].self_attn.q_proj.weight
    for keep, drop in merges:
        pos = kept.index(keep)
        rows = slice(pos * 8, (pos + 1) * 8)
        torch.testing.assert_close(q_merged[rows], 2 * q0[keep * 8 : (keep + 1) * 8] - q0[drop * 8 : (drop + 1) * 8])
    untouched = [kept.index(h) for h in kept if h not in {k for k, _ in merges}]
    for pos in untouched:
        assert torch.equal(q_merged[pos * 8 : (pos + 1) * 8], q_plain[pos * 8 : (pos + 1) * 8])
