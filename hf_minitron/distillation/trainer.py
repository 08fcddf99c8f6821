# Copyright 2026 The hf-minitron Authors. Apache-2.0.
"""`DistillationTrainer`: off-policy logit + hidden-state distillation on a text corpus (Minitron recipe)."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging
from trl import SFTTrainer
from trl.models.utils import _ForwardRedirection

from ..model_utils import instance_patches, strip_instance_patches
from .checks import (
    base_model,
    check_peft_config,
    check_same_tokenizer,
    checkpoint_dir,
    describe_transforms,
    load_local_tokenizer,
    output_head,
    resolve_logit_transforms_checked,
)
from .cached_teacher import cached_distill_loss, open_cache_for_training, student_vocab
from .config import DistillationConfig
from .layer_map import final_norm, get_provenance, resolve_layer_map
from .losses import fused_linear_kd_loss, hidden_state_loss
from .sharding import (
    check_sharding_setup,
    full_weight,
    gathered,
    is_fsdp,
    is_sharded,
    param_shape,
    prepare_teacher,
)


logger = logging.get_logger(__name__)

PROJECTION_FILE = "minitron_projection.safetensors"
PROJECTION_OPTIMIZER_FILE = "minitron_projection_optimizer.pt"  # its optimizer and LR-scheduler states
STATE_FILE = "minitron_distillation_state.json"  # the dynamic hidden-state weight α, for exact resumes
# Collator/bookkeeping keys that must not reach the models' forward
_NON_MODEL_KEYS = ("labels", "shift_labels", "completion_mask", "assistant_masks", "num_items_in_batch")


_base = base_model



def next_token_batch(inputs: dict) -> tuple[dict, torch.Tensor, slice, torch.Tensor, torch.Tensor]:
    """`(model_inputs, targets [B, T'], cut, mask [B, T'], num_valid)` of a batch: the model's own inputs (no cache)
    and the next-token targets from SFT's labels (-100 = padding, prompt or non-assistant tokens); `cut` selects the
    positions of the hidden states that predict them."""
    model_inputs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
    model_inputs["use_cache"] = False
    if "shift_labels" in inputs:
        targets, cut = inputs["shift_labels"], slice(None)
    else:
        targets, cut = inputs["labels"][:, 1:], slice(None, -1)
    mask = targets != -100
    return model_inputs, targets, cut, mask, mask.sum()


def loss_normalizer(num_items_in_batch, num_valid: torch.Tensor, device: torch.device):
    """What a summed loss is divided by: the Trainer's token count over the whole accumulated step when given."""
    normalizer = num_items_in_batch if num_items_in_batch is not None else num_valid.clamp(min=1)
    return normalizer.to(device) if torch.is_tensor(normalizer) else normalizer

