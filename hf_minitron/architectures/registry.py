"""The registry of supported model families, keyed by ``config.model_type``.

Adding a family is one :class:`ArchitectureLayout` entry here plus its row in the family test table
(``tests/test_architectures.py``). Each entry was read off the family's ``modeling_*.py`` in transformers 5.
"""

from __future__ import annotations

from torch import nn

from .blocks import MambaLayout, MoELayout
from .layout import ArchitectureLayout
from .logits import LogitTransform


# Llama-shaped: pre-norm RMSNorm (`input_layernorm` before attention, `post_attention_layernorm` before the MLP),
# separate q/k/v, gated MLP. Mistral only adds a sliding window (a config scalar, or `layer_types`); Qwen2 adds q/k/v
# biases, which follow their projections' output rows without any layout data, and `max_window_layers`.
LLAMA_LAYOUT = ArchitectureLayout(model_types=("llama",))
MISTRAL_LAYOUT = ArchitectureLayout(model_types=("mistral",))
QWEN2_LAYOUT = ArchitectureLayout(model_types=("qwen2",), layer_prefix_config_fields=("max_window_layers",))
# Granite: Llama plus scalar multipliers (embedding, residual, attention scaling, logits) that do not depend
# on any pruned size; the attention scaling replaces 1/sqrt(head_dim), and head_dim never changes.
# `.logits` are the head output divided by `logits_scaling`.
GRANITE_LAYOUT = ArchitectureLayout(model_types=("granite",), logit_transforms=(LogitTransform("divide", "logits_scaling"),))
# Qwen3: per-head q/k RMSNorm ([head_dim], shared by all heads).
QWEN3_LAYOUT = ArchitectureLayout(
    model_types=("qwen3",), q_norm="self_attn.q_norm", k_norm="self_attn.k_norm",
    layer_prefix_config_fields=("max_window_layers",),
)
# Gemma: (1 + w) RMSNorm and embeddings multiplied by sqrt(hidden_size).
GEMMA_LAYOUT = ArchitectureLayout(model_types=("gemma",), norm_kind="rms_one_plus", embed_scale="sqrt_hidden")
# Gemma2: Gemma plus "sandwich" norms: `post_attention_layernorm` normalises the attention *output* before the
# residual add, `pre_feedforward_layernorm` is the pre-MLP norm and `post_feedforward_layernorm` normalises the MLP
# output. Attention and final-logit softcapping are config scalars (preserved as they are); `.logits` are the
# soft-capped head outputs.
_SANDWICH_NORMS = dict(
    attention_norm="input_layernorm",
    attention_output_norm="post_attention_layernorm",
    mlp_norm="pre_feedforward_layernorm",
    mlp_output_norm="post_feedforward_layernorm",
)
_SOFTCAP = (LogitTransform("softcap", "final_logit_softcapping"),)
GEMMA2_LAYOUT = ArchitectureLayout(
    model_types=("gemma2",), norm_kind="rms_one_plus", embed_scale="sqrt_hidden", logit_transforms=_SOFTCAP,
    **_SANDWICH_NORMS,
)
# Gemma3 (text-only Gemma3ForCausalLM, model_type "gemma3_text"): Gemma2 plus per-head q/k norms.
GEMMA3_LAYOUT = ArchitectureLayout(
    model_types=("gemma3_text",),
    norm_kind="rms_one_plus",
    embed_scale="sqrt_hidden",
    q_norm="self_attn.q_norm",
    k_norm="self_attn.k_norm",
    logit_transforms=_SOFTCAP,
    **_SANDWICH_NORMS,
)
# Phi-3: fused qkv_proj ([q; k; v] rows) and fused gate_up_proj ([gate; up] rows).
PHI3_LAYOUT = ArchitectureLayout(
    model_types=("phi3",),
    q_proj=None,
    k_proj=None,
    v_proj=None,
    qkv_proj="self_attn.qkv_proj",
    gate_proj=None,
    up_proj=None,
    gate_up_proj="mlp.gate_up_proj",
)
# OLMo2: no pre-norms (attention and MLP read the raw residual stream); post-norms on the attention and MLP outputs
# (before the residual add), and q/k RMSNorm over the whole projection (num_heads * head_dim), not per head.
OLMO2_LAYOUT = ArchitectureLayout(
    model_types=("olmo2",),
    attention_norm=None,
    mlp_norm=None,
    attention_output_norm="post_attention_layernorm",
    mlp_output_norm="post_feedforward_layernorm",
    q_norm="self_attn.q_norm",
    k_norm="self_attn.k_norm",
    qk_norm_scope="projection",
)
# Nemotron: LayerNorm1P (x_hat * (1 + w) + b) and a non-gated relu^2 MLP (up_proj -> act -> down_proj).
NEMOTRON_LAYOUT = ArchitectureLayout(model_types=("nemotron",), norm_kind="layernorm_one_plus", gate_proj=None)


