"""Turn importance scores and a target shape into kept indices (pure: touches no weights)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers.utils import logging

from ..architectures.blocks import mamba_expand
from ..architectures.layout import BLOCK_SIZE_KEYS, ArchitectureLayout
from ..config import MinitronPruneConfig
from ..importance import ImportanceScores


logger = logging.get_logger(__name__)


@dataclass
class PrunePlan:
    """Which units survive, as sorted source indices.

    ``heads``, ``kv_heads``, ``neurons`` and the block fields have one entry per *kept* layer, in the new order.
    Layers without a block get an empty entry for it (``[]``): ``experts[i]`` lists the kept routed experts and
    ``expert_neurons[i][k]`` the kept neurons of the ``k``-th of them; ``mamba_heads[i]`` the kept Mamba heads and
    ``mamba_channels[i][k]`` the kept channels of the ``k``-th of them; ``mamba_norm_scales[i]`` one gain factor per SSM
    group of the gated norm. ``layer_parts[i]`` names the blocks of the ``i``-th kept layer.
    """

    source_sizes: dict[str, int]
    target_sizes: dict[str, int]
    layers: list[int]
    hidden: list[int]
    heads: list[list[int]]
    kv_heads: list[list[int]]
    neurons: list[list[int]]
    head_merges: list[list[tuple[int, int]]] = field(default_factory=list)
    layer_parts: list[list[str]] = field(default_factory=list)
    experts: list[list[int]] = field(default_factory=list)
    expert_neurons: list[list[list[int]]] = field(default_factory=list)
    shared_neurons: list[list[int]] = field(default_factory=list)
    mamba_heads: list[list[int]] = field(default_factory=list)
    mamba_channels: list[list[list[int]]] = field(default_factory=list)
    mamba_norm_scales: list[list[float]] = field(default_factory=list)
    # Norm correction actually applied ("calibrated", "sqrt" or "none"; "calibrated" falls back to "sqrt" for scores
    # without norm statistics) and, for "calibrated", ``{source norm path: (gain scale, bias shift)}`` for hidden-axis
    # norms and ``[(q_norm scale, k_norm scale)]`` per kept layer for whole-projection q/k norms (OLMo2).
    norm_correction: str = "none"
    norm_scales: dict[str, tuple[float, float]] = field(default_factory=dict)
    qk_norm_scales: list[tuple[float, float]] = field(default_factory=list)

    @property
    def changes_width(self) -> bool:
        return any(self.source_sizes[k] != self.target_sizes[k] for k in WIDTH_FIELDS if k in self.source_sizes)

    def changes(self, size: str) -> bool:
        """Whether the target changes ``size`` (a key of the source sizes; ``False`` when the family has none)."""
        return size in self.source_sizes and self.source_sizes[size] != self.target_sizes[size]

    def to_dict(self) -> dict:
        out = {"layers": self.layers, "hidden": self.hidden, "heads": self.heads, "kv_heads": self.kv_heads, "neurons": self.neurons}
        for name in ("layer_parts", "experts", "expert_neurons", "shared_neurons", "mamba_heads", "mamba_channels"):
            if any(getattr(self, name)):
                out[name] = getattr(self, name)
        if any(self.head_merges):
            out["head_merges"] = [[list(pair) for pair in layer] for layer in self.head_merges]
        out["norm_correction"] = self.norm_correction
        if self.norm_scales:
            out["norm_scales"] = {k: list(v) for k, v in self.norm_scales.items()}
        if self.qk_norm_scales:
            out["qk_norm_scales"] = [list(v) for v in self.qk_norm_scales]
        return out


WIDTH_FIELDS = (
    "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
    "num_experts", "moe_intermediate_size", "shared_expert_intermediate_size", "mamba_num_heads", "mamba_head_dim",
)
DENSE_LAYER = frozenset({"attention", "mlp"})
_BLOCK_NAMES = {
    "attention": "attention layers",
    "mlp": "dense MLP",
    "moe": "mixture-of-experts layers",
    "shared_expert": "shared expert",
    "mamba": "Mamba layers",
}


def _not_applicable(name: str, value: int, source: dict[str, int], block: str) -> ValueError:
    prunable = [k for k in WIDTH_FIELDS + ("num_hidden_layers",) if k in source]
    hint = {
        "mlp": " (its MLPs are mixtures of experts: set `moe_intermediate_size` for the expert width)",
        "moe": " (set the dense MLP width with `intermediate_size`)",
    }.get(block, "")
    return ValueError(
        f"`{name}={value}` does not apply to this model: it has no {_BLOCK_NAMES[block]}{hint}. Remove `{name}` from the "
        f"MinitronPruneConfig; this model's prunable sizes are {prunable}."
    )


def resolve_target_sizes(
    source: dict[str, int],
    config: MinitronPruneConfig,
    layout: ArchitectureLayout | None = None,
    layer_parts: list[frozenset[str]] | None = None,
) -> dict[str, int]:
    """Fill ``None`` targets from the source and check the shape is reachable and saveable.

    ``layout`` and ``layer_parts`` (the blocks of each source layer) add the checks of MoE and hybrid models: a target
    for a block no layer has, routed experts and their groups, Mamba heads and groups, and family-specific ties (the
    Mamba width of GraniteMoeHybrid).

    Raises:
        ValueError: a target for a size the model does not have (e.g. ``num_experts`` on a dense model), a target above
            the source, heads not a multiple of KV heads, hidden not a multiple of heads (transformers refuses to save
            such a config), conflicting layer targets, ``num_experts`` below ``num_experts_per_tok`` or not a multiple
            of the expert groups, Mamba heads not a multiple of the SSM groups; each message says what to change.
    """
    target = dict(source)
    present = set().union(*layer_parts) if layer_parts else None
    for name in WIDTH_FIELDS + ("num_hidden_layers",):
        value = getattr(config, name)
        if value is None:
            continue
        block = BLOCK_SIZE_KEYS.get(name)
        if name not in source or (present is not None and block is not None and block not in present):
            if name in source and value == source[name]:
                continue  # asking for the size the model already has is harmless
            raise _not_applicable(name, value, source, block or name)
        if value > source[name]:
            raise ValueError(
                f"Target {name}={value} is larger than the source model's {source[name]}: pruning can only shrink; "
                f"choose {name} <= {source[name]}."
            )
        target[name] = value

    num_layers = source["num_hidden_layers"]
    if config.layers_to_drop:
        bad = [i for i in config.layers_to_drop if i >= num_layers]
        if bad:
            raise ValueError(f"layers_to_drop {bad} out of range: the model has layers 0..{num_layers - 1}.")
        remaining = num_layers - len(config.layers_to_drop)
        if config.num_hidden_layers is not None and config.num_hidden_layers != remaining:
            raise ValueError(
                f"num_hidden_layers={config.num_hidden_layers} conflicts with dropping {len(config.layers_to_drop)} of "
                f"{num_layers} layers (leaves {remaining}); set only one of them."
            )
        target["num_hidden_layers"] = remaining
    if target["num_hidden_layers"] < 1:
        raise ValueError("Pruning would remove every layer; keep at least one.")

    heads, kv_heads = target["num_attention_heads"], target["num_key_value_heads"]
    if heads % kv_heads:
        raise ValueError(
            f"num_attention_heads={heads} must be a multiple of num_key_value_heads={kv_heads} (GQA groups); "
            f"e.g. num_attention_heads={max(kv_heads, heads - heads % kv_heads)}."
        )
    source_group = source["num_attention_heads"] // source["num_key_value_heads"]
    if heads // kv_heads > source_group:
        raise ValueError(
            f"{heads // kv_heads} query heads per KV group exceeds the source's {source_group}: heads are pruned "
            f"within groups, so choose num_attention_heads <= {source_group * kv_heads}."
        )
    hidden = target["hidden_size"]
    if hidden % heads:
        lower, upper = hidden - hidden % heads, hidden - hidden % heads + heads
        raise ValueError(
            f"hidden_size={hidden} must be a multiple of num_attention_heads={heads} (transformers refuses to save "
            f"other Llama-style configs, even with an explicit head_dim); e.g. hidden_size={lower} or {upper}."
        )
    _check_block_targets(source, target, layout)
    return target


def _check_block_targets(source: dict[str, int], target: dict[str, int], layout: ArchitectureLayout | None) -> None:
    """Routed experts, expert groups and Mamba groups (see :func:`resolve_target_sizes`)."""
    if "num_experts" in target:
        experts, top_k, groups = target["num_experts"], target["num_experts_per_tok"], target["num_expert_groups"]
        if experts < top_k:
            raise ValueError(
                f"num_experts={experts} is below num_experts_per_tok={top_k}: every token is routed to {top_k} experts. "
                f"Choose num_experts >= {top_k}."
            )
        minimum = layout.moe.min_experts_per_group if layout is not None and layout.moe is not None else 1
        if experts % groups or experts // groups < minimum:
            raise ValueError(
                f"num_experts={experts} must be a multiple of the {groups} expert groups the router picks from (experts "
                f"are pruned evenly within each group), with at least {minimum} per group; e.g. num_experts="
                f"{max(groups * minimum, experts - experts % groups)}."
            )
    if "mamba_num_heads" in target:
        heads, groups = target["mamba_num_heads"], target["mamba_n_groups"]
        if heads % groups:
            raise ValueError(
                f"mamba_num_heads={heads} is not divisible by the {groups} SSM groups (n_groups): heads are pruned "
                f"within each group, so every group keeps the same count. Choose a multiple of {groups}, e.g. "
                f"mamba_num_heads={max(groups, heads - heads % groups)}."
            )
        if "mamba_expand" in target:  # the width is expand x hidden_size (GraniteMoeHybrid): expand must stay an integer
            name = layout.mamba.expand_field if layout is not None and layout.mamba is not None else "mamba_expand"
            target["mamba_expand"] = mamba_expand(target, name)


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` largest scores, returned in ascending index order (ties -> lower index)."""
    order = torch.sort(scores.float().cpu(), descending=True, stable=True).indices[:k]
    return sorted(order.tolist())


