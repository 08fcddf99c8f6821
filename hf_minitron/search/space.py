"""The search space: which pruned shapes the architecture search enumerates.

Dense axes (layers, hidden, heads, KV heads, MLP) for every family; MoE and hybrid families add the axes of their
blocks (routed experts, expert width, shared-expert width, Mamba heads, Mamba head dim), read off the source sizes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

from ..architectures import ArchitectureLayout
from ..config import MinitronPruneConfig
from ..pruning import resolve_target_sizes


# Order of the search axes in shape tuples, tables and the deterministic tie-break. A model searches the dense axes it
# has (`intermediate_size` only with a dense MLP) followed by the block axes it has (see `search_axes`).
SEARCH_AXES = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size")
BLOCK_SEARCH_AXES = ("num_experts", "moe_intermediate_size", "shared_expert_intermediate_size", "mamba_num_heads", "mamba_head_dim")
SEARCH_PRESETS = ("all", "width", "depth")

# Defaults of the search axes (fractions of the source size kept at least).
_MIN_HIDDEN_FRACTION = 0.5
_MIN_INTERMEDIATE_FRACTION = 0.25
_MIN_LAYERS_FRACTION = 0.5
# Block axes: (least fraction kept, step = source / this, rounded to a power of two; Mamba heads also a multiple of the
# SSM groups). Coarser than the dense axes: every block axis multiplies the number of shapes.
_BLOCK_AXIS_DEFAULTS = {
    "num_experts": (0.5, 4),
    "moe_intermediate_size": (0.5, 4),
    "shared_expert_intermediate_size": (0.5, 4),
    "mamba_num_heads": (0.5, 4),
    "mamba_head_dim": (0.5, 4),
}


def search_axes(source_sizes: Mapping[str, int]) -> tuple[str, ...]:
    """The axes a model with ``source_sizes`` (:meth:`ArchitectureLayout.read_sizes`) is searched over, in order.

    Example:
        >>> search_axes({"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 4,
        ...              "num_experts": 8, "moe_intermediate_size": 32})
        ('num_hidden_layers', 'hidden_size', 'num_attention_heads', 'num_key_value_heads', 'num_experts', 'moe_intermediate_size')
    """
    return tuple(a for a in SEARCH_AXES + BLOCK_SEARCH_AXES if a in source_sizes)


# ------------------------------------------------------------------------------------------- search space
def _auto_step(size: int, parts: int = 8) -> int:
    """Largest power of two <= size / parts (so a default axis has ~parts/2-parts values above half the source)."""
    return max(1, 2 ** int(math.floor(math.log2(max(1.0, size / parts)))))


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
    - ``num_hidden_layers``: the source depth down to 50%;
    - MoE and hybrid families also: ``num_experts``, ``moe_intermediate_size``, ``shared_expert_intermediate_size``,
      ``mamba_num_heads`` (multiples of the SSM groups) and ``mamba_head_dim``, each from the source down to 50% in
      steps of about a quarter (a power of two); ``num_experts`` not below ``num_experts_per_tok``.

    ``preset="width"`` fixes the depth at the source's (the paper's width search); ``"depth"`` fixes every width
    axis and varies only the layers. Sizes the model lacks (``intermediate_size`` of an all-MoE model) are no axis.

    Example:
        >>> default_search_space({"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 8,
        ...                        "num_key_value_heads": 2, "num_hidden_layers": 4})["hidden_size"]
        [64, 56, 48, 40, 32]
    """
    if preset not in SEARCH_PRESETS:
        raise ValueError(f"`search_space` preset must be one of {SEARCH_PRESETS}, got {preset!r}.")
    hidden = source_sizes["hidden_size"]
    heads, kv, layers = source_sizes["num_attention_heads"], source_sizes["num_key_value_heads"], source_sizes["num_hidden_layers"]
    kv_values = sorted((d for d in range(1, kv + 1) if kv % d == 0), reverse=True)
    head_values = sorted({h for d in kv_values for h in range(d, heads + 1, d)}, reverse=True)
    space = {
        "num_hidden_layers": list(range(layers, max(1, math.ceil(_MIN_LAYERS_FRACTION * layers)) - 1, -1)),
        "hidden_size": _width_values(hidden, multiple_of or _auto_step(hidden), _MIN_HIDDEN_FRACTION),
        "num_attention_heads": head_values,
        "num_key_value_heads": kv_values,
    }
    if "intermediate_size" in source_sizes:
        inter = source_sizes["intermediate_size"]
        space["intermediate_size"] = _width_values(inter, multiple_of or _auto_step(inter), _MIN_INTERMEDIATE_FRACTION)
    for axis in BLOCK_SEARCH_AXES:
        if axis not in source_sizes:
            continue
        size, (fraction, parts) = source_sizes[axis], _BLOCK_AXIS_DEFAULTS[axis]
        step = _auto_step(size, parts)
        if axis == "mamba_num_heads":  # heads are pruned within each SSM group: every value a multiple of the groups
            groups = source_sizes.get("mamba_n_groups", 1)
            step = max(groups, step - step % groups)
        values = _width_values(size, step, fraction)
        if axis == "num_experts":
            values = [v for v in values if v >= source_sizes.get("num_experts_per_tok", 1)]
        space[axis] = values
    if preset == "width":
        space["num_hidden_layers"] = [layers]
    elif preset == "depth":
        space.update({a: [source_sizes[a]] for a in search_axes(source_sizes) if a != "num_hidden_layers"})
    return space