# ------------------------------------------------------------------------------------------ mixture of experts
def _experts_attributes(path: str) -> dict[str, dict[str, str]]:
    """Size attributes of the fused experts module at ``path``."""
    return {path: {"num_experts": "experts", "intermediate_dim": "moe_intermediate", "hidden_dim": "hidden"}}


_ROUTER_ATTRIBUTES = {"num_experts": "experts", "hidden_dim": "hidden"}
# Qwen-MoE: every `decoder_sparse_step`-th layer not listed in `mlp_only_layers` holds a sparse block at `mlp` (router
# `mlp.gate`, softmax top-k); the others a dense MLP of `intermediate_size`.
_QWEN_MOE = dict(
    router="mlp.gate", experts="mlp.experts", dense_layers_field="mlp_only_layers", sparse_step_field="decoder_sparse_step",
)
QWEN3_MOE_LAYOUT = ArchitectureLayout(
    model_types=("qwen3_moe",), q_norm="self_attn.q_norm", k_norm="self_attn.k_norm",
    moe=MoELayout(**_QWEN_MOE, attributes={**_experts_attributes("mlp.experts"), "mlp.gate": _ROUTER_ATTRIBUTES}),
)
# Qwen2-MoE adds a shared expert (an MLP every token goes through) scaled by sigmoid(shared_expert_gate(x)).
QWEN2_MOE_LAYOUT = ArchitectureLayout(
    model_types=("qwen2_moe",), layer_prefix_config_fields=("max_window_layers",),
    moe=MoELayout(
        **_QWEN_MOE,
        shared_gate_proj="mlp.shared_expert.gate_proj", shared_up_proj="mlp.shared_expert.up_proj",
        shared_down_proj="mlp.shared_expert.down_proj", shared_expert_gate="mlp.shared_expert_gate",
        shared_intermediate_size_field="shared_expert_intermediate_size",
        attributes={
            **_experts_attributes("mlp.experts"), "mlp.gate": _ROUTER_ATTRIBUTES,
            "mlp.shared_expert": {"hidden_size": "hidden", "intermediate_size": "shared_intermediate"},
        },
    ),
)
# Mixtral and OLMoE: every layer's MLP is a sparse block; the config's `intermediate_size` is the expert width (there is
# no dense MLP). OLMoE's q/k norms span the whole projection, as in OLMo2.
_NO_DENSE_MLP = dict(gate_proj=None, up_proj=None, down_proj=None, intermediate_size_field=None)
MIXTRAL_LAYOUT = ArchitectureLayout(
    model_types=("mixtral",), **_NO_DENSE_MLP,
    moe=MoELayout(
        router="mlp.gate", experts="mlp.experts", num_experts_field="num_local_experts",
        intermediate_size_field="intermediate_size",
        attributes={**_experts_attributes("mlp.experts"), "mlp.gate": _ROUTER_ATTRIBUTES},
    ),
)
OLMOE_LAYOUT = ArchitectureLayout(
    model_types=("olmoe",), **_NO_DENSE_MLP,
    q_norm="self_attn.q_norm", k_norm="self_attn.k_norm", qk_norm_scope="projection",
    moe=MoELayout(
        router="mlp.gate", experts="mlp.experts", intermediate_size_field="intermediate_size",
        attributes={**_experts_attributes("mlp.experts"), "mlp.gate": _ROUTER_ATTRIBUTES},
    ),
)