def select_layers(num_layers: int, config: MinitronPruneConfig, target_layers: int, scores: ImportanceScores | None) -> list[int]:
    """Source indices of the layers to keep."""
    if config.layers_to_drop:
        dropped = set(config.layers_to_drop)
        return [i for i in range(num_layers) if i not in dropped]
    if target_layers == num_layers:
        return list(range(num_layers))
    if scores is None:
        raise ValueError("Depth pruning by ranking needs importance scores (or pass explicit `layers_to_drop`).")
    return _top(scores.layer_scores(config.depth_criterion), target_layers)


def select_heads(head_scores: torch.Tensor, source: dict[str, int], target: dict[str, int]) -> tuple[list[int], list[int]]:
    """Kept (query heads, KV heads) of one layer.

    KV groups are ranked by the summed importance of their query heads; within each kept group the best
    ``target_heads / target_kv`` query heads are kept, so every group keeps the same number of heads.
    """
    num_kv, group = source["num_key_value_heads"], source["num_attention_heads"] // source["num_key_value_heads"]
    per_group = head_scores.float().cpu().view(num_kv, group)  # [kv_heads, heads_per_group]
    kept_kv = _top(per_group.sum(1), target["num_key_value_heads"])
    new_group = target["num_attention_heads"] // target["num_key_value_heads"]
    kept_heads = [g * group + h for g in kept_kv for h in _top(per_group[g], new_group)]
    return kept_heads, kept_kv


