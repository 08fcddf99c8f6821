"""The end-to-end recipe on a tiny model: single and 2-process, settings-aware reuse, a kill during every stage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

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


def assert_final_folder_loads_with_stock_transformers(folder, sizes=("32", "64", "3")):
    proc = run_python(
        "import sys, torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({folder!r}); AutoTokenizer.from_pretrained({folder!r})\n"
        "assert not any(k.startswith('hf_minitron') for k in sys.modules)\n"
        "print(m.config.hidden_size, m.config.intermediate_size, m.config.num_hidden_layers)\n"
    )
    assert proc.stdout.split() == list(sizes)
    for name in ("README.md", "minitron_config.json", "importance_scores.safetensors", RESULTS_NAME):
        assert os.path.isfile(os.path.join(folder, name)), name


def test_recipe_end_to_end_and_rerun_reuses_every_stage(recipe_assets, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    results = run_recipe(recipe_flags(*recipe_assets, out))
    assert [r["model"] for r in results["rows"]] == ["teacher", "pruned (zero-shot)", "distilled"]
    assert results["rows"][1]["parameters"] < results["rows"][0]["parameters"]
    final = os.path.join(out, "final")
    assert results["final_dir"] == final
    assert_final_folder_loads_with_stock_transformers(final)
    card = open(os.path.join(final, "README.md")).read()
    assert "AutoModelForCausalLM.from_pretrained" in card and "Tokens distilled: 1,024" in card
    history = json.load(open(os.path.join(out, "distilled", "distill_log.json")))["log_history"]
    kd = [h["kd_loss"] for h in history if "kd_loss" in h]
    assert len(kd) == 8 and all(0 <= v < 10 for v in kd)
    for plot in ("importance.png", "distillation_loss.png"):
        with open(os.path.join(final, "plots", plot), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"  # loss decrease is tested with a trained teacher in test_distillation_*
    assert not any(n.startswith(".tmp-") for n in os.listdir(out))

    # A rerun with the same settings reuses every stage: no model is even loaded.
    import hf_minitron.minitron_stages as stages

    def fail(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    for name in ("estimate_importance", "prune_model", "load_model_and_tokenizer", "search_architectures"):
        monkeypatch.setattr(stages, name, fail, raising=False)
    monkeypatch.setattr("hf_minitron.distillation.DistillationTrainer.train", fail)
    again = run_recipe(recipe_flags(*recipe_assets, out, logging_steps=2, save_steps=2))  # settings without effect
    assert again["rows"] == results["rows"]
    assert {k: v["action"] for k, v in again["stages"].items()} == {
        "importance": "reused", "prune": "reused", "distill": "reused", "evaluate": "reused", "export": "reused"
    }


def test_rerun_with_changed_target_gives_the_new_model_or_a_strict_refusal(recipe_assets, tmp_path, monkeypatch):
    from hf_minitron.cli import _parse
    from hf_minitron.distillation import DistillationConfig, DistillationTrainer
    from hf_minitron.pipeline import MinitronRecipeArguments, run_minitron
    from hf_minitron.stages import StageChangedError

    out = str(tmp_path / "run")
    run_recipe(recipe_flags(*recipe_assets, out, max_steps=2, save_steps=1))
    final = os.path.join(out, "final")
    before = {n: os.stat(os.path.join(final, n)).st_mtime_ns for n in os.listdir(final)}
    changed = recipe_flags(*recipe_assets, out, max_steps=2, save_steps=1, hidden_size=48)
    with pytest.raises(StageChangedError, match=r"prune \(pruned/\): settings changed: target.hidden_size: 32 -> 48") as err:
        run_recipe(changed + ["--resume", "strict"])
    assert "distill_checkpoints" not in str(err.value) and "importance" not in str(err.value).split("\n", 1)[1]
    assert {n: os.stat(os.path.join(final, n)).st_mtime_ns for n in os.listdir(final)} == before

    # --resume auto (default): importance is reused, prune and everything after it recomputed, distillation
    # starts over (the stale checkpoints of the hidden-32 student are not resumed). Through the Python API, which
    # leaves torch's thread count alone.
    import hf_minitron.minitron_stages as stages

    def fail(*args, **kwargs):
        raise AssertionError("importance ran again")

    monkeypatch.setattr(stages, "estimate_importance", fail)
    resumed_from = []
    original_train = DistillationTrainer.train

    def recording_train(self, *args, **kwargs):
        resumed_from.append(kwargs.get("resume_from_checkpoint"))
        return original_train(self, *args, **kwargs)

    monkeypatch.setattr(DistillationTrainer, "train", recording_train)
    args, training_args = _parse((MinitronRecipeArguments, DistillationConfig), changed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = run_minitron(args, training_args)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert resumed_from == [None]
    assert results["stages"]["importance"]["action"] == "reused" and results["stages"]["prune"]["action"] == "computed"
    assert_final_folder_loads_with_stock_transformers(final, sizes=("48", "64", "3"))
    assert json.load(open(os.path.join(out, "pruned", "config.json")))["hidden_size"] == 48


KILL_POINTS = (
    "teacher_correction:saved",  # corrected teacher written to a temporary folder, not yet renamed into place
    "importance:ran",            # scores computed, nothing saved
    "search:saved",
    "prune:saved",
    "distill:checkpoint",        # mid-training, right after the first checkpoint
    "distill:saved",
    "evaluate:ran",
    "export:saved",
)


def _chain_flags(assets, out):
    flags = recipe_flags(*assets, out, max_steps=4, save_steps=2, num_calibration_samples=8, max_eval_samples=4, num_cpu_threads=1)
    for name in ("--hidden_size", "--intermediate_size", "--num_hidden_layers"):
        i = flags.index(name)
        del flags[i : i + 2]
    return flags + ["--search", "true", "--target_params", "0.6", "--search_max_candidates", "2",
                    "--teacher_correction", "true", "--teacher_correction_steps", "2", "--teacher_original_learning_rate", "1e-2"]


def test_kill_during_every_stage_then_rerun_gives_the_uninterrupted_result(recipe_assets, tmp_path):
    """SIGKILL the recipe at a named point of each stage in turn (deterministic: HF_MINITRON_KILL_AT), resuming each
    time; the final run must give the same model and table as a run that was never interrupted."""
    import torch
    from safetensors.torch import load_file

    from hf_minitron.atomic import KILL_ENV
    from hf_minitron.stages import RECORD_NAME

    reference = str(tmp_path / "reference")
    threads = torch.get_num_threads()
    try:
        expected = run_recipe(_chain_flags(recipe_assets, reference))
    finally:
        torch.set_num_threads(threads)

    out = str(tmp_path / "killed")
    script = os.path.join(REPO_ROOT, "recipes", "minitron.py")
    for i, point in enumerate((*KILL_POINTS, None)):
        env = {**os.environ, "PYTHONPATH": REPO_ROOT}
        env.pop(KILL_ENV, None)
        if point:
            env[KILL_ENV] = point
        proc = subprocess.run([sys.executable, script, *_chain_flags(recipe_assets, out)], capture_output=True, text=True,
                              timeout=600, env=env)
        if point is None:
            assert proc.returncode == 0, proc.stderr[-3000:]
            break
        assert proc.returncode == -signal.SIGKILL, f"not killed at {point} (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
        stage = point.split(":")[0]
        for name in os.listdir(out):  # every stage folder in place is complete (has its record)
            if name in ("teacher_corrected", "importance", "search", "pruned", "distilled", "evaluation", "final"):
                assert os.path.isfile(os.path.join(out, name, RECORD_NAME)), (point, name)
        if point == "distill:checkpoint":
            assert os.path.isfile(os.path.join(out, "distill_checkpoints", "checkpoint-2", "trainer_state.json"))
        if i > 0 and KILL_POINTS[i - 1] == "distill:checkpoint":
            assert "Resuming distillation from" in proc.stderr and "checkpoint-2" in proc.stderr
        assert f"[hf_minitron] [{stage}] running" in proc.stderr  # the console names the stage it was in
    assert "[hf_minitron] [export] done" in proc.stderr  # routine progress at INFO by default
    assert not any(n.startswith(".tmp-") for n in os.listdir(out))

    results = json.load(open(os.path.join(out, "final", RESULTS_NAME)))
    assert [r["model"] for r in results["rows"]] == [r["model"] for r in expected["rows"]]
    for got, want in zip(results["rows"], expected["rows"]):
        assert got["parameters"] == want["parameters"] and got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-5)
    got, want = (load_file(os.path.join(d, "final", "model.safetensors")) for d in (out, reference))
    assert got.keys() == want.keys() and all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)
    history = json.load(open(os.path.join(out, "distilled", "distill_log.json")))["log_history"]
    assert [h["step"] for h in history if "kd_loss" in h] == [1, 2, 3, 4]  # restored history + the rest, no step twice


def test_recipe_two_processes(recipe_assets, tmp_path):
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "--main_process_port", "29533",
           os.path.join(REPO_ROOT, "recipes", "minitron.py"), *recipe_flags(*recipe_assets, out, max_steps=4, save_steps=10)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "| distilled |" in proc.stdout
    assert_final_folder_loads_with_stock_transformers(os.path.join(out, "final"))
    assert "[hf_minitron] [importance] done" in proc.stderr and proc.stderr.count("[hf_minitron] [importance] done") == 1
    state = json.load(open(os.path.join(out, STATE_NAME)))
    assert state["stages"]["importance"]["info"]["num_samples"] == 16  # both shards counted once


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
    assert not os.path.exists(tmp_path / "d" / "final")


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
    final = json.load(open(os.path.join(out, "final", "config.json")))
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
