"""PNG plots of importance scores and distillation loss curves (needs matplotlib: `pip install hf-minitron[plots]`)."""

from __future__ import annotations

import os
from typing import Any

from .atomic import atomic_write_bytes
from .importance import ImportanceScores


def new_figure(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] = (7, 4.5), **subplot_kw: Any):
    """A ``matplotlib`` figure and its axes drawn by the Agg (file) renderer, touching no global state.

    Uses :class:`matplotlib.figure.Figure` directly instead of ``pyplot``, so the caller's backend (a notebook's
    inline or interactive one) is neither chosen nor changed, and no figure is left in pyplot's registry.

    Raises:
        ImportError: matplotlib is not installed (``pip install hf-minitron[plots]``).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, **subplot_kw)
    return fig, axes


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> str:
    """Write ``fig`` as a PNG through a temporary sibling and a rename; returns ``path``."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return atomic_write_bytes(path, buffer.getvalue())


def plot_importance(scores: ImportanceScores, path: str | os.PathLike, title: str = "") -> str:
    """Per-layer importance by axis (heads, MLP neurons, Block Importance) and the sorted hidden-channel scores.

    Example:
        >>> plot_importance(scores, "importance.png")  # doctest: +SKIP
    """
    fig, axes = new_figure(2, 2, figsize=(11, 7))
    layers = range(scores.num_layers)
    axes[0, 0].imshow(scores.heads.float().numpy().T, aspect="auto", origin="lower", cmap="viridis")
    axes[0, 0].set(title="head importance", xlabel="layer", ylabel="head")
    axes[0, 1].plot(layers, scores.neurons.float().mean(1).numpy(), label="mean")
    axes[0, 1].plot(layers, scores.neurons.float().median(1).values.numpy(), label="median")
    axes[0, 1].set(title="MLP neuron importance per layer", xlabel="layer")
    axes[0, 1].legend()
    axes[1, 0].bar(list(layers), scores.block_importance.float().numpy(), label="block importance (1 - cos)")
    if scores.layer_perplexity is not None:
        twin = axes[1, 0].twinx()
        twin.plot(list(layers), scores.layer_perplexity.float().numpy(), color="C3", marker="o", label="ppl without layer")
        twin.set_ylabel("perplexity without the layer")
    axes[1, 0].set(title="layer importance", xlabel="layer")
    axes[1, 1].plot(scores.hidden.float().sort(descending=True).values.numpy())
    axes[1, 1].set(title="hidden-channel importance (sorted)", xlabel="rank", yscale="log")
    fig.suptitle(title or "hf-minitron activation importance")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_loss_curves(log_history: list[dict[str, Any]], path: str | os.PathLike, title: str = "") -> str:
    """Every logged loss component (``kd_loss``, ``ce_loss``, ``hidden_state_loss``, ...) against the step."""
    keys = sorted({k for h in log_history for k in h if k.endswith("loss") and k not in ("train_loss",)})
    fig, ax = new_figure(figsize=(7, 4.5))
    for key in keys:
        points = [(h["step"], h[key]) for h in log_history if key in h and "step" in h]
        if points:
            ax.plot(*zip(*points), label=key, marker=".")
    ax.set(xlabel="step", ylabel="loss", title=title or "distillation losses", yscale="log")
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)
