# Copyright 2026 The hf-minitron Authors. Apache-2.0.
"""`DistillationConfig`: the [`trl.SFTConfig`] of [`DistillationTrainer`]."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from trl import SFTConfig

from .losses import HIDDEN_STATE_LOSSES, KD_LOSSES


def apply_cpu_defaults(config: SFTConfig) -> None:
    """Unset `bf16` / activation checkpointing become off on a machine without a CUDA GPU (explicit values stay).

    `SFTConfig` turns both on by default; on a CPU-only machine the first fails validation without `use_cpu` and
    both make steps ~6x slower.
    """
    import torch

    if torch.cuda.is_available():
        return
    if config.bf16 is None:
        config.bf16 = False
    if config.activation_checkpointing is None:
        config.activation_checkpointing = False
        config.gradient_checkpointing = False


def check_cache_options(config: DistillationConfig) -> None:
    """Refuse, with what to change, the options a teacher-logit cache cannot serve."""
    path = config.teacher_logits_cache
    if config.hidden_state_loss != "none":
        raise ValueError(
            f"`hidden_state_loss={config.hidden_state_loss!r}` compares intermediate hidden states, which a teacher-logit "
            f"cache ({path}) does not store: distil from the live teacher for hidden-state losses, or set "
            "`hidden_state_loss='none'`."
        )
    if config.kd_loss != "forward_kl":
        raise ValueError(
            f"`kd_loss={config.kd_loss!r}` needs the teacher's full distribution; a teacher-logit cache stores its top-k "
            "tokens and tail mass, on which hf-minitron computes the exact forward KL. Use `kd_loss='forward_kl'` (the "
            "Minitron loss) or the live teacher."
        )
    if config.temperature != 1.0:
        raise ValueError(
            f"`temperature={config.temperature}` with a teacher-logit cache: the cache holds the teacher's τ = 1 top-k "
            "log-probabilities and tail mass. Softening to τ ≠ 1 rescales every tail token's probability by its own "
            "q^(1/τ), which depends on how the tail mass is spread over the V - k tokens the cache does not keep, so "
            "the τ-softened distribution cannot be recovered from it. Use `temperature=1.0` (Minitron's setting) or "
            "the live teacher."
        )


@dataclass
class DistillationConfig(SFTConfig):
    r"""
    Configuration of [`DistillationTrainer`]: off-policy (dataset) knowledge distillation à la Minitron.

    All [`~trl.SFTConfig`] arguments are accepted (dataset preparation, `completion_only_loss`,
    `assistant_only_loss`, packing, `max_length`, ...). The label mask built by SFT (padding, `-100` labels,
    completion-only and assistant-only masks) selects the tokens that the distillation losses are averaged over.

    On a machine without a CUDA GPU, `bf16` and activation checkpointing default to off (TRL's `SFTConfig` turns
    them on); values you set explicitly are kept.

    Parameters:
        teacher_model_init_kwargs (`dict[str, Any]` or `str`, *optional*):
            Keyword arguments of `AutoModelForCausalLM.from_pretrained` when `teacher_model` is a path (e.g.
            `{"dtype": "bfloat16"}`); a JSON string is accepted. Must be `None` when the teacher is a model.
        temperature (`float`, *optional*, defaults to `1.0`):
            Softmax temperature τ of both models; the divergence is multiplied by τ² (Hinton et al., 2015).
        kd_loss (`str`, *optional*, defaults to `"forward_kl"`):
            `"forward_kl"` = KL(teacher ‖ student) (Minitron), `"reverse_kl"` = KL(student ‖ teacher), or `"jsd"`
            = generalized Jensen-Shannon divergence with `jsd_beta` (as TRL's GKD).
        jsd_beta (`float`, *optional*, defaults to `0.5`):
            Interpolation coefficient β ∈ (0, 1) of the JSD, `m = β q_teacher + (1 - β) p_student`.
        kd_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the logit distillation term.
        ce_weight (`float`, *optional*, defaults to `0.0`):
            Weight of the student's next-token cross-entropy on the labels (Minitron uses none). Always logged: with
            `ce_weight=0` it is read off the student's log-softmax (τ = 1) or one logsumexp pass, without a gradient.
        hidden_state_loss (`str`, *optional*, defaults to `"none"`):
            `"none"`, `"cosine"` (1 - cos) or `"mse"` between post-norm hidden states of mapped layers.
        hidden_state_layer_map (`str` or `list[int]`, *optional*, defaults to `"auto"`):
            `"auto"`: student layer `i` is compared with the teacher layer it was pruned from
            (`minitron_provenance["kept"]["layers"][i]`), or, without provenance, with teacher layer
            `round((i + 1) · L_t / L_s) - 1` (so the last layers always match). Otherwise a list with one teacher
            layer index per student layer (`None`/`-1` to skip a layer), or a list of `[student, teacher]` pairs; a
            JSON or comma-separated string is accepted.
        hidden_state_weight (`float` or `str`, *optional*, defaults to `"dynamic"`):
            Weight of the hidden-state term; `"dynamic"` uses α = L_logits / L_hidden (both detached) of a whole
            optimizer step (all accumulation micro-batches and ranks): the previous step's, or on the first step its
            own (one extra no-grad forward). Invariant to how the step's batch is split.
        kd_chunk_size (`int`, *optional*, defaults to `1024`):
            Tokens per chunk of the fused `lm_head` + divergence; bounds the logits memory to `2 · chunk · V` floats.
        projection_learning_rate (`float`, *optional*):
            Learning rate of the hidden-state projection; defaults to `learning_rate`.
        teacher_logits_cache (`str`, *optional*):
            Folder of a teacher-logit cache ([`cache_teacher_logits`]): train from the stored teacher top-k
            log-probabilities + tail mass instead of a live teacher (`teacher_model=None`). The loss is the exact
            forward KL over the top-k tokens plus one tail bucket (equal to the full forward KL when the cache has
            k = V in float32). Needs `kd_loss="forward_kl"`, `temperature=1.0` and `hidden_state_loss="none"`.
    """

    teacher_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Kwargs of `AutoModelForCausalLM.from_pretrained` for a teacher given as a path."},
    )
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature; the KD loss is scaled by τ²."})
    kd_loss: str = field(
        default="forward_kl", metadata={"help": "Divergence.", "choices": list(KD_LOSSES)}
    )
    jsd_beta: float = field(default=0.5, metadata={"help": "β of the generalized JSD, in (0, 1)."})
    kd_weight: float = field(default=1.0, metadata={"help": "Weight of the logit distillation loss."})
    ce_weight: float = field(default=0.0, metadata={"help": "Weight of the cross-entropy loss on the labels."})
    hidden_state_loss: str = field(
        default="none",
        metadata={"help": "Intermediate-state loss.", "choices": list(HIDDEN_STATE_LOSSES)},
    )
    hidden_state_layer_map: list[Any] | str = field(
        default="auto", metadata={"help": "'auto', or one teacher layer index per student layer."}
    )
    # Typed `str` so command-line parsing (TrlParser) accepts both "dynamic" and numbers; floats are converted below.
    hidden_state_weight: str = field(
        default="dynamic", metadata={"help": "'dynamic' (α = L_logits / L_hidden) or a float."}
    )
    kd_chunk_size: int = field(default=1024, metadata={"help": "Tokens per chunk of the fused logit loss."})
    projection_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the hidden-state projection (default: learning_rate)."}
    )
    teacher_logits_cache: str | None = field(
        default=None, metadata={"help": "Teacher-logit cache folder (`hf-minitron cache-teacher`): distil without the teacher."}
    )

    def __post_init__(self):
        apply_cpu_defaults(self)
        super().__post_init__()
        if isinstance(self.teacher_model_init_kwargs, str):
            self.teacher_model_init_kwargs = json.loads(self.teacher_model_init_kwargs)
        if self.kd_loss not in KD_LOSSES:
            raise ValueError(f"Unknown `kd_loss={self.kd_loss!r}`; expected one of {KD_LOSSES}.")
        if self.kd_loss == "jsd" and not 0.0 < self.jsd_beta < 1.0:
            raise ValueError(f"`jsd_beta` must be in (0, 1), got {self.jsd_beta}.")
        if self.temperature <= 0:
            raise ValueError(f"`temperature` must be > 0, got {self.temperature}.")
        if self.kd_chunk_size < 1:
            raise ValueError(f"`kd_chunk_size` must be >= 1, got {self.kd_chunk_size}.")
        if self.hidden_state_loss not in HIDDEN_STATE_LOSSES:
            raise ValueError(
                f"Unknown `hidden_state_loss={self.hidden_state_loss!r}`; expected one of {HIDDEN_STATE_LOSSES}."
            )
        if isinstance(self.hidden_state_weight, str) and self.hidden_state_weight != "dynamic":
            try:
                self.hidden_state_weight = float(self.hidden_state_weight)
            except ValueError:
                raise ValueError(
                    f"`hidden_state_weight` must be 'dynamic' or a float, got {self.hidden_state_weight!r}."
                ) from None
        if self.hidden_state_layer_map is None:  # what command-line parsing (TrlParser) leaves for the default
            self.hidden_state_layer_map = "auto"
        if isinstance(self.hidden_state_layer_map, str) and self.hidden_state_layer_map != "auto":
            text = self.hidden_state_layer_map.strip()
            try:
                self.hidden_state_layer_map = (
                    json.loads(text) if text.startswith("[") else [int(x) for x in text.split(",")]
                )
            except ValueError:
                raise ValueError(
                    "`hidden_state_layer_map` must be 'auto', a list of teacher layer indices or of "
                    f"[student, teacher] pairs, got {self.hidden_state_layer_map!r}."
                ) from None
        if self.teacher_logits_cache is not None:
            check_cache_options(self)
        if self.kd_weight == 0 and self.ce_weight == 0 and self.hidden_state_loss == "none":
            raise ValueError("All loss weights are zero: set `kd_weight`, `ce_weight` or `hidden_state_loss`.")
        if self.kd_weight == 0 and self.ce_weight == 0 and self.hidden_state_weight == "dynamic":
            raise ValueError(
                "`hidden_state_weight='dynamic'` scales the hidden-state loss by the logit loss, which is zero with "
                "`kd_weight=0` and `ce_weight=0`; set a float `hidden_state_weight`."
            )