# ------------------------------------------------------------------------------------------ hybrid Mamba
# Nemotron-H: every block is `norm` -> one `mixer` (Mamba2, attention, relu^2 MLP or MoE, per `layers_block_type`) -> add.
# The MoE has non-gated experts, a shared expert, and sigmoid routing with a score-correction bias [E] and optional
# group-limited routing (`n_group`, top-2 scores per group).
NEMOTRON_H_LAYOUT = ArchitectureLayout(
    model_types=("nemotron_h",),
    embed_tokens="model.embeddings", final_norm="model.norm_f",
    attention="mixer", q_proj="mixer.q_proj", k_proj="mixer.k_proj", v_proj="mixer.v_proj", o_proj="mixer.o_proj",
    mlp="mixer", gate_proj=None, up_proj="mixer.up_proj", down_proj="mixer.down_proj",
    attention_norm="norm", mlp_norm="norm",
    per_layer_config_fields=("layers_block_type",),
    moe=MoELayout(
        router="mixer.gate", experts="mixer.experts", expert_gate_up_proj=None, expert_up_proj="up_proj",
        router_expert_tensors=("e_score_correction_bias",), router_probability="sigmoid",
        shared_up_proj="mixer.shared_experts.up_proj", shared_down_proj="mixer.shared_experts.down_proj",
        num_experts_field="n_routed_experts", shared_intermediate_size_field="moe_shared_expert_intermediate_size",
        expert_groups_field="n_group", min_experts_per_group=2, latent_size_field="moe_latent_size",
        attributes={
            **_experts_attributes("mixer.experts"), "mixer.gate": _ROUTER_ATTRIBUTES,
            "mixer.shared_experts": {"hidden_size": "hidden", "intermediate_size": "shared_intermediate"},
        },
    ),
    mamba=MambaLayout(mixer="mixer", in_proj="mixer.in_proj", conv1d="mixer.conv1d", out_proj="mixer.out_proj",
                      norm="mixer.norm"),
)
# GraniteMoeHybrid (Granite-4.0-H): `input_layernorm` -> Mamba2 or attention (`layer_types`) -> `post_attention_layernorm`
# -> sparse MoE + an always-on shared MLP (fused [gate; up] `input_linear`), residuals scaled by a config scalar. The
# Mamba width is tied to the integer `mamba_expand` x hidden_size. Logits are divided by `logits_scaling` (as Granite).
GRANITEMOEHYBRID_LAYOUT = ArchitectureLayout(
    model_types=("granitemoehybrid",), **_NO_DENSE_MLP,
    logit_transforms=(LogitTransform("divide", "logits_scaling"),),
    moe=MoELayout(
        router="block_sparse_moe.router", experts="block_sparse_moe.experts",
        shared_gate_up_proj="shared_mlp.input_linear", shared_down_proj="shared_mlp.output_linear",
        num_experts_field="num_local_experts", intermediate_size_field="intermediate_size",
        shared_intermediate_size_field="shared_intermediate_size",
        attributes={
            **_experts_attributes("block_sparse_moe.experts"),
            "block_sparse_moe": {"input_size": "hidden"},
            "block_sparse_moe.router": {"num_experts": "experts"},
            "shared_mlp": {"input_size": "hidden", "hidden_size": "shared_intermediate"},
        },
    ),
    mamba=MambaLayout(
        num_heads_field="mamba_n_heads", head_dim_field="mamba_d_head", n_groups_field="mamba_n_groups",
        state_size_field="mamba_d_state", expand_field="mamba_expand",
    ),
)

# Falcon-H1: every layer runs Mamba2 and attention in parallel from `input_layernorm` (outputs summed, each times a
# config multiplier), then `pre_ff_layernorm` -> gated MLP. The Mamba width is `mamba_d_ssm` (or `mamba_expand` x
# hidden_size when None); in_proj rows carry the per-section muP multipliers of the `mup_vector` buffer; the gated norm
# (optional, `mamba_rms_norm`) may apply the gate after normalising (`norm_before_gate`). Logits are `lm_head` output x
# `lm_head_multiplier`.
FALCON_H1_LAYOUT = ArchitectureLayout(
    model_types=("falcon_h1",),
    final_norm="model.final_layernorm",
    mlp="feed_forward", gate_proj="feed_forward.gate_proj", up_proj="feed_forward.up_proj",
    down_proj="feed_forward.down_proj", mlp_norm="pre_ff_layernorm",
    per_layer_config_fields=(),  # `layer_types` is derived from num_hidden_layers (all "hybrid")
    layer_output_tuple=True,
    logit_transforms=(LogitTransform("scale", "lm_head_multiplier"),),
    mamba=MambaLayout(
        num_heads_field="mamba_n_heads", head_dim_field="mamba_d_head", n_groups_field="mamba_n_groups",
        state_size_field="mamba_d_state", width_field="mamba_d_ssm", expand_field="mamba_expand",
        in_proj_buffers=("mup_vector",), norm_before_gate_attribute="norm_before_gate",
    ),
)

