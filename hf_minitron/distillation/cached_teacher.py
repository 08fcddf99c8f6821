# Copyright 2026 The hf-minitron Authors. Apache-2.0.
"""`DistillationTrainer` without the teacher in memory: set-up checks and the loss from a teacher-logit cache.

Kept apart from the live-teacher code path of `trainer.py`: the trainer calls :func:`open_cache_for_training` at
construction and :func:`cached_distill_loss` in place of its teacher forward when `args.teacher_logits_cache` is set.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from .checks import checkpoint_dir, load_local_tokenizer, output_head
from .logit_cache import TeacherLogitCache, cache_teacher_logits
from .sharding import full_weight, gathered
from .topk_loss import fused_linear_topk_kd_loss


logger = logging.get_logger(__name__)

__all__ = ["open_cache_for_training", "cached_distill_loss", "cached_teacher_retrain_fn", "ensure_search_cache"]


def open_cache_for_training(model: Any, teacher_model: Any, args, processing_class) -> tuple[TeacherLogitCache, Any]:
    """Open `args.teacher_logits_cache` and check it against the student's tokenizers. Returns `(cache, tokenizer)`;
    without `processing_class` the cache's tokenizer is used.

    Raises:
        ValueError: a teacher given as well, an unreadable or incomplete cache, or a tokenizer that differs from the
            cache's.
    """
    if teacher_model is not None:
        raise ValueError(
            "Pass either `teacher_model` or `DistillationConfig(teacher_logits_cache=...)`, not both: with a cache the "
            "teacher is not needed (`teacher_model=None`)."
        )
    cache = TeacherLogitCache(args.teacher_logits_cache)
    known = []
    if processing_class is not None:
        known.append(("`processing_class`", processing_class))
    folder = checkpoint_dir(model)
    tok = load_local_tokenizer(folder)
    if tok is not None:
        known.append((f"the student's checkpoint ({folder})", tok))
    cache.check_tokenizers(known)
    logger.info(f"Distilling from {cache!r}: the teacher is not loaded.")
    return cache, processing_class if processing_class is not None else cache.tokenizer()


def student_vocab(cache: TeacherLogitCache, student: nn.Module, processing_class) -> int:
    """The vocabulary size the loss compares on (the cache's), after checking the student's `lm_head` against it."""
    tok = getattr(processing_class, "tokenizer", processing_class)
    n_tok = len(tok) if tok is not None and hasattr(tok, "__len__") else None
    return cache.check_vocab(output_head(student, "student").weight.shape[0], n_tok)


def cached_distill_loss(trainer, student: nn.Module, inputs: dict, num_items_in_batch) -> tuple[torch.Tensor, None, torch.Tensor]:
    """`(logit_loss, None, stats)` of one batch against the cached teacher; the same contract as the trainer's
    `_distill_loss` (runs inside the student wrapper's forward)."""
    from .trainer import loss_normalizer, next_token_batch  # the trainer imports this module

    args = trainer.args
    model_inputs, targets, cut, mask, num_valid = next_token_batch(inputs)

    s_last = trainer._backbone_states(student, model_inputs, False)[-1][:, cut]  # [B, T', Hs], post final norm

    input_ids = inputs["input_ids"]
    needed = torch.zeros(input_ids.shape, dtype=torch.bool)
    needed[:, cut] = mask.cpu()
    t_ids, t_lp, t_lt = trainer.logit_cache.batch_targets(
        input_ids, inputs.get("attention_mask"), inputs.get("position_ids"), needed
    )  # [B, T, k], [B, T, k], [B, T] on CPU

    s_head = output_head(student, "student")
    device = s_head.weight.device
    normalizer = loss_normalizer(num_items_in_batch, num_valid, device)
    # The student head is gathered once when sharded (as in the live-teacher loss)
    with contextlib.ExitStack() as stack:
        s_w, s_b = s_head.weight, getattr(s_head, "bias", None)
        stack.enter_context(gathered(s_w, s_b))
        logit_loss, (kd_sum, ce_sum, _) = fused_linear_topk_kd_loss(
            s_last.to(device),
            full_weight(s_w, s_last.dtype),
            t_ids[:, cut].to(device),
            t_lp[:, cut].to(device),
            t_lt[:, cut].to(device),
            mask.to(device),
            student_bias=full_weight(s_b, s_last.dtype),
            targets=targets.to(device).clamp(min=0),
            kd_weight=args.kd_weight,
            ce_weight=args.ce_weight,
            vocab_size=trainer.kd_vocab_size,
            student_logit_transforms=trainer.student_logit_transforms,
            chunk_size=args.kd_chunk_size,
            normalizer=normalizer,
            return_components=True,
        )
    zero = torch.zeros((), device=device)
    stats = torch.stack([num_valid.to(device).float(), kd_sum.float(), ce_sum.float(), zero]).detach()
    return logit_loss, None, stats


def cached_teacher_retrain_fn(
    cache: TeacherLogitCache | str,
    tokenizer=None,
    use_lora: bool = False,
    training_kwargs: Mapping[str, Any] | None = None,
    callbacks: Sequence[Any] = (),
) -> Callable[..., nn.Module]:
    """A `retrain_fn` for `search_architectures` that retrains every candidate from one teacher-logit cache.

    The returned callable has the signature `search_architectures` calls (`retrain_fn(student, teacher=...,
    train_dataset=..., max_steps=..., seed=...)`); it ignores `teacher` and runs the search's default short
    distillation (`distill_candidate`: same schedule, seed and data order) with `teacher_logits_cache=cache`. The
    `train_dataset` it receives must consist of rows of the cache (build the cache on the search's training rows).

    Example:
    ```python
    >>> cache = cache_teacher_logits(model, train_ds, "search-cache", tokenizer=tok)   # once
    >>> result = search_architectures(model, scores, ..., retrain_steps=20, train_dataset=train_ds,
    ...                               eval_dataset=eval_ds, tokenizer=tok, retrain_fn=cached_teacher_retrain_fn(cache, tok))
    ```
    """
    path = cache.path if isinstance(cache, TeacherLogitCache) else os.fspath(cache)
    TeacherLogitCache(path)  # fail now, not inside the search, if the cache is incomplete

    def retrain(student: nn.Module, teacher: nn.Module | None = None, train_dataset=None, max_steps: int = 0, seed: int = 0):
        from ..search import distill_candidate

        kwargs = {**(training_kwargs or {}), "teacher_logits_cache": path}
        return distill_candidate(student, None, train_dataset, max_steps, seed=seed, tokenizer=tokenizer,
                                 use_lora=use_lora, training_kwargs=kwargs, callbacks=callbacks)

    return retrain


def ensure_search_cache(teacher: nn.Module, train_dataset, cache_dir: str | None, tokenizer, top_k: int = 64,
                        dtype: str = "float16", **kwargs) -> TeacherLogitCache:
    """The cache search candidates retrain from: `cache_teacher_logits` on the search's training rows, taken once
    (idempotent: an existing complete cache of the same teacher, data and settings is reused; an unfinished one is
    resumed). `cache_dir=None` uses a fresh temporary folder (the caller removes it)."""
    folder = cache_dir or tempfile.mkdtemp(prefix="hf-minitron-teacher-cache-")
    return cache_teacher_logits(teacher, train_dataset, folder, top_k=top_k, dtype=dtype, tokenizer=tokenizer, **kwargs)
