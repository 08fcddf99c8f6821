"""`hf-minitron` subcommands on a tiny model (they wrap the same library functions as the recipe)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hf_minitron.cli import main


def test_cli_importance_prune_distill_evaluate_correct_teacher(recipe_assets, tmp_path, capsys):
    model_dir, corpus = recipe_assets
    common = ["--model_name_or_path", model_dir, "--dataset_path", corpus, "--seq_length", "32"]
    scores = str(tmp_path / "scores.safetensors")
    main(["importance", *common, "--num_calibration_samples", "8", "--output", scores])
    assert os.path.isfile(scores)

    pruned = str(tmp_path / "pruned")
    main(["prune", *common, "--importance", scores, "--hidden_size", "32", "--num_attention_heads", "4", "--output_dir", pruned])
    assert json.load(open(os.path.join(pruned, "config.json")))["hidden_size"] == 32
    assert os.path.isfile(os.path.join(pruned, "minitron_config.json"))

    distilled = str(tmp_path / "distilled")
    main(["distill", *common, "--student", pruned, "--output_dir", distilled, "--max_steps", "2", "--per_device_train_batch_size", "2",
          "--use_cpu", "true", "--bf16", "false", "--report_to", "none", "--save_strategy", "no"])
    assert os.path.isfile(os.path.join(distilled, "final", "model.safetensors"))
    assert os.path.isfile(os.path.join(distilled, "final", "minitron_config.json"))  # provenance carried through

    capsys.readouterr()
    main(["evaluate", *common, "--model_name_or_path", os.path.join(distilled, "final"), "--max_samples", "4"])
    report = json.loads(capsys.readouterr().out)
    assert report["held_out_samples"] == 4 and report["perplexity"] > 1

    search_dir = str(tmp_path / "search")
    main(["search", *common, "--importance", scores, "--target_params", "0.6", "--max_candidates", "3", "--output_dir", search_dir])
    assert os.path.isfile(os.path.join(search_dir, "minitron_prune_config.json"))
    assert "| rank | shape |" in capsys.readouterr().out

    corrected = str(tmp_path / "corrected")
    main(["correct-teacher", *common, "--output_dir", corrected, "--max_steps", "2", "--original_learning_rate", "1e-3",
          "--per_device_train_batch_size", "2", "--use_cpu", "true", "--bf16", "false", "--report_to", "none", "--save_strategy", "no"])
    assert os.path.isfile(os.path.join(corrected, "final", "model.safetensors"))


def test_cli_usage_and_console_script():
    with pytest.raises(SystemExit) as err:
        main(["no-such-command"])
    assert err.value.code == 2
    proc = subprocess.run([sys.executable, "-m", "hf_minitron.cli", "prune", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--hidden_size" in proc.stdout and "--importance" in proc.stdout


def test_cli_prune_under_two_processes_scores_sharded_and_writes_once(recipe_assets, tmp_path):
    """`accelerate launch -m hf_minitron.cli prune`: both processes score half the samples, only the main one writes."""
    model_dir, corpus = recipe_assets
    out = tmp_path / "pruned"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "--main_process_port", "29537",
           "-m", "hf_minitron.cli", "prune", "--model_name_or_path", model_dir, "--dataset_path", corpus, "--seq_length", "32",
           "--num_calibration_samples", "8", "--hidden_size", "32", "--output_dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('"output_dir"') == 1  # one report, from the main process
    assert json.load(open(out / "config.json"))["hidden_size"] == 32
    assert json.load(open(out / "minitron_config.json"))["importance"]["num_samples"] == 8  # both shards counted once
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]  # no temporary folder left behind
