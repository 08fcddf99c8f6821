"""Model hygiene shared by importance, pruning, distillation and teacher correction.

Two kinds of state make a model that looks plain behave like another object:

* **Instance patches.** TRL's `SFTTrainer` replaces `model.forward` on the instance with a closure over the model it
  was given; accelerate (mixed precision, `device_map` hooks) does the same. A `copy.deepcopy` of such a model keeps
  the closure, so the copy silently runs the *original's* weights (and a pruned copy crashes with a shape error).
  :func:`strip_instance_patches` removes them; every trainer of this package calls it when it hands a model back, and
  `estimate_importance` / `prune_model` call it on entry for patches that point outside the model.
* **Adapters.** A PEFT model's modules are wrapped (`base_layer`, `lora_A`, ...); importance and pruning work on plain
  modules. :func:`check_no_adapters` says to merge them first.
"""

from __future__ import annotations

import functools
import types
from typing import Any

from torch import nn
from transformers.utils import logging


logger = logging.get_logger(__name__)

# Saved originals that accelerate stores next to a patched `forward` (`_original_forward`: mixed precision;
# `_old_forward`: `device_map` hooks). They only make sense together with the patch.
_COMPANIONS = ("_original_forward", "_old_forward")

PatchSnapshot = dict[tuple[int, str], Any]


def _is_patch(module: nn.Module, name: str, value: Any) -> bool:
    """An instance attribute that shadows a method of the class (e.g. `forward`), or a saved original."""
    if not callable(value) or isinstance(value, nn.Module):
        return False
    return name in _COMPANIONS or callable(getattr(type(module), name, None))


def instance_patches(model: nn.Module) -> PatchSnapshot:
    """Every instance-level method override in ``model`` and its submodules: ``{(id(module), name): value}``."""
    return {
        (id(m), name): value
        for m in model.modules()
        for name, value in list(vars(m).items())
        if _is_patch(m, name, value)
    }


def _referenced_modules(obj: Any, depth: int = 8, seen: set[int] | None = None) -> list[nn.Module]:
    """The `nn.Module`s a patch reaches through bound selves, closures, partials and `__wrapped__` chains."""
    seen = set() if seen is None else seen
    if depth < 0 or id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, nn.Module):
        return [obj]
    children: list[Any] = []
    if isinstance(obj, types.MethodType):
        children += [obj.__self__, obj.__func__]
    elif isinstance(obj, functools.partial):
        children += [obj.func, *obj.args, *obj.keywords.values()]
    elif isinstance(obj, types.FunctionType):
        children += [cell.cell_contents for cell in (obj.__closure__ or ()) if _cell_filled(cell)]
    wrapped = getattr(obj, "__wrapped__", None) if not isinstance(obj, type) else None
    if wrapped is not None:
        children.append(wrapped)
    found: list[nn.Module] = []
    for child in children:
        found += _referenced_modules(child, depth - 1, seen)
    return found


def _cell_filled(cell) -> bool:
    try:
        cell.cell_contents
        return True
    except ValueError:  # an empty cell
        return False


def strip_instance_patches(model: nn.Module, keep: PatchSnapshot | None = None, foreign_only: bool = False) -> list[str]:
    """Remove instance-level method overrides (``forward`` patches and their saved originals) from ``model``.

    With ``foreign_only=True`` only patches that reach an `nn.Module` outside ``model`` are removed: those make the
    model run another object's weights (a `deepcopy` of a model patched by TRL or accelerate). Otherwise every patch
    is removed except those in ``keep`` (a snapshot from :func:`instance_patches` taken before a trainer touched the
    model: the user's own) and those on modules dispatched by accelerate (`device_map`, which needs its hooks to
    run); foreign patches go in any case. When a module loses its ``forward`` patch, its saved originals go with it.

    Returns:
        The removed attributes, as ``"<module path>.<name>"`` (``"forward"`` for the root).

    Example:
        >>> trainer = SFTTrainer(model=model, ...)  # doctest: +SKIP
        >>> strip_instance_patches(model)  # doctest: +SKIP
        ['forward']
    """
    inside = {id(m) for m in model.modules()}
    removed = []
    for path, module in model.named_modules():
        patches = {name: value for name, value in vars(module).items() if _is_patch(module, name, value)}
        drop = set()
        for name, value in patches.items():
            foreign = any(id(m) not in inside for m in _referenced_modules(value))
            # accelerate's `device_map` dispatch hooks (`_hf_hook`) move tensors between devices: the model cannot run
            # without them, and they point at their own module
            added = (keep is None or keep.get((id(module), name)) is not value) and not hasattr(module, "_hf_hook")
            if foreign or (not foreign_only and added):
                drop.add(name)
        if "forward" in drop:
            drop.update(n for n in _COMPANIONS if n in patches)
        for name in sorted(drop):
            delattr(module, name)
            removed.append(f"{path}.{name}" if path else name)
    if removed:
        logger.info(f"Removed instance-level patches {removed} (they would outlive the trainer or run another model).")
    return removed


def check_no_adapters(model: nn.Module, action: str) -> None:
    """Raise a ``ValueError`` if ``model`` is a PEFT model or carries adapter layers (LoRA & co.).

    Args:
        action: What the caller is about to do, for the message (e.g. ``"prune"``).
    """
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        raise ValueError(
            f"Cannot {action} a PEFT model ({type(model).__name__}): its layers are wrapped by adapters. Pass "
            "`model.merge_and_unload()` (adapters merged into the weights) or `model.get_base_model()` (the base "
            "weights, adapters ignored)."
        )
    adapted = next((name for name, m in model.named_modules() if hasattr(m, "base_layer")), None)
    if adapted is not None:
        raise ValueError(
            f"Cannot {action} a model with adapter layers (e.g. `{adapted}` wraps a `base_layer`). Merge them first "
            "(`merge_and_unload()` on the PEFT model) or remove them."
        )
