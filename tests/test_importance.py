"""Importance scores against hand-computed references; input formats; save/load; multi-process."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from torch.utils.data import DataLoader

from hf_minitron import ImportanceScores, MinitronPruneConfig, estimate_importance

from conftest import REPO_ROOT, random_batches, tiny_llama, word_tokenizer


def _capture(model, batch):
    """Full activations of one forward (reference only; the estimator never stores these)."""
    acts = {"o": [], "down": [], "norm": [], "layer_in": [], "layer_out": []}
    hooks = []
    for layer in model.model.layers:
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: acts["o"].append(a[0].clone())))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: acts["down"].append(a[0].clone())))
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            hooks.append(norm.register_forward_hook(lambda m, a, o: acts["norm"].append(o.clone())))
        hooks.append(layer.register_forward_pre_hook(lambda m, a, k: acts["layer_in"].append((a[0] if a else k["hidden_states"]).clone()), with_kwargs=True))
        hooks.append(layer.register_forward_hook(lambda m, a, o: acts["layer_out"].append((o[0] if isinstance(o, tuple) else o).clone())))
    hooks.append(model.model.norm.register_forward_hook(lambda m, a, o: acts["norm"].append(o.clone())))
    with torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()
    return acts


def _seq_ref(values, mask, how):
    """values [seq, units] for one sample -> [units], looping over real tokens only."""
    real = values[mask.bool()]
    if how == "mean":
        return real.mean(0)
    if how == "l2":
        return real.square().sum(0).sqrt()
    return real.var(0, unbiased=False)


def _batch_ref(per_sample, how):
    stacked = torch.stack(per_sample)
    if how == "l2":
        return stacked.square().sum(0).sqrt()
    if how == "mean":
        return stacked.mean(0)
    return stacked.var(0, unbiased=False)


@pytest.mark.parametrize("batch_how,seq_how", list(itertools.product(["l2", "mean", "var"], repeat=2)))
def test_aggregations_match_hand_computed_reference(batch_how, seq_how):
    model = tiny_llama()
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 128, (6, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding on two samples
    mask[4, 3:] = 0
    config = MinitronPruneConfig(batch_aggregation=batch_how, sequence_aggregation=seq_how, num_calibration_samples=6, calibration_batch_size=4)
    scores = estimate_importance(model, [{"input_ids": ids, "attention_mask": mask}], config, show_progress=False)

    # Reference: one sample at a time, no padding at all.
    per = {"heads": [[] for _ in range(4)], "neurons": [[] for _ in range(4)], "norm": [[] for _ in range(9)]}
    bi_sum, tokens = torch.zeros(4), 0
    for b in range(6):
        n = int(mask[b].sum())
        acts = _capture(model, {"input_ids": ids[b : b + 1, :n]})
        ones = torch.ones(n)
        for i in range(4):
            heads = acts["o"][i][0].unflatten(-1, (8, 8)).norm(dim=-1)
            per["heads"][i].append(_seq_ref(heads, ones, seq_how))
            per["neurons"][i].append(_seq_ref(acts["down"][i][0].abs(), ones, seq_how))
            cos = torch.nn.functional.cosine_similarity(acts["layer_in"][i][0], acts["layer_out"][i][0], dim=-1)
            bi_sum[i] += (1 - cos).sum()
        for j in range(9):
            per["norm"][j].append(_seq_ref(acts["norm"][j][0].abs(), ones, seq_how))
        tokens += n
    heads = torch.stack([_batch_ref(v, batch_how) for v in per["heads"]])
    neurons = torch.stack([_batch_ref(v, batch_how) for v in per["neurons"]])
    hidden = torch.stack([_batch_ref(v, batch_how) for v in per["norm"]]).sum(0)
    torch.testing.assert_close(scores.heads, heads, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(scores.neurons, neurons, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(scores.hidden, hidden, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(scores.block_importance, bi_sum / tokens, atol=1e-5, rtol=1e-4)
    assert scores.metadata["num_samples"] == 6 and scores.metadata["num_tokens"] == tokens


def test_input_formats_give_identical_scores():
    model = tiny_llama()
    batches = random_batches(num=2, batch=4, seq=12)
    flat = torch.cat(batches)  # [8, 12]
    config = MinitronPruneConfig(num_calibration_samples=8, calibration_batch_size=3)
    ref = estimate_importance(model, batches, config, show_progress=False)
    variants = {
        "list of [seq]": list(flat),
        "tensor [batch, seq]": flat,
        "Dataset input_ids": Dataset.from_dict({"input_ids": flat.tolist()}),
        "DataLoader of dicts": DataLoader([{"input_ids": row} for row in flat], batch_size=5),
    }
    for name, data in variants.items():
        got = estimate_importance(model, data, config, show_progress=False)
        for key, value in ref.tensors().items():
            torch.testing.assert_close(got.tensors()[key], value, atol=1e-5, rtol=1e-5, msg=f"{name}: {key}")


def test_text_dataset_with_tokenizer():
    text = " ".join(f"word{i % 37}" for i in range(400))
    tok = word_tokenizer(text)
    model = tiny_llama(vocab_size=len(tok))
    config = MinitronPruneConfig(num_calibration_samples=4, calibration_seq_length=32)
    scores = estimate_importance(model, Dataset.from_dict({"text": [text]}), config, tokenizer=tok, show_progress=False)
    assert scores.metadata["num_samples"] == 4 and scores.metadata["num_tokens"] == 128
    with pytest.raises(ValueError, match="tokenizer"):
        estimate_importance(model, [text], config, show_progress=False)


def test_scores_save_and_load_roundtrip(tmp_path):
    model = tiny_llama()
    config = MinitronPruneConfig(num_calibration_samples=8, depth_criterion="perplexity")
    scores = estimate_importance(model, random_batches(num=2), config, show_progress=False)
    scores.save(tmp_path)
    loaded = ImportanceScores.load(tmp_path)
    for key, value in scores.tensors().items():
        assert torch.equal(loaded.tensors()[key], value)
    assert loaded.metadata == scores.metadata


def test_importance_leaves_model_unchanged_and_hook_free():
    model = tiny_llama()
    ids = random_batches(num=1)[0]
    with torch.no_grad():
        ref = model(ids).logits
    estimate_importance(model, random_batches(num=2), MinitronPruneConfig(num_calibration_samples=8), show_progress=False)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


WORKER = r"""
import sys, torch, torch.distributed as dist
from transformers import AutoModelForCausalLM
from hf_minitron import MinitronPruneConfig, estimate_importance
model_dir, data_path, out = sys.argv[1:4]
dist.init_process_group("gloo")
model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
data = torch.load(data_path)
config = MinitronPruneConfig(num_calibration_samples=14, calibration_batch_size=3, depth_criterion="perplexity")
scores = estimate_importance(model, data, config, show_progress=False)
if dist.get_rank() == 0:
    scores.save(out)
