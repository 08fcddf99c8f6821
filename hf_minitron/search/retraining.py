"""Short (optionally LoRA) distillation of each candidate before it is ranked (Minitron section 3)."""

from __future__ import annotations

import dataclasses
import gc
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from ..architectures import ArchitectureLayout, get_layout
from .evaluation import heldout_loss


def lora_target_modules(layout: ArchitectureLayout) -> list[str]:
    """The attention and MLP projection names of a family, as PEFT ``target_modules`` (never ``lm_head``)."""
    paths = (layout.q_proj, layout.k_proj, layout.v_proj, layout.o_proj, layout.gate_proj, layout.up_proj, layout.down_proj)
    return sorted({p.rsplit(".", 1)[-1] for p in paths if p is not None})


class _EvalAtSteps(TrainerCallback):
    """Records the held-out loss at the given global steps of a retraining run."""

    def __init__(self, steps: Sequence[int], batches: Sequence[Mapping[str, torch.Tensor]], curve: dict[int, float]) -> None:
        self.steps, self.batches, self.curve = set(steps), batches, curve

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps and model is not None:
            self.curve[state.global_step] = heldout_loss(model, self.batches)


def distill_candidate(
    student: nn.Module,
    teacher: nn.Module,
    train_dataset,
    max_steps: int,
    seed: int = 0,
    tokenizer=None,
    use_lora: bool = False,
    lora_config=None,
    training_kwargs: Mapping[str, Any] | None = None,
    callbacks: Sequence[Any] = (),
) -> nn.Module:
    """Short Minitron distillation of one pruned ``student`` from its frozen ``teacher`` (the default ``retrain_fn``).

    Runs :class:`~hf_minitron.distillation.DistillationTrainer` (forward-KL logit loss) for ``max_steps`` with a
    fixed ``seed`` and a constant learning rate, so every candidate sees the same batches in the same order, and
    the loss after ``n`` steps equals that of an ``n``-step run. With ``use_lora`` the student is wrapped in a PEFT
    LoRA adapter on every attention and MLP projection (sizes stay those of the pruned shape) and the PEFT model
    is returned.

    Args:
        student: The pruned model (trained in place).
        teacher: The unpruned source model (frozen by the trainer).
        train_dataset: A ``datasets.Dataset`` with an ``input_ids`` column.
        max_steps: Optimizer steps.
        seed: Seed of the data order, dropout and LoRA initialisation.
        tokenizer: Padding / special tokens for the trainer's collator (required by TRL).
        use_lora: Train LoRA adapters instead of all weights.
        lora_config: A ``peft.LoraConfig`` (default: rank 16, alpha 32 on q/k/v/o/gate/up/down).
        training_kwargs: Overrides of the :class:`~hf_minitron.distillation.DistillationConfig` defaults
            (``per_device_train_batch_size=4``, ``learning_rate=1e-4`` (``5e-4`` with LoRA),
            ``lr_scheduler_type="constant"``, no activation checkpointing, bf16 only on a bf16 GPU, no saving,
            no reporting).
        callbacks: Extra ``TrainerCallback``\\s.

    Example:
        >>> student = distill_candidate(student, teacher, train_ds, max_steps=20, tokenizer=tokenizer)  # doctest: +SKIP
    """
    try:
        from hf_minitron.distillation import DistillationConfig, DistillationTrainer
    except ImportError as err:  # pragma: no cover - the module ships with the package
        raise ImportError(
            "Short retraining needs `hf_minitron.distillation` (DistillationTrainer); pass your own `retrain_fn=`."
        ) from err
    from transformers import set_seed

    if tokenizer is None:
        raise ValueError("Retraining candidates needs `tokenizer=` (TRL's trainer builds its collator from it).")
    peft_config = None
    if use_lora:
        from peft import LoraConfig

        peft_config = lora_config or LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules=lora_target_modules(get_layout(student)), task_type="CAUSAL_LM"
        )
    with tempfile.TemporaryDirectory(prefix="hf-minitron-search-") as out:
        kwargs = dict(
            output_dir=out,
            max_steps=max_steps,
            per_device_train_batch_size=4,
            learning_rate=5e-4 if use_lora else 1e-4,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            seed=seed,
            data_seed=seed,
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            logging_steps=max(1, max_steps // 5),
            disable_tqdm=True,
            dataloader_num_workers=0,
            # TRL defaults to bf16 autocast and activation checkpointing: slow on CPUs, and needless for short runs.
            bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        )
        names = {f.name for f in dataclasses.fields(DistillationConfig)}
        kwargs["activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"] = False
        kwargs.update(training_kwargs or {})
        args = DistillationConfig(**kwargs)
        set_seed(seed)
        trainer = DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=train_dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=list(callbacks),
        )
        trainer.train()
        trained = trainer.model
        trainer.accelerator.free_memory()
        del trainer
    return trained


def _restore(model: nn.Module, grad_flags: dict[str, bool], training: bool) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(grad_flags[name])
    model.train(training)


def _free(collect: bool) -> None:
    """Return a freed candidate's memory (a full ``gc`` pass costs ~1 s, so only for real-sized models)."""
    if collect:
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
