"""Exact parameter counts of pruned shapes without weights: meta-device builds with stock transformers."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..architectures import ArchitectureLayout
from ..architectures.depth import keep_layers
from ..architectures.layout import BLOCK_SIZE_KEYS
from ..config import MinitronPruneConfig
from ..counting import inactive_layer_params
from ..importance import ImportanceScores
from ..pruning.plan import select_layers


# ------------------------------------------------------------------------------------------ parameter count
def _shaped_config(model_config, layout: ArchitectureLayout, sizes: Mapping[str, int]):
    """A copy of ``model_config`` with the target ``sizes`` written in (and per-layer lists cut to the depth)."""
    config = copy.deepcopy(model_config)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # a meta model needs none, and a dequantized GGUF's must not be applied
    source_layers = getattr(config, layout.num_layers_field)
    full = dict(layout.read_sizes(config))
    full.update({k: v for k, v in sizes.items() if k in full})
    layout.write_sizes(config, full)
    for name in layout.per_layer_config_fields:
        values = getattr(config, name, None)
        if isinstance(values, (list, tuple)) and len(values) == source_layers:
            setattr(config, name, list(values)[: full["num_hidden_layers"]])
    return config


def _unique_numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() yields tied tensors once


def _meta_model(config) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def predict_num_params(
    model_or_config,
    sizes: Mapping[str, int] | MinitronPruneConfig,
    kept_layers: Sequence[int] | None = None,
    importance: ImportanceScores | None = None,
) -> int:
    """Exact parameter count of ``model_or_config`` pruned to ``sizes``, with no weights in memory.

    Builds the pruned shape on the meta device with stock ``AutoModelForCausalLM.from_config`` and counts its
    unique parameters, so biases, norms, tied (counted once) or untied embeddings, routers, shared experts and Mamba
    tensors are right for every family the registry supports. Same as :func:`hf_minitron.counting.count_params`: in a
    model whose layers hold different blocks (hybrids, dense + MoE layers) a depth change needs ``kept_layers`` or
    ``importance`` (which layers are kept decides the count).

    Example:
        >>> predict_num_params(model, MinitronPruneConfig(hidden_size=48, num_hidden_layers=3))  # doctest: +SKIP
        61616
    """
    from ..counting import count_params

    return count_params(model_or_config, sizes, kept_layers, importance)


class _ParamCounter:
    """Exact total and active counts for many shapes from few meta builds.

    A decoder layer's count is the sum of its blocks (``layout.layer_parts``: attention, dense MLP, routed experts +
    router, shared expert, Mamba mixer), each depending only on the hidden size and its own sizes
    (``BLOCK_SIZE_KEYS``), plus the rest of the layer (norms: hidden only); the count of a shape is what lies outside
    the layers (embeddings, final norm, ``lm_head``: hidden only) plus its kept layers. Each build is a meta model with
    one layer of every kind the source has (depth pruning's :func:`keep_layers` keeps the per-layer config lists right)
    and fills the caches of every kind at once; a shape triggers a build only when one of its keys is new. Active
    counts subtract each MoE layer's unrouted experts (:func:`hf_minitron.counting.active_params`). The candidates the
    search keeps are re-counted with a full build (:meth:`exact`) as a check.
    """

    def __init__(self, model_config, layout: ArchitectureLayout) -> None:
        self.config, self.layout = model_config, layout
        source = _meta_model(_shaped_config(model_config, layout, {}))
        self.layer_parts = [layout.layer_parts(layer) for layer in layout.decoder_layers(source)]
        self.kinds = list(dict.fromkeys(self.layer_parts))  # distinct block sets, in order of first appearance
        self.base_config = source.config
        self._reduce_to([self.layer_parts.index(kind) for kind in self.kinds], source)
        self.part_paths = self._part_paths()
        self.parts: dict[tuple, int] = {}  # (kind, part, hidden, *part sizes) -> parameters
        self.inactive: dict[tuple, int] = {}  # (kind, hidden, experts, expert width) -> unrouted expert parameters
        self.rest: dict[tuple, int] = {}  # (kind, hidden) -> parameters of the layer outside its blocks (norms)
        self.outside: dict[int, int] = {}  # hidden -> parameters outside the decoder layers
        self.builds = 0

    def _reduce_to(self, representatives: list[int], source: nn.Module) -> None:
        """Base config of the builds: one source layer of each kind (all layers if the kinds do not survive)."""
        self.representatives = representatives
        if len(representatives) < len(self.layer_parts):
            keep_layers(source, self.layout, representatives)  # re-indexes block-type lists like depth pruning does
            config = source.config
            setattr(config, self.layout.num_layers_field, len(representatives))
            check = _meta_model(config)
            if [self.layout.layer_parts(layer) for layer in self.layout.decoder_layers(check)] == self.kinds:
                self.base_config = config
                return
            self.representatives = list(range(len(self.layer_parts)))  # a positional rule the lists cannot express
        self.base_config = copy.deepcopy(self.config)

    def _part_paths(self) -> dict[str, tuple[str, ...]]:
        """Module paths (relative to a layer) of each block, from the registry."""
        layout, moe, mamba = self.layout, self.layout.moe, self.layout.mamba
        paths = {"attention": (layout.attention,), "mlp": (layout.mlp,)}
        if moe is not None:
            paths["moe"] = (moe.experts, moe.router)
            paths["shared_expert"] = tuple(p for p in (*moe.shared_paths.values(), moe.shared_expert_gate) if p)
        if mamba is not None:
            paths["mamba"] = (mamba.mixer,)
        return paths

    def _part_keys(self, kind: frozenset[str], sizes: Mapping[str, int]) -> dict[str, tuple]:
        keys = {}
        for part in sorted(kind):
            fields = [k for k, block in BLOCK_SIZE_KEYS.items() if block == part]
            keys[part] = (kind, part, sizes["hidden_size"], *(sizes[k] for k in fields))
        return keys

    def _inactive_key(self, kind: frozenset[str], sizes: Mapping[str, int]) -> tuple:
        return (kind, sizes["hidden_size"], sizes.get("num_experts"), sizes.get("moe_intermediate_size"))

    def _known(self, sizes: Mapping[str, int]) -> bool:
        if sizes["hidden_size"] not in self.outside:
            return False
        for kind in self.kinds:
            if (kind, sizes["hidden_size"]) not in self.rest or self._inactive_key(kind, sizes) not in self.inactive:
                return False
            if any(k not in self.parts for k in self._part_keys(kind, sizes).values()):
                return False
        return True

    def _build(self, sizes: Mapping[str, int]) -> None:
        width = {k: v for k, v in sizes.items() if k != "num_hidden_layers"}
        model = _meta_model(_shaped_config(self.base_config, self.layout, width))
        self.builds += 1
        top_k = getattr(model.config, self.layout.moe.top_k_field) if self.layout.moe is not None else 0
        hidden = sizes["hidden_size"]
        in_layers = 0
        for i, layer in enumerate(self.layout.decoder_layers(model)):
            kind = self.layer_parts[self.representatives[i]]
            counts = dict.fromkeys(kind, 0)
            rest = 0
            for name, p in layer.named_parameters():
                owner = max(
                    ((part, len(path)) for part in kind for path in self.part_paths.get(part, ())
                     if name.startswith(path + ".")),
                    key=lambda t: t[1], default=None,
                )
                if owner is None:
                    rest += p.numel()
                else:
                    counts[owner[0]] += p.numel()
            for part, key in self._part_keys(kind, sizes).items():
                self.parts[key] = counts[part]
            self.rest[(kind, hidden)] = rest
            self.inactive[self._inactive_key(kind, sizes)] = inactive_layer_params(layer, self.layout, top_k)
            in_layers += _unique_numel(layer)
        self.outside[hidden] = _unique_numel(model) - in_layers

    def prepare(self, shapes: Sequence[Mapping[str, int]]) -> None:
        """Fill the caches for ``shapes``: one build per shape that brings a new (block, sizes) key."""
        for s in shapes:
            if not self._known(s):
                self._build(s)

    def kept_layers(self, sizes: Mapping[str, int], prune_config: MinitronPruneConfig, importance: ImportanceScores | None) -> list[int]:
        """Source indices of the layers pruning to ``sizes`` keeps, ranked by ``importance`` as pruning ranks them (the
        first ones when there are no scores and every layer is alike: the count is the same)."""
        num, target = len(self.layer_parts), sizes["num_hidden_layers"]
        if target == num:
            return list(range(num))
        if importance is None and len(self.kinds) == 1:
            return list(range(target))
        return select_layers(num, prune_config, target, importance)

    def __call__(self, sizes: Mapping[str, int], kept: Sequence[int]) -> tuple[int, int]:
        """``(total, active)`` parameters of ``sizes`` keeping source layers ``kept``."""
        if not self._known(sizes):
            self._build(sizes)
        total = self.outside[sizes["hidden_size"]]
        inactive = 0
        for i in kept:
            kind = self.layer_parts[i]
            total += self.rest[(kind, sizes["hidden_size"])] + sum(self.parts[k] for k in self._part_keys(kind, sizes).values())
            inactive += self.inactive[self._inactive_key(kind, sizes)]
        return total, total - inactive

    def exact(self, sizes: Mapping[str, int], kept: Sequence[int]) -> tuple[int, int]:
        """``(total, active)`` from a full meta build of the pruned shape."""
        from ..counting import active_params, count_params

        return count_params(self.config, sizes, kept_layers=kept), active_params(self.config, sizes, kept_layers=kept)
