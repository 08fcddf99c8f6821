"""Worker of the 2-process sharded distillation tests (FSDP2 or DeepSpeed ZeRO-3, on CPU with gloo):

    torchrun --nproc_per_node 2 _sharded_distill_worker.py {fsdp2,zero3} OUT

Runs `DistillationTrainer` through `Trainer`/accelerate exactly as `accelerate launch` with
`recipes/accelerate/{fsdp2,zero3}.yaml` would (the same `fsdp_config` / DeepSpeed config, via `TrainingArguments`):
student and teacher sharded, hidden-state loss through the projection, a checkpoint every 2 steps, `save_model`. Then
a second trainer resumes from `checkpoint-2` of the first. Each rank writes `rank{r}.json`; rank 0 also leaves the
saved students and checkpoints in OUT for the test to compare with one process.

FSDP on CPU: accelerate turns FSDP on only for GPU-like devices (`AcceleratorState.__init__` sets
`distributed_type = FSDP` in a branch guarded by `distributed_type in [MULTI_GPU, MULTI_XPU, ...]`; a gloo run is
`MULTI_CPU`). `_enable_fsdp_on_cpu` applies that branch's own assignments for `MULTI_CPU` and changes nothing else, so
everything downstream is the real code: accelerate's `fsdp2_prepare_model` (per-layer `fully_shard`, optimizer
re-mapping), `get_state_dict`, `save_fsdp_model` / `load_fsdp_model` (DCP), Trainer's FSDP branches and ours. torch's
FSDP2 itself runs on CPU with gloo. DeepSpeed needs no patch: its CPU accelerator runs ZeRO-3 on gloo/shm.
"""

from __future__ import annotations

import json
import os
import sys

import torch


sys.path.insert(0, os.path.dirname(__file__))

from _distill_utils import make_dataset, make_teacher, make_tokenizer, prune_student  # noqa: E402

from hf_minitron.distillation import DistillationConfig, DistillationTrainer  # noqa: E402


STEPS, SAVE_EVERY, PER_DEVICE_BATCH, N_ROWS = 4, 2, 4, 16


def _enable_fsdp_on_cpu() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # The assignments of accelerate's GPU branch (state.py), for a CPU process group
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = self.distributed_type

    AcceleratorState.__init__ = patched


def _enable_deepspeed_on_cpu() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def patched(self, *args, deepspeed_plugin=None, **kwargs):
        init(self, *args, deepspeed_plugin=deepspeed_plugin, **kwargs)
        # MULTI_CPU on a first init; DEEPSPEED (inherited from PartialState) after `release_deepspeed_accelerator`
        if deepspeed_plugin is not None and self.deepspeed_plugins is None and self.distributed_type in (
            DistributedType.MULTI_CPU, DistributedType.DEEPSPEED
        ):
            # The assignments of accelerate's DeepSpeed branch (state.py; it is skipped when `cpu=True`)
            mixed_precision, self._mixed_precision = self._mixed_precision, "no"  # DeepSpeed handles precision
            self.distributed_type = DistributedType.DEEPSPEED
            deepspeed_plugin.set_mixed_precision(mixed_precision)
            deepspeed_plugin.select(_from_accelerator_state=True)
            self.deepspeed_plugins = deepspeed_plugin
            PartialState._shared_state["distributed_type"] = self.distributed_type

    AcceleratorState.__init__ = patched


def engine_args(engine: str) -> dict:
    if engine == "fsdp2":
        # = recipes/accelerate/fsdp2.yaml (sharded checkpoints, per-decoder-layer units, reshard after forward)
        return {"fsdp": True, "fsdp_config": {"version": 2, "state_dict_type": "SHARDED_STATE_DICT",
                                             "reshard_after_forward": True, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}}
    # = recipes/accelerate/zero3.yaml
    ds = {
        # Threshold 0: every parameter is partitioned, however small (the tiny heads would otherwise stay whole)
        "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True,
                              "stage3_param_persistence_threshold": 0},
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
    }
    return {"deepspeed": ds}


def make_trainer(engine: str, out: str) -> DistillationTrainer:
    teacher = make_teacher()
    student = prune_student(teacher)
    args = DistillationConfig(
        out, max_steps=STEPS, per_device_train_batch_size=PER_DEVICE_BATCH, learning_rate=3e-3, logging_steps=1,
        save_strategy="steps", save_steps=SAVE_EVERY, report_to="none", seed=0, hidden_state_loss="cosine",
        kd_chunk_size=16, bf16=False, dataloader_num_workers=0, use_cpu=True, ddp_backend="gloo",
        **engine_args(engine),
    )
    return DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=make_dataset(n=N_ROWS),
        processing_class=make_tokenizer(),
    )