dist.barrier()
dist.destroy_process_group()
"""


def test_two_process_scores_equal_single_process(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "model")
    data = list(torch.cat(random_batches(num=4, batch=4, seq=12)))[:14]  # 14 samples: uneven shards
    torch.save(data, tmp_path / "data.pt")
    (tmp_path / "worker.py").write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           str(tmp_path / "worker.py"), str(tmp_path / "model"), str(tmp_path / "data.pt"), str(tmp_path / "scores.safetensors")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    multi = ImportanceScores.load(tmp_path / "scores.safetensors")
    config = MinitronPruneConfig(num_calibration_samples=14, calibration_batch_size=3, depth_criterion="perplexity")
    single = estimate_importance(model, data, config, show_progress=False)
    for key, value in single.tensors().items():
        torch.testing.assert_close(multi.tensors()[key], value, atol=1e-5, rtol=1e-5, msg=key)
    assert multi.metadata["num_samples"] == 14


def test_accelerate_dispatched_model():
    """A model placed block by block with accelerate hooks (as device_map="auto" does; CPU-only here) scores alike."""
    import copy

    from accelerate import dispatch_model

    model = tiny_llama()
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": "cpu" for i in range(4)})
    placed = dispatch_model(copy.deepcopy(model), device_map=device_map, force_hooks=True)
    assert hasattr(placed.model.layers[0], "_hf_hook")
    config = MinitronPruneConfig(num_calibration_samples=8)
    a = estimate_importance(model, random_batches(num=2), config, show_progress=False)
    b = estimate_importance(placed, random_batches(num=2), config, show_progress=False)
    for key, value in a.tensors().items():
        torch.testing.assert_close(b.tensors()[key], value, atol=1e-5, rtol=1e-5, msg=key)
