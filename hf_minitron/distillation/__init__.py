# Copyright 2026 The hf-minitron Authors. Apache-2.0.
"""Knowledge distillation of a (pruned) student from its teacher: the second half of the Minitron recipe.

Example:
```python
>>> from hf_minitron.distillation import DistillationConfig, DistillationTrainer
>>> args = DistillationConfig("out", hidden_state_loss="cosine", max_steps=1000)
>>> DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds).train()
>>> # or without the teacher in memory: cache its top-k logits once, distil many students from them
>>> cache = cache_teacher_logits(teacher, ds, "teacher-cache", top_k=64, tokenizer=tokenizer)
>>> args = DistillationConfig("out", teacher_logits_cache="teacher-cache", max_steps=1000)
>>> DistillationTrainer(model=student, teacher_model=None, args=args, train_dataset=ds).train()
```
"""

from .cached_teacher import cached_teacher_retrain_fn, ensure_search_cache
from .config import DistillationConfig
from .layer_map import get_provenance, resolve_layer_map
from .losses import (
    HIDDEN_STATE_LOSSES,
    KD_LOSSES,
    divergence_and_grad,
    fused_linear_kd_loss,
    hidden_state_loss,
    kd_loss_from_logits,
)
from .logit_cache import TeacherLogitCache, cache_teacher_logits
from .topk_loss import fused_linear_topk_kd_loss, topk_kd_loss_from_logits
from .trainer import PROJECTION_FILE, DistillationTrainer


# Alias: the chunked loss is the fused-linear one
chunked_kd_loss = fused_linear_kd_loss

__all__ = [
    "DistillationConfig",
    "DistillationTrainer",
    "fused_linear_kd_loss",
    "chunked_kd_loss",
    "kd_loss_from_logits",
    "hidden_state_loss",
    "divergence_and_grad",
    "resolve_layer_map",
    "get_provenance",
    "KD_LOSSES",
    "HIDDEN_STATE_LOSSES",
    "PROJECTION_FILE",
    "TeacherLogitCache",
    "cache_teacher_logits",
    "cached_teacher_retrain_fn",
    "ensure_search_cache",
    "fused_linear_topk_kd_loss",
    "topk_kd_loss_from_logits",
]