def teacher_report(trainer: DistillationTrainer, engine: str) -> dict:
    """Is the teacher sharded, frozen, in eval mode, and are its (gathered) weights those it started with?"""
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    params = dict(teacher.named_parameters())
    if engine == "fsdp2":
        sharded = all(hasattr(p, "full_tensor") for p in params.values())

        full = {k: p.full_tensor() for k, p in params.items()}
    else:
        import deepspeed

        sharded = all(hasattr(p, "ds_id") and p.numel() == 0 for p in params.values())
        with deepspeed.zero.GatheredParameters(list(params.values())):
            full = {k: p.detach().clone() for k, p in params.items()}
    reference = dict(make_teacher().named_parameters())
    return {
        "sharded": sharded,
        "frozen": not any(p.requires_grad for p in params.values()),
        "eval": not teacher.training,
        "unchanged": all(torch.equal(full[k], reference[k].detach()) for k in reference),
    }


def bytes_per_parameter(trainer: DistillationTrainer, engine: str) -> dict:
    """This rank's bytes per parameter of teacher weights, student weights and optimizer state (the optimizer's
    tensors, and under ZeRO-3 also its fp32 master partition), as in the memory table of docs/scale.md."""
    from hf_minitron.distillation.sharding import param_shape

    def local(p):
        if hasattr(p, "to_local"):
            return p.to_local()
        return p.ds_tensor if hasattr(p, "ds_tensor") else p

    def weights(model):
        params = list(model.parameters())
        full = sum(param_shape(p).numel() for p in params)
        return full, sum(local(p).numel() * local(p).element_size() for p in params)

    n_teacher, teacher_bytes = weights(trainer.accelerator.unwrap_model(trainer.teacher_model))
    n_student, student_bytes = weights(trainer.accelerator.unwrap_model(trainer.model))
    if engine == "fsdp2":
        states = trainer.optimizer.optimizer.state.values()
        extra = 0
    else:
        zero = trainer.model_wrapped.optimizer  # DeepSpeedZeroOptimizer_Stage3
        states = zero.optimizer.state.values()
        extra = sum(t.numel() * t.element_size() for t in zero.fp32_partitioned_groups_flat)  # fp32 master
    opt_bytes = extra + sum(
        local(t).numel() * local(t).element_size() for st in states for t in st.values() if torch.is_tensor(t) and t.dim()
    )
    return {"teacher": teacher_bytes / n_teacher, "student": student_bytes / n_student, "optimizer": opt_bytes / n_student}


def main(engine: str, out: str) -> None:
    _enable_fsdp_on_cpu() if engine == "fsdp2" else _enable_deepspeed_on_cpu()
    from torch.distributed.tensor import DTensor

    gathers = {"n": 0}
    full_tensor = DTensor.full_tensor

    def counted(self, *a, **k):
        gathers["n"] += 1
        return full_tensor(self, *a, **k)

    DTensor.full_tensor = counted  # FSDP2: how many whole-head all-gathers the fused loss makes

    run = make_trainer(engine, os.path.join(out, "run"))
    forwards = {"n": 0}
    distill_loss = run._distill_loss

    def counted_loss(*a, **k):
        forwards["n"] += 1
        return distill_loss(*a, **k)

    run._distill_loss = counted_loss
    run.train()
    head_gathers = gathers["n"]
    per_parameter = bytes_per_parameter(run, engine)
    run.save_model(os.path.join(out, "final"))
    report = {
        "world": run.accelerator.num_processes,
        "engine": str(run.accelerator.distributed_type),
        "losses": {k: [h[k] for h in run.state.log_history if k in h] for k in ("loss", "kd_loss", "hidden_state_loss")},
        "alpha": [h["hidden_state_alpha"] for h in run.state.log_history if "hidden_state_alpha" in h],
        "forwards": forwards["n"],
        "head_full_tensor_calls": head_gathers,
        "teacher": teacher_report(run, engine),
        "projection_sum": float(run.projection.weight.double().sum()),
        "bytes_per_parameter": per_parameter,
    }

    resumed = make_trainer(engine, os.path.join(out, "resumed"))
    resumed.train(resume_from_checkpoint=os.path.join(out, "run", f"checkpoint-{SAVE_EVERY}"))
    resumed.save_model(os.path.join(out, "resumed_final"))
    report["resumed_losses"] = {
        k: [h[k] for h in resumed.state.log_history if k in h and h["step"] > SAVE_EVERY]
        for k in ("loss", "kd_loss", "hidden_state_loss")
    }
    report["resumed_projection_sum"] = float(resumed.projection.weight.double().sum())
    with open(os.path.join(out, f"rank{run.accelerator.process_index}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2])