def head_merge_pairs(head_scores: torch.Tensor, kept_heads: list[int], kept_kv: list[int], group: int) -> list[tuple[int, int]]:
    """(kept head, pruned head) pairs for the first Minitron paper's head merge, within each kept KV group.

    With a group's heads ranked 1..L by importance and K kept, kept head ``i`` absorbs pruned head ``2K - i + 1``
    for ``i`` in ``[K - (L - K) + 1, K]``: the weakest kept heads take the residual of the strongest pruned ones.
    """
    pairs = []
    kept = set(kept_heads)
    for g in kept_kv:
        members = list(range(g * group, (g + 1) * group))
        ranked = sorted(members, key=lambda h: (-float(head_scores[h]), h))
        k = sum(1 for h in members if h in kept)
        for i in range(1, min(group - k, k) + 1):
            pairs.append((ranked[k - i], ranked[k + i - 1]))
    return pairs


def rms_correction(energy: torch.Tensor, kept: list[int]) -> float:
    """Gain scale that keeps an RMSNorm's output on the kept channels: ``sqrt(share * H / H')``.

    ``energy`` is ``[H]``, the mean over calibration tokens of the norm's input squared, per channel; ``share`` is the
    part of the total the kept channels carry. The RMS over the kept channels is then, on average, what the norm
    computed over all ``H`` of them. Equals ``sqrt(H / H')`` when the dropped channels carry no energy.
    """
    energy = energy.double()
    total = float(energy.sum())
    if total <= 0.0:
        return 1.0
    share = float(energy[kept].sum()) / total
    return math.sqrt(share * energy.numel() / len(kept))


