"""`prune_model()`: width and depth pruning of a Hugging Face causal LM into a smaller stock model."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from .. import __version__
from ..architectures import ArchitectureLayout
from ..config import MinitronPruneConfig
from ..importance import ImportanceScores, estimate_importance
from ..validation import check_prunable_model
from .plan import PrunePlan, make_plan, resolve_target_sizes
from .slicing import expand_heads, slice_embedding, slice_linear, slice_norm


logger = logging.get_logger(__name__)

PROVENANCE_NAME = "minitron_config.json"


def _needs_scores(config: MinitronPruneConfig, source: dict[str, int]) -> bool:
    width = any(
        getattr(config, k) is not None and getattr(config, k) != source[k]
        for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
    )
    depth = (
        not config.layers_to_drop
        and config.num_hidden_layers is not None
        and config.num_hidden_layers != source["num_hidden_layers"]
    )
    return width or depth


@torch.no_grad()
def _drop_layers(model: nn.Module, layout: ArchitectureLayout, keep: list[int]) -> None:
    parent_path, _, attr = layout.layers.rpartition(".")
    parent = model.get_submodule(parent_path)
    layers = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList([layers[i] for i in keep]))
    # The KV cache is indexed by `layer_idx`: re-number so generation with a cache works.
    for new_idx, layer in enumerate(getattr(parent, attr)):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    config = model.config
    for name in layout.per_layer_config_fields:
        values = getattr(config, name, None)
        if isinstance(values, (list, tuple)) and len(values) == len(layers):
            setattr(config, name, [values[i] for i in keep])


@torch.no_grad()
def _prune_layer_width(layer: nn.Module, layout: ArchitectureLayout, plan: PrunePlan, i: int) -> None:
    """Slice one decoder layer's attention, MLP and norms to the plan's ``i``-th kept layer."""
    source, target = plan.source_sizes, plan.target_sizes
    head_dim = source["head_dim"]
    hidden = plan.hidden if target["hidden_size"] != source["hidden_size"] else None
    heads = expand_heads(plan.heads[i], head_dim) if plan.heads[i] != list(range(source["num_attention_heads"])) else None
    kv = expand_heads(plan.kv_heads[i], head_dim) if plan.kv_heads[i] != list(range(source["num_key_value_heads"])) else None
    neurons = plan.neurons[i] if target["intermediate_size"] != source["intermediate_size"] else None

    slice_linear(layer.get_submodule(layout.q_proj), out_idx=heads, in_idx=hidden)
    slice_linear(layer.get_submodule(layout.k_proj), out_idx=kv, in_idx=hidden)
    slice_linear(layer.get_submodule(layout.v_proj), out_idx=kv, in_idx=hidden)
    slice_linear(layer.get_submodule(layout.o_proj), out_idx=hidden, in_idx=heads)
    for path in (layout.gate_proj, layout.up_proj):
        if path is not None:
            slice_linear(layer.get_submodule(path), out_idx=neurons, in_idx=hidden)
    slice_linear(layer.get_submodule(layout.down_proj), out_idx=hidden, in_idx=neurons)
    if hidden is not None:
        for name in layout.layer_norms:
            slice_norm(layer.get_submodule(name), hidden)

    sizes = {
        "hidden": target["hidden_size"],
        "intermediate": target["intermediate_size"],
        "heads": target["num_attention_heads"],
        "kv_heads": target["num_key_value_heads"],
        "kv_groups": target["num_attention_heads"] // target["num_key_value_heads"],
    }
    for path, attributes in ((layout.attention, layout.attention_attributes), (layout.mlp, layout.mlp_attributes)):
        module = layer.get_submodule(path)
        for attr, size in attributes.items():
            if hasattr(module, attr):
                setattr(module, attr, sizes[size])


@torch.no_grad()
def apply_plan(model: nn.Module, plan: PrunePlan, layout: ArchitectureLayout, rescale_norms: bool = True) -> None:
    """Slice ``model`` in place to ``plan`` and rewrite its config (sizes, explicit ``head_dim``)."""
    source, target = plan.source_sizes, plan.target_sizes
    if plan.layers != list(range(source["num_hidden_layers"])):
        _drop_layers(model, layout, plan.layers)
    for i, layer in enumerate(layout.decoder_layers(model)):
        _prune_layer_width(layer, layout, plan, i)

    if target["hidden_size"] != source["hidden_size"]:
        embed = model.get_submodule(layout.embed_tokens)
        lm_head = model.get_submodule(layout.lm_head)
        tied = lm_head.weight is embed.weight
        slice_embedding(embed, plan.hidden)
        if tied:
            lm_head.weight = embed.weight
        else:
            slice_linear(lm_head, in_idx=plan.hidden)
        lm_head.in_features = target["hidden_size"]
        slice_norm(model.get_submodule(layout.final_norm), plan.hidden)
        if rescale_norms:
            # RMS over H_new kept channels vs H_old: if the dropped channels carry ~no energy, the kept
            # ones' RMS is sqrt(H_old / H_new) larger, shrinking every normalised output; undo that.
            factor = math.sqrt(source["hidden_size"] / target["hidden_size"])
            for _, norm in layout.norm_modules(model):
                layout.scale_norm(norm, factor)

    layout.write_sizes(model.config, target)


def prune_model(
    model: nn.Module,
    config: MinitronPruneConfig,
    importance: ImportanceScores | None = None,
    calibration_data: Any = None,
    tokenizer=None,
) -> nn.Module:
    """Prune ``model`` in place to the shape in ``config`` and return it (the same stock class).

    Width pruning keeps the highest-scoring hidden channels (embeddings, every norm, q/k/v and gate/up
    inputs, o/down outputs, ``lm_head``; tied embeddings stay tied), MLP neurons per layer, and query heads
    within KV groups (whole KV groups when ``num_key_value_heads`` shrinks). Depth pruning removes whole
    layers and re-numbers ``layer_idx`` so KV-cache generation works. ``head_dim`` stays fixed and is written
    into the config. Provenance (source, settings, kept indices) is attached as ``model.minitron_provenance``
    and written by :func:`save_pruned_model` as ``minitron_config.json``.

    Memory: weights are sliced one tensor at a time, so the peak is the model plus its largest tensor.

    Args:
        model: A supported ``*ForCausalLM`` with float weights.
        config: Target sizes and importance settings.
        importance: Precomputed scores (from :func:`estimate_importance`); computed from ``calibration_data``
            when omitted and needed.
        calibration_data: Anything :func:`estimate_importance` accepts.
        tokenizer: Needed when ``calibration_data`` is text.

    Example:
        >>> from hf_minitron import MinitronPruneConfig, prune_model
        >>> config = MinitronPruneConfig(hidden_size=432, intermediate_size=1024)
        >>> small = prune_model(model, config, calibration_data=texts, tokenizer=tokenizer)  # doctest: +SKIP
        >>> small.save_pretrained("smollm2-pruned")  # doctest: +SKIP
    """
    if not isinstance(config, MinitronPruneConfig):
        raise TypeError(f"`config` must be a MinitronPruneConfig, got {type(config).__name__}.")
    start = time.perf_counter()
    layout = check_prunable_model(model)
    source = layout.read_sizes(model.config)
    resolve_target_sizes(source, config)  # fail on an impossible target before any costly pass
    if importance is None and _needs_scores(config, source):
        if calibration_data is None:
            raise ValueError(
                "This target needs importance scores: pass `importance=estimate_importance(...)` or `calibration_data=`."
            )
        importance = estimate_importance(model, calibration_data, config, tokenizer=tokenizer)
    plan = make_plan(config, source, importance)
    apply_plan(model, plan, layout, rescale_norms=config.rescale_norms)
    model.minitron_provenance = {
        "hf_minitron_version": __version__,
        "source_model": getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "") or "",
        "model_type": model.config.model_type,
        "source_config": plan.source_sizes,
        "target_config": plan.target_sizes,
        "prune_config": config.to_dict(),
        "importance": None if importance is None else importance.metadata,
        "kept": plan.to_dict(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    logger.info(
        f"Pruned {plan.source_sizes} -> {plan.target_sizes} in {time.perf_counter() - start:.1f}s; "
        f"{sum(p.numel() for p in model.parameters()):,} parameters left."
    )
    return model


def save_pruned_model(
    model: nn.Module,
    save_directory: str | os.PathLike,
    tokenizer=None,
    importance: ImportanceScores | None = None,
    overwrite: bool = False,
    **save_kwargs,
) -> str:
    """Save a pruned model, its tokenizer, provenance and (optionally) scores, atomically.

    Everything is written to a temporary folder beside ``save_directory`` and moved into place at the end,
    so an interrupted save never leaves a half-written model. The weights load with stock
    ``AutoModelForCausalLM.from_pretrained`` (no hf_minitron import needed).

    Example:
        >>> save_pruned_model(small, "smollm2-pruned", tokenizer=tokenizer)  # doctest: +SKIP
    """
    save_directory = os.path.abspath(os.fspath(save_directory))
    if os.path.exists(save_directory) and os.listdir(save_directory) and not overwrite:
        raise ValueError(f"{save_directory} exists and is not empty; pass overwrite=True or choose another folder.")
    parent = os.path.dirname(save_directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        model.save_pretrained(tmp, **save_kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        provenance = getattr(model, "minitron_provenance", None)
        if provenance is not None:
            with open(os.path.join(tmp, PROVENANCE_NAME), "w", encoding="utf-8") as f:
                json.dump(provenance, f)
        if importance is not None:
            importance.save(tmp)
        if os.path.exists(save_directory):
            shutil.rmtree(save_directory)
        os.replace(tmp, save_directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return save_directory


def load_provenance(path: str | os.PathLike) -> dict:
    """Read ``minitron_config.json`` from a pruned model folder."""
    with open(os.path.join(os.fspath(path), PROVENANCE_NAME), encoding="utf-8") as f:
        return json.load(f)
