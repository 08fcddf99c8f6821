"""The recipe's teacher-logit cache stage (`--teacher_cache`): taken once, read by search retraining and
distillation, exact at k = V, reused on rerun and recomputed (with what trained from it) when its settings change."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from hf_minitron.cli import run_recipe
from hf_minitron.stages import StageChangedError

from test_recipe import recipe_flags


def search_flags(model_dir, corpus, out, **overrides):
    flags = recipe_flags(model_dir, corpus, out, max_steps=3, save_steps=10, **overrides)
    for name in ("--hidden_size", "--intermediate_size", "--num_hidden_layers"):  # the search picks the shape
        i = flags.index(name)
        del flags[i : i + 2]
    return flags + ["--search", "true", "--target_params", "0.6", "--search_max_candidates", "2", "--search_retrain_steps", "2"]


def vocab_size(model_dir) -> int:
    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f)["vocab_size"]


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def test_cache_stage_at_full_vocab_equals_the_live_recipe_and_is_reused(recipe_assets, tmp_path, monkeypatch):
    model_dir, corpus = recipe_assets
    V = vocab_size(model_dir)
    live = run_recipe(search_flags(model_dir, corpus, str(tmp_path / "live")))
    out = str(tmp_path / "cached")
    cache_flags = search_flags(model_dir, corpus, out) + ["--teacher_cache", "true", "--teacher_cache_top_k", str(V),
                                                          "--teacher_cache_dtype", "float32"]

    # Neither search retraining nor distillation may run the teacher once the cache exists.
    import hf_minitron.distillation.trainer as trainer_module

    calls = {"teacher_forward_in_trainer": 0}
    original_init = trainer_module.DistillationTrainer.__init__

    def recording_init(self, *args, **kwargs):
        if kwargs.get("teacher_model") is not None:
            calls["teacher_forward_in_trainer"] += 1
        return original_init(self, *args, **kwargs)

    monkeypatch.setattr(trainer_module.DistillationTrainer, "__init__", recording_init)
    cached = run_recipe(cache_flags)
    assert calls["teacher_forward_in_trainer"] == 0
    assert cached["stages"]["teacher_cache"]["action"] == "computed"
    manifest = json.load(open(os.path.join(out, "teacher_cache", "teacher_logits_manifest.json")))
    assert manifest["top_k"] == V and not os.path.exists(os.path.join(out, "teacher_cache.partial"))
    record = json.load(open(os.path.join(out, "teacher_cache", ".minitron_stage.json")))
    assert record["settings"] == {"top_k": V, "logprob_dtype": "float32"} and record["info"]["tokens"] > 0

    # k = V, float32: the same search ranking and retrained losses, the same final weights as the live teacher.
    s_live = json.load(open(tmp_path / "live" / "search" / "architecture_search.json"))["candidates"]
    s_cache = json.load(open(os.path.join(out, "search", "architecture_search.json")))["candidates"]
    assert [c["name"] for c in s_cache] == [c["name"] for c in s_live]
    for a, b in zip(s_cache, s_live):
        assert a["retrain_loss"] == pytest.approx(b["retrain_loss"], rel=1e-4)
    w_live, w_cache = weights(tmp_path / "live" / "final"), weights(os.path.join(out, "final"))
    assert w_live.keys() == w_cache.keys()
    for name in w_live:
        torch.testing.assert_close(w_cache[name], w_live[name], rtol=1e-4, atol=1e-5, msg=name)
    assert cached["rows"][-1]["perplexity"] == pytest.approx(live["rows"][-1]["perplexity"], rel=1e-4)

    # Rerun: the cache stage is reused (no teacher pass) along with everything else.
    import hf_minitron.distillation as distillation

    def fail(*args, **kwargs):
        raise AssertionError("the teacher-logit cache was taken again")

    monkeypatch.setattr(distillation, "cache_teacher_logits", fail)
    again = run_recipe(cache_flags)
    assert {k: v["action"] for k, v in again["stages"].items()}["teacher_cache"] == "reused"
    assert again["rows"] == cached["rows"]

    # Another k: --resume strict names the change; the cache and what trained from it are stale, importance is not.
    changed = search_flags(model_dir, corpus, out) + ["--teacher_cache", "true", "--teacher_cache_top_k", "8"]
    with pytest.raises(StageChangedError, match=r"teacher_cache\.top_k: \d+ -> 8") as err:
        run_recipe(changed + ["--resume", "strict"])
    stale = {line.split()[1] for line in str(err.value).splitlines() if line.startswith("  - ")}
    assert {"teacher_cache", "search", "distill"} <= stale and "importance" not in stale


def test_turning_the_cache_off_reuses_the_live_stages(recipe_assets, tmp_path):
    """The option adds a stage; without it, fingerprints are those of a recipe without the stage."""
    model_dir, corpus = recipe_assets
    out = str(tmp_path / "run")
    run_recipe(recipe_flags(model_dir, corpus, out, max_steps=2, save_steps=10))
    again = run_recipe(recipe_flags(model_dir, corpus, out, max_steps=2, save_steps=10) + ["--teacher_cache", "false"])
    assert {v["action"] for v in again["stages"].values()} == {"reused"}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--teacher_logits_cache", "somewhere"], "use `--teacher_cache`"),
        (["--teacher_cache", "true", "--temperature", "2.0"], r"--teacher_cache: `temperature=2.0`"),
        (["--teacher_cache", "true", "--hidden_state_loss", "cosine"], r"--teacher_cache: `hidden_state_loss='cosine'`"),
        (["--teacher_cache", "true", "--teacher_cache_top_k", "0"], "`teacher_cache_top_k` must be a positive integer"),
        (["--teacher_cache", "true", "--teacher_cache_dtype", "int8"], "`teacher_cache_dtype` must be one of"),
    ],
)
def test_bad_cache_options_are_refused_before_any_work(recipe_assets, tmp_path, extra, message):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        run_recipe(recipe_flags(*recipe_assets, str(out)) + extra)
    assert not any(n in ("importance", "teacher_cache", "teacher_cache.partial") for n in (os.listdir(out) if out.exists() else []))
