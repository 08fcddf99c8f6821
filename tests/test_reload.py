"""A saved pruned model loads in a fresh process with stock transformers only, with identical logits."""

from __future__ import annotations

import json

import pytest
import torch

from hf_minitron import PROVENANCE_NAME, MinitronPruneConfig, estimate_importance, load_provenance, prune_model, save_pruned_model

from conftest import random_batches, run_python, tiny_llama



FRESH = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({folder!r}).eval()
ids = torch.load({ids!r})
with torch.no_grad():
    torch.save(model(ids).logits, {out!r})
tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
assert not any(name.startswith("hf_minitron") for name in sys.modules), "hf_minitron was imported"
print(type(model).__name__, tied, model.config.hidden_size, model.config.head_dim, model.config.num_hidden_layers)
"""


@pytest.mark.parametrize("tied", [False, True])
def test_fresh_process_stock_reload_gives_identical_logits(tmp_path, tied):
    model = tiny_llama(tie_word_embeddings=tied, num_hidden_layers=5)
    config = MinitronPruneConfig(
        hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=1, num_hidden_layers=3,
        num_calibration_samples=16,
    )
    scores = estimate_importance(model, random_batches(), config, show_progress=False)
    pruned = prune_model(model, config, importance=scores)
    ids = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = pruned(ids).logits
    folder = save_pruned_model(pruned, tmp_path / "pruned", importance=scores)
    torch.save(ids, tmp_path / "ids.pt")
    proc = run_python(FRESH.format(folder=folder, ids=str(tmp_path / "ids.pt"), out=str(tmp_path / "logits.pt")))
    assert proc.stdout.split() == ["LlamaForCausalLM", str(tied), "48", "8", "3"]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, atol=1e-6, rtol=0)

    provenance = load_provenance(folder)
    assert provenance == json.loads(json.dumps(pruned.minitron_provenance))
    assert provenance["source_config"]["num_hidden_layers"] == 5 and len(provenance["kept"]["layers"]) == 3
    assert (tmp_path / "pruned" / PROVENANCE_NAME).exists() and (tmp_path / "pruned" / "importance_scores.safetensors").exists()
