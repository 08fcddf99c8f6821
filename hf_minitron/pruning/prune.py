"""`prune_model()`: width and depth pruning of a Hugging Face causal LM into a smaller stock model."""

from __future__ import annotations

import copy
import json
import math
import os
import time
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from .. import __version__
from ..architectures import ArchitectureLayout
from ..architectures.depth import keep_layers
from ..config import MinitronPruneConfig
from ..importance import ImportanceScores, estimate_importance
from ..atomic import staged_dir
from ..validation import check_prunable_model, drop_dequantized_gguf_marker, without_dequantized_gguf_marker
from .plan import WIDTH_FIELDS, PrunePlan, make_plan, resolve_target_sizes
from .blocks import _fused_rows, prune_experts, prune_mamba, prune_mlp
from .slicing import expand_heads, slice_embedding, slice_linear, slice_norm


logger = logging.get_logger(__name__)

PROVENANCE_NAME = "minitron_config.json"


def _needs_scores(config: MinitronPruneConfig, source: dict[str, int]) -> bool:
    width = any(getattr(config, k) is not None and getattr(config, k) != source.get(k) for k in WIDTH_FIELDS)
    depth = (
        not config.layers_to_drop
        and config.num_hidden_layers is not None
        and config.num_hidden_layers != source["num_hidden_layers"]
    )
    return width or depth


@torch.no_grad()
def _merge_heads(layer: nn.Module, layout: ArchitectureLayout, pairs: list[tuple[int, int]], head_dim: int) -> None:
    """Head merge of arXiv 2407.14679 (opt-in): ``head_i <- head_i + (head_i - head_j)`` on the query rows
    (and bias) and ``o_proj`` columns of each (kept ``i``, pruned ``j``) pair, before ``j`` is sliced away."""
    q = layer.get_submodule(layout.qkv_proj if layout.qkv_proj is not None else layout.q_proj)  # q rows come first
    o = layer.get_submodule(layout.o_proj)
    for keep, drop in pairs:
        ki, di = slice(keep * head_dim, (keep + 1) * head_dim), slice(drop * head_dim, (drop + 1) * head_dim)
        q.weight[ki] = 2 * q.weight[ki] - q.weight[di]
        if q.bias is not None:
            q.bias[ki] = 2 * q.bias[ki] - q.bias[di]
        o.weight[:, ki] = 2 * o.weight[:, ki] - o.weight[:, di]


@torch.no_grad()
def _prune_layer_width(layer: nn.Module, layout: ArchitectureLayout, plan: PrunePlan, i: int, correct_norms: bool) -> None:
    """Slice the blocks of one decoder layer (attention, MLP, experts, shared expert, Mamba) and its norms to the
    plan's ``i``-th kept layer."""
    source, target = plan.source_sizes, plan.target_sizes
    parts = layout.layer_parts(layer)
    hidden = plan.hidden if plan.changes("hidden_size") else None
    if "attention" in parts:
        _prune_attention(layer, layout, plan, i, hidden, correct_norms)
    if "mlp" in parts:
        neurons = plan.neurons[i] if plan.changes("intermediate_size") else None
        dense = {"gate_proj": layout.gate_proj, "up_proj": layout.up_proj, "gate_up_proj": layout.gate_up_proj,
                 "down_proj": layout.down_proj}
        prune_mlp(layer, dense, neurons, hidden, source["intermediate_size"])
    if "moe" in parts:
        prune_experts(layer, layout.moe, plan.experts[i], plan.expert_neurons[i], hidden, source["moe_intermediate_size"])
    if "shared_expert" in parts:
        neurons = plan.shared_neurons[i] if plan.changes("shared_expert_intermediate_size") else None
        prune_mlp(layer, layout.moe.shared_paths, neurons, hidden, source["shared_expert_intermediate_size"])
        if layout.moe.shared_expert_gate is not None:
            slice_linear(layer.get_submodule(layout.moe.shared_expert_gate), in_idx=hidden)
    if "mamba" in parts:
        scales = plan.mamba_norm_scales[i] if correct_norms else [1.0] * source["mamba_n_groups"]
        prune_mamba(layer, layout.mamba, source, plan.mamba_heads[i], plan.mamba_channels[i], hidden, scales)
    if hidden is not None:
        for name in layout.layer_norm_roles_of(layer, parts):
            slice_norm(layer.get_submodule(name), hidden)

    sizes = {
        "hidden": target["hidden_size"],
        "intermediate": target.get("intermediate_size"),
        "heads": target["num_attention_heads"],
        "kv_heads": target["num_key_value_heads"],
        "kv_groups": target["num_attention_heads"] // target["num_key_value_heads"],
        "experts": target.get("num_experts"),
        "moe_intermediate": target.get("moe_intermediate_size"),
        "shared_intermediate": target.get("shared_expert_intermediate_size"),
    }
    if "mamba_num_heads" in target:
        heads, head_dim, groups = target["mamba_num_heads"], target["mamba_head_dim"], target["mamba_n_groups"]
        sizes.update(
            mamba_heads=heads, mamba_head_dim=head_dim, mamba_intermediate=heads * head_dim,
            mamba_conv_dim=heads * head_dim + 2 * groups * target["mamba_state_size"],
            mamba_group_size=heads * head_dim // groups,
        )
    updates = [(layer, layout.layer_attributes)]
    if "attention" in parts:
        updates.append((layer.get_submodule(layout.attention), layout.attention_attributes))
    if "mlp" in parts:
        updates.append((layer.get_submodule(layout.mlp), layout.mlp_attributes))
    if parts & {"moe", "shared_expert"}:
        updates += [(layer.get_submodule(p), a) for p, a in layout.moe.attributes.items() if layout.has(layer, p)]
    if "mamba" in parts:
        mixer = layer.get_submodule(layout.mamba.mixer)
        updates += [(mixer.get_submodule(p), a) for p, a in layout.mamba.attributes.items() if layout.has(mixer, p) or not p]
    for module, attributes in updates:
        for attr, size in attributes.items():
            if isinstance(getattr(module, attr, None), int) and sizes.get(size) is not None:
                setattr(module, attr, sizes[size])