def layernorm_correction(energy: torch.Tensor, mean: torch.Tensor, kept: list[int]) -> tuple[float, float]:
    """``(gain scale, bias shift in units of the gain)`` that keep a LayerNorm's output on the kept channels.

    With per-channel token means ``m_c`` of ``x`` and ``E[x_c^2]`` (``mean``, ``energy``: ``[H]``), the norm's mean and
    variance over all channels are estimated as ``mu = avg_c m_c`` and ``var = avg_c E[x_c^2] - mu^2``, and likewise
    over the kept channels. Scaling the gain by ``sqrt(var_K / var)`` and adding ``gain * (mu_K - mu) / sqrt(var)`` to
    the bias makes ``(x - mu_K) / sigma_K * g' + b'`` equal ``(x - mu) / sigma * g + b`` at those estimates.
    """
    energy, mean = energy.double(), mean.double()
    mu, mu_k = float(mean.mean()), float(mean[kept].mean())
    var, var_k = float(energy.mean()) - mu * mu, float(energy[kept].mean()) - mu_k * mu_k
    if var <= 0.0 or var_k <= 0.0:
        return 1.0, 0.0
    return math.sqrt(var_k / var), (mu_k - mu) / math.sqrt(var)


def _norm_plan(config: MinitronPruneConfig, plan: PrunePlan, scores: ImportanceScores | None, head_dim: int) -> None:
    """Fill the plan's norm correction (see :class:`PrunePlan`) for ``config.rescale_norms``."""
    source, target = plan.source_sizes, plan.target_sizes
    mode = config.rescale_norms
    if mode == "calibrated" and (scores is None or scores.norm_input_sq is None):
        changes = target["hidden_size"] != source["hidden_size"]
        if changes:
            logger.warning(
                "rescale_norms='calibrated' needs the norm statistics of an activation importance pass, which these "
                "scores lack (magnitude / random scores, or a file from hf-minitron 0.1): using 'sqrt' instead."
            )
        mode = "sqrt"
    plan.norm_correction = mode
    if mode != "calibrated":
        return
    if target["hidden_size"] != source["hidden_size"]:
        paths = scores.metadata.get("norm_paths") or []
        for k, path in enumerate(paths):
            if scores.norm_input_mean is not None:
                plan.norm_scales[path] = layernorm_correction(scores.norm_input_sq[k], scores.norm_input_mean[k], plan.hidden)
            else:
                plan.norm_scales[path] = (rms_correction(scores.norm_input_sq[k], plan.hidden), 0.0)
    if scores.q_norm_input_sq is not None:
        for i, src in enumerate(plan.layers):
            q_rows = [h * head_dim + d for h in plan.heads[i] for d in range(head_dim)]
            k_rows = [g * head_dim + d for g in plan.kv_heads[i] for d in range(head_dim)]
            plan.qk_norm_scales.append(
                (rms_correction(scores.q_norm_input_sq[src], q_rows), rms_correction(scores.k_norm_input_sq[src], k_rows))
            )


def select_grouped(scores: torch.Tensor, groups: int, keep: int) -> list[int]:
    """Indices of the ``keep / groups`` best units within each of ``groups`` contiguous equal groups of ``scores``.

    Used for Mamba heads (head ``h`` reads SSM group ``h // (heads / groups)``) and for experts under group-limited
    routing: every group keeps the same count, so the grouped structure survives.
    """
    per_group, kept = scores.numel() // groups, keep // groups
    return [g * per_group + j for g in range(groups) for j in _top(scores[g * per_group : (g + 1) * per_group], kept)]


