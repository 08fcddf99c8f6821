"""The end-to-end recipe on a tiny model: single and 2-process, stage skipping, resume after a kill, bad fields."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from hf_minitron.cli import run_recipe
from hf_minitron.pipeline import RESULTS_NAME, STATE_NAME

from conftest import REPO_ROOT, run_python


def recipe_flags(model_dir, corpus, output_dir, **overrides):
    flags = dict(
        model_name_or_path=model_dir, dataset_path=corpus, output_dir=output_dir, hidden_size=32, intermediate_size=64,
        num_hidden_layers=3, num_calibration_samples=16, calibration_batch_size=8, seq_length=32, max_eval_samples=8,
        max_steps=8, save_steps=4, per_device_train_batch_size=4, learning_rate=3e-3, logging_steps=1, use_cpu=True,
        bf16=False, activation_checkpointing=False, report_to="none", seed=0,
    )
    flags.update(overrides)
    argv = []
    for key, value in flags.items():
        argv += [f"--{key}", str(value)]
    return argv


def assert_final_folder_loads_with_stock_transformers(folder):
    proc = run_python(
        "import sys, torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({folder!r}); AutoTokenizer.from_pretrained({folder!r})\n"
        "assert not any(k.startswith('hf_minitron') for k in sys.modules)\n"
        "print(m.config.hidden_size, m.config.intermediate_size, m.config.num_hidden_layers)\n"
    )
    assert proc.stdout.split() == ["32", "64", "3"]
    for name in ("README.md", "minitron_config.json", "importance_scores.safetensors", RESULTS_NAME):
        assert os.path.isfile(os.path.join(folder, name)), name


def test_recipe_end_to_end_and_rerun_skips_stages(recipe_assets, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    results = run_recipe(recipe_flags(*recipe_assets, out))
    assert [r["model"] for r in results["rows"]] == ["teacher", "pruned (zero-shot)", "distilled"]
    assert results["rows"][1]["parameters"] < results["rows"][0]["parameters"]
    assert_final_folder_loads_with_stock_transformers(out)
    card = open(os.path.join(out, "README.md")).read()
    assert "AutoModelForCausalLM.from_pretrained" in card and "Tokens distilled: 1,024" in card
    history = json.load(open(os.path.join(out, "distill_log_history.json")))
    kd = [h["kd_loss"] for h in history if "kd_loss" in h]
    assert len(kd) == 8 and all(0 <= v < 10 for v in kd)
    for plot in ("importance.png", "distillation_loss.png"):
        with open(os.path.join(out, "plots", plot), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"  # loss decrease is tested with a trained teacher in test_distillation_*

    # A rerun finds every stage done: no importance pass, no training.
    import hf_minitron.pipeline as pipeline

    def fail(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(pipeline, "estimate_importance", fail)
    monkeypatch.setattr(pipeline, "prune_model", fail)
    monkeypatch.setattr("hf_minitron.distillation.DistillationTrainer.train", fail)
    again = run_recipe(recipe_flags(*recipe_assets, out))
    assert again["rows"] == results["rows"]


def test_recipe_resumes_after_kill_mid_distillation(recipe_assets, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    # Enough steps that the run is still training when the poll sees checkpoint-4 (a tiny step takes ~30 ms).
    argv = recipe_flags(*recipe_assets, out, max_steps=400, save_steps=2, save_total_limit=2)
    proc = subprocess.Popen([sys.executable, os.path.join(REPO_ROOT, "recipes", "minitron.py"), *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoints = os.path.join(out, "distill_checkpoints")
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if os.path.isfile(os.path.join(checkpoints, "checkpoint-4", "trainer_state.json")):
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended by itself (exit {proc.returncode}) before it was killed"
    assert os.path.isdir(checkpoints), "the run was killed before distillation started"
    assert not os.path.isfile(os.path.join(out, "config.json")), "no final model may exist after a kill"
    assert not os.path.isdir(os.path.join(out, "distilled"))
    stages = json.load(open(os.path.join(out, STATE_NAME)))["stages"]
    assert set(stages) == {"importance", "prune"}

    from hf_minitron.distillation import DistillationTrainer

    resumed_from = []
    original_train = DistillationTrainer.train

    def recording_train(self, *args, **kwargs):
        resumed_from.append(kwargs.get("resume_from_checkpoint"))
        return original_train(self, *args, **kwargs)

    monkeypatch.setattr(DistillationTrainer, "train", recording_train)
    results = run_recipe(argv)
    assert resumed_from and int(resumed_from[0].rsplit("-", 1)[1]) >= 4, resumed_from
    history = json.load(open(os.path.join(out, "distill_log_history.json")))
    steps = [h["step"] for h in history if "kd_loss" in h]
    assert steps == list(range(1, 401)), steps[:10]  # restored history + the rest, no step twice
    assert_final_folder_loads_with_stock_transformers(out)
    assert results["rows"][-1]["model"] == "distilled"


def test_recipe_two_processes(recipe_assets, tmp_path):
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "--main_process_port", "29533",
           os.path.join(REPO_ROOT, "recipes", "minitron.py"), *recipe_flags(*recipe_assets, out, max_steps=4, save_steps=10)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "| distilled |" in proc.stdout
    assert_final_folder_loads_with_stock_transformers(out)
    state = json.load(open(os.path.join(out, STATE_NAME)))
    assert state["stages"]["importance"]["num_samples"] == 16  # both shards counted once


def test_unknown_or_invalid_fields_are_named(recipe_assets, tmp_path):
    with pytest.raises(ValueError, match="hiden_size"):
        run_recipe(recipe_flags(*recipe_assets, str(tmp_path / "a")) + ["--hiden_size", "3"])
    config = tmp_path / "bad.yaml"
    config.write_text("hidden_size: 32\nkd_los: forward_kl\n")
    with pytest.raises(ValueError, match="kd_los"):
        run_recipe(["--config", str(config), "--output_dir", str(tmp_path / "b")])
    with pytest.raises(ValueError, match="depth_criterion"):
        run_recipe(recipe_flags(*recipe_assets, str(tmp_path / "c"), depth_criterion="cosine"))
    with pytest.raises(ValueError, match="larger than the source"):
        run_recipe(recipe_flags(*recipe_assets, str(tmp_path / "d"), hidden_size=128))
    assert not os.path.exists(tmp_path / "d" / "config.json")


def test_recipe_with_architecture_search(recipe_assets, tmp_path):
    out = str(tmp_path / "run")
    flags = recipe_flags(*recipe_assets, out, max_steps=2, save_steps=10)
    for name in ("--hidden_size", "--intermediate_size", "--num_hidden_layers"):  # the search picks the shape
        i = flags.index(name)
        del flags[i : i + 2]
    results = run_recipe(flags + ["--search", "true", "--target_params", "0.6", "--search_max_candidates", "3"])
    search = json.load(open(os.path.join(out, "search", "architecture_search.json")))
    best = search["candidates"][0]
    assert len(search["candidates"]) == 3
    final = json.load(open(os.path.join(out, "config.json")))
    assert final["hidden_size"] == best["config"]["hidden_size"]
    assert results["rows"][-1]["parameters"] == best["num_params"]
    assert os.path.isfile(os.path.join(out, "search", "candidates.md"))


def test_half_written_checkpoint_is_ignored_and_removed(tmp_path):
    from hf_minitron.pipeline import last_complete_checkpoint

    assert last_complete_checkpoint(str(tmp_path / "missing")) is None
    for step, complete in ((2, True), (4, True), (6, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x")
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-4")
    assert not (tmp_path / "checkpoint-6").exists()