@torch.no_grad()
def _prune_attention(layer: nn.Module, layout: ArchitectureLayout, plan: PrunePlan, i: int, hidden, correct_norms: bool) -> None:
    """Query rows follow the kept heads, key/value rows the kept KV groups, inputs and ``o_proj`` rows the hidden."""
    source = plan.source_sizes
    head_dim = source["head_dim"]
    heads = expand_heads(plan.heads[i], head_dim) if plan.heads[i] != list(range(source["num_attention_heads"])) else None
    kv = expand_heads(plan.kv_heads[i], head_dim) if plan.kv_heads[i] != list(range(source["num_key_value_heads"])) else None
    q_width, kv_width = source["num_attention_heads"] * head_dim, source["num_key_value_heads"] * head_dim
    if plan.head_merges and plan.head_merges[i]:
        _merge_heads(layer, layout, plan.head_merges[i], head_dim)
    if layout.qkv_proj is not None:
        rows = _fused_rows([(heads, q_width), (kv, kv_width), (kv, kv_width)])
        slice_linear(layer.get_submodule(layout.qkv_proj), out_idx=rows, in_idx=hidden)
    else:
        slice_linear(layer.get_submodule(layout.q_proj), out_idx=heads, in_idx=hidden)
        slice_linear(layer.get_submodule(layout.k_proj), out_idx=kv, in_idx=hidden)
        slice_linear(layer.get_submodule(layout.v_proj), out_idx=kv, in_idx=hidden)
    slice_linear(layer.get_submodule(layout.o_proj), out_idx=hidden, in_idx=heads)
    if layout.qk_norm_scope == "projection":
        # A norm over the whole projection (OLMo2) has one weight per kept row, and its RMS now runs over fewer
        # heads: corrected like a hidden-axis norm ("sqrt" is exact when the dropped heads' rows were zero).
        for k, (path, rows, width) in enumerate(((layout.q_norm, heads, q_width), (layout.k_norm, kv, kv_width))):
            if path is not None and rows is not None:
                norm = layer.get_submodule(path)
                slice_norm(norm, rows)
                if correct_norms and plan.norm_correction == "sqrt":
                    layout.scale_norm(norm, math.sqrt(width / len(rows)))
                elif correct_norms and plan.norm_correction == "calibrated":
                    layout.scale_norm(norm, plan.qk_norm_scales[i][k])
    # Per-head q/k norms ([head_dim], shared by all heads) need nothing: head_dim never changes.


@torch.no_grad()
def _compensate_embedding_scale(model: nn.Module, layout: ArchitectureLayout, source: dict, target: dict, tied: bool) -> None:
    """Keep the token embeddings' output exact when their forward-time scale depends on hidden_size.

    Gemma multiplies embeddings by sqrt(hidden_size), recomputed from the config on reload. Multiplying the kept
    embedding rows by c = scale(H_old) / scale(H_new) leaves ``W[token] * scale`` unchanged. A tied ``lm_head``
    shares those rows, so its logits would grow by c: the final norm's output (which only feeds ``lm_head``) is
    divided by c instead, which makes the logits exact too. The one visible difference, for tied models only, is
    that the final hidden state (``last_hidden_state``) is 1/c times what it would otherwise be.
    """
    old, new = layout.embed_scale_value(source["hidden_size"]), layout.embed_scale_value(target["hidden_size"])
    if old is None or old == new:
        return
    embed = model.get_submodule(layout.embed_tokens)
    factor = old / new
    embed.weight.mul_(factor)
    for attr in layout.embed_scale_attributes:
        value = getattr(embed, attr, None)
        if isinstance(value, torch.Tensor):
            value.fill_(new)
        elif isinstance(value, float):
            setattr(embed, attr, new)
    if tied:
        layout.scale_norm(model.get_submodule(layout.final_norm), 1.0 / factor, include_bias=True)