def _check_scores(scores: ImportanceScores, source: dict[str, int], parts: list[frozenset[str]]) -> None:
    """The scores must come from a model of this shape (every block's tensor included)."""
    num_layers = source["num_hidden_layers"]
    expected = {
        "heads": (num_layers, source["num_attention_heads"]),
        "neurons": (num_layers, source.get("intermediate_size", 0)),
        "expert_output_norm": (num_layers, source.get("num_experts")),
        "expert_neurons": (num_layers, source.get("num_experts"), source.get("moe_intermediate_size")),
        "shared_neurons": (num_layers, source.get("shared_expert_intermediate_size")),
        "mamba_heads": (num_layers, source.get("mamba_num_heads")),
        "mamba_channels": (num_layers, source.get("mamba_num_heads"), source.get("mamba_head_dim")),
    }
    present = set().union(*parts)
    needed = {"expert_output_norm": "moe", "expert_neurons": "moe", "shared_neurons": "shared_expert",
              "mamba_heads": "mamba", "mamba_channels": "mamba"}
    wrong = []
    for name, shape in expected.items():
        value = getattr(scores, name)
        if value is None:
            if needed.get(name) in present and scores.has_sites:
                wrong.append(f"{name} missing")
            continue
        if name == "neurons" and value.shape[1] == 0 and "mlp" not in present:
            continue
        if tuple(value.shape) != shape:
            wrong.append(f"{name} {tuple(value.shape)} (expected {shape})")
    if scores.hidden.numel() != source["hidden_size"]:
        wrong.append(f"hidden {scores.hidden.numel()} (expected {source['hidden_size']})")
    if wrong:
        raise ValueError(
            f"The importance scores were computed for another model than this one ({'; '.join(wrong)}); "
            "re-estimate them on the model you prune."
        )


def check_target(model, config: MinitronPruneConfig, layout: ArchitectureLayout) -> dict[str, int]:
    """:func:`resolve_target_sizes` for ``model``: every target check that needs no scores, so that a bad target
    fails before the importance pass (the expensive part) rather than at pruning time."""
    source = layout.read_sizes(model.config)
    parts = [layout.layer_parts(layer) for layer in layout.decoder_layers(model)]
    return resolve_target_sizes(source, config, layout, parts)


def make_plan(
    config: MinitronPruneConfig,
    source: dict[str, int],
    scores: ImportanceScores | None,
    layer_parts: list[frozenset[str]] | None = None,
    layout: ArchitectureLayout | None = None,
) -> PrunePlan:
    """Compute every kept index for ``config`` from ``scores`` (needed unless only explicit layers are dropped).

    Args:
        config: Target sizes and selection settings.
        source: The model's sizes (:meth:`ArchitectureLayout.read_sizes`).
        scores: Importance scores of that model.
        layer_parts: The blocks each source layer holds (:meth:`ArchitectureLayout.layer_parts`); default: those
            recorded in ``scores``, else attention + dense MLP in every layer.
        layout: The family layout, for the family-specific checks of :func:`resolve_target_sizes`.

    Raises:
        ValueError: an invalid target (see :func:`resolve_target_sizes`), or scores of another model.
    """
    num_layers = source["num_hidden_layers"]
    if layer_parts is None:
        layer_parts = (scores.layer_parts if scores is not None else None) or [DENSE_LAYER] * num_layers
    target = resolve_target_sizes(source, config, layout, layer_parts)
    layers = select_layers(num_layers, config, target["num_hidden_layers"], scores)
    attention = [i for i in range(num_layers) if "attention" in layer_parts[i]]
    mamba = any("mamba" in p for p in layer_parts)
    if mamba and attention and not set(attention) & set(layers):
        # transformers 5 hybrids read the sequence length off an attention cache layer: without one, every forward
        # with a cache (generation, the default use_cache=True) fails, so do not produce such a model.
        raise ValueError(
            f"This depth target drops every attention layer (layers {attention}) of a hybrid Mamba model; transformers "
            "cannot run such a model with a cache (generation fails). Keep at least one attention layer: pass "
            f"`layers_to_drop` without one of {attention}, or prune fewer layers."
        )
    changes_width = any(source[k] != target[k] for k in WIDTH_FIELDS if k in source)
    if changes_width and scores is None:
        raise ValueError("Width pruning needs importance scores: pass `importance=` or `calibration_data=`.")
    if scores is not None:
        _check_scores(scores, source, layer_parts)
        scores.check_finite()
    identity = lambda n: list(range(n))  # noqa: E731
    changes = lambda k: k in source and source[k] != target[k]  # noqa: E731
    if changes("hidden_size"):
        hidden = _top(scores.hidden_scores(config.hidden_importance_source), target["hidden_size"])
    else:
        hidden = identity(source["hidden_size"])
    plan = PrunePlan(source, target, layers, hidden, [], [], [], [])
    group = source["num_attention_heads"] // source["num_key_value_heads"]
    for i in layers:
        parts = layer_parts[i]
        plan.layer_parts.append(sorted(parts))
        if "attention" in parts and (changes("num_attention_heads") or changes("num_key_value_heads")):
            h, kv = select_heads(scores.heads[i], source, target)
        else:
            h, kv = identity(source["num_attention_heads"]), identity(source["num_key_value_heads"])
        plan.heads.append(h)
        plan.kv_heads.append(kv)
        merge = config.merge_pruned_heads and scores is not None and "attention" in parts
        plan.head_merges.append(head_merge_pairs(scores.heads[i], h, kv, group) if merge else [])
        if "mlp" in parts and changes("intermediate_size"):
            plan.neurons.append(_top(scores.neurons[i], target["intermediate_size"]))
        else:
            plan.neurons.append(identity(source.get("intermediate_size", 0)) if "mlp" in parts else [])
        _plan_experts(plan, config, scores, i, parts, changes)
        _plan_mamba(plan, config, scores, i, parts, changes)
    _norm_plan(config, plan, scores, source["head_dim"])
    return plan


