# Copyright 2026 The hf-minitron Authors. Apache-2.0.
"""Set-up checks of `DistillationTrainer`: the output head the fused loss reads, the post-head logit transforms it
applies, and the tokenizers of student and teacher.

The fused loss rebuilds logits from `lm_head`'s weights instead of calling the model, so it is only right if
(1) the head's input is the hidden state the trainer takes, (2) the head is a plain linear map of the weight and bias
it reads, and (3) it applies the family's post-head transforms. :func:`resolve_logit_transforms_checked` verifies all
three once, on a 4-token input, for registered and unregistered families alike.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ..architectures import (
    apply_logit_transforms,
    candidate_logit_transforms,
    get_layout,
    resolve_logit_transforms,
)
from .sharding import param_shape


logger = logging.get_logger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def base_model(model: nn.Module) -> nn.Module:
    """The `PreTrainedModel` under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# ------------------------------------------------------------------------------------------------- output head
def output_head(model: nn.Module, role: str) -> nn.Module:
    """The module whose `weight` `[V, H]` (and `bias`) produce `model`'s head output, as the fused loss reads it.

    A PEFT `modules_to_save` copy of `lm_head` is resolved to the active (trainable) copy, so it trains through the
    fused loss. An adapter *layer* on `lm_head` (LoRA, IA³, trainable tokens...) is refused: its output is not
    `h @ weight.T`, and reading `weight` would silently drop the adapter.

    Raises:
        ValueError: no output embeddings, an adapter layer on the head, or a head without a 2-D weight.
    """
    head = base_model(model).get_output_embeddings()
    if head is None:
        raise ValueError(f"The {role} has no output embeddings (`get_output_embeddings()` is None); the fused loss reads `lm_head.weight`.")
    if hasattr(head, "base_layer"):
        raise ValueError(
            f"The {role}'s `lm_head` is wrapped by a PEFT adapter layer ({type(head).__name__}), which the fused "
            "distillation loss cannot see (it reads `lm_head.weight`). Leave `lm_head` out of `target_modules`; to "
            "train the head, use `modules_to_save=['lm_head']` (a full trainable copy, supported), or merge the "
            "adapter first (`merge_and_unload()`)."
        )
    if hasattr(head, "modules_to_save") and hasattr(head, "original_module"):  # PEFT ModulesToSaveWrapper
        active = list(getattr(head, "active_adapters", None) or [])
        if getattr(head, "disable_adapters", False) or not active or active[0] not in head.modules_to_save:
            head = head.original_module
        else:
            head = head.modules_to_save[active[0]]
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or len(param_shape(weight)) != 2:
        raise ValueError(f"The {role}'s output head ({type(head).__name__}) has no 2-D `weight`; the fused loss needs a linear `lm_head`.")
    return head


def check_peft_config(model: Any, peft_config: Any) -> None:
    """Refuse, before any work, a `peft_config` that puts an adapter on the student's `lm_head`."""
    if peft_config is None or not isinstance(model, nn.Module):
        return
    head = base_model(model).get_output_embeddings()
    name = next((n for n, m in base_model(model).named_modules() if m is head), None)
    targets = getattr(peft_config, "target_modules", None)
    if name is None or targets is None:
        return
    try:
        from peft.tuners.tuners_utils import check_target_module_exists
    except ImportError:  # pragma: no cover - peft is needed for peft_config anyway
        return
    if check_target_module_exists(peft_config, name):
        raise ValueError(
            f"`peft_config.target_modules` ({targets!r}) puts an adapter on the student's `{name}`, which the fused "
            f"distillation loss cannot see (it reads `{name}.weight`). Leave `{name}` out of `target_modules`; to train "
            f"the head use `modules_to_save=['{name}']` (a full trainable copy, supported)."
        )


# -------------------------------------------------------------------------------------- post-head transforms
def _registered_transforms(model: nn.Module):
    """The registry's `logit_transforms` for `model`'s family, or `None` when the family is not registered."""
    try:
        return get_layout(base_model(model), allow_generic=False).logit_transforms
    except ValueError:
        return None


