"""Result types of the architecture search: one :class:`Candidate` per shape, the ranked :class:`SearchResult`."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..atomic import atomic_write_json
from ..config import MinitronPruneConfig
from .space import search_axes


RESULTS_NAME = "architecture_search.json"


# ---------------------------------------------------------------------------------------------------- results
@dataclass
class Candidate:
    """One pruned shape of the search and its scores.

    Attributes:
        config: The :class:`MinitronPruneConfig` that prunes the source to this shape (every search axis explicit;
            importance settings copied from the search's ``prune_config``).
        num_params: Exact parameter count of the pruned model (tied embeddings counted once).
        sizes: The target sizes (the search axes plus the unchanged ones such as ``head_dim``).
        active_params: Parameters used per token (``num_params`` minus the routed experts a token is not sent to;
            equal to ``num_params`` for models without experts). ``None`` in results saved before it existed.
        kept_layers: Source indices of the layers pruning keeps (what the counts of mixed-layer models depend on;
            the first ones when the search had no importance scores and every layer is alike).
        param_fraction: ``num_params`` / source parameters.
        target_deviation: ``num_params / target_params - 1`` (within ``±tolerance``; 0 without a total target).
        active_deviation: ``active_params / target_active_params - 1`` (``None`` without an active target).
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
    active_params: int | None = None
    active_deviation: float | None = None
    kept_layers: list[int] | None = None

    @property
    def axes(self) -> tuple[str, ...]:
        """The search axes of this model (see :func:`~hf_minitron.search.search_axes`)."""
        return search_axes(self.sizes)

    @property
    def shape(self) -> tuple[int, ...]:
        """``(layers, hidden, heads, kv_heads, intermediate)`` for dense models, then the block axes it has."""
        return tuple(self.sizes[a] for a in self.axes)

    @property
    def name(self) -> str:
        """A compact label: ``L30-H576-A9/3-F1024`` (layers, hidden, heads/KV heads, MLP), then ``-E8x512`` (routed
        experts x expert width), ``-S1024`` (shared-expert width), ``-M64x64`` (Mamba heads x head dim) as present."""
        s = self.sizes
        name = f"L{s['num_hidden_layers']}-H{s['hidden_size']}-A{s['num_attention_heads']}/{s['num_key_value_heads']}"
        for key, label in _NAME_PARTS:
            if all(k in s for k in key):
                name += f"-{label}" + "x".join(str(s[k]) for k in key)
        return name

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
            "active_params": self.active_params,
            "active_deviation": self.active_deviation,
            "kept_layers": self.kept_layers,
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
            active_params=data.get("active_params"),
            active_deviation=data.get("active_deviation"),
            kept_layers=data.get("kept_layers"),
        )


@dataclass
class SearchResult:
    """The ranked candidates of :func:`search_architectures` (best first) and how they were found.

    Behaves like the list of candidates: ``result[0]``, ``len(result)``, ``for c in result``.

    Attributes:
        candidates: Ranked best first (see :func:`search_architectures` for the ranking rule).
        source_sizes: The source model's sizes.
        source_params: The source model's parameter count.
        target_params: The absolute parameter target (``None`` when only active parameters were targeted).
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
    target_active_params: int | None = None
    source_active_params: int | None = None

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
        axes = search_axes(self.source_sizes)
        sparse = self.target_active_params is not None or any(
            c.active_params is not None and c.active_params != c.num_params for c in self.candidates
        )
        header = ["rank", "shape", *(_AXIS_LABELS[a] for a in axes), "params", "% source"]
        if self.target_params is not None:
            header.append("Δ target")
        if sparse:
            header.append("active params")
        if self.target_active_params is not None:
            header.append("Δ active target")
        header += ["zero-shot loss"] + [f"loss @{s}" for s in steps]
        if self.retrain_steps:
            header.append(f"retrain loss @{self.retrain_steps}" + (" (LoRA)" if self.use_lora else ""))
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        fmt = lambda x: "–" if x is None else f"{x:.4f}"  # noqa: E731
        for c in self.candidates:
            row = [str(c.rank), f"`{c.name}`", *(str(c.sizes[a]) for a in axes), f"{c.num_params:,}", f"{100 * c.param_fraction:.1f}%"]
            if self.target_params is not None:
                row.append(f"{100 * c.target_deviation:+.2f}%")
            if sparse:
                row.append("–" if c.active_params is None else f"{c.active_params:,}")
            if self.target_active_params is not None:
                row.append("–" if c.active_deviation is None else f"{100 * c.active_deviation:+.2f}%")
            row.append(fmt(c.zero_shot_loss))
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
        """Write every candidate and the winner's config as JSON (each file atomically); returns the file written.

        A directory (existing, or a path without a ``.json`` suffix) gets ``architecture_search.json`` and the
        winner's ``minitron_prune_config.json`` (loadable with ``MinitronPruneConfig.from_pretrained(dir)``).
        """
        path = os.fspath(path)
        is_dir = os.path.isdir(path) or not path.endswith(".json")
        file = os.path.join(path, RESULTS_NAME) if is_dir else path
        atomic_write_json(file, self.to_dict())
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


# Column labels of the search axes, and the name parts of the block axes (``Candidate.name``).
_AXIS_LABELS = {
    "num_hidden_layers": "layers", "hidden_size": "hidden", "num_attention_heads": "heads",
    "num_key_value_heads": "KV heads", "intermediate_size": "MLP", "num_experts": "experts",
    "moe_intermediate_size": "expert MLP", "shared_expert_intermediate_size": "shared MLP",
    "mamba_num_heads": "Mamba heads", "mamba_head_dim": "Mamba head dim",
}
_NAME_PARTS = (
    (("intermediate_size",), "F"), (("num_experts", "moe_intermediate_size"), "E"),
    (("shared_expert_intermediate_size",), "S"), (("mamba_num_heads", "mamba_head_dim"), "M"),
)


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
