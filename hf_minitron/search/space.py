"""The search space: which pruned shapes (layers, hidden, heads, KV heads, MLP) the architecture search enumerates."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

from ..config import MinitronPruneConfig
from ..pruning import resolve_target_sizes


# Order of the search axes in shape tuples, tables and the deterministic tie-break.
SEARCH_AXES = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size")
SEARCH_PRESETS = ("all", "width", "depth")

# Defaults of the search axes (fractions of the source size kept at least).
_MIN_HIDDEN_FRACTION = 0.5
_MIN_INTERMEDIATE_FRACTION = 0.25
_MIN_LAYERS_FRACTION = 0.5


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
