"""Turn importance scores and a target shape into kept indices (pure: touches no weights)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers.utils import logging

from ..config import MinitronPruneConfig
from ..importance import ImportanceScores


logger = logging.get_logger(__name__)


@dataclass
class PrunePlan:
    """Which units survive, as sorted source indices.

    ``heads``, ``kv_heads`` and ``neurons`` have one entry per *kept* layer, in the new order.
    """

    source_sizes: dict[str, int]
    target_sizes: dict[str, int]
    layers: list[int]
    hidden: list[int]
    heads: list[list[int]]
    kv_heads: list[list[int]]
    neurons: list[list[int]]
    head_merges: list[list[tuple[int, int]]] = field(default_factory=list)
    # Norm correction actually applied ("calibrated", "sqrt" or "none"; "calibrated" falls back to "sqrt" for scores
    # without norm statistics) and, for "calibrated", ``{source norm path: (gain scale, bias shift)}`` for hidden-axis
    # norms and ``[(q_norm scale, k_norm scale)]`` per kept layer for whole-projection q/k norms (OLMo2).
    norm_correction: str = "none"
    norm_scales: dict[str, tuple[float, float]] = field(default_factory=dict)
    qk_norm_scales: list[tuple[float, float]] = field(default_factory=list)

    @property
    def changes_width(self) -> bool:
        return any(self.source_sizes[k] != self.target_sizes[k] for k in WIDTH_FIELDS)

    def to_dict(self) -> dict:
        out = {"layers": self.layers, "hidden": self.hidden, "heads": self.heads, "kv_heads": self.kv_heads, "neurons": self.neurons}
        if any(self.head_merges):
            out["head_merges"] = [[list(pair) for pair in layer] for layer in self.head_merges]
        out["norm_correction"] = self.norm_correction
        if self.norm_scales:
            out["norm_scales"] = {k: list(v) for k, v in self.norm_scales.items()}
        if self.qk_norm_scales:
            out["qk_norm_scales"] = [list(v) for v in self.qk_norm_scales]
        return out


WIDTH_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")


def resolve_target_sizes(source: dict[str, int], config: MinitronPruneConfig) -> dict[str, int]:
    """Fill ``None`` targets from the source and check the shape is reachable and saveable.

    Raises:
        ValueError: a target exceeds the source, heads are not a multiple of KV heads, hidden is not a
            multiple of heads (transformers refuses to save such a config), or the layer targets conflict.
    """
    target = dict(source)
    for name in WIDTH_FIELDS + ("num_hidden_layers",):
        value = getattr(config, name)
        if value is None:
            continue
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
    if target["intermediate_size"] < 1 or hidden < 1:
        raise ValueError("Target sizes must be positive.")
    return target


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


def make_plan(config: MinitronPruneConfig, source: dict[str, int], scores: ImportanceScores | None) -> PrunePlan:
    """Compute every kept index for ``config`` from ``scores`` (needed unless only explicit layers are dropped)."""
    target = resolve_target_sizes(source, config)
    layers = select_layers(source["num_hidden_layers"], config, target["num_hidden_layers"], scores)
    changes_width = any(source[k] != target[k] for k in WIDTH_FIELDS)
    if changes_width and scores is None:
        raise ValueError("Width pruning needs importance scores: pass `importance=` or `calibration_data=`.")
    if scores is not None:
        expected = (source["num_hidden_layers"], source["num_attention_heads"])
        if tuple(scores.heads.shape) != expected or scores.hidden.numel() != source["hidden_size"] or (
            scores.neurons.shape[1] != source["intermediate_size"]
        ):
            raise ValueError(
                f"The importance scores were computed for another shape (heads {tuple(scores.heads.shape)}, hidden "
                f"{scores.hidden.numel()}, neurons {tuple(scores.neurons.shape)}) than this model {source}; "
                "re-estimate them on the model you prune."
            )
        scores.check_finite()
    identity = lambda n: list(range(n))  # noqa: E731
    if target["hidden_size"] != source["hidden_size"]:
        hidden = _top(scores.hidden_scores(config.hidden_importance_source), target["hidden_size"])
    else:
        hidden = identity(source["hidden_size"])
    heads, kv_heads, neurons, merges = [], [], [], []
    group = source["num_attention_heads"] // source["num_key_value_heads"]
    for i in layers:
        if (target["num_attention_heads"], target["num_key_value_heads"]) != (source["num_attention_heads"], source["num_key_value_heads"]):
            h, kv = select_heads(scores.heads[i], source, target)
        else:
            h, kv = identity(source["num_attention_heads"]), identity(source["num_key_value_heads"])
        heads.append(h)
        kv_heads.append(kv)
        merges.append(head_merge_pairs(scores.heads[i], h, kv, group) if config.merge_pruned_heads and scores is not None else [])
        if target["intermediate_size"] != source["intermediate_size"]:
            neurons.append(_top(scores.neurons[i], target["intermediate_size"]))
        else:
            neurons.append(identity(source["intermediate_size"]))
    plan = PrunePlan(source, target, layers, hidden, heads, kv_heads, neurons, merges)
    _norm_plan(config, plan, scores, source["head_dim"])
    return plan
