# Copyright 2026 The hf-minitron Authors. Apache-2.0.
"""Which student layer is compared with which teacher layer in the hidden-state loss, and where the final norm is."""

from __future__ import annotations

import json
import os

from torch import nn

from ..architectures import get_layout
from .checks import base_model as _base


PROVENANCE_FILE = "minitron_config.json"


def get_provenance(model: nn.Module) -> dict | None:
    """Pruning provenance of `model`: `model.minitron_provenance`, else `minitron_config.json` beside its weights."""
    model = _base(model)
    prov = getattr(model, "minitron_provenance", None)
    if prov is not None:
        return prov
    for path in (getattr(model, "name_or_path", None), getattr(getattr(model, "config", None), "_name_or_path", None)):
        if path and os.path.isfile(os.path.join(path, PROVENANCE_FILE)):
            with open(os.path.join(path, PROVENANCE_FILE)) as f:
                return json.load(f)
    return None


def resolve_layer_map(
    num_student_layers: int,
    num_teacher_layers: int,
    layer_map: str | list = "auto",
    provenance: dict | None = None,
) -> list[tuple[int, int]]:
    """`[(student_layer, teacher_layer), ...]` pairs compared by the hidden-state loss (0-based layer indices).

    `"auto"`: the teacher layer each student layer was pruned from (`provenance["kept"]["layers"]`), else an even
    spread `t = round((s + 1) · L_t / L_s) - 1` that always pairs the last layers. An explicit list holds one teacher
    index per student layer (`None` or `-1` skips that layer) or `[student, teacher]` pairs.

    Example:
    ```python
    >>> resolve_layer_map(2, 4)
    [(0, 1), (1, 3)]
    >>> resolve_layer_map(3, 4, provenance={"kept": {"layers": [0, 1, 3]}})
    [(0, 0), (1, 1), (2, 3)]
    ```
    """
    Ls, Lt = num_student_layers, num_teacher_layers
    if layer_map == "auto":
        kept = ((provenance or {}).get("kept") or {}).get("layers")
        if kept is not None:
            src = (provenance.get("source_config") or {}).get("num_hidden_layers")
            if src is not None and src != Lt:
                raise ValueError(
                    f"The student's pruning provenance refers to a {src}-layer source model but the teacher has {Lt} "
                    "layers; pass the teacher the student was pruned from or an explicit `hidden_state_layer_map`."
                )
            if len(kept) != Ls:
                raise ValueError(
                    f"Provenance `kept.layers` has {len(kept)} entries but the student has {Ls} layers; pass an "
                    "explicit `hidden_state_layer_map`."
                )
            pairs = [(s, int(t)) for s, t in enumerate(kept)]
        else:
            pairs = [(s, max(0, min(Lt - 1, round((s + 1) * Lt / Ls) - 1))) for s in range(Ls)]
    elif isinstance(layer_map, (list, tuple)):
        if layer_map and all(isinstance(x, (list, tuple)) for x in layer_map):
            pairs = [(int(s), int(t)) for s, t in layer_map]
        else:
            if len(layer_map) != Ls:
                raise ValueError(
                    f"`hidden_state_layer_map` has {len(layer_map)} entries but the student has {Ls} layers; give "
                    "one teacher layer index per student layer (None or -1 to skip) or [student, teacher] pairs."
                )
            pairs = [(s, int(t)) for s, t in enumerate(layer_map) if t is not None and int(t) >= 0]
    else:
        raise ValueError(f"`hidden_state_layer_map` must be 'auto' or a list, got {layer_map!r}.")
    for s, t in pairs:
        if not (0 <= s < Ls and 0 <= t < Lt):
            raise ValueError(f"Layer pair (student {s}, teacher {t}) is out of range ({Ls} / {Lt} layers).")
    if not pairs:
        raise ValueError("`hidden_state_layer_map` selects no layer.")
    return pairs


def final_norm(model: nn.Module) -> nn.Module | None:
    """The final norm (registry path for a registered family, else the usual attribute names of the decoder)."""
    try:
        return _base(model).get_submodule(get_layout(_base(model), allow_generic=False).final_norm)
    except (ValueError, AttributeError):
        pass
    decoder = _base(model).get_decoder() if hasattr(_base(model), "get_decoder") else None
    for name in ("norm", "final_layernorm", "ln_f", "final_layer_norm"):
        if decoder is not None and isinstance(getattr(decoder, name, None), nn.Module):
            return getattr(decoder, name)
    return None
