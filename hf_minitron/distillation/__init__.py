# Copyright 2026 The hf-minitron Authors. Apache-2.0.
"""Knowledge distillation of a (pruned) student from its teacher: the second half of the Minitron recipe.

Example:
```python
>>> from hf_minitron.distillation import DistillationConfig, DistillationTrainer
>>> args = DistillationConfig("out", hidden_state_loss="cosine", max_steps=1000)
>>> DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds).train()
```
"""

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
]