class _DistillationStepCallback(TrainerCallback):
    """Per-optimizer-step bookkeeping of what lives outside the (DDP/FSDP/DeepSpeed-wrapped) student.

    The hidden-state projection has its own optimizer and LR schedule (the engines only know the student's
    parameters: FSDP2 re-maps the optimizer onto the student's shards, ZeRO-3 partitions every parameter it is given).
    Before each optimizer step its gradients are averaged over data-parallel ranks, unscaled (fp16 gradient scaler)
    and clipped with `max_grad_norm`; after the student's step it steps too (skipped with the student's when the
    scaler found an overflow), its gradients are cleared, and the dynamic hidden-state weight α of the next step is
    set from this step's loss totals.
    """

    def __init__(self, trainer: DistillationTrainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        proj = self.trainer.projection
        if proj is None:
            return
        grads = [p.grad for p in proj.parameters() if p.grad is not None]
        if not grads:
            return
        world = self.trainer.accelerator.num_processes
        if world > 1 and dist.is_available() and dist.is_initialized():
            for g in grads:
                dist.all_reduce(g, op=dist.ReduceOp.SUM)
                g.div_(world)
        scaler = getattr(self.trainer.accelerator, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            for g in grads:
                g.div_(scaler.get_scale())
        if args.max_grad_norm and args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(proj.parameters()), args.max_grad_norm)

    def on_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        if trainer.projection is not None:
            if trainer._projection_optimizer is not None and not trainer.accelerator.optimizer_step_was_skipped:
                trainer._projection_optimizer.step()
                trainer._projection_scheduler.step()
            trainer.projection.zero_grad(set_to_none=True)
        trainer._finish_alpha_step()


class DistillationTrainer(SFTTrainer):
    """Off-policy knowledge distillation of a (pruned) student from a teacher on a text corpus, à la Minitron.

    Extends [`~trl.SFTTrainer`] (same datasets, collators, PEFT and packing support) with:

    - a memory-bounded logit loss ([`fused_linear_kd_loss`]): forward KL (default), reverse KL or generalized JSD at
      temperature τ, computed chunk by chunk from the final hidden states and the `lm_head` weights, plus an optional
      cross-entropy term (`ce_weight`, default 0);
    - an optional hidden-state loss (cosine or MSE) between post-norm hidden states of mapped layers, through one
      learned `nn.Linear(H_student, H_teacher, bias=False)` shared across layers when the widths differ, weighted by a
      fixed float or dynamically by α = L_logits / L_hidden, one value per optimizer step (see below);
    - a frozen teacher in eval mode, run under `torch.no_grad()` and prepared by accelerate like TRL's `GKDTrainer`;
    - FSDP2 and DeepSpeed ZeRO-3 through accelerate with both models sharded (`sharding.py`): each `lm_head` is
      gathered once per forward, gradients are exact, checkpoints stay sharded and `save_model` writes a stock model.

    Not TRL's own `trl.DistillationTrainer`, which is on-policy (the student generates, with vLLM, and is trained
    on its own samples): this one is off-policy, on a fixed corpus, for students pruned from their teacher.

    The logits the loss rebuilds from each `lm_head` include the family's post-head transforms (registry data,
    `ArchitectureLayout.logit_transforms`: Granite's `logits_scaling`, Gemma-2/3 soft-capping, ...). At construction
    one 4-token forward per model checks that they, the head's input and the head itself reproduce the model's own
    `.logits`; an unregistered causal LM is accepted when `.logits` is its head output as is, or scaled, divided or
    soft-capped by one of its config fields, and refused otherwise. Student and teacher must share a tokenizer: every
    tokenizer that is known (`processing_class`, and those saved beside either model's weights) is compared by
    vocabulary and special tokens.

    Dynamic α is L_logits / L_hidden of a whole optimizer step (all gradient-accumulation micro-batches, all
    data-parallel ranks), taken from the previous step's totals; the first step measures its own with one extra
    forward without gradients. Updates are therefore the same for batch 4 × accumulation 1, batch 1 × accumulation 4
    or 4 ranks × batch 1, and α is checkpointed so a resumed run continues exactly.

    Tokens are selected by SFT's labels: positions whose next-token label is `-100` (padding, prompt in
    completion-only training, non-assistant turns) are excluded. Every loss is summed over those tokens and divided
    by the number of label tokens of the optimizer step (`num_items_in_batch`), i.e. a per-token mean that stays exact
    under gradient accumulation. "Post-norm" hidden states are a layer's output passed through the model's final norm
    (the last layer's output already is), so both models are compared at the scale their `lm_head` sees.

    The projection belongs to the trainer: it has its own optimizer on the student's LR schedule (the engines' optimizers
    only hold the student's shards), saved with its weights as `checkpoint-*/minitron_projection.safetensors` and
    `minitron_projection_optimizer.pt` and restored on resume under every engine; the saved student is a stock model. After
    `train()` neither model carries an instance-level `forward` patch added by TRL or accelerate, so copies of them
    (how further students are pruned) run their own weights.

    Teacher-logit cache: with `DistillationConfig(teacher_logits_cache=path)` and `teacher_model=None` the teacher is
    not loaded at all; each batch reads the teacher's stored top-k log-probabilities and tail mass
    ([`cache_teacher_logits`]) and the loss is the exact forward KL over those k + 1 buckets
    ([`fused_linear_topk_kd_loss`]). Rows are matched to the cache by their tokens, and every sample of the train and
    eval datasets is checked against it at construction; the cache's tokenizer must be the student's.

    PEFT: adapters anywhere but on `lm_head`; `modules_to_save=["lm_head"]` trains a full copy of the head through
    the fused loss. An adapter layer on `lm_head` (or on the teacher's) raises a `ValueError`.

    Args:
        model: The student (model or path), as in [`~trl.SFTTrainer`].
        teacher_model: The teacher (model or path; `args.teacher_model_init_kwargs` when a path). It must share the
            student's tokenizer; `lm_head`s padded beyond the tokenizer are compared on their common rows. `None`
            with `args.teacher_logits_cache`.
        args ([`DistillationConfig`]): Training and distillation options.
        Other arguments are those of [`~trl.SFTTrainer`].

    Raises:
        ValueError: different tokenizers, a vocabulary mismatch, an adapter on either `lm_head`, a post-head
            transform that cannot be reproduced, or invalid options; before any dataset preparation (the student's
            head is checked again once PEFT has wrapped it).

    Example:
    ```python
    >>> args = DistillationConfig("out", hidden_state_loss="cosine", max_steps=100)
    >>> trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds,
    ...                               processing_class=tokenizer)
    >>> trainer.train()
    >>> trainer.save_model("student")  # a plain `AutoModelForCausalLM` checkpoint
    ```
    """

    _tag_names = ["trl", "sft", "distillation", "minitron"]
    _name = "Minitron distillation"

    def __init__(
        self,
        model: str | PreTrainedModel | nn.Module,
        teacher_model: str | PreTrainedModel | nn.Module | None = None,
        args: DistillationConfig | None = None,
        data_collator: Callable | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        compute_metrics: Callable | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple = (None, None),
        optimizer_cls_and_kwargs: tuple | None = None,
        preprocess_logits_for_metrics: Callable | None = None,
        peft_config: Any = None,
        formatting_func: Callable | None = None,
    ):
        if args is None:
            name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
            args = DistillationConfig(f"{str(name).split('/')[-1] or 'student'}-Distill")
        if not isinstance(args, DistillationConfig):
            raise ValueError(f"`args` must be a `DistillationConfig`, got {type(args).__name__}.")
        self.logit_cache = None
        if args.teacher_logits_cache is not None:  # distil from stored teacher top-k log-probabilities
            self.logit_cache, processing_class = open_cache_for_training(model, teacher_model, args, processing_class)
        elif teacher_model is None:
            raise ValueError("`teacher_model` is required (or a teacher-logit cache: `DistillationConfig(teacher_logits_cache=...)`).")

        teacher_dir = checkpoint_dir(teacher_model) if teacher_model is not None else None
        if isinstance(teacher_model, str):
            init_kwargs = dict(args.teacher_model_init_kwargs or {})
            dtype = init_kwargs.get("dtype")
            if isinstance(dtype, str) and dtype != "auto":
                init_kwargs["dtype"] = getattr(torch, dtype)
            init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
            teacher_model = AutoModelForCausalLM.from_pretrained(teacher_model, **init_kwargs)
        elif args.teacher_model_init_kwargs is not None:
            raise ValueError(
                "You passed `teacher_model_init_kwargs` but the teacher is already instantiated; drop them or pass "
                "the teacher as a path."
            )

        # Cheap checks first: adapters on either head, and the tokenizers
        check_peft_config(model, peft_config)
        if isinstance(model, nn.Module):
            output_head(model, "student")
        self.teacher_logit_transforms = ()
        if teacher_model is not None:
            output_head(teacher_model, "teacher")
            processing_class = self._check_tokenizers(model, teacher_model, teacher_dir, processing_class)
            # Post-head logit transforms (registry data), verified against each model's own `.logits` on 4 tokens
            self.teacher_logit_transforms = resolve_logit_transforms_checked(teacher_model, "teacher", check_backbone=True)
        student_steps = (
            resolve_logit_transforms_checked(model, "student", check_backbone=True) if isinstance(model, nn.Module) else None
        )
        # Instance patches present now are the user's (e.g. `device_map` hooks); the ones trainers add are removed
        # when the models are handed back (see `train`)
        self._student_patches = instance_patches(model) if isinstance(model, nn.Module) else {}
        self._teacher_patches = instance_patches(teacher_model) if teacher_model is not None else {}

        super().__init__(
            model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            peft_config=peft_config,
            formatting_func=formatting_func,
        )

        student = self.accelerator.unwrap_model(self.model)
        # SFTTrainer's fused-LM-head `forward` (a closure over this object) is unused here: the distillation loss
        # is fused with the head itself. Removing it keeps copies of the student running their own weights.
        strip_instance_patches(student, keep=self._student_patches)
        output_head(student, "student")  # after PEFT wrapping
        if self.logit_cache is not None:
            self.kd_vocab_size = student_vocab(self.logit_cache, student, self.processing_class)
        else:
            self.kd_vocab_size = self._resolve_vocab(student, teacher_model)
        if student_steps is None:  # the student was a path
            student_steps = resolve_logit_transforms_checked(student, "student", check_backbone=True)
        self.student_logit_transforms = student_steps
        if self.student_logit_transforms or self.teacher_logit_transforms:
            logger.info(
                f"Post-head logit transforms: student {describe_transforms(self.student_logit_transforms)}, "
                f"teacher {describe_transforms(self.teacher_logit_transforms)}"
            )

        if self.logit_cache is not None:
            # No teacher: every sample must have its cached row (checked now, before any training step)
            self.teacher_model = None
            self.logit_cache.check_dataset(self.train_dataset, "train_dataset")
            self.logit_cache.check_dataset(self.eval_dataset, "eval_dataset")

        # Hidden-state loss: layer pairs and the trainer-owned projection
        self.layer_pairs: list[tuple[int, int]] = []
        self.projection: nn.Linear | None = None
        if args.hidden_state_loss != "none":
            s_cfg = _base(student).config.get_text_config()
            t_cfg = teacher_model.config.get_text_config()
            self.layer_pairs = resolve_layer_map(
                s_cfg.num_hidden_layers, t_cfg.num_hidden_layers, args.hidden_state_layer_map, get_provenance(student)
            )
            if s_cfg.hidden_size != t_cfg.hidden_size:
                self.projection = nn.Linear(s_cfg.hidden_size, t_cfg.hidden_size, bias=False).to(
                    device=self.accelerator.device, dtype=torch.float32
                )
            logger.info(f"Hidden-state distillation on (student, teacher) layers {self.layer_pairs}")
        # Its optimizer and LR schedule are built with the student's (`create_scheduler`)
        self._projection_optimizer: torch.optim.Optimizer | None = None
        self._projection_scheduler = None
        check_sharding_setup(self.accelerator, args, self.projection is not None)

        # Frozen teacher in eval mode, sharded like the student under FSDP2 / ZeRO-3 (see `sharding.prepare_teacher`)
        if self.logit_cache is None:
            self.teacher_model = prepare_teacher(self.accelerator, teacher_model)
        self._teacher_head_cache: tuple[torch.Tensor, torch.Tensor | None] | None = None

        # The chunked loss reads `lm_head.weight` after the backbone; running it inside the wrapper's forward keeps
        # DDP's `prepare_for_backward` and DeepSpeed's parameter gathering consistent (as TRL does). An FSDP2 student
        # is its own wrapper: the loss calls it directly (see `_run_distill_loss`).
        self._forward_redirection = _ForwardRedirection()

        # Dynamic α: the value of the current optimizer step, and the running [logit, hidden] loss sums of the step
        self._alpha: float | None = None
        self._alpha_totals = torch.zeros(2, dtype=torch.float64)
        self.add_callback(_DistillationStepCallback(self))

    # ----------------------------------------------------------------------------------------------- setup checks
    @staticmethod
    def _load_tokenizer(model, teacher_model):
        """The shared tokenizer: from the student's checkpoint, else from the teacher's."""
        from transformers import AutoTokenizer

        sources = []
        for m in (model, teacher_model):
            src = m if isinstance(m, str) else getattr(getattr(m, "config", None), "_name_or_path", None)
            if src and src not in sources:
                sources.append(src)
        for src in sources:
            try:
                return AutoTokenizer.from_pretrained(src)
            except Exception:  # noqa: BLE001 - any loading failure means "try the next source"
                continue
        raise ValueError(
            f"Could not load a tokenizer from the student or the teacher ({sources or 'no checkpoint path'}); pass "
            "`processing_class=tokenizer` (the tokenizer student and teacher share)."
        )

    def _check_tokenizers(self, model, teacher_model, teacher_dir: str | None, processing_class):
        """Compare every tokenizer that is known: `processing_class` and those saved beside the student's and the
        teacher's weights (vocabulary and special tokens, not just sizes). Returns the tokenizer to train with."""
        known = []
        if processing_class is not None:
            known.append(("`processing_class`", processing_class))
        seen = set()
        for role, folder in (("student", checkpoint_dir(model)), ("teacher", teacher_dir or checkpoint_dir(teacher_model))):
            if folder is None or os.path.realpath(folder) in seen:
                continue
            seen.add(os.path.realpath(folder))
            tok = load_local_tokenizer(folder)
            if tok is not None:
                known.append((f"the {role}'s checkpoint ({folder})", tok))
        check_same_tokenizer(known)
        if processing_class is None:
            processing_class = known[0][1] if known else self._load_tokenizer(model, teacher_model)
        return processing_class

    def _resolve_vocab(self, student: nn.Module, teacher: nn.Module) -> int:
        s_rows = param_shape(output_head(student, "student").weight)[0]
        t_rows = param_shape(output_head(teacher, "teacher").weight)[0]
        if s_rows == t_rows:
            return s_rows
        tok = getattr(self.processing_class, "tokenizer", self.processing_class)
        n_tok = len(tok) if tok is not None and hasattr(tok, "__len__") else None
        common = min(s_rows, t_rows)
        if n_tok is not None and n_tok <= common:
            logger.info(
                f"Student/teacher `lm_head`s have {s_rows}/{t_rows} rows (tokenizer: {n_tok}); the padded rows beyond "
                f"{common} are ignored by the distillation loss."
            )
            return common
        raise ValueError(
            f"Vocabulary mismatch: the student `lm_head` has {s_rows} rows, the teacher's {t_rows}, and the tokenizer "
            f"has {n_tok} tokens. Distillation compares full next-token distributions, so student and teacher must "
            "share a tokenizer; resize the student's embeddings to the teacher's vocabulary "
            "(`student.resize_token_embeddings(len(tokenizer))`) or use a teacher with the same tokenizer."
        )

    # ------------------------------------------------------------------------------------------ optimizer/ckpting
    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The student's LR scheduler ([`~transformers.Trainer.create_scheduler`]), and the hidden-state projection's
        optimizer and scheduler: the optimizer of `args.optim` (AdamW when it cannot be built for a lone linear map),
        at `projection_learning_rate` (default `learning_rate`), no weight decay, on the same schedule. Called once the
        student's optimizer is final, under every engine."""
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if self.projection is not None and self._projection_optimizer is None:
            from transformers import Trainer
            from transformers.optimization import get_scheduler

            lr = self.args.projection_learning_rate or self.args.learning_rate
            groups = [{"params": list(self.projection.parameters()), "weight_decay": 0.0}]
            try:
                cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args)
                self._projection_optimizer = cls(groups, **{**kwargs, "lr": lr})
            except Exception as err:  # noqa: BLE001 - optimizers that need the whole model (GaLore, LOMO, ...)
                logger.info(f"`optim={self.args.optim}` cannot train the projection alone ({err}); using AdamW.")
                self._projection_optimizer = torch.optim.AdamW(
                    groups, lr=lr, betas=(self.args.adam_beta1, self.args.adam_beta2), eps=self.args.adam_epsilon
                )
            self._projection_scheduler = get_scheduler(
                self.args.lr_scheduler_type,
                optimizer=self._projection_optimizer,
                num_warmup_steps=self.args.get_warmup_steps(num_training_steps),
                num_training_steps=num_training_steps,
                scheduler_specific_kwargs=self.args.lr_scheduler_kwargs,
            )
        return scheduler

    def _save_checkpoint(self, model, trial):
        # Trainer-owned state goes in first: `Trainer` writes `trainer_state.json` last, so a checkpoint that has it is
        # complete, projection and α included, even if the process is killed mid-save. The projection is replicated
        # on every rank (its gradients are averaged), so the main process writes it under every engine.
        if self.args.should_save and (self.projection is not None or self._alpha is not None):
            folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            output_dir = os.path.join(self._get_output_dir(trial=trial), folder)
            os.makedirs(output_dir, exist_ok=True)
            if self.projection is not None:
                from safetensors.torch import save_file

                state = {k: v.detach().cpu().contiguous() for k, v in self.projection.state_dict().items()}
                save_file(state, os.path.join(output_dir, PROJECTION_FILE))
                if self._projection_optimizer is not None:
                    torch.save(
                        {
                            "optimizer": self._projection_optimizer.state_dict(),
                            "scheduler": self._projection_scheduler.state_dict(),
                        },
                        os.path.join(output_dir, PROJECTION_OPTIMIZER_FILE),
                    )
            if self._alpha is not None:
                with open(os.path.join(output_dir, STATE_FILE), "w") as f:
                    json.dump({"hidden_state_alpha": self._alpha}, f)
        super()._save_checkpoint(model, trial)

    def _load_optimizer_and_scheduler(self, checkpoint):
        # Called on resume under every engine (plain, DDP, FSDP2, DeepSpeed), after the student's weights are loaded
        # and every optimizer exists.
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        self._load_projection(checkpoint)
        path = os.path.join(checkpoint, STATE_FILE)
        if self._dynamic_alpha and os.path.isfile(path):
            with open(path) as f:
                self._alpha = json.load(f)["hidden_state_alpha"]

    def _load_projection(self, checkpoint: str) -> None:
        if self.projection is None:
            return
        path = os.path.join(checkpoint, PROJECTION_FILE)
        if not os.path.isfile(path):
            logger.warning(f"No {PROJECTION_FILE} in {checkpoint}: the hidden-state projection starts from scratch.")
            return
        from safetensors.torch import load_file

        self.projection.load_state_dict(load_file(path))  # copied onto the projection's device
        path = os.path.join(checkpoint, PROJECTION_OPTIMIZER_FILE)
        if self._projection_optimizer is not None and os.path.isfile(path):
            state = torch.load(path, map_location="cpu", weights_only=True)  # moved to the parameters' device
            self._projection_optimizer.load_state_dict(state["optimizer"])
            self._projection_scheduler.load_state_dict(state["scheduler"])

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """[`~transformers.Trainer.save_model`], and under FSDP2 with `SHARDED_STATE_DICT` checkpoints (where
        `Trainer` writes nothing here) the full student gathered into a stock `save_pretrained` folder. Checkpoints
        (`_internal_call`) keep the engine's own sharded format."""
        if _internal_call or not (self.is_fsdp_enabled and "FULL_STATE_DICT" not in str(
                self.accelerator.state.fsdp_plugin.state_dict_type)):
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        state_dict = self.accelerator.get_state_dict(self.model)  # every rank joins the gather; rank 0 keeps it
        self._save(output_dir, state_dict=state_dict)
        if self.args.push_to_hub:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    # ------------------------------------------------------------------------------------------------- training
    def train(self, *args, **kwargs):
        """[`~transformers.Trainer.train`]; afterwards the student and the teacher carry no instance-level patch that
        a trainer added (TRL's fused-head `forward`, accelerate's mixed-precision wrapper), so copies of them run
        their own weights."""
        self._alpha = None  # measured on the first step (or restored from the checkpoint being resumed)
        self._alpha_totals.zero_()
        try:
            return super().train(*args, **kwargs)
        finally:
            strip_instance_patches(self.accelerator.unwrap_model(self.model), keep=self._student_patches)
            if self.teacher_model is not None:
                strip_instance_patches(self.accelerator.unwrap_model(self.teacher_model), keep=self._teacher_patches)

    @property
    def _dynamic_alpha(self) -> bool:
        return self.args.hidden_state_loss != "none" and self.args.hidden_state_weight == "dynamic"

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self._dynamic_alpha and self._alpha is None and batch_samples:
            self._alpha = self._measure_alpha(batch_samples, num_items_in_batch)
        return batch_samples, num_items_in_batch

    @torch.no_grad()
    def _measure_alpha(self, batch_samples: list, num_items_in_batch) -> float:
        """α = L_logits / L_hidden over the whole first optimizer step (every micro-batch, every rank), by one extra
        forward without gradients; later steps take α from the previous step's totals at no cost."""
        model = self.model_wrapped
        totals = torch.zeros(2, dtype=torch.float64, device=self.accelerator.device)
        for batch in batch_samples:
            inputs = self._prepare_inputs(batch)
            _, _, stats = self._run_distill_loss(model, inputs, num_items_in_batch)
            totals += self._loss_sums(stats).to(totals.device)
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        return float(totals[0] / totals[1].clamp(min=1e-12))

    def _loss_sums(self, stats: torch.Tensor) -> torch.Tensor:
        """`[Σ logit loss, Σ hidden-state loss]` (per-token sums, before the normalizer) from `_distill_loss` stats."""
        stats = stats.double()
        return torch.stack([self.args.kd_weight * stats[1] + self.args.ce_weight * stats[2], stats[3]])

    def _finish_alpha_step(self) -> None:
        """End of an optimizer step: the next step's α is this step's L_logits / L_hidden (all micro-batches, ranks)."""
        if self._dynamic_alpha and self._alpha_totals[1] > 0:
            self._alpha = float(self._alpha_totals[0] / self._alpha_totals[1])
        self._alpha_totals.zero_()

    # ------------------------------------------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        logit_loss, hs_loss, stats = self._run_distill_loss(model, inputs, num_items_in_batch)
        loss = logit_loss
        alpha = torch.zeros((), device=logit_loss.device)
        if hs_loss is not None:
            if self.args.hidden_state_weight != "dynamic":
                alpha = torch.tensor(float(self.args.hidden_state_weight), device=logit_loss.device)
            elif self._alpha is not None:
                alpha = torch.tensor(self._alpha, device=logit_loss.device)
            else:
                # Outside a training step (a direct call, or evaluation before training): this batch's own ratio
                # over all data-parallel ranks
                pair = torch.stack([logit_loss.detach(), hs_loss.detach()]).float()
                if self.accelerator.num_processes > 1:
                    pair = self.accelerator.reduce(pair, reduction="sum")
                alpha = pair[0] / pair[1].clamp(min=1e-12)
            loss = logit_loss + alpha.to(hs_loss.dtype) * hs_loss
        stats = torch.cat([stats, alpha.detach().float().reshape(1)])
        # Like SFTTrainer: `num_items_in_batch` counts every rank's tokens while DDP averages gradients
        if self.args.average_tokens_across_devices and num_items_in_batch is not None and self.model.training:
            loss = loss * self.accelerator.num_processes

        # Metrics: token-weighted means over all ranks (gathered outside the wrapped forward)
        g = self.accelerator.gather(stats.unsqueeze(0)).reshape(-1, stats.numel()).sum(0)
        if mode == "train" and self._dynamic_alpha:
            self._alpha_totals += self._loss_sums(g).cpu()
        n = g[0].clamp(min=1)
        metrics = self._metrics[mode]
        metrics["kd_loss"].append((g[1] / n).item())
        metrics["ce_loss"].append((g[2] / n).item())
        if self.args.hidden_state_loss != "none":
            metrics["hidden_state_loss"].append((g[3] / n).item())
            metrics["hidden_state_alpha"].append((g[4] / self.accelerator.num_processes).item())  # same on all ranks
        if mode == "train" and "attention_mask" in inputs:
            self._total_train_tokens += int(self.accelerator.gather(inputs["attention_mask"].sum()).sum().item())
            metrics["num_tokens"] = [self._total_train_tokens]
        return (loss, None) if return_outputs else loss

    def _run_distill_loss(self, model: nn.Module, inputs: dict, num_items_in_batch):
        """`_distill_loss` inside the student wrapper's forward: DDP's `prepare_for_backward`, FSDP2's root hooks (an
        FSDP2 student is its own wrapper) and DeepSpeed's parameter fetching all run as for a plain forward, while the
        loss calls the backbone and reads `lm_head.weight` itself (as TRL's fused losses do)."""
        unwrapped = self.accelerator.unwrap_model(model)
        return self._forward_redirection(model, unwrapped, self._distill_loss, unwrapped, inputs, num_items_in_batch)

    def _teacher_head(self, device: torch.device, stack: contextlib.ExitStack) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The teacher head's weight and bias on the student head's `device`. The teacher is frozen, so a head on
        another device is copied once and kept; a sharded one (FSDP2 `DTensor`, ZeRO-3 partition) is gathered once
        for this forward (`stack` releases a ZeRO-3 gather)."""
        if self._teacher_head_cache is not None:
            return self._teacher_head_cache
        head = output_head(self.accelerator.unwrap_model(self.teacher_model), "teacher")
        w, b = head.weight, getattr(head, "bias", None)
        if is_sharded(w):
            stack.enter_context(gathered(w, b))
            w, b = full_weight(w), full_weight(b)
            return w.detach().to(device), (b.detach().to(device) if b is not None else None)
        w, b = w.detach(), (b.detach() if b is not None else None)
        if w.device != device:
            logger.info(f"Keeping a copy of the teacher's `lm_head` on {device} (the teacher's is on {w.device}).")
            w, b = w.to(device), (b.to(device) if b is not None else None)
            self._teacher_head_cache = (w, b)
        return w, b

    @staticmethod
    def _backbone_states(model: nn.Module, model_inputs: dict, all_layers: bool) -> tuple[torch.Tensor, ...]:
        """The backbone's hidden states: `(embeddings, layer 1, ..., last)` with `all_layers`, else `(last,)`; the last
        is post final norm, the input of `lm_head` (checked at construction). The head itself is not run."""
        out = _base(model).base_model(**model_inputs, output_hidden_states=all_layers)
        return tuple(out.hidden_states) if all_layers else (out.last_hidden_state,)

    def _teacher_pass(
        self, teacher: nn.Module, model_inputs: dict, layers: list[int]
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None] | None]:
        """The teacher's part of a step, run inside its wrapper's forward (FSDP2 / ZeRO-3 gather its layers as in a
        plain forward): `(last hidden state, {layer: post-norm state of that layer}, head)`. `head` is the `lm_head`
        weight and bias of an FSDP2 teacher, read (and copied) while its unit is gathered for the final norm, so the
        step gathers it once; `None` for other teachers (see `_teacher_head`)."""
        states = self._backbone_states(teacher, model_inputs, all_layers=bool(layers))
        normed: dict[int, torch.Tensor] = {}
        if layers:
            norm, last = final_norm(teacher), len(states) - 1
            for t in layers:  # "post-norm": the final norm on a layer's output (the last one already has it)
                h = states[t + 1]
                normed[t] = norm(h) if t + 1 < last and norm is not None else h
        head = None
        if is_fsdp(self.accelerator):
            module = output_head(teacher, "teacher")
            w, b = module.weight, getattr(module, "bias", None)
            # A DTensor (unit resharded) is gathered here; a gathered unit's plain tensors are freed when the
            # forward returns, so they are copied.
            w, b = (full_weight(x) if is_sharded(x) else x.detach().clone() if x is not None else None for x in (w, b))
            head = (w, b)
        return states[-1], normed, head

    def _distill_loss(
        self, student: nn.Module, inputs: dict, num_items_in_batch
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """`(logit_loss, hidden_state_loss or None, stats)`; runs inside the student wrapper's forward."""
        if self.logit_cache is not None:
            return cached_distill_loss(self, student, inputs, num_items_in_batch)
        args = self.args
        want_hidden = args.hidden_state_loss != "none"
        model_inputs, targets, cut, mask, num_valid = next_token_batch(inputs)

        # Both backbones, no head: the fused loss makes the logits chunk by chunk from the `lm_head` weights. The
        # teacher runs through its own wrapper too, so FSDP2 / ZeRO-3 gather its layers as in a plain forward.
        s_states = self._backbone_states(student, model_inputs, want_hidden)
        s_last = s_states[-1][:, cut]  # [B, T', Hs], post final norm
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        self.teacher_model.eval()
        t_layers = sorted({t for _, t in self.layer_pairs}) if want_hidden else []
        with torch.no_grad():
            t_last, t_normed, t_head = self._forward_redirection(
                self.teacher_model, teacher, self._teacher_pass, teacher, model_inputs, t_layers
            )
        t_last = t_last[:, cut]

        s_head = output_head(student, "student")
        device = s_head.weight.device
        normalizer = loss_normalizer(num_items_in_batch, num_valid, device)

        # Each head is gathered once here when sharded (ZeRO-3: for the duration of the loss, whose forward computes
        # the student head's gradient; FSDP2: one differentiable `full_tensor()`)
        with contextlib.ExitStack() as stack:
            s_w, s_b = s_head.weight, getattr(s_head, "bias", None)
            stack.enter_context(gathered(s_w, s_b))
            t_w, t_b = t_head if t_head is not None else self._teacher_head(device, stack)
            t_w, t_b = t_w.to(device), (t_b.to(device) if t_b is not None else None)
            logit_loss, (kd_sum, ce_sum, _) = fused_linear_kd_loss(
                s_last.to(device),
                full_weight(s_w, s_last.dtype),
                t_last.to(device),
                t_w,
                mask.to(device),
                student_bias=full_weight(s_b, s_last.dtype),
                teacher_bias=t_b,
                targets=targets.to(device).clamp(min=0),
                kd_loss=args.kd_loss,
                jsd_beta=args.jsd_beta,
                temperature=args.temperature,
                kd_weight=args.kd_weight,
                ce_weight=args.ce_weight,
                vocab_size=self.kd_vocab_size,
                student_logit_transforms=self.student_logit_transforms,
                teacher_logit_transforms=self.teacher_logit_transforms,
                chunk_size=args.kd_chunk_size,
                normalizer=normalizer,
                return_components=True,
            )

        hs_loss = None
        hs_sum = torch.zeros((), device=device)
        if want_hidden:
            s_norm = final_norm(student)
            Ls = len(s_states) - 1
            hs_loss = 0.0
            for s_idx, t_idx in self.layer_pairs:
                h_s = s_states[s_idx + 1]
                if s_idx + 1 < Ls and s_norm is not None:  # the last state already went through the final norm
                    h_s = s_norm(h_s)
                h_t = t_normed[t_idx]
                hs_loss = hs_loss + hidden_state_loss(
                    h_s[:, cut].to(device),
                    h_t[:, cut].to(device),
                    args.hidden_state_loss,
                    self.projection,
                    mask.to(device),
                    normalizer,
                )
            hs_loss = hs_loss / len(self.layer_pairs)  # mean over mapped layers: a fixed weight is depth-independent
            # Per-token sum for logging, undoing the normalizer
            hs_sum = hs_loss.detach() * (normalizer if torch.is_tensor(normalizer) else float(normalizer))

        stats = torch.stack([num_valid.to(device).float(), kd_sum.float(), ce_sum.float(), hs_sum.float()]).detach()
        return logit_loss, hs_loss, stats

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Only the loss: the fused loss never builds the logits
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