@torch.no_grad()
def _correct_hidden_norms(model: nn.Module, layout: ArchitectureLayout, plan: PrunePlan) -> None:
    """Apply the plan's norm correction to every hidden-axis norm after the hidden channels were sliced.

    A norm's statistic (RMS, or LayerNorm's mean and variance) now runs over the kept channels only; without
    correction every normalised output would shift by the ratio of the two statistics.
    """
    source, target = plan.source_sizes, plan.target_sizes
    if plan.norm_correction == "sqrt":
        # RMS over H_new kept channels vs H_old: if the dropped channels carry ~no energy, the kept ones' RMS is
        # sqrt(H_old / H_new) larger, shrinking every normalised output; undo that.
        factor = math.sqrt(source["hidden_size"] / target["hidden_size"])
        for _, norm in layout.norm_modules(model):
            layout.scale_norm(norm, factor)
        return
    if plan.norm_correction != "calibrated":
        return
    # Norms are named by their source path: layer i of the pruned model is source layer plan.layers[i].
    layers = layout.decoder_layers(model)
    sources = [
        f"{layout.layers}.{src}.{name}" for src, layer in zip(plan.layers, layers) for name in layout.layer_norm_roles_of(layer)
    ] + [layout.final_norm]
    for src_path, (_, norm) in zip(sources, layout.norm_modules(model)):
        if src_path not in plan.norm_scales:
            raise ValueError(f"The pruning plan has no norm correction for `{src_path}`: re-estimate the importance scores.")
        scale, shift = plan.norm_scales[src_path]
        bias = getattr(norm, "bias", None)
        if shift and isinstance(bias, torch.Tensor):
            bias.add_(layout.norm_gain(norm).to(bias.dtype), alpha=shift)  # b' = b + g * (mu_K - mu) / sigma
        layout.scale_norm(norm, scale)


@torch.no_grad()
def apply_plan(model: nn.Module, plan: PrunePlan, layout: ArchitectureLayout, correct_norms: bool = True) -> None:
    """Slice ``model`` in place to ``plan`` and rewrite its config (sizes, explicit ``head_dim``).

    ``correct_norms=False`` skips the plan's norm-gain correction (used by the shape-only dry run).
    """
    source, target = plan.source_sizes, plan.target_sizes
    if plan.layers != list(range(source["num_hidden_layers"])):
        keep_layers(model, layout, plan.layers)
    for i, layer in enumerate(layout.decoder_layers(model)):
        _prune_layer_width(layer, layout, plan, i, correct_norms)

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
        if correct_norms:
            _correct_hidden_norms(model, layout, plan)
        _compensate_embedding_scale(model, layout, source, target, tied)

    layout.write_sizes(model.config, target)
    if layout.moe is not None and "num_experts" in target:
        sizes = {"experts": target["num_experts"]}
        for attr, size in layout.moe.model_attributes.items():
            if isinstance(getattr(model, attr, None), int) and size in sizes:
                setattr(model, attr, sizes[size])