def _resolve_search_space(
    source: Mapping[str, int], search_space: Mapping[str, Sequence[int]] | str | None, multiple_of: int | None
) -> dict[str, list[int]]:
    if multiple_of is not None and (not isinstance(multiple_of, int) or isinstance(multiple_of, bool) or multiple_of < 1):
        raise ValueError(f"`multiple_of` must be a positive integer (e.g. 64, 128 or 256) or None, got {multiple_of!r}.")
    if search_space is None or isinstance(search_space, str):
        space = default_search_space(source, multiple_of, search_space or "all")
    elif isinstance(search_space, Mapping):
        axes = search_axes(source)
        unknown = sorted(set(search_space) - set(axes))
        if unknown:
            missing = [a for a in unknown if a in SEARCH_AXES + BLOCK_SEARCH_AXES]
            why = f" ({missing} do not apply: this model has no such block)" if missing else ""
            raise ValueError(f"Unknown search axes {unknown}{why}; this model's axes are {list(axes)}.")
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
        for axis in [a for a in ("hidden_size", "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size") if a in space]:
            kept = [v for v in space[axis] if v % multiple_of == 0 or v == source[axis]]
            if not kept:
                raise ValueError(
                    f"No {axis} in {space[axis]} is a multiple of multiple_of={multiple_of}; add such values to "
                    f"`search_space[{axis!r}]` or lower `multiple_of`."
                )
            space[axis] = kept
    return space


def enumerate_shapes(
    source_sizes: Mapping[str, int],
    search_space: Mapping[str, Sequence[int]] | str | None = None,
    multiple_of: int | None = None,
    layout: ArchitectureLayout | None = None,
    layer_parts: Sequence[frozenset[str]] | None = None,
) -> list[dict[str, int]]:
    """Every valid target shape of the search space (the cross product of the axes), in a fixed order.

    A shape is valid when :func:`~hf_minitron.pruning.resolve_target_sizes` accepts it: no size above the source,
    heads a multiple of KV heads with at most the source's heads per KV group, and hidden a multiple of heads
    (transformers refuses to save other Llama-style configs); with ``layout`` and ``layer_parts`` (the blocks of each
    source layer) also the MoE and Mamba checks (experts >= ``num_experts_per_tok`` and a multiple of the expert
    groups, Mamba heads a multiple of the SSM groups, a Mamba width tied to the hidden size). ``head_dim`` stays the
    source's.

    Example:
        >>> shapes = enumerate_shapes(model_sizes, {"num_hidden_layers": [4], "hidden_size": [64, 48]})  # doctest: +SKIP
    """
    space = _resolve_search_space(source_sizes, search_space, multiple_of)
    axes = search_axes(source_sizes)
    parts = list(layer_parts) if layer_parts is not None else None
    shapes = []
    for values in itertools.product(*(space[a] for a in axes)):
        sizes = dict(zip(axes, values))
        if sizes["num_attention_heads"] % sizes["num_key_value_heads"] or sizes["hidden_size"] % sizes["num_attention_heads"]:
            continue  # fast path for the common invalid pairs; resolve_target_sizes below has the last word
        try:
            target = resolve_target_sizes(dict(source_sizes), MinitronPruneConfig(**sizes), layout, parts)
        except ValueError:
            continue
        shapes.append(target)
    return shapes