def _plan_experts(plan: PrunePlan, config: MinitronPruneConfig, scores, i: int, parts, changes) -> None:
    """Kept routed experts (group-aware), each expert's own best neurons, and the shared expert's neurons."""
    source, target = plan.source_sizes, plan.target_sizes
    if "moe" in parts:
        num, inter = source["num_experts"], source["moe_intermediate_size"]
        if changes("num_experts"):
            experts = select_grouped(scores.expert_scores(config.expert_importance)[i], source["num_expert_groups"], target["num_experts"])
        else:
            experts = list(range(num))
        if changes("moe_intermediate_size"):
            neurons = [_top(scores.expert_neurons[i, e], target["moe_intermediate_size"]) for e in experts]
        else:
            neurons = [list(range(inter)) for _ in experts]
        plan.experts.append(experts)
        plan.expert_neurons.append(neurons)
    else:
        plan.experts.append([])
        plan.expert_neurons.append([])
    if "shared_expert" in parts and changes("shared_expert_intermediate_size"):
        plan.shared_neurons.append(_top(scores.shared_neurons[i], target["shared_expert_intermediate_size"]))
    else:
        plan.shared_neurons.append(list(range(source["shared_expert_intermediate_size"])) if "shared_expert" in parts else [])


def _plan_mamba(plan: PrunePlan, config: MinitronPruneConfig, scores, i: int, parts, changes) -> None:
    """Kept Mamba heads (within SSM groups), each head's own best channels, and the gated norm's per-group gains."""
    if "mamba" not in parts:
        plan.mamba_heads.append([])
        plan.mamba_channels.append([])
        plan.mamba_norm_scales.append([])
        return
    source, target = plan.source_sizes, plan.target_sizes
    num_heads, head_dim, groups = source["mamba_num_heads"], source["mamba_head_dim"], source["mamba_n_groups"]
    if changes("mamba_num_heads"):
        heads = select_grouped(scores.mamba_heads[i], groups, target["mamba_num_heads"])
    else:
        heads = list(range(num_heads))
    if changes("mamba_head_dim"):
        channels = [_top(scores.mamba_channels[i, h], target["mamba_head_dim"]) for h in heads]
    else:
        channels = [list(range(head_dim)) for _ in heads]
    plan.mamba_heads.append(heads)
    plan.mamba_channels.append(channels)
    # The gated norm takes its RMS within each group of (heads / groups) * head_dim channels: fewer channels per group
    # change it, corrected per group like a hidden-axis norm (exact for "sqrt" when the dropped channels were zero).
    mode = config.rescale_norms
    energy = scores.mamba_norm_input_sq if scores is not None else None
    if mode == "calibrated" and energy is None:
        mode = "sqrt"
    per_group = num_heads // groups * head_dim
    kept = [h * head_dim + d for h, ds in zip(heads, channels) for d in ds]
    factors = []
    for g in range(groups):
        local = [c - g * per_group for c in kept if g * per_group <= c < (g + 1) * per_group]
        if len(local) == per_group or mode == "none":
            factors.append(1.0)
        elif mode == "sqrt":
            factors.append(math.sqrt(per_group / len(local)))
        else:
            factors.append(rms_correction(energy[i, g * per_group : (g + 1) * per_group], local))
    plan.mamba_norm_scales.append(factors)
