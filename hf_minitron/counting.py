"""Exact parameter counts of pruned shapes, total and active (used per token), with no weights in memory.

Every count builds the pruned shape on the meta device with stock ``AutoModelForCausalLM.from_config``, so biases,
norms, tied embeddings, routers, shared experts and Mamba tensors are right for every registered family. Depth is
applied with the same :func:`~hf_minitron.architectures.depth.keep_layers` as pruning: in hybrid and mixed MoE/dense
models *which* layers are kept decides the count (a Mamba layer and an MoE layer differ), so pass ``kept_layers`` (or
``importance`` to rank them as pruning would) when the layers differ and the depth changes.

Example:
    >>> from hf_minitron import MinitronPruneConfig
    >>> from hf_minitron.counting import active_params, count_params
    >>> target = MinitronPruneConfig(num_experts=4, moe_intermediate_size=512)
    >>> count_params(mixtral_config, target), active_params(mixtral_config, target)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .architectures import ArchitectureLayout, get_layout
from .architectures.depth import keep_layers
from .config import TARGET_FIELDS, MinitronPruneConfig
from .importance import ImportanceScores
from .pruning.plan import resolve_target_sizes, select_layers


def _meta_model(config) -> nn.Module:
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # a meta model needs none, and a dequantized GGUF's must not be applied
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _resolve(config, layout: ArchitectureLayout, parts, sizes: Mapping[str, int] | MinitronPruneConfig) -> dict[str, int]:
    source = layout.read_sizes(config)
    if isinstance(sizes, MinitronPruneConfig):
        return resolve_target_sizes(source, sizes, layout, parts)
    unknown = sorted(set(sizes) - set(source) - set(TARGET_FIELDS))
    if unknown:
        raise ValueError(f"Unknown size(s) {unknown} for this {config.model_type} model; its sizes are {sorted(source)}.")
    targets = MinitronPruneConfig(**{k: v for k, v in sizes.items() if k in TARGET_FIELDS})
    return resolve_target_sizes(source, targets, layout, parts)


def pruned_model_skeleton(
    model_or_config,
    sizes: Mapping[str, int] | MinitronPruneConfig,
    kept_layers: Sequence[int] | None = None,
    importance: ImportanceScores | None = None,
) -> nn.Module:
    """A meta-device model with exactly the shapes pruning to ``sizes`` gives (no weights).

    Args:
        model_or_config: The source model or its config.
        sizes: Target sizes (keys of :meth:`ArchitectureLayout.read_sizes`) or a :class:`MinitronPruneConfig`.
        kept_layers: Source indices of the layers kept, when the depth changes. Default: the layers ``importance``
            ranks highest (as pruning would), else the first ones, which is exact only when every layer is alike.
        importance: Scores to rank layers by (``MinitronPruneConfig.depth_criterion`` when ``sizes`` is a config).

    Raises:
        ValueError: an invalid target, or a depth change in a model whose layers differ without ``kept_layers`` or
            ``importance``.
    """
    config = getattr(model_or_config, "config", model_or_config)
    layout = get_layout(config.model_type)
    source_model = _meta_model(config)
    layers = layout.decoder_layers(source_model)
    parts = [layout.layer_parts(layer) for layer in layers]
    target = _resolve(source_model.config, layout, parts, sizes)
    num_layers = len(layers)
    if kept_layers is None:
        prune_config = sizes if isinstance(sizes, MinitronPruneConfig) else MinitronPruneConfig()
        if prune_config.layers_to_drop or target["num_hidden_layers"] == num_layers or importance is not None:
            kept_layers = select_layers(num_layers, prune_config, target["num_hidden_layers"], importance)
        elif len(set(parts)) > 1:
            raise ValueError(
                f"This {config.model_type} model's layers hold different blocks ({[sorted(p) for p in parts]}), so the "
                "count depends on which layers are kept: pass `kept_layers=` or `importance=`."
            )
        else:
            kept_layers = list(range(target["num_hidden_layers"]))
    kept_layers = sorted(kept_layers)
    if len(kept_layers) != target["num_hidden_layers"]:
        raise ValueError(f"kept_layers has {len(kept_layers)} layers, the target {target['num_hidden_layers']}.")
    if kept_layers != list(range(num_layers)):
        keep_layers(source_model, layout, kept_layers)  # per-layer config lists follow, exactly as in pruning
    pruned_config = source_model.config
    layout.write_sizes(pruned_config, target)
    return _meta_model(pruned_config)


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() yields tied tensors once


def inactive_layer_params(layer: nn.Module, layout: ArchitectureLayout, top_k: int) -> int:
    """Parameters of one decoder layer's routed experts a token does not use: ``(E - k) / E`` of them (0 without MoE)."""
    if layout.moe is None or "moe" not in layout.layer_parts(layer):
        return 0
    experts = layer.get_submodule(layout.moe.experts)
    num = getattr(experts, layout.moe.expert_down_proj).shape[0]
    return _numel(experts) * (num - min(top_k, num)) // num


def _inactive_expert_params(model: nn.Module, layout: ArchitectureLayout) -> int:
    """Parameters of the routed experts a token does not use: ``(E - k) / E`` of every MoE layer's experts."""
    if layout.moe is None:
        return 0
    top_k = getattr(model.config, layout.moe.top_k_field)
    return sum(inactive_layer_params(layer, layout, top_k) for layer in layout.decoder_layers(model))


def count_params(
    model_or_config,
    sizes: Mapping[str, int] | MinitronPruneConfig | None = None,
    kept_layers: Sequence[int] | None = None,
    importance: ImportanceScores | None = None,
) -> int:
    """Total parameters of ``model_or_config`` pruned to ``sizes`` (as it is when ``sizes`` is ``None``).

    Compatible with :func:`~hf_minitron.predict_num_params` (same sizes, same meta-device count) and exact for MoE and
    hybrid families given the kept layers (see :func:`pruned_model_skeleton`).
    """
    if sizes is None:
        model = model_or_config if isinstance(model_or_config, nn.Module) else _meta_model(model_or_config)
        return _numel(model)
    return _numel(pruned_model_skeleton(model_or_config, sizes, kept_layers, importance))


def active_params(
    model_or_config,
    sizes: Mapping[str, int] | MinitronPruneConfig | None = None,
    kept_layers: Sequence[int] | None = None,
    importance: ImportanceScores | None = None,
) -> int:
    """Parameters used per token: the total minus the routed experts a token is not sent to.

    Each MoE layer runs ``num_experts_per_tok`` of its ``num_experts`` experts per token, so ``(E - k) / E`` of its
    expert parameters are inactive; everything else (embeddings, attention, Mamba, dense MLPs, routers, shared
    experts, norms, ``lm_head``) counts, the convention behind "Mixtral-8x7B: 12.9B active of 46.7B" and
    "Qwen3-30B-A3B". Equals :func:`count_params` for dense models.

    Example:
        >>> active_params(model) <= count_params(model)  # doctest: +SKIP
        True
    """
    config = getattr(model_or_config, "config", model_or_config)
    layout = get_layout(config.model_type)
    if sizes is None:
        model = model_or_config if isinstance(model_or_config, nn.Module) else _meta_model(model_or_config)
    else:
        model = pruned_model_skeleton(model_or_config, sizes, kept_layers, importance)
    return _numel(model) - _inactive_expert_params(model, layout)
