"""Architecture search: every pruned shape within ±tolerance of a parameter target, ranked by held-out loss.

Follows the first Minitron paper (Muralidharan et al., 2024, §3): enumerate every shape (layers, hidden size,
attention heads, KV heads, MLP size) whose parameter count lies within ±5% of a target, prune each one from a
single importance pass, and keep the best by validation loss, optionally after a short distillation of every
candidate (the paper finds rankings settle after ~300 steps; LoRA can stand in for full training to save memory).

Example:
    >>> from hf_minitron import MinitronPruneConfig, estimate_importance, prune_model
    >>> from hf_minitron.search import search_architectures
    >>> scores = estimate_importance(model, calibration_data)  # doctest: +SKIP
    >>> result = search_architectures(model, scores, target_params=0.6, eval_dataset=held_out)  # doctest: +SKIP
    >>> print(result.to_table())  # doctest: +SKIP
    >>> small = prune_model(model, result.best.config, importance=scores)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import itertools
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.utils import logging

from .architectures import ArchitectureLayout, get_layout
from .config import MinitronPruneConfig
from .data import batch_samples, to_samples
from .importance import ImportanceScores, estimate_importance
from .pruning import prune_model, resolve_target_sizes
from .validation import check_prunable_model


logger = logging.get_logger(__name__)

# Order of the search axes in shape tuples, tables and the deterministic tie-break.
SEARCH_AXES = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size")
SEARCH_PRESETS = ("all", "width", "depth")
SELECTIONS = ("spread", "closest")
RESULTS_NAME = "architecture_search.json"

# Defaults of the search axes (fractions of the source size kept at least).
_MIN_HIDDEN_FRACTION = 0.5
_MIN_INTERMEDIATE_FRACTION = 0.25
_MIN_LAYERS_FRACTION = 0.5

RetrainFn = Callable[..., nn.Module]


# ---------------------------------------------------------------------------------------------------- results
@dataclass
class Candidate:
    """One pruned shape of the search and its scores.

    Attributes:
        config: The :class:`MinitronPruneConfig` that prunes the source to this shape (all five sizes explicit;
            importance settings copied from the search's ``prune_config``).
        num_params: Exact parameter count of the pruned model (tied embeddings counted once).
        sizes: The target sizes (``SEARCH_AXES`` plus the unchanged ``head_dim``).
        param_fraction: ``num_params`` / source parameters.
        target_deviation: ``num_params / target_params - 1`` (within ``±tolerance``).
        zero_shot_loss: Mean next-token cross-entropy on the held-out data right after pruning (no training).
        retrain_loss: The same held-out loss after ``retrain_steps`` of distillation (``None`` without retraining).
        retrain_curve: Held-out loss after intermediate retraining steps, ``{step: loss}`` (includes the last step).
        rank: 1-based position in the final ranking.

    Example:
        >>> result.best.config.to_dict()["hidden_size"]  # doctest: +SKIP
        512
    """

    config: MinitronPruneConfig
    num_params: int
    sizes: dict[str, int]
    param_fraction: float = 0.0
    target_deviation: float = 0.0
    zero_shot_loss: float | None = None
    retrain_loss: float | None = None
    retrain_curve: dict[int, float] = field(default_factory=dict)
    rank: int | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """``(layers, hidden, heads, kv_heads, intermediate)``."""
        return tuple(self.sizes[a] for a in SEARCH_AXES)

    @property
    def name(self) -> str:
        """A compact label, e.g. ``L30-H576-A9/3-F1024`` (layers, hidden, heads/KV heads, MLP)."""
        layers, hidden, heads, kv, inter = self.shape
        return f"L{layers}-H{hidden}-A{heads}/{kv}-F{inter}"

    @property
    def score(self) -> float | None:
        """The loss the candidate is ranked by: ``retrain_loss`` when retrained, else ``zero_shot_loss``."""
        return self.retrain_loss if self.retrain_loss is not None else self.zero_shot_loss

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rank": self.rank,
            "num_params": self.num_params,
            "param_fraction": self.param_fraction,
            "target_deviation": self.target_deviation,
            "sizes": dict(self.sizes),
            "zero_shot_loss": self.zero_shot_loss,
            "retrain_loss": self.retrain_loss,
            "retrain_curve": {str(k): v for k, v in sorted(self.retrain_curve.items())},
            "config": self.config.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Candidate":
        return cls(
            config=MinitronPruneConfig.from_dict(data["config"]),
            num_params=int(data["num_params"]),
            sizes={k: int(v) for k, v in data["sizes"].items()},
            param_fraction=float(data.get("param_fraction", 0.0)),
            target_deviation=float(data.get("target_deviation", 0.0)),
            zero_shot_loss=data.get("zero_shot_loss"),
            retrain_loss=data.get("retrain_loss"),
            retrain_curve={int(k): float(v) for k, v in (data.get("retrain_curve") or {}).items()},
            rank=data.get("rank"),
        )


@dataclass
class SearchResult:
    """The ranked candidates of :func:`search_architectures` (best first) and how they were found.

    Behaves like the list of candidates: ``result[0]``, ``len(result)``, ``for c in result``.

    Attributes:
        candidates: Ranked best first (see :func:`search_architectures` for the ranking rule).
        source_sizes: The source model's sizes.
        source_params: The source model's parameter count.
        target_params: The absolute parameter target.
        tolerance: Relative tolerance around ``target_params``.
        ranked_by: ``"retrain_loss"``, ``"zero_shot_loss"`` or ``"param_distance"`` (no held-out data given).
        num_valid_shapes: Valid shapes enumerated from the search space.
        num_within_tolerance: Of those, how many lie within ``±tolerance`` of the target (before ``max_candidates``).
        retrain_steps: Distillation steps per candidate (0: zero-shot only).
        use_lora: Whether the short retraining trained LoRA adapters instead of all weights.
        selection: How ``max_candidates`` were chosen among ``num_within_tolerance``.
        seconds: Wall time of the search.

    Example:
        >>> print(result.to_table())  # doctest: +SKIP
        >>> result.save("search_out")  # doctest: +SKIP
        >>> SearchResult.load("search_out").best.name  # doctest: +SKIP
    """

    candidates: list[Candidate]
    source_sizes: dict[str, int]
    source_params: int
    target_params: int
    tolerance: float
    ranked_by: str
    num_valid_shapes: int = 0
    num_within_tolerance: int = 0
    retrain_steps: int = 0
    use_lora: bool = False
    selection: str = "spread"
    seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.candidates)

    def __iter__(self):
        return iter(self.candidates)

    def __getitem__(self, index):
        return self.candidates[index]

    @property
    def best(self) -> Candidate:
        """The winning candidate."""
        return self.candidates[0]

    @property
    def best_config(self) -> MinitronPruneConfig:
        """The winner's :class:`MinitronPruneConfig`, ready for :func:`prune_model`."""
        return self.best.config

    def ranking(self, by: str = "score") -> list[str]:
        """Candidate names ordered best first by ``by``: ``"score"`` (the final ranking), ``"zero_shot_loss"``,
        ``"retrain_loss"`` or ``"retrain_loss@<step>"`` (an intermediate evaluation)."""
        if by == "score":
            return [c.name for c in self.candidates]
        return [self.candidates[i].name for i in sorted(range(len(self)), key=lambda i: (_metric(self.candidates[i], by), i))]

    def to_table(self) -> str:
        """The candidates as a markdown table, best first."""
        steps = sorted({s for c in self.candidates for s in c.retrain_curve if s != self.retrain_steps})
        header = ["rank", "shape", "layers", "hidden", "heads", "KV heads", "MLP", "params", "% source", "Δ target"]
        header += ["zero-shot loss"] + [f"loss @{s}" for s in steps]
        if self.retrain_steps:
            header.append(f"retrain loss @{self.retrain_steps}" + (" (LoRA)" if self.use_lora else ""))
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        fmt = lambda x: "–" if x is None else f"{x:.4f}"  # noqa: E731
        for c in self.candidates:
            row = [str(c.rank), f"`{c.name}`", *map(str, c.shape), f"{c.num_params:,}"]
            row += [f"{100 * c.param_fraction:.1f}%", f"{100 * c.target_deviation:+.2f}%", fmt(c.zero_shot_loss)]
            row += [fmt(c.retrain_curve.get(s)) for s in steps]
            if self.retrain_steps:
                row.append(fmt(c.retrain_loss))
            lines.append("| " + " | ".join(row) + " |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "candidates"}
        out["candidates"] = [c.to_dict() for c in self.candidates]
        out["best"] = self.best.name if self.candidates else None
        out["best_config"] = self.best.config.to_dict() if self.candidates else None
        return out

    def save(self, path: str | os.PathLike) -> str:
        """Write every candidate and the winner's config as JSON; returns the file written.

        A directory (existing, or a path without a ``.json`` suffix) gets ``architecture_search.json`` and the
        winner's ``minitron_prune_config.json`` (loadable with ``MinitronPruneConfig.from_pretrained(dir)``).
        """
        path = os.fspath(path)
        is_dir = os.path.isdir(path) or not path.endswith(".json")
        file = os.path.join(path, RESULTS_NAME) if is_dir else path
        os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
        tmp = f"{file}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")
        os.replace(tmp, file)
        if is_dir and self.candidates:
            self.best.config.save_pretrained(path)
        return file

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SearchResult":
        """Read a result written by :meth:`save` (a JSON file or the directory holding it)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, RESULTS_NAME)
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        known = {f.name for f in dataclasses.fields(cls)} - {"candidates"}
        return cls(candidates=[Candidate.from_dict(c) for c in data["candidates"]], **{k: v for k, v in data.items() if k in known})


def _metric(candidate: Candidate, by: str) -> float:
    if by == "zero_shot_loss":
        value = candidate.zero_shot_loss
    elif by == "retrain_loss":
        value = candidate.retrain_loss
    elif by.startswith("retrain_loss@"):
        value = candidate.retrain_curve.get(int(by.split("@", 1)[1]))
    else:
        raise ValueError(f"Unknown ranking {by!r}: use 'score', 'zero_shot_loss', 'retrain_loss' or 'retrain_loss@<step>'.")
    return math.inf if value is None or math.isnan(value) else value


def spearman_rho(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation of two equally long score lists (average ranks for ties).

    Example:
        >>> spearman_rho([1.0, 2.0, 3.0], [10.0, 30.0, 20.0])
        0.5
    """
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"Need two lists of equal length >= 2, got {len(x)} and {len(y)}.")

    def ranks(values: Sequence[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2 + 1
            i = j + 1
        return out

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / var if var else float("nan")


# ------------------------------------------------------------------------------------------- search space
def _auto_step(size: int) -> int:
    """Largest power of two <= size / 8 (so a default axis has ~4-8 values above half the source)."""
    return max(1, 2 ** int(math.floor(math.log2(max(1.0, size / 8)))))


def _width_values(size: int, step: int, min_fraction: float) -> list[int]:
    values = {size}
    value = (size // step) * step
    while value >= max(1, math.ceil(min_fraction * size)):
        values.add(value)
        value -= step
    return sorted(values, reverse=True)


def default_search_space(
    source_sizes: Mapping[str, int], multiple_of: int | None = None, preset: str = "all"
) -> dict[str, list[int]]:
    """The default axes derived from the source sizes (largest first).

    - ``hidden_size``: the source size and every multiple of ``multiple_of`` (default: the largest power of two
      <= hidden / 8) down to 50% of the source;
    - ``intermediate_size``: likewise down to 25%;
    - ``num_key_value_heads``: the divisors of the source's KV heads;
    - ``num_attention_heads``: every multiple of a KV-head count up to the source (GQA groups stay at most the
      source's size); invalid pairs are filtered later;
    - ``num_hidden_layers``: the source depth down to 50%.

    ``preset="width"`` fixes the depth at the source's (the paper's width search); ``"depth"`` fixes every width
    axis and varies only the layers.

    Example:
        >>> default_search_space({"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 8,
        ...                        "num_key_value_heads": 2, "num_hidden_layers": 4})["hidden_size"]
        [64, 56, 48, 40, 32]
    """
    if preset not in SEARCH_PRESETS:
        raise ValueError(f"`search_space` preset must be one of {SEARCH_PRESETS}, got {preset!r}.")
    hidden, inter = source_sizes["hidden_size"], source_sizes["intermediate_size"]
    heads, kv, layers = source_sizes["num_attention_heads"], source_sizes["num_key_value_heads"], source_sizes["num_hidden_layers"]
    kv_values = sorted((d for d in range(1, kv + 1) if kv % d == 0), reverse=True)
    head_values = sorted({h for d in kv_values for h in range(d, heads + 1, d)}, reverse=True)
    space = {
        "num_hidden_layers": list(range(layers, max(1, math.ceil(_MIN_LAYERS_FRACTION * layers)) - 1, -1)),
        "hidden_size": _width_values(hidden, multiple_of or _auto_step(hidden), _MIN_HIDDEN_FRACTION),
        "num_attention_heads": head_values,
        "num_key_value_heads": kv_values,
        "intermediate_size": _width_values(inter, multiple_of or _auto_step(inter), _MIN_INTERMEDIATE_FRACTION),
    }
    if preset == "width":
        space["num_hidden_layers"] = [layers]
    elif preset == "depth":
        space.update({a: [source_sizes[a]] for a in SEARCH_AXES if a != "num_hidden_layers"})
    return space


def _resolve_search_space(
    source: Mapping[str, int], search_space: Mapping[str, Sequence[int]] | str | None, multiple_of: int | None
) -> dict[str, list[int]]:
    if multiple_of is not None and (not isinstance(multiple_of, int) or isinstance(multiple_of, bool) or multiple_of < 1):
        raise ValueError(f"`multiple_of` must be a positive integer (e.g. 64, 128 or 256) or None, got {multiple_of!r}.")
    if search_space is None or isinstance(search_space, str):
        space = default_search_space(source, multiple_of, search_space or "all")
    elif isinstance(search_space, Mapping):
        unknown = sorted(set(search_space) - set(SEARCH_AXES))
        if unknown:
            raise ValueError(f"Unknown search axes {unknown}; valid axes are {list(SEARCH_AXES)}.")
        space = default_search_space(source, multiple_of)
        for axis, values in search_space.items():
            values = [values] if isinstance(values, int) else list(values)
            if not values:
                raise ValueError(f"search_space[{axis!r}] is empty; give at least one value (e.g. [{source[axis]}]).")
            bad = [v for v in values if not isinstance(v, int) or isinstance(v, bool) or v < 1]
            if bad:
                raise ValueError(f"search_space[{axis!r}] must hold positive integers, got {bad}.")
            too_big = [v for v in values if v > source[axis]]
            if too_big:
                raise ValueError(
                    f"search_space[{axis!r}] has {too_big} > the source model's {source[axis]}: pruning can only "
                    f"shrink; use values <= {source[axis]}."
                )
            space[axis] = sorted(set(values), reverse=True)
    else:
        raise TypeError(f"`search_space` must be a dict of axis -> values, one of {SEARCH_PRESETS}, or None.")
    if multiple_of is not None:
        for axis in ("hidden_size", "intermediate_size"):
            kept = [v for v in space[axis] if v % multiple_of == 0 or v == source[axis]]
            if not kept:
                raise ValueError(
                    f"No {axis} in {space[axis]} is a multiple of multiple_of={multiple_of}; add such values to "
                    f"`search_space[{axis!r}]` or lower `multiple_of`."
                )
            space[axis] = kept
    return space


def enumerate_shapes(
    source_sizes: Mapping[str, int], search_space: Mapping[str, Sequence[int]] | str | None = None, multiple_of: int | None = None
) -> list[dict[str, int]]:
    """Every valid target shape of the search space (the cross product of the axes), in a fixed order.

    A shape is valid when :func:`~hf_minitron.pruning.resolve_target_sizes` accepts it: no size above the source,
    heads a multiple of KV heads with at most the source's heads per KV group, and hidden a multiple of heads
    (transformers refuses to save other Llama-style configs). ``head_dim`` stays the source's.

    Example:
        >>> shapes = enumerate_shapes(model_sizes, {"num_hidden_layers": [4], "hidden_size": [64, 48]})  # doctest: +SKIP
    """
    space = _resolve_search_space(source_sizes, search_space, multiple_of)
    shapes = []
    for values in itertools.product(*(space[a] for a in SEARCH_AXES)):
        sizes = dict(zip(SEARCH_AXES, values))
        if sizes["num_attention_heads"] % sizes["num_key_value_heads"] or sizes["hidden_size"] % sizes["num_attention_heads"]:
            continue  # fast path for the common invalid pairs; resolve_target_sizes below has the last word
        try:
            target = resolve_target_sizes(dict(source_sizes), MinitronPruneConfig(**sizes))
        except ValueError:
            continue
        shapes.append(target)
    return shapes


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


def predict_num_params(model_or_config, sizes: Mapping[str, int] | MinitronPruneConfig) -> int:
    """Exact parameter count of ``model_or_config`` pruned to ``sizes``, with no weights in memory.

    Builds the pruned shape on the meta device with stock ``AutoModelForCausalLM.from_config`` and counts its
    unique parameters, so biases, norms and tied (counted once) or untied embeddings are right for every family
    the registry supports.

    Example:
        >>> predict_num_params(model, MinitronPruneConfig(hidden_size=48, num_hidden_layers=3))  # doctest: +SKIP
        61616
    """
    config = getattr(model_or_config, "config", model_or_config)
    layout = get_layout(config.model_type)
    source = layout.read_sizes(config)
    if isinstance(sizes, MinitronPruneConfig):
        sizes = resolve_target_sizes(source, sizes)
    return _unique_numel(_meta_model(_shaped_config(config, layout, sizes)))


class _ParamCounter:
    """Exact counts for many shapes from few 1-layer meta models.

    In every registered family a decoder layer is an attention block whose size depends on (hidden, heads, KV
    heads), an MLP block depending on (hidden, MLP size) and norms depending on hidden, and all layers are alike;
    so the count is ``outside(hidden) + layers * (attention + mlp + norms)``, and one 1-layer build per new
    attention or MLP key fills the caches. The selected candidates are re-counted with a full meta build as a check.
    """

    def __init__(self, model_config, layout: ArchitectureLayout) -> None:
        self.config, self.layout = model_config, layout
        self.attention: dict[tuple[int, int, int], int] = {}
        self.mlp: dict[tuple[int, int], int] = {}
        self.outside: dict[int, tuple[int, int]] = {}  # hidden -> (outside the layers, layer minus attention/MLP)
        self.builds = 0

    def _build(self, sizes: Mapping[str, int]) -> None:
        model = _meta_model(_shaped_config(self.config, self.layout, {**sizes, "num_hidden_layers": 1}))
        self.builds += 1
        layer = self.layout.decoder_layers(model)[0]
        attention = _unique_numel(layer.get_submodule(self.layout.attention))
        mlp = _unique_numel(layer.get_submodule(self.layout.mlp))
        per_layer = _unique_numel(layer)
        hidden = sizes["hidden_size"]
        self.attention[(hidden, sizes["num_attention_heads"], sizes["num_key_value_heads"])] = attention
        self.mlp[(hidden, sizes["intermediate_size"])] = mlp
        self.outside[hidden] = (_unique_numel(model) - per_layer, per_layer - attention - mlp)

    def prepare(self, shapes: Sequence[Mapping[str, int]]) -> None:
        """Fill the caches for ``shapes`` with as few builds as possible (one per new attention / MLP key pair)."""
        needs: dict[int, tuple[list, list]] = {}
        for s in shapes:
            attention, mlp = needs.setdefault(s["hidden_size"], ([], []))
            key = (s["num_attention_heads"], s["num_key_value_heads"])
            if key not in attention and (s["hidden_size"], *key) not in self.attention:
                attention.append(key)
            if s["intermediate_size"] not in mlp and (s["hidden_size"], s["intermediate_size"]) not in self.mlp:
                mlp.append(s["intermediate_size"])
        for hidden, (attention, mlp) in needs.items():
            any_heads = next((s["num_attention_heads"], s["num_key_value_heads"]) for s in shapes if s["hidden_size"] == hidden)
            any_inter = next(s["intermediate_size"] for s in shapes if s["hidden_size"] == hidden)
            for i in range(max(len(attention), len(mlp))):
                heads, kv = attention[i] if i < len(attention) else any_heads
                inter = mlp[i] if i < len(mlp) else any_inter
                self._build({"hidden_size": hidden, "num_attention_heads": heads, "num_key_value_heads": kv,
                             "intermediate_size": inter, "num_hidden_layers": 1})

    def __call__(self, sizes: Mapping[str, int]) -> int:
        hidden = sizes["hidden_size"]
        attention_key = (hidden, sizes["num_attention_heads"], sizes["num_key_value_heads"])
        mlp_key = (hidden, sizes["intermediate_size"])
        if attention_key not in self.attention or mlp_key not in self.mlp:
            self._build(sizes)
        outside, norms = self.outside[hidden]
        return outside + sizes["num_hidden_layers"] * (self.attention[attention_key] + self.mlp[mlp_key] + norms)

    def exact(self, sizes: Mapping[str, int]) -> int:
        return _unique_numel(_meta_model(_shaped_config(self.config, self.layout, sizes)))


# ----------------------------------------------------------------------------------------------- selection
def _tie_key(c: Candidate, target: int) -> tuple:
    """Deterministic order among equals: closest to the target, then the larger shape (layers, hidden, ...)."""
    return (abs(c.num_params - target), tuple(-v for v in c.shape))


def _select(candidates: list[Candidate], k: int, how: str, source: Mapping[str, int], target: int) -> list[Candidate]:
    ordered = sorted(candidates, key=lambda c: _tie_key(c, target))
    if len(ordered) <= k or how == "closest":
        return ordered[:k]
    # "spread": greedy farthest-point sampling in relative-size space, starting from the closest to the target.
    points = [[c.sizes[a] / source[a] for a in SEARCH_AXES] for c in ordered]
    chosen = [0]
    dist = [math.dist(points[0], p) for p in points]
    while len(chosen) < k:
        best = max(range(len(ordered)), key=lambda i: (dist[i], -i))  # ties -> earlier in the tie order
        chosen.append(best)
        dist = [min(d, math.dist(points[best], p)) for d, p in zip(dist, points)]
    return [ordered[i] for i in sorted(chosen)]


# --------------------------------------------------------------------------------------------- evaluation
def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def heldout_loss(model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]]) -> float:
    """Mean next-token cross-entropy (nats per predicted token) of ``model`` on padded ``batches``.

    Example:
        >>> from hf_minitron.data import batch_samples
        >>> heldout_loss(model, batch_samples(samples, batch_size=4))  # doctest: +SKIP
        3.21
    """
    was_training = model.training
    model.eval()
    device = _model_device(model)
    total, count = 0.0, 0
    try:
        for batch in batches:
            ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
            targets, valid = ids[:, 1:], mask[:, 1:].bool()
            nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
            total += float(nll[valid].double().sum())
            count += int(valid.sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("The held-out data has no token to predict: give sequences of at least 2 tokens.")
    return total / count


def lora_target_modules(layout: ArchitectureLayout) -> list[str]:
    """The attention and MLP projection names of a family, as PEFT ``target_modules`` (never ``lm_head``)."""
    paths = (layout.q_proj, layout.k_proj, layout.v_proj, layout.o_proj, layout.gate_proj, layout.up_proj, layout.down_proj)
    return sorted({p.rsplit(".", 1)[-1] for p in paths if p is not None})


class _EvalAtSteps(TrainerCallback):
    """Records the held-out loss at the given global steps of a retraining run."""

    def __init__(self, steps: Sequence[int], batches: Sequence[Mapping[str, torch.Tensor]], curve: dict[int, float]) -> None:
        self.steps, self.batches, self.curve = set(steps), batches, curve

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps and model is not None:
            self.curve[state.global_step] = heldout_loss(model, self.batches)


def distill_candidate(
    student: nn.Module,
    teacher: nn.Module,
    train_dataset,
    max_steps: int,
    seed: int = 0,
    tokenizer=None,
    use_lora: bool = False,
    lora_config=None,
    training_kwargs: Mapping[str, Any] | None = None,
    callbacks: Sequence[Any] = (),
) -> nn.Module:
    """Short Minitron distillation of one pruned ``student`` from its frozen ``teacher`` (the default ``retrain_fn``).

    Runs :class:`~hf_minitron.distillation.DistillationTrainer` (forward-KL logit loss) for ``max_steps`` with a
    fixed ``seed`` and a constant learning rate, so every candidate sees the same batches in the same order, and
    the loss after ``n`` steps equals that of an ``n``-step run. With ``use_lora`` the student is wrapped in a PEFT
    LoRA adapter on every attention and MLP projection (sizes stay those of the pruned shape) and the PEFT model
    is returned.

    Args:
        student: The pruned model (trained in place).
        teacher: The unpruned source model (frozen by the trainer).
        train_dataset: A ``datasets.Dataset`` with an ``input_ids`` column.
        max_steps: Optimizer steps.
        seed: Seed of the data order, dropout and LoRA initialisation.
        tokenizer: Padding / special tokens for the trainer's collator (required by TRL).
        use_lora: Train LoRA adapters instead of all weights.
        lora_config: A ``peft.LoraConfig`` (default: rank 16, alpha 32 on q/k/v/o/gate/up/down).
        training_kwargs: Overrides of the :class:`~hf_minitron.distillation.DistillationConfig` defaults
            (``per_device_train_batch_size=4``, ``learning_rate=1e-4`` (``5e-4`` with LoRA),
            ``lr_scheduler_type="constant"``, no activation checkpointing, bf16 only on a bf16 GPU, no saving,
            no reporting).
        callbacks: Extra ``TrainerCallback``\\s.

    Example:
        >>> student = distill_candidate(student, teacher, train_ds, max_steps=20, tokenizer=tokenizer)  # doctest: +SKIP
    """
    try:
        from hf_minitron.distillation import DistillationConfig, DistillationTrainer
    except ImportError as err:  # pragma: no cover - the module ships with the package
        raise ImportError(
            "Short retraining needs `hf_minitron.distillation` (DistillationTrainer); pass your own `retrain_fn=`."
        ) from err
    from transformers import set_seed

    if tokenizer is None:
        raise ValueError("Retraining candidates needs `tokenizer=` (TRL's trainer builds its collator from it).")
    peft_config = None
    if use_lora:
        from peft import LoraConfig

        peft_config = lora_config or LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules=lora_target_modules(get_layout(student)), task_type="CAUSAL_LM"
        )
    with tempfile.TemporaryDirectory(prefix="hf-minitron-search-") as out:
        kwargs = dict(
            output_dir=out,
            max_steps=max_steps,
            per_device_train_batch_size=4,
            learning_rate=5e-4 if use_lora else 1e-4,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            seed=seed,
            data_seed=seed,
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            logging_steps=max(1, max_steps // 5),
            disable_tqdm=True,
            dataloader_num_workers=0,
            # TRL defaults to bf16 autocast and activation checkpointing: slow on CPUs, and needless for short runs.
            bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        )
        names = {f.name for f in dataclasses.fields(DistillationConfig)}
        kwargs["activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"] = False
        kwargs.update(training_kwargs or {})
        args = DistillationConfig(**kwargs)
        set_seed(seed)
        trainer = DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=train_dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=list(callbacks),
        )
        trainer.train()
        trained = trainer.model
        trainer.accelerator.free_memory()
        del trainer
    return trained


def _restore(model: nn.Module, grad_flags: dict[str, bool], training: bool) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(grad_flags[name])
    model.train(training)


def _free(collect: bool) -> None:
    """Return a freed candidate's memory (a full ``gc`` pass costs ~1 s, so only for real-sized models)."""
    if collect:
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------- search
def _resolve_target(target_params: int | float, source_params: int) -> int:
    if isinstance(target_params, bool) or not isinstance(target_params, (int, float)):
        raise TypeError(f"`target_params` must be an int (parameters) or a float fraction of the source, got {target_params!r}.")
    if isinstance(target_params, float) and target_params > 1.0 and target_params.is_integer():
        target_params = int(target_params)  # a count written as a float (YAML `8.0e7`, a float CLI flag)
    if isinstance(target_params, float):
        if not 0.0 < target_params <= 1.0:
            raise ValueError(
                f"A fractional `target_params` must be in (0, 1], got {target_params}: pruning can only shrink "
                f"(pass an absolute count <= {source_params:,} or a fraction such as 0.6)."
            )
        return int(round(target_params * source_params))
    if target_params < 1:
        raise ValueError(f"`target_params` must be positive, got {target_params}.")
    if target_params > source_params:
        raise ValueError(
            f"target_params={target_params:,} is larger than the source model ({source_params:,} parameters): pruning "
            f"can only shrink; choose <= {source_params:,} or a fraction such as 0.6."
        )
    return int(target_params)


def search_architectures(
    model: nn.Module,
    importance: ImportanceScores | None,
    target_params: int | float,
    tolerance: float = 0.05,
    search_space: Mapping[str, Sequence[int]] | str | None = None,
    max_candidates: int = 8,
    retrain_steps: int = 0,
    train_dataset: Any = None,
    eval_dataset: Any = None,
    use_lora: bool = False,
    *,
    multiple_of: int | None = None,
    selection: str = "spread",
    prune_config: MinitronPruneConfig | None = None,
    tokenizer=None,
    seq_length: int = 512,
    eval_batch_size: int = 8,
    seed: int = 0,
    retrain_eval_steps: Sequence[int] = (),
    training_kwargs: Mapping[str, Any] | None = None,
    lora_config=None,
    retrain_fn: RetrainFn | None = None,
    calibration_data: Any = None,
) -> SearchResult:
    """Find the best pruned shape of ``model`` with about ``target_params`` parameters (Minitron §3).

    1. Enumerate every valid shape of ``search_space`` and keep those whose exact parameter count (meta-device
       build, tied embeddings counted once) is within ``±tolerance`` of the target.
    2. If more than ``max_candidates`` remain, choose deterministically by ``selection``: ``"spread"`` (default:
       the shape closest to the target, then greedily the shape farthest from those chosen, in sizes relative to
       the source, so the candidates cover the space) or ``"closest"`` (the ones nearest the target).
    3. With ``eval_dataset``, prune a copy of ``model`` to each candidate (one at a time, from the one
       ``importance`` pass) and measure the zero-shot held-out loss.
    4. With ``retrain_steps > 0``, distill each pruned copy from ``model`` for ``retrain_steps`` on
       ``train_dataset`` (same data, order, seed and budget for all; full weights, or LoRA adapters with
       ``use_lora``) and measure the held-out loss again.

    Candidates are ranked by the retrained loss when ``retrain_steps > 0``, else by the zero-shot loss, else (no
    held-out data) by distance to the target. Equal scores are broken by distance to the target, then by the
    larger shape (layers, hidden, heads, KV heads, MLP), so the order is deterministic.

    Args:
        model: The source ``*ForCausalLM`` (not modified; it is the teacher when retraining).
        importance: Scores from :func:`~hf_minitron.estimate_importance` on ``model``; estimated from
            ``calibration_data`` when ``None``.
        target_params: Absolute parameter count (int) or fraction of the source's parameters (float in (0, 1]).
        tolerance: Relative window around the target, in (0, 1).
        search_space: ``{axis: [values]}`` overriding any default axis (axes: ``num_hidden_layers``,
            ``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size``), or a preset:
            ``"all"`` (default axes, see :func:`default_search_space`), ``"width"`` (depth fixed, the paper's width
            search) or ``"depth"`` (only layers vary).
        max_candidates: Most candidates to evaluate.
        retrain_steps: Distillation steps per candidate (0: zero-shot ranking only).
        train_dataset: Retraining data: anything :func:`hf_minitron.data.to_samples` accepts.
        eval_dataset: Held-out data for the ranking loss, same formats.
        use_lora: Retrain LoRA adapters (PEFT) on the pruned model instead of all its weights.
        multiple_of: Keep only hidden and MLP sizes that are multiples of this (e.g. 64/128/256 for fast kernels;
            the source's own size is always allowed); also the step of the default axes.
        selection: ``"spread"`` or ``"closest"`` (see 2.).
        prune_config: Importance / pruning settings copied into every candidate's config (e.g.
            ``depth_criterion``, ``rescale_norms``); its target sizes are ignored.
        tokenizer: Needed for text datasets and for retraining.
        seq_length: Tokens per sample when datasets are text.
        eval_batch_size: Sequences per held-out forward pass.
        seed: Seed of every retraining run.
        retrain_eval_steps: Also record the held-out loss after these steps (``Candidate.retrain_curve``); with
            the constant learning rate of the default retraining, the loss at step ``n`` equals an ``n``-step run.
        training_kwargs: Overrides of the retraining :class:`~hf_minitron.distillation.DistillationConfig`.
        lora_config: A ``peft.LoraConfig`` for ``use_lora`` (default rank 16 on q/k/v/o/gate/up/down).
        retrain_fn: Replaces the default :func:`distill_candidate`; called as ``retrain_fn(student, teacher=model,
            train_dataset=Dataset, max_steps=retrain_steps, seed=seed)`` and returns the trained model.
        calibration_data: Used to estimate ``importance`` once when it is ``None``.

    Returns:
        A :class:`SearchResult`: the candidates best first, each with ``.config``, ``.num_params`` and its scores.

    Raises:
        ValueError: the target exceeds the source, ``tolerance`` is out of range, the search space is invalid,
            no valid shape lies within the tolerance (the message says what to change), or data is missing.

    Example:
        >>> n = sum(p.numel() for p in model.parameters())  # doctest: +SKIP
        >>> result = search_architectures(model, scores, target_params=int(0.6 * n), max_candidates=6)  # doctest: +SKIP
        >>> [(c.name, c.num_params) for c in result]  # doctest: +SKIP
    """
    start = time.perf_counter()
    layout = check_prunable_model(model)
    source = layout.read_sizes(model.config)
    source_params = _unique_numel(model)
    target = _resolve_target(target_params, source_params)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0.0 < tolerance < 1.0:
        raise ValueError(f"`tolerance` must be a fraction in (0, 1) such as 0.05 (±5%), got {tolerance!r}.")
    if isinstance(max_candidates, bool) or not isinstance(max_candidates, int) or max_candidates < 1:
        raise ValueError(f"`max_candidates` must be a positive integer, got {max_candidates!r}.")
    if isinstance(retrain_steps, bool) or not isinstance(retrain_steps, int) or retrain_steps < 0:
        raise ValueError(f"`retrain_steps` must be a non-negative integer, got {retrain_steps!r}.")
    if selection not in SELECTIONS:
        raise ValueError(f"`selection` must be one of {SELECTIONS}, got {selection!r}.")
    eval_steps = sorted(set(retrain_eval_steps))
    if any(not isinstance(s, int) or not 0 < s <= retrain_steps for s in eval_steps):
        raise ValueError(f"`retrain_eval_steps` must be steps in 1..retrain_steps={retrain_steps}, got {list(retrain_eval_steps)}.")
    if eval_steps and retrain_fn is not None:
        raise ValueError("`retrain_eval_steps` works with the default retraining only; record them in your `retrain_fn`.")
    if retrain_steps > 0:
        if train_dataset is None:
            raise ValueError("`retrain_steps > 0` needs `train_dataset=` (the short distillation data).")
        if eval_dataset is None:
            raise ValueError("`retrain_steps > 0` needs `eval_dataset=`: candidates are ranked by held-out loss.")
    elif use_lora:
        logger.warning("`use_lora=True` has no effect with `retrain_steps=0` (LoRA only applies to retraining).")
    base_config = prune_config or MinitronPruneConfig()
    if base_config.layers_to_drop:
        raise ValueError("`prune_config.layers_to_drop` conflicts with a search over `num_hidden_layers`; leave it unset.")

    # 1. Enumerate and count.
    shapes = enumerate_shapes(source, search_space, multiple_of)
    if not shapes:
        raise ValueError(
            f"The search space {_resolve_search_space(source, search_space, multiple_of)} has no valid shape: hidden_size "
            "must be a multiple of num_attention_heads, itself a multiple of num_key_value_heads; add such values."
        )
    counter = _ParamCounter(model.config, layout)
    counter.prepare(shapes)
    counted = [
        Candidate(config=dataclasses.replace(base_config, **{a: s[a] for a in SEARCH_AXES}), num_params=counter(s), sizes=s)
        for s in shapes
    ]
    low, high = target * (1 - tolerance), target * (1 + tolerance)
    within = [c for c in counted if low <= c.num_params <= high]
    if not within:
        nearest = min(counted, key=lambda c: _tie_key(c, target))
        smallest = min(c.num_params for c in counted)
        hint = (
            f"Even the smallest shape has {smallest:,} parameters ({100 * smallest / source_params:.1f}% of the source): "
            "add smaller values to `search_space` (fewer layers, smaller hidden/MLP sizes) or raise `target_params`."
            if smallest > high
            else f"Widen `tolerance`, move `target_params` (the nearest valid shape {nearest.name} has "
            f"{nearest.num_params:,} = {100 * nearest.num_params / target:.1f}% of the target), or add values to `search_space`."
        )
        raise ValueError(
            f"No valid shape of the {len(counted)} enumerated lies within ±{100 * tolerance:g}% of target_params="
            f"{target:,} ({100 * target / source_params:.1f}% of the source's {source_params:,}). {hint}"
        )
    chosen = _select(within, max_candidates, selection, source, target)
    for c in chosen:
        exact = counter.exact(c.sizes)
        if exact != c.num_params:  # a family whose layers differ in size: trust the full build
            logger.warning(f"{c.name}: per-layer count {c.num_params:,} != full count {exact:,}; using the latter.")
            c.num_params = exact
        c.param_fraction = c.num_params / source_params
        c.target_deviation = c.num_params / target - 1
    logger.info(
        f"Architecture search: {len(shapes)} valid shapes, {len(within)} within ±{100 * tolerance:g}% of {target:,} "
        f"parameters; evaluating {len(chosen)} ({selection})."
    )

    # 2. Zero-shot and retrained held-out losses, one pruned copy at a time.
    ranked_by = "param_distance"
    if eval_dataset is not None:
        pad = getattr(model.config, "pad_token_id", None)
        pad = pad if isinstance(pad, int) else 0
        eval_batches = batch_samples(to_samples(eval_dataset, tokenizer, seq_length), eval_batch_size, pad)
        train_ds = None
        if retrain_steps > 0:
            from datasets import Dataset

            train_ds = Dataset.from_dict({"input_ids": [s.tolist() for s in to_samples(train_dataset, tokenizer, seq_length)]})
        needs_scores = any(c.sizes[a] != source[a] for c in chosen for a in SEARCH_AXES)
        if importance is None and needs_scores:
            if calibration_data is None:
                raise ValueError("Pass `importance=estimate_importance(model, ...)` or `calibration_data=` to prune candidates.")
            importance = estimate_importance(model, calibration_data, base_config, tokenizer=tokenizer)
        grad_flags = {name: p.requires_grad for name, p in model.named_parameters()}
        was_training = model.training
        try:
            for c in tqdm(chosen, desc="Evaluating candidates"):
                student = prune_model(copy.deepcopy(model), c.config, importance=importance)
                actual = _unique_numel(student)
                if actual != c.num_params:
                    logger.warning(f"{c.name}: predicted {c.num_params:,} parameters but the pruned model has {actual:,}.")
                    c.num_params, c.param_fraction, c.target_deviation = actual, actual / source_params, actual / target - 1
                c.zero_shot_loss = heldout_loss(student, eval_batches)
                if retrain_steps > 0:
                    student.requires_grad_(True)  # even if the source model was frozen (PEFT re-freezes for LoRA)
                    if retrain_fn is None:
                        callbacks = [_EvalAtSteps(eval_steps, eval_batches, c.retrain_curve)] if eval_steps else []
                        student = distill_candidate(
                            student, model, train_ds, retrain_steps, seed=seed, tokenizer=tokenizer, use_lora=use_lora,
                            lora_config=lora_config, training_kwargs=training_kwargs, callbacks=callbacks,
                        )
                    else:
                        student = retrain_fn(student, teacher=model, train_dataset=train_ds, max_steps=retrain_steps, seed=seed)
                    c.retrain_loss = heldout_loss(student, eval_batches)
                    c.retrain_curve[retrain_steps] = c.retrain_loss
                    # The trainer froze the teacher; the next candidate is copied from it and must be trainable.
                    _restore(model, grad_flags, was_training)
                logger.info(f"{c.name}: {c.num_params:,} params, zero-shot {c.zero_shot_loss:.4f}, retrained {c.retrain_loss}")
                del student
                _free(collect=source_params >= 10_000_000)
        finally:
            _restore(model, grad_flags, was_training)
        ranked_by = "retrain_loss" if retrain_steps > 0 else "zero_shot_loss"
    else:
        logger.warning(
            "No `eval_dataset`: candidates are only enumerated and ordered by distance to the target, not ranked by loss."
        )

    def rank_key(c: Candidate) -> tuple:
        score = c.score
        return (math.inf if score is None or math.isnan(score) else score, *_tie_key(c, target))

    ranked = sorted(chosen, key=rank_key)
    for i, c in enumerate(ranked, 1):
        c.rank = i
    return SearchResult(
        candidates=ranked,
        source_sizes=dict(source),
        source_params=source_params,
        target_params=target,
        tolerance=float(tolerance),
        ranked_by=ranked_by,
        num_valid_shapes=len(shapes),
        num_within_tolerance=len(within),
        retrain_steps=retrain_steps,
        use_lora=bool(use_lora and retrain_steps > 0),
        selection=selection,
        seconds=time.perf_counter() - start,
    )


__all__ = [
    "Candidate",
    "SEARCH_AXES",
    "SearchResult",
    "default_search_space",
    "distill_candidate",
    "enumerate_shapes",
    "heldout_loss",
    "lora_target_modules",
    "predict_num_params",
    "search_architectures",
    "spearman_rho",
]
