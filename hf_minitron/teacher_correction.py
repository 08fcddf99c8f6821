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
) -> nn.Module:
    """Fine-tune ``model`` on the distillation corpus and return a plain (LoRA-merged) model.

    Args:
        model: The unpruned teacher (``PreTrainedModel``).
        args: Training settings; see :class:`TeacherCorrectionConfig`.
        train_dataset: A ``datasets.Dataset`` with ``input_ids`` (already packed) or ``text``.
        eval_dataset: Optional held-out set for the trainer's evaluation.
        processing_class: The teacher's tokenizer.

    Example:
        >>> args = TeacherCorrectionConfig(output_dir="tc", original_learning_rate=1e-4, max_steps=50)
        >>> teacher = correct_teacher(teacher, args, train_dataset=train_ds, processing_class=tok)  # doctest: +SKIP
    """
    if processing_class is None:
        raise ValueError("Pass the teacher's tokenizer as `processing_class=` (SFTTrainer needs it for padding).")
    peft_config = None
    if args.use_lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules="all-linear", task_type="CAUSAL_LM")
    logger.info(f"Teacher correction at learning rate {args.learning_rate:g}" + (" (LoRA)" if args.use_lora else ""))
    user_patches = instance_patches(model)
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
    corrected = trainer.accelerator.unwrap_model(trainer.model)
    if args.use_lora:
        corrected = corrected.merge_and_unload()
    # TRL (fused LM head) and accelerate (mixed precision) patch `forward` on the instance, closing over the original
    # object: a `copy.deepcopy` of the teacher (how students are made) would silently run the teacher's forward.
    strip_instance_patches(corrected, keep=user_patches)
    corrected.eval()
    for p in corrected.parameters():
        p.requires_grad_(True)
    return corrected
