"""Distillation with both models sharded, 2 CPU processes (gloo) under `torchrun`: FSDP2 and DeepSpeed ZeRO-3.

Each engine's run must equal one process on the same global batch (losses, updated student, projection), keep the
teacher sharded, frozen and unchanged, write a stock student with `save_model`, and resume exactly from its sharded
checkpoint. `pytest -m distributed` selects these tests (and the DDP one in test_distillation_trainer.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from _distill_utils import make_dataset, make_teacher, make_tokenizer, prune_student
from _sharded_distill_worker import N_ROWS, PER_DEVICE_BATCH, SAVE_EVERY, STEPS
from hf_minitron.distillation import DistillationConfig, DistillationTrainer
from hf_minitron.distillation.sharding import check_sharding_setup
from hf_minitron.pipeline import RESULTS_NAME, STATE_NAME

from conftest import REPO_ROOT


HERE = os.path.dirname(os.path.abspath(__file__))
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def _run(cmd: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a multi-process launcher in its own process group: on a timeout (a hang in a collective) every worker is
    killed, not only the launcher, and the failure shows what the workers printed."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{cmd[2:4]} hung for {timeout} s (killed):\n{out[-3000:]}\n{err[-6000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _launch(engine: str, out) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if engine == "zero3":
        env["DS_ACCELERATOR"] = "cpu"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "_sharded_distill_worker.py"), engine, str(out)]
    proc = _run(cmd, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The reference: one process, the global batch (2 ranks x PER_DEVICE_BATCH), same steps and data."""
    out = tmp_path_factory.mktemp("single")
    teacher = make_teacher()
    args = DistillationConfig(
        str(out), max_steps=STEPS, per_device_train_batch_size=2 * PER_DEVICE_BATCH, learning_rate=3e-3,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0, hidden_state_loss="cosine",
        kd_chunk_size=16, bf16=False, dataloader_num_workers=0,
    )
    trainer = DistillationTrainer(model=prune_student(teacher), teacher_model=teacher, args=args,
                                  train_dataset=make_dataset(n=N_ROWS), processing_class=make_tokenizer())
    trainer.train()
    return {
        "losses": {k: [h[k] for h in trainer.state.log_history if k in h] for k in ("loss", "kd_loss", "hidden_state_loss")},
        "alpha": [h["hidden_state_alpha"] for h in trainer.state.log_history if "hidden_state_alpha" in h],
        "student": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
        "projection": trainer.projection.weight.detach().clone(),
    }