def check_plan_reloads(model: nn.Module, plan: PrunePlan, layout: ArchitectureLayout) -> None:
    """Dry-run ``plan`` on a weightless (meta-device) copy and check stock transformers rebuilds the same shapes.

    A model class built from the pruned config must create every parameter with the shape pruning produces,
    or ``from_pretrained`` would refuse (or silently re-initialise) the weights. Some families tie sizes the
    registry cannot change independently (e.g. Helium builds ``o_proj`` as hidden x hidden). Runs before any real
    weight is touched, costs no memory, and is skipped with a warning if the class cannot be built on meta.

    Raises:
        ValueError: listing the first mismatched parameters.
    """
    cls = type(model)
    try:
        with torch.device("meta"):
            shadow = cls(copy.deepcopy(model.config))
        apply_plan(shadow, plan, layout, correct_norms=False)
    except Exception as err:  # noqa: BLE001 - a best-effort check must not block pruning
        logger.warning(f"Could not dry-run the pruned shapes of {cls.__name__} on the meta device ({err}); skipping the reload check.")
        return
    try:
        # Round-trip the config through a dict, as `from_pretrained` does: runs the config's own validation
        # (e.g. Phi-3 longrope factors sized from hidden_size // num_attention_heads) and its __post_init__.
        reloaded_config = type(shadow.config).from_dict(shadow.config.to_dict())
        with torch.device("meta"):
            fresh = cls(reloaded_config)
    except Exception as err:  # noqa: BLE001
        raise ValueError(
            f"The pruned {cls.__name__} would not reload with stock transformers: its pruned config fails to load "
            f"({type(err).__name__}: {err}). Target sizes were {plan.target_sizes}. The model was not modified."
        ) from err
    pruned = {name: tuple(p.shape) for name, p in shadow.named_parameters()}
    rebuilt = {name: tuple(p.shape) for name, p in fresh.named_parameters()}
    mismatched = [
        f"{name}: pruned {pruned.get(name)} vs rebuilt {rebuilt.get(name)}"
        for name in sorted(set(pruned) | set(rebuilt))
        if pruned.get(name) != rebuilt.get(name)
    ]
    if mismatched:
        raise ValueError(
            f"The pruned {cls.__name__} would not reload with stock transformers: a model built from the pruned config "
            f"has other shapes ({'; '.join(mismatched[:4])}{'; ...' if len(mismatched) > 4 else ''}). This family ties "
            f"sizes together (e.g. num_attention_heads * head_dim == hidden_size); choose targets that keep them tied. "
            f"Target sizes were {plan.target_sizes}. The model was not modified."
        )


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
    within KV groups (whole KV groups when ``num_key_value_heads`` shrinks). In MoE layers it keeps the best routed
    experts per layer (router rows and fused expert tensors; group-aware under group-limited routing), each kept
    expert's own best neurons and the shared expert's; in Mamba2 layers the best heads within each SSM group and each
    kept head's best channels (``in_proj``, ``conv1d``, ``A_log``/``D``/``dt_bias``, gated norm, ``out_proj``). Depth
    pruning removes whole layers of any block type, re-indexes per-layer config lists (block types, attention types,
    dense-layer lists) and re-numbers ``layer_idx`` so KV-cache (and SSM-cache) generation works. ``head_dim`` stays fixed and is written
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
    parts = [layout.layer_parts(layer) for layer in layout.decoder_layers(model)]
    resolve_target_sizes(source, config, layout, parts)  # fail on an impossible target before any costly pass
    if importance is None and _needs_scores(config, source):
        if calibration_data is None:
            raise ValueError(
                "This target needs importance scores: pass `importance=estimate_importance(...)` or `calibration_data=`."
            )
        importance = estimate_importance(model, calibration_data, config, tokenizer=tokenizer)
    plan = make_plan(config, source, importance, parts, layout)
    check_plan_reloads(model, plan, layout)
    apply_plan(model, plan, layout)
    drop_dequantized_gguf_marker(model)  # the pruned model is a new float model; the GGUF marker would block saving
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
    """Save a pruned model, its tokenizer, provenance and (optionally) scores, crash-safely.

    Everything is written to a temporary sibling folder, fsynced and renamed into place; with ``overwrite=True``
    an existing folder is moved aside and deleted only once the new one is in place, so a kill at any point leaves
    either the old or the new complete folder (stale temporaries are cleaned by the next save into the same
    parent). The weights load with stock ``AutoModelForCausalLM.from_pretrained`` (no hf_minitron import needed).
    A dequantized GGUF model's leftover ``quantization_config`` is left out of the saved config (the caller's
    model keeps it).

    Raises:
        ValueError: ``save_directory`` is a file, or a non-empty folder without ``overwrite=True``, or its parent
            is not writable.

    Example:
        >>> save_pruned_model(small, "smollm2-pruned", tokenizer=tokenizer)  # doctest: +SKIP
    """
    save_directory = os.path.abspath(os.fspath(save_directory))
    with staged_dir(save_directory, overwrite=overwrite) as tmp:
        write_model_folder(model, tmp, tokenizer=tokenizer, importance=importance, **save_kwargs)
    return save_directory


def write_model_folder(model: nn.Module, folder: str, tokenizer=None, importance: ImportanceScores | None = None, **save_kwargs) -> None:
    """Write the files of :func:`save_pruned_model` into an existing (temporary) ``folder``, not atomically."""
    with without_dequantized_gguf_marker(model):
        model.save_pretrained(folder, **save_kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    provenance = getattr(model, "minitron_provenance", None)
    if provenance is not None:
        with open(os.path.join(folder, PROVENANCE_NAME), "w", encoding="utf-8") as f:
            json.dump(provenance, f)
    if importance is not None:
        importance.save(folder)


def load_provenance(path: str | os.PathLike) -> dict:
    """Read ``minitron_config.json`` from a pruned model folder."""
    with open(os.path.join(os.fspath(path), PROVENANCE_NAME), encoding="utf-8") as f:
        return json.load(f)