def _probe_values(like: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in head output spanning [-40, 40]: large enough that a scale or soft-cap shows."""
    v = torch.arange(like.shape[-1], device=like.device, dtype=torch.float32)
    t = torch.arange(like.shape[-2], device=like.device, dtype=torch.float32).unsqueeze(-1)
    return (40.0 * torch.sin(0.7 * v + 1.3 * t)).expand(like.shape).to(like.dtype).contiguous()


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    eps = max(torch.finfo(a.dtype).eps, torch.finfo(b.dtype).eps) if a.is_floating_point() and b.is_floating_point() else 1e-6
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=8 * eps, atol=8 * eps)


def _sharded(head: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") or hasattr(p, "full_tensor") or p.device.type == "meta" for p in head.parameters())


def describe_transforms(steps) -> str:
    return " -> ".join(f"{kind} {value:g}" for kind, value in steps) or "none"


@torch.no_grad()
def resolve_logit_transforms_checked(model: nn.Module, role: str, check_backbone: bool = False) -> tuple:
    """The post-head transforms `((kind, value), ...)` of `model`, verified against the model's own forward.

    One forward on 4 tokens, with hooks on the output head, checks that (1) the head's input equals
    `hidden_states[-1]` (and, with `check_backbone`, `base_model(...).last_hidden_state`), which is what the fused
    loss projects; (2) the head's output equals `h @ weight.T + bias` of the module :func:`output_head` returns; (3)
    with the head's output replaced by known values, `.logits` equals those values after the transforms. For a
    registered family the transforms come from `ArchitectureLayout.logit_transforms`; for any other causal LM, the
    identity and single steps built from its config fields (`logit_scale`, `logits_scaling`, ...) are tried and the
    one that reproduces `.logits` is used. Skipped (registry data only) when the head is sharded (DeepSpeed ZeRO-3,
    FSDP) or on the meta device.

    Raises:
        ValueError: a check fails; the message says which and what to change.
    """
    base = base_model(model)
    registered = _registered_transforms(model)
    head_module = base.get_output_embeddings()
    weights = output_head(model, role)
    if _sharded(head_module):
        steps = resolve_logit_transforms(registered or (), base.config)
        if registered is None:
            logger.warning(
                f"The {role}'s family ({base.config.model_type!r}) is not registered and its head is sharded, so its "
                "post-head logit transform cannot be checked; assuming `.logits == lm_head(h)`."
            )
        return steps

    embed = base.get_input_embeddings()
    vocab = min(weights.weight.shape[0], getattr(embed, "num_embeddings", weights.weight.shape[0]))
    ids = ((torch.arange(4) * 7919 + 3) % vocab).unsqueeze(0).to(embed.weight.device)
    captured: dict[str, torch.Tensor] = {}

    def pre_hook(module, args):
        captured["input"] = args[0]

    def hook(module, args, output):
        captured["output"] = output
        captured["probe"] = _probe_values(output)
        return captured["probe"]

    handles = [head_module.register_forward_pre_hook(pre_hook), head_module.register_forward_hook(hook)]
    was_training = model.training
    model.eval()
    try:
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True, use_cache=False)
        last = base.base_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).last_hidden_state if check_backbone else None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if "output" not in captured:
        raise ValueError(f"The {role}'s forward never called its output head (`get_output_embeddings()`); the fused loss needs a standard causal-LM head.")
    h_in = captured["input"]
    where = f"{type(base).__name__} (model_type {base.config.model_type!r})"
    if out.hidden_states is None or not _close(out.hidden_states[-1], h_in) or (last is not None and not _close(last, h_in)):
        raise ValueError(
            f"The {role} {where} does not feed its last hidden state (`hidden_states[-1]` / the backbone's "
            "`last_hidden_state`) to its output head, which the fused distillation loss assumes."
        )
    w = weights.weight
    ref = nn.functional.linear(h_in.to(w.dtype), w, getattr(weights, "bias", None))
    scale = ref.float().abs().max().clamp(min=1.0)
    tol = 1e-4 if w.dtype in (torch.float32, torch.float64) else 2e-2
    if ref.shape != captured["output"].shape or (ref.float() - captured["output"].float()).abs().max() > tol * scale:
        raise ValueError(
            f"The {role}'s output head ({type(head_module).__name__}) is not the linear map `h @ weight.T + bias` of "
            "its `weight`/`bias`, which the fused distillation loss computes; use a plain `nn.Linear` head."
        )

    probe, logits = captured["probe"], out.logits
    candidates = [registered] if registered is not None else candidate_logit_transforms(base.config)
    for transforms in candidates:
        steps = resolve_logit_transforms(transforms, base.config)
        if _close(logits, apply_logit_transforms(probe, steps)):
            if registered is None and steps:
                logger.warning(
                    f"The {role} {where} is not a registered family; its `.logits` are its head output after "
                    f"{list(transforms)} (found by probing), which the distillation loss applies. Register a layout "
                    "with `logit_transforms=` to make this explicit."
                )
            return steps
    found = [t for t in candidate_logit_transforms(base.config)
             if _close(logits, apply_logit_transforms(probe, resolve_logit_transforms(t, base.config)))]
    if registered is not None:
        raise ValueError(
            f"The registered post-head logit transforms of the {role} {where} "
            f"({describe_transforms(resolve_logit_transforms(registered, base.config))}) do not reproduce its "
            f"`.logits`" + (f"; {list(found[0])} does: fix `ArchitectureLayout.logit_transforms`." if found else ".")
        )
    raise ValueError(
        f"The {role} {where} changes its head output on the way to `.logits` in a way hf-minitron does not recognise "
        "(not a scale, division or soft-cap by a config field), so the fused distillation loss would train against "
        "other logits than the model's own. Register its family with the transform: `register_layout("
        "ArchitectureLayout(model_types=(...), logit_transforms=(LogitTransform(kind, config_field), ...)))`."
    )


# ------------------------------------------------------------------------------------------------- tokenizers
def checkpoint_dir(model: Any) -> str | None:
    """The local folder a model (or path) was loaded from, if any."""
    path = model if isinstance(model, str) else getattr(base_model(model), "name_or_path", None)
    if not path and not isinstance(model, str):
        path = getattr(getattr(model, "config", None), "_name_or_path", None)
    return path if path and os.path.isdir(path) else None


def load_local_tokenizer(folder: str | None):
    """The tokenizer saved in a local checkpoint folder, or `None` (no tokenizer files, or it fails to load)."""
    if folder is None or not any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as err:  # noqa: BLE001 - an unreadable tokenizer is just not a known one
        logger.info(f"Could not load the tokenizer in {folder} ({type(err).__name__}: {err}); not comparing it.")
        return None


def _special_tokens(tok) -> dict[str, int]:
    decoder = getattr(tok, "added_tokens_decoder", None) or {}
    specials = {str(t): int(i) for i, t in decoder.items() if getattr(t, "special", False)}
    for name in ("bos_token", "eos_token", "unk_token"):
        token = getattr(tok, name, None)
        if token is not None:
            specials.setdefault(str(token), tok.convert_tokens_to_ids(str(token)))
    return specials


def tokenizer_difference(a, b) -> str | None:
    """`None` if two tokenizers map the same strings to the same ids (vocabulary and special tokens), else why not."""
    a, b = getattr(a, "tokenizer", a), getattr(b, "tokenizer", b)  # processors wrap their tokenizer
    if a is b:
        return None
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        diff = sorted(set(va.items()) ^ set(vb.items()), key=lambda kv: kv[1])
        token = diff[0][0] if diff else "?"
        return (
            f"their vocabularies differ ({len(va):,} vs {len(vb):,} entries; e.g. {token!r} is id {va.get(token)} in one "
            f"and {vb.get(token)} in the other)"
        )
    sa, sb = _special_tokens(a), _special_tokens(b)
    if sa != sb:
        extra = sorted(set(sa.items()) ^ set(sb.items()))[:3]
        return f"their special tokens differ (e.g. {extra})"
    return None


def check_same_tokenizer(known: list[tuple[str, Any]]) -> None:
    """Raise a `ValueError` unless every `(source, tokenizer)` in `known` equals the first one."""
    if len(known) < 2:
        return
    (ref_source, ref), rest = known[0], known[1:]
    for source, tok in rest:
        why = tokenizer_difference(ref, tok)
        if why is not None:
            raise ValueError(
                f"Student and teacher must share a tokenizer (distillation compares next-token distributions id by "
                f"id), but the tokenizer of {ref_source} and that of {source} differ: {why}. Use a teacher trained "
                "with the student's tokenizer (a student pruned from the teacher has it), or pass the right "
                "`processing_class`."
            )