def _check_against_single_process(out, ranks: list[dict], ref: dict, tol: dict) -> None:
    r0, r1 = ranks
    assert r0["world"] == 2
    strip = lambda r: {k: v for k, v in r.items() if k != "bytes_per_parameter"}  # noqa: E731 - shard sizes differ
    assert strip(r0) == strip(r1)  # every rank logs the same (all-reduced) losses, α and projection
    assert len(r0["losses"]["kd_loss"]) == STEPS
    for key in ("loss", "kd_loss", "hidden_state_loss"):
        torch.testing.assert_close(torch.tensor(r0["losses"][key]), torch.tensor(ref["losses"][key]), **tol)
    torch.testing.assert_close(torch.tensor(r0["alpha"]), torch.tensor(ref["alpha"]), **tol)

    # The teacher stayed sharded, frozen, in eval mode, unchanged
    assert r0["teacher"] == {"sharded": True, "frozen": True, "eval": True, "unchanged": True}

    # `save_model` wrote a stock checkpoint (stock class, stock keys) holding the single-process weights
    final = AutoModelForCausalLM.from_pretrained(str(out / "final"))
    assert type(final) is LlamaForCausalLM
    assert set(final.state_dict()) == set(ref["student"])
    for k, v in final.state_dict().items():
        torch.testing.assert_close(v, ref["student"][k], **tol, msg=k)
    # The projection, checkpointed beside the sharded student, equals the single-process one
    proj = load_file(str(out / "run" / f"checkpoint-{STEPS}" / "minitron_projection.safetensors"))["weight"]
    torch.testing.assert_close(proj, ref["projection"], **tol)

    # Resuming from the sharded checkpoint of step SAVE_EVERY continues the same run: losses, student, projection
    for key in ("loss", "kd_loss", "hidden_state_loss"):
        assert len(r0["resumed_losses"][key]) == STEPS - SAVE_EVERY
        torch.testing.assert_close(torch.tensor(r0["resumed_losses"][key]),
                                   torch.tensor(r0["losses"][key][SAVE_EVERY:]), rtol=1e-5, atol=1e-6)
    assert r0["resumed_projection_sum"] == pytest.approx(r0["projection_sum"], rel=1e-5)
    resumed = AutoModelForCausalLM.from_pretrained(str(out / "resumed_final")).state_dict()
    for k, v in final.state_dict().items():
        torch.testing.assert_close(resumed[k], v, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.distributed
def test_fsdp2_two_processes_equal_one_and_resume(tmp_path, single_process):
    ranks = _launch("fsdp2", tmp_path)
    assert ranks[0]["engine"] == "DistributedType.FSDP"
    _check_against_single_process(tmp_path, ranks, single_process, dict(rtol=1e-4, atol=1e-5))
    # Each rank holds half of every fp32 tensor (docs/scale.md: teacher 4/N, student 4/N, Adam 8/N bytes per parameter)
    assert ranks[0]["bytes_per_parameter"] == pytest.approx({"teacher": 2.0, "student": 2.0, "optimizer": 4.0}, rel=0.05)
    # The fused loss read both heads while their FSDP units were gathered for the forward: no extra all-gather
    assert ranks[0]["head_full_tensor_calls"] == 0
    assert ranks[0]["forwards"] == STEPS + 1  # + the first step's α measurement
    # The sharded checkpoint is FSDP's (DCP), not a full copy of the student
    assert (tmp_path / "run" / f"checkpoint-{SAVE_EVERY}" / "pytorch_model_fsdp_0").is_dir()


@pytest.mark.distributed
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="DeepSpeed is not installed (`pip install deepspeed`)")
def test_zero3_two_processes_equal_one_and_resume(tmp_path, single_process):
    ranks = _launch("zero3", tmp_path)
    assert ranks[0]["engine"] == "DistributedType.DEEPSPEED"
    _check_against_single_process(tmp_path, ranks, single_process, dict(rtol=1e-4, atol=1e-5))
    # ZeRO-3 partitions the weights and keeps an fp32 master partition next to Adam's: 12/N bytes of optimizer state
    assert ranks[0]["bytes_per_parameter"] == pytest.approx({"teacher": 2.0, "student": 2.0, "optimizer": 6.0}, rel=0.05)


# --------------------------------------------------------------------- the recipe under the shipped accelerate configs
def _launch_recipe(engine: str, model_dir: str, corpus: str, out: str) -> subprocess.CompletedProcess:
    from test_recipe import recipe_flags

    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(REPO_ROOT, "recipes", "accelerate", f"{engine}.yaml"), "--num_processes", "2",
           "--mixed_precision", "no", "--main_process_port", "29541" if engine == "fsdp2" else "29542",
           os.path.join(HERE, "_recipe_sharded_worker.py"),
           *recipe_flags(model_dir, corpus, out, max_steps=4, save_steps=2, hidden_state_loss="cosine",
                         teacher_correction=True, teacher_correction_steps=2)]
    return _run(cmd, env)


@pytest.mark.distributed
@pytest.mark.parametrize("engine", ["fsdp2", pytest.param("zero3", marks=pytest.mark.skipif(
    not HAS_DEEPSPEED, reason="DeepSpeed is not installed (`pip install deepspeed`)"))])
