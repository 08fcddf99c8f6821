# Copyright 2026 The hf-minitron Authors. Apache-2.0.
"""Distillation on sharded data parallelism: FSDP2 and DeepSpeed ZeRO-3, both through `accelerate`.

The fused loss reads both `lm_head` weights directly instead of calling the heads, so under sharding it must see the
full weights, once per forward:

* **FSDP2** (`fsdp_version: 2`): accelerate shards the student's decoder layers, embeddings and `[final norm,
  lm_head]` as separate units. A head read while its unit is resharded is a `DTensor`; :func:`full_weight` turns it
  into a plain tensor with one `full_tensor()` all-gather (differentiable: its backward reduce-scatters the gradient
  onto the shards), as TRL's `_chunked_divergence_loss` does. A head read while its unit is unsharded (accelerate keeps
  the tail unit unsharded after the forward) is already a plain tensor and costs nothing.
* **DeepSpeed ZeRO-3**: every parameter is partitioned (an empty tensor) outside its module's forward.
  :func:`gathered` all-gathers the heads for the duration of the loss; the fused loss computes the head's gradient
  in its forward, and autograd hands it to ZeRO-3's gradient hooks like any other gradient (TRL's
  `maybe_gather_lm_head_ctx` relies on the same property).

The teacher is sharded too, frozen and in eval mode (:func:`prepare_teacher`): under FSDP2 by accelerate's own
`fsdp2_prepare_model` (the per-layer units of the student's plugin, every unit resharded after the forward), under
ZeRO-3 by TRL's `prepare_deepspeed` (a ZeRO-3 inference engine, as TRL does for reference models). The trainer reads
an FSDP2 teacher's head inside the teacher's forward, while its unit is gathered for the final norm (one all-gather
per step, as for a plain forward), and keeps a copy for the loss.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator

from typing import Any

import torch
from torch import nn
from transformers.utils import logging


logger = logging.get_logger(__name__)


def is_fsdp(accelerator) -> bool:
    return str(accelerator.distributed_type).endswith("FSDP")


def is_deepspeed(accelerator) -> bool:
    return str(accelerator.distributed_type).endswith("DEEPSPEED")


def zero_stage(accelerator) -> int | None:
    """The ZeRO stage of a DeepSpeed run, else `None`."""
    if not is_deepspeed(accelerator):
        return None
    plugin = accelerator.state.deepspeed_plugin
    return int((plugin.deepspeed_config.get("zero_optimization") or {}).get("stage", 0) or 0)


def check_sharding_setup(accelerator, args, has_projection: bool) -> None:
    """Refuse, before any work, sharded set-ups the trainer cannot run right.

    Raises:
        ValueError: FSDP version 1; ZeRO-3 without `stage3_gather_16bit_weights_on_model_save` (then `save_model`
            would write a DeepSpeed checkpoint instead of a stock model); DeepSpeed fp16 with a hidden-state projection
            (DeepSpeed scales the loss by its own dynamic factor, which the projection's optimizer cannot see).
    """
    if is_fsdp(accelerator):
        version = getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1)
        if version != 2:
            raise ValueError(
                f"DistillationTrainer supports FSDP2 only (got fsdp_version={version}): the fused loss reads the "
                "`lm_head` weights, which FSDP1 flattens. Set `fsdp_version: 2` in the accelerate config (see "
                "recipes/accelerate/fsdp2.yaml) or `fsdp_config={'version': 2}`."
            )
    if zero_stage(accelerator) == 3:
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        gather = (ds_config.get("zero_optimization") or {}).get("stage3_gather_16bit_weights_on_model_save", False)
        if gather is not True and str(gather).lower() != "true":
            raise ValueError(
                "Under DeepSpeed ZeRO-3, `save_model` writes a stock model only with "
                "`stage3_gather_16bit_weights_on_model_save: true` (accelerate config: `zero3_save_16bit_model: "
                "true`); without it the distilled student would be saved as a DeepSpeed checkpoint. See "
                "recipes/accelerate/zero3.yaml."
            )
    if is_deepspeed(accelerator) and has_projection:
        fp16 = (accelerator.state.deepspeed_plugin.deepspeed_config.get("fp16") or {}).get("enabled", False)
        if fp16 is True or str(fp16).lower() == "true" or (str(fp16) == "auto" and args.fp16):
            raise ValueError(
                "DeepSpeed fp16 scales the loss by a dynamic factor that the hidden-state projection's optimizer "
                "cannot undo. Use bf16 (`bf16: true`), or `hidden_state_loss='none'`, or equal student/teacher widths "
                "(no projection)."
            )


def prepare_teacher(accelerator, teacher: nn.Module) -> nn.Module:
    """The frozen teacher, sharded like the student: FSDP2 units (accelerate's `fsdp2_prepare_model`), a ZeRO-3
    inference engine (TRL's `prepare_deepspeed`; ZeRO-0 under ZeRO-1/2, as TRL), or `prepare_model(evaluation_mode=
    True)` otherwise (device placement and autocast)."""
    teacher.requires_grad_(False)
    teacher.eval()
    if is_deepspeed(accelerator):
        from trl.models.utils import prepare_deepspeed

        teacher = prepare_deepspeed(teacher, accelerator)
    elif is_fsdp(accelerator):
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        state = accelerator.state
        plugin = state.fsdp_plugin
        # `fsdp2_prepare_model` resolves the auto-wrap policy on the plugin it is given; a copy keeps the student's
        # policy for the student (a teacher of another family has other layer classes).
        state.fsdp_plugin = copy.copy(plugin)
        try:
            teacher = fsdp2_prepare_model(accelerator, teacher)
        finally:
            state.fsdp_plugin = plugin
        # accelerate keeps the `[final norm, lm_head]` unit (and the root) unsharded after the forward, for the
        # backward; a frozen teacher has none, so every unit reshards and the head is not held whole between steps.
        teacher.set_reshard_after_forward(True)
    else:
        teacher = accelerator.prepare_model(teacher, evaluation_mode=True)
    teacher.eval()
    return teacher


def param_shape(p: torch.Tensor) -> torch.Size:
    """A parameter's full shape: a ZeRO-3 partitioned parameter is an empty tensor whose shape is `ds_shape`."""
    return torch.Size(p.ds_shape) if hasattr(p, "ds_shape") else p.shape


def is_sharded(p: torch.Tensor | None) -> bool:
    """A ZeRO-3 partitioned parameter or an FSDP2 `DTensor`."""
    return p is not None and (hasattr(p, "ds_id") or hasattr(p, "full_tensor"))


@contextlib.contextmanager
def gathered(*params: torch.Tensor | None) -> Iterator[None]:
    """ZeRO-3 partitioned `params` all-gathered (read-only) for the duration; a no-op for any other tensor.

    Parameters already available (e.g. a tied head whose embedding is in use) are left alone, and each parameter is
    gathered once even when passed twice (tied heads).
    """
    todo: dict[int, torch.Tensor] = {}
    for p in params:
        if p is None or not hasattr(p, "ds_id"):
            continue
        status = getattr(p, "ds_status", None)
        if status is not None and getattr(status, "name", "") == "AVAILABLE":
            continue
        todo[id(p)] = p
    if not todo:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(todo.values()), modifier_rank=None):
        yield


def full_weight(p: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """A plain tensor for a parameter: an FSDP2 `DTensor` is all-gathered once with `full_tensor()` (differentiable)
    and cast to `dtype` (the master weights are fp32 under mixed precision; the chunks run in the activations' dtype);
    anything else is returned as is."""
    if p is not None and hasattr(p, "full_tensor"):
        p = p.full_tensor()
        return p.to(dtype) if dtype is not None and p.is_floating_point() else p
    return p



# ------------------------------------------------------------------------------------ whole models around trainers
def sharded_engine(args: Any = None) -> str | None:
    """`"fsdp"` or `"deepspeed"` when training arguments (`fsdp=` / `deepspeed=`) or `accelerate launch`'s
    environment (an accelerate config with `distributed_type: FSDP` / `DEEPSPEED`) turn a sharding engine on; else
    `None`. Known before any trainer exists, so a pipeline can keep its own work on whole models."""
    if getattr(args, "deepspeed", None) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    if getattr(args, "fsdp", None) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    return None


@contextlib.contextmanager
def whole_model_loading() -> Iterator[None]:
    """`from_pretrained` inside loads whole models even when DeepSpeed ZeRO-3 training arguments exist (transformers
    then loads every model into `deepspeed.zero.Init`, partitioned on the spot). The recipe scores, prunes and
    evaluates models on every rank before a trainer partitions them."""
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:  # pragma: no cover - transformers without the integration
        yield
        return
    ref = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)  # transformers' ZeRO-3 switch
    config = ref() if ref is not None else None
    if config is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)


def gather_full_state_dict(trainer, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor] | None:
    """The trained model's full state dict on the main process (`None` on the others), gathered from FSDP2 shards or
    ZeRO-3 partitions by accelerate (`Accelerator.get_state_dict`; a collective: call it on every rank). Floating
    tensors are cast to `dtype` (FSDP2 keeps fp32 master weights of a bf16 model)."""
    accelerator = trainer.accelerator
    model = trainer.model_wrapped if is_deepspeed(accelerator) else trainer.model
    state_dict = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return None
    return {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in state_dict.items()
    }


def release_deepspeed_accelerator() -> None:
    """Let the next trainer of this process create its own DeepSpeed `Accelerator`.

    accelerate accepts a `deepspeed_plugin` only in the first `Accelerator` of a process (a second one raises
    `NotImplementedError`), and every `Trainer` creates one. The recipe runs two trainers in sequence under ZeRO-3
    (teacher correction, then distillation); once the first has finished and its engine is released, its accelerator
    state is dropped (the process group stays). A no-op unless the current state is DeepSpeed's.
    """
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    if AcceleratorState._shared_state.get("distributed_type") == DistributedType.DEEPSPEED:
        AcceleratorState._reset_state(reset_partial_state=False)
