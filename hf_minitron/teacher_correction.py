"""Teacher correction (Minitron, arXiv 2408.11796): fine-tune the unpruned teacher on the distillation data.

The teacher never saw the distillation corpus; a light SFT at a fraction (default 1/5) of its original peak
learning rate, with warm-up and cosine decay, moves it onto that distribution before it guides the student.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn
from transformers.utils import logging
from trl import SFTConfig, SFTTrainer

from .distillation.config import apply_cpu_defaults
from .model_utils import instance_patches, strip_instance_patches


logger = logging.get_logger(__name__)


@dataclass
class TeacherCorrectionConfig(SFTConfig):
    r"""
    [`~trl.SFTConfig`] for teacher correction.

    Like [`DistillationConfig`], on a machine without a CUDA GPU `bf16` and activation checkpointing default to off.

    Parameters:
        original_learning_rate (`float`, *optional*):
            The teacher's original peak learning rate. When set, `learning_rate` becomes
            `original_learning_rate * lr_fraction` (the paper uses about 1/5).
        lr_fraction (`float`, *optional*, defaults to `0.2`):
            Fraction of `original_learning_rate` to use.
        use_lora (`bool`, *optional*, defaults to `False`):
            Train LoRA adapters (PEFT) on every linear layer and merge them back, giving a plain model.
        lora_r (`int`, *optional*, defaults to `16`), lora_alpha (`int`, *optional*, defaults to `32`):
            LoRA rank and scaling.
    """

    original_learning_rate: float | None = field(default=None, metadata={"help": "Teacher's original peak LR."})
    lr_fraction: float = field(default=0.2, metadata={"help": "Fraction of the original peak LR to use."})
    use_lora: bool = field(default=False, metadata={"help": "LoRA fine-tune, merged back into a plain model."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Scheduler (cosine decay by default)."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Linear warm-up fraction of the steps."})

    def __post_init__(self):
        if not 0 < self.lr_fraction <= 1:
            raise ValueError(f"`lr_fraction` must be in (0, 1], got {self.lr_fraction}.")
        if self.original_learning_rate is not None:
            if self.original_learning_rate <= 0:
                raise ValueError(f"`original_learning_rate` must be > 0, got {self.original_learning_rate}.")
            self.learning_rate = self.original_learning_rate * self.lr_fraction
        apply_cpu_defaults(self)
        super().__post_init__()


def correct_teacher(
    model: nn.Module,
    args: TeacherCorrectionConfig,
    train_dataset: Any,
    eval_dataset: Any = None,
    processing_class: Any = None,
    save_directory: str | None = None,
) -> nn.Module:
    """Fine-tune ``model`` on the distillation corpus and return a plain (LoRA-merged) model.

    Args:
        model: The unpruned teacher (``PreTrainedModel``).
        args: Training settings; see :class:`TeacherCorrectionConfig`.
        train_dataset: A ``datasets.Dataset`` with ``input_ids`` (already packed) or ``text``.
        eval_dataset: Optional held-out set for the trainer's evaluation.
        processing_class: The teacher's tokenizer.
        save_directory: Where to write the corrected teacher (a stock checkpoint with its tokenizer, written
            atomically by the main process). Required under FSDP / DeepSpeed (``accelerate launch`` with such a
            config, or ``fsdp=`` / ``deepspeed=`` in ``args``): the trained model is sharded, so it is gathered there
            and the returned teacher is loaded back from it, whole, on every process.

    Raises:
        ValueError: no tokenizer; FSDP / DeepSpeed without ``save_directory``, or with ``use_lora`` (merge a LoRA
            correction in a run without sharding).

    Example:
        >>> args = TeacherCorrectionConfig(output_dir="tc", original_learning_rate=1e-4, max_steps=50)
        >>> teacher = correct_teacher(teacher, args, train_dataset=train_ds, processing_class=tok)  # doctest: +SKIP
    """
    from .distillation.sharding import gather_full_state_dict, sharded_engine, whole_model_loading

    if processing_class is None:
        raise ValueError("Pass the teacher's tokenizer as `processing_class=` (SFTTrainer needs it for padding).")
    engine = sharded_engine(args)
    if engine is not None and save_directory is None:
        raise ValueError(f"Under {engine}, pass `save_directory=`: the corrected teacher is gathered there from its shards.")
    if engine is not None and args.use_lora:
        raise ValueError(f"LoRA teacher correction is not supported under {engine}; correct the full teacher "
                         "(`use_lora=False`, the paper's choice) or run the LoRA correction without sharding.")
    peft_config = None
    if args.use_lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules="all-linear", task_type="CAUSAL_LM")
    logger.info(f"Teacher correction at learning rate {args.learning_rate:g}" + (" (LoRA)" if args.use_lora else ""))
    user_patches = instance_patches(model)
    dtype = next(model.parameters()).dtype
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processing_class,
        peft_config=peft_config,
    )
    try:
        trainer.train()
    finally:  # also when training fails: the caller's model must not keep the trainer's patches
        strip_instance_patches(trainer.accelerator.unwrap_model(trainer.model), keep=user_patches)
    if engine is not None:
        # The model is sharded in place: gather it into a stock checkpoint, and load it back whole everywhere
        from transformers import AutoModelForCausalLM

        from .pruning import save_pruned_model

        state_dict = gather_full_state_dict(trainer, dtype)
        if trainer.accelerator.is_main_process:
            save_pruned_model(trainer.accelerator.unwrap_model(trainer.model), save_directory,
                              tokenizer=processing_class, overwrite=True, state_dict=state_dict)
        trainer.accelerator.wait_for_everyone()
        del trainer, state_dict
        with whole_model_loading():
            corrected = AutoModelForCausalLM.from_pretrained(save_directory, dtype=dtype)
    else:
        corrected = trainer.accelerator.unwrap_model(trainer.model)
        if args.use_lora:
            corrected = corrected.merge_and_unload()
        # TRL (fused LM head) and accelerate (mixed precision) patch `forward` on the instance, closing over the
        # original object: a `copy.deepcopy` of the teacher (how students are made) would silently run the teacher's
        # forward.
        strip_instance_patches(corrected, keep=user_patches)
        if save_directory is not None and trainer.accelerator.is_main_process:
            from .pruning import save_pruned_model

            save_pruned_model(corrected, save_directory, tokenizer=processing_class, overwrite=True)
        trainer.accelerator.wait_for_everyone()
    corrected.eval()
    for p in corrected.parameters():
        p.requires_grad_(True)
    return corrected