def test_recipe_under_accelerate_config(recipe_assets, tmp_path, engine):
    # `accelerate launch --config_file recipes/accelerate/<engine>.yaml recipes/minitron.py ...` on 2 CPU processes:
    # teacher correction and distillation sharded, importance / pruning / evaluation on whole models
    from test_recipe import assert_final_folder_loads_with_stock_transformers

    out = str(tmp_path / "run")
    proc = _launch_recipe(engine, *recipe_assets, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = json.load(open(os.path.join(out, "final", RESULTS_NAME)))
    assert [r["model"] for r in results["rows"]] == [
        "teacher (original)", "teacher (corrected)", "pruned (zero-shot)", "distilled"]
    assert all(r["perplexity"] > 1 for r in results["rows"])
    assert_final_folder_loads_with_stock_transformers(os.path.join(out, "final"))
    history = json.load(open(os.path.join(out, "distilled", "distill_log.json")))["log_history"]
    assert len([h for h in history if "kd_loss" in h]) == 4
    state = json.load(open(os.path.join(out, STATE_NAME)))
    assert state["stages"]["importance"]["info"]["num_samples"] == 16  # both shards counted once
    # The corrected teacher and the distilled student were gathered from their shards into stock checkpoints, and the
    # shared folders they were gathered in are gone
    for folder in ("teacher_corrected", "distilled"):
        assert type(AutoModelForCausalLM.from_pretrained(os.path.join(out, folder))) is LlamaForCausalLM
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]
    if engine == "fsdp2":
        # The student's checkpoints are FSDP's DCP shards, not full copies. A run killed after its last checkpoint but
        # before `distilled/` was written takes the weights from those shards (merged by accelerate), not by training
        assert os.path.isdir(os.path.join(out, "distill_checkpoints", "checkpoint-4", "pytorch_model_fsdp_0"))
        distilled = AutoModelForCausalLM.from_pretrained(os.path.join(out, "distilled")).state_dict()
        shutil.rmtree(os.path.join(out, "distilled"))
        proc = _launch_recipe(engine, *recipe_assets, out)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        assert "Distillation had finished in" in proc.stderr
        again = AutoModelForCausalLM.from_pretrained(os.path.join(out, "distilled")).state_dict()
        for k, v in distilled.items():
            torch.testing.assert_close(again[k], v, rtol=0, atol=0, msg=k)
        assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]


# ------------------------------------------------------------------------------ set-up checks (no process group)
def _accelerator(distributed_type: str, **state) -> SimpleNamespace:
    return SimpleNamespace(distributed_type=distributed_type, state=SimpleNamespace(**state))


def test_sharding_setup_errors():
    args = SimpleNamespace(fp16=False)
    fsdp1 = _accelerator("DistributedType.FSDP", fsdp_plugin=SimpleNamespace(fsdp_version=1))
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        check_sharding_setup(fsdp1, args, has_projection=False)
    check_sharding_setup(_accelerator("DistributedType.FSDP", fsdp_plugin=SimpleNamespace(fsdp_version=2)), args, True)

    def zero(stage, gather, fp16="auto"):
        config = {"zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": gather},
                  "fp16": {"enabled": fp16}}
        return _accelerator("DistributedType.DEEPSPEED", deepspeed_plugin=SimpleNamespace(deepspeed_config=config))

    with pytest.raises(ValueError, match="zero3_save_16bit_model"):
        check_sharding_setup(zero(3, False), args, has_projection=False)
    check_sharding_setup(zero(3, True), args, has_projection=True)
    check_sharding_setup(zero(2, False), args, has_projection=True)  # ZeRO-2 saves full weights anyway
    with pytest.raises(ValueError, match="fp16"):
        check_sharding_setup(zero(3, True, fp16=True), args, has_projection=True)
    with pytest.raises(ValueError, match="fp16"):
        check_sharding_setup(zero(3, True, fp16="auto"), SimpleNamespace(fp16=True), has_projection=True)
    check_sharding_setup(zero(3, True, fp16=True), args, has_projection=False)  # no projection: nothing to unscale