BUILTIN_LAYOUTS: tuple[ArchitectureLayout, ...] = (
    LLAMA_LAYOUT,
    MISTRAL_LAYOUT,
    QWEN2_LAYOUT,
    QWEN3_LAYOUT,
    GEMMA_LAYOUT,
    GEMMA2_LAYOUT,
    GEMMA3_LAYOUT,
    PHI3_LAYOUT,
    OLMO2_LAYOUT,
    GRANITE_LAYOUT,
    NEMOTRON_LAYOUT,
    QWEN3_MOE_LAYOUT,
    QWEN2_MOE_LAYOUT,
    MIXTRAL_LAYOUT,
    OLMOE_LAYOUT,
    NEMOTRON_H_LAYOUT,
    GRANITEMOEHYBRID_LAYOUT,
    FALCON_H1_LAYOUT,
)

_REGISTRY: dict[str, ArchitectureLayout] = {}


def register_layout(layout: ArchitectureLayout, overwrite: bool = False) -> None:
    """Register ``layout`` for each of its ``model_types``.

    Example:
        >>> from hf_minitron.architectures import ArchitectureLayout, register_layout
        >>> register_layout(ArchitectureLayout(model_types=("my_llama",)))
    """
    for model_type in layout.model_types:
        if model_type in _REGISTRY and not overwrite:
            raise ValueError(f"A layout for model_type {model_type!r} is already registered; pass overwrite=True.")
        _REGISTRY[model_type] = layout


def supported_model_types() -> list[str]:
    """The ``config.model_type`` values hf-minitron can prune."""
    return sorted(_REGISTRY)


def _model_type(model_or_type: nn.Module | str) -> str | None:
    if isinstance(model_or_type, str):
        return model_or_type
    return getattr(getattr(model_or_type, "config", None), "model_type", None)


def _unsupported(model_type: str | None, reason: str = "") -> ValueError:
    return ValueError(
        f"Unsupported architecture {model_type!r}{reason}. hf-minitron supports model_type in "
        f"{supported_model_types()}; register a layout for others with "
        "`hf_minitron.architectures.register_layout(ArchitectureLayout(model_types=(...), ...))`."
    )


def get_layout(model_or_type: nn.Module | str, allow_generic: bool = True) -> ArchitectureLayout:
    """Return the layout for a model (or a ``model_type`` string).

    A model whose ``model_type`` is not registered but is Llama-like (``model.layers[i].self_attn.{q,k,v,o}_proj``
    or ``qkv_proj``, ``mlp.{gate,up,down}_proj`` or ``gate_up_proj``, hidden-sized norms) gets a layout inferred
    from its module names and norm behaviour (see :func:`~hf_minitron.architectures.generic.infer_layout`).

    Raises:
        ValueError: the family is not registered and (for a model) its structure does not match a Llama-like
            decoder; the message lists the supported families.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> layout = get_layout(LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=2, num_attention_heads=4, vocab_size=100)))
    """
    model_type = _model_type(model_or_type)
    if model_type in _REGISTRY:
        return _REGISTRY[model_type]
    if isinstance(model_or_type, str) or not allow_generic:
        raise _unsupported(model_type)
    from .generic import infer_layout

    try:
        return infer_layout(model_or_type)
    except ValueError as err:
        raise _unsupported(model_type, f" (not a registered family, and the generic Llama-like fallback failed: {err})") from None


for _layout in BUILTIN_LAYOUTS:
    register_layout(_layout)
