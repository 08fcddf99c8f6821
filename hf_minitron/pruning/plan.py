"""Turn importance scores and a target shape into kept indices (pure: touches no weights)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import MinitronPruneConfig
from ..importance import ImportanceScores


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

    @property
    def changes_width(self) -> bool:
        return any(self.source_sizes[k] != self.target_sizes[k] for k in WIDTH_FIELDS)

    def to_dict(self) -> dict:
        out = {"layers": self.layers, "hidden": self.hidden, "heads": self.heads, "kv_heads": self.kv_heads, "neurons": self.neurons}
        if any(self.head_merges):
            out["head_merges"] = [[list(pair) for pair in layer] for layer in self.head_merges]
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
    identity = lambda n: list(range(n))  # noqa: E731
    hidden = _top(scores.hidden, target["hidden_size"]) if target["hidden_size"] != source["hidden_size"] else identity(source["hidden_size"])
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
    return PrunePlan(source, target, layers, hidden, heads, kv_heads, neurons, merges)
