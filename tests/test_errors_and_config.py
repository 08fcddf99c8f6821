"""Bad inputs fail early with a message that says what to change; config round-trips."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_minitron import MinitronPruneConfig, estimate_importance, prune_model, save_pruned_model
from hf_minitron.config import CONFIG_NAME

from conftest import random_batches, tiny_llama


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(hidden_size=80), "larger than the source"),
        (dict(intermediate_size=129), "larger than the source"),
        (dict(num_attention_heads=3, num_key_value_heads=2), "multiple of num_key_value_heads"),
        (dict(hidden_size=60), "hidden_size=60 must be a multiple of num_attention_heads=8"),
        (dict(num_attention_heads=6), "hidden_size=64 must be a multiple of num_attention_heads=6"),
        (dict(num_attention_heads=8, num_key_value_heads=1), "query heads per KV group exceeds"),
        (dict(layers_to_drop=[4]), "out of range"),
        (dict(layers_to_drop=[0], num_hidden_layers=2), "conflicts"),
        (dict(layers_to_drop=[0, 1, 2, 3]), "keep at least one"),
    ],
)
def test_impossible_targets(kwargs, match):
    model = tiny_llama()
    with pytest.raises(ValueError, match=match):
        prune_model(model, MinitronPruneConfig(num_calibration_samples=4, **kwargs), calibration_data=random_batches(num=1))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(hidden_size=0), "positive integer"),
        (dict(batch_aggregation="max"), "batch_aggregation"),
        (dict(sequence_aggregation="sum"), "sequence_aggregation"),
        (dict(depth_criterion="random"), "depth_criterion"),
        (dict(layers_to_drop=[1, 1]), "distinct"),
        (dict(calibration_seq_length=1), "calibration_seq_length"),
    ],
)
def test_invalid_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MinitronPruneConfig(**kwargs)


def test_config_roundtrip_and_unknown_field(tmp_path):
    config = MinitronPruneConfig(hidden_size=48, layers_to_drop=[3, 1], batch_aggregation="mean")
    assert config.layers_to_drop == [1, 3]
    config.save_pretrained(tmp_path)
    assert MinitronPruneConfig.from_pretrained(tmp_path) == config
    data = json.loads((tmp_path / CONFIG_NAME).read_text())
    data["hidden_sise"] = 3
    (tmp_path / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="hidden_sise"):
        MinitronPruneConfig.from_pretrained(tmp_path)


def test_width_pruning_without_scores_or_data():
    with pytest.raises(ValueError, match="importance"):
        prune_model(tiny_llama(), MinitronPruneConfig(hidden_size=32))


def test_unsupported_architecture_lists_supported():
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100))
    with pytest.raises(ValueError, match=r"Unsupported architecture 'gpt2'.*llama"):
        prune_model(model, MinitronPruneConfig(hidden_size=16), calibration_data=random_batches(num=1))


def test_quantized_model_is_refused():
    model = tiny_llama()
    model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    with pytest.raises(ValueError, match="quantized.*bitsandbytes"):
        estimate_importance(model, random_batches(num=1))
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight = torch.nn.Parameter(
            model.model.layers[0].mlp.up_proj.weight.to(torch.int8), requires_grad=False
        )
    with pytest.raises(ValueError, match="quantized.*int8"):
        prune_model(model, MinitronPruneConfig(hidden_size=32), calibration_data=random_batches(num=1))


def test_dequantized_gguf_model_is_accepted_and_saves(tmp_path):
    model = tiny_llama()
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf"}
    pruned = prune_model(model, MinitronPruneConfig(intermediate_size=64, num_calibration_samples=4), calibration_data=random_batches(num=1))
    assert getattr(pruned.config, "quantization_config", None) is None
    save_pruned_model(pruned, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_meta_device_model_is_refused():
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config

    with torch.device("meta"):
        model = LlamaForCausalLM(tiny_llama_config())
    with pytest.raises(ValueError, match="meta device"):
        prune_model(model, MinitronPruneConfig(hidden_size=32), calibration_data=random_batches(num=1))


@pytest.mark.parametrize("data,match", [([], "empty"), ([torch.tensor([], dtype=torch.long)], "empty"), ([torch.tensor([5])] * 3, "too short"), (None, "required")])
def test_empty_or_short_calibration_data(data, match):
    with pytest.raises(ValueError, match=match):
        estimate_importance(tiny_llama(), data, MinitronPruneConfig(num_calibration_samples=4))


def test_save_refuses_non_empty_directory_and_leaves_no_partial_output(tmp_path, monkeypatch):
    model = prune_model(tiny_llama(), MinitronPruneConfig(layers_to_drop=[1]))
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="overwrite=True"):
        save_pruned_model(model, target)

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_pruned_model(model, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folder left behind


@pytest.mark.parametrize(
    "target, message",
    [
        ({"hidden_size": 4096}, "larger than the source"),
        ({"num_attention_heads": 3}, "multiple of num_key_value_heads"),
        ({"num_experts": 2}, "num_experts"),
    ],
)
def test_bad_target_fails_before_the_importance_pass(target, message):
    """A target pruning would refuse is refused by `estimate_importance` before any forward pass (the costly part)."""
    model = tiny_llama()
    calls = []
    model.model.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=message):
        estimate_importance(model, random_batches(model.config.vocab_size, num=2), MinitronPruneConfig(**target))
    assert calls == []
