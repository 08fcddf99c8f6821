"""Generic fallback: infer a layout for an unregistered Llama-like model from its module names.

Only structure that can be checked is inferred: module paths by name, q/k norm scope by shape, the norm formula
by probing a norm with a test input, a ``sqrt(hidden_size)`` embedding scale by value, and per-layer config lists
by length. Anything unexpected raises ``ValueError`` saying what did not match.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.utils import logging

from .layout import NORM_ROLES, ArchitectureLayout


logger = logging.get_logger(__name__)

_REQUIRED_CONFIG = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers")


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def _first(module: nn.Module, options: tuple[tuple[str | None, ...], ...]) -> tuple[str | None, ...] | None:
    """The first tuple of paths that all exist (``None`` entries are not checked)."""
    for paths in options:
        if all(p is None or _has(module, p) for p in paths):
            return paths
    return None


def _norm_weight(module: nn.Module) -> torch.Tensor | None:
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) and weight.dim() == 1 else None


@torch.no_grad()
def probe_norm_kind(norm: nn.Module) -> str:
    """Which formula ``norm`` applies (one of ``NORM_KINDS``), found by comparing its output on a test input.

    Raises:
        ValueError: none of the known formulas reproduces the module's output.
    """
    weight = _norm_weight(norm)
    if weight is None:
        raise ValueError(f"{type(norm).__name__} has no 1-D weight")
    size = weight.numel()
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(3, size, generator=gen) + 0.5).to(weight.device)  # non-zero mean: LayerNorm != RMSNorm
    y = norm(x.to(weight.dtype)).float()
    w = weight.float()
    b = getattr(norm, "bias", None)
    b = b.float() if isinstance(b, torch.Tensor) else torch.zeros_like(w)
    rms = x / x.square().mean(-1, keepdim=True).add(1e-6).sqrt()
    centered = x - x.mean(-1, keepdim=True)
    ln = centered / centered.square().mean(-1, keepdim=True).add(1e-5).sqrt()
    candidates = {
        "rms": rms * w,
        "rms_one_plus": rms * (1 + w),
        "layernorm": ln * w + b,
        "layernorm_one_plus": ln * (1 + w) + b,
    }
    errors = {kind: (y - ref).abs().max().item() for kind, ref in candidates.items()}
    kind = min(errors, key=errors.get)
    if errors[kind] > 1e-2 * max(1.0, y.abs().max().item()):
        raise ValueError(f"{type(norm).__name__} matches none of the known norm formulas (RMSNorm / LayerNorm, w or 1 + w)")
    return kind


@torch.no_grad()
def probe_norm_roles(
    model: nn.Module, layer: nn.Module, norms: tuple[str, ...], attn_in: str, mlp_in: str, o_proj: str, down_proj: str
) -> dict[str, str]:
    """The role (a key of ``NORM_ROLES``) of each of ``layer``'s norms, found by one forward over three tokens.

    A norm whose output is what the attention's (MLP's) first projection reads is its pre-norm; a norm whose input is
    what ``o_proj`` (``down_proj``) wrote is a post-sublayer norm.

    Raises:
        ValueError: the forward fails, or a norm matches no role (or two norms claim one).
    """
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(key: str):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            seen[key] = (args[0].detach(), out.detach())

        return hook

    handles = [layer.get_submodule(p).register_forward_hook(record(p)) for p in (*norms, attn_in, mlp_in, o_proj, down_proj)]
    device = model.get_submodule("model.embed_tokens").weight.device
    vocab = model.get_submodule("model.embed_tokens").weight.shape[0]
    try:
        model(input_ids=torch.arange(3, device=device).remainder(vocab).unsqueeze(0), use_cache=False)
    except Exception as err:  # noqa: BLE001 - any failure means the structure could not be probed
        raise ValueError(f"a probing forward pass failed ({type(err).__name__}: {err})") from None
    finally:
        for handle in handles:
            handle.remove()

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-6)

    roles: dict[str, str] = {}
    for name in norms:
        norm_in, norm_out = seen[name]
        matches = [
            role for role, hit in (
                ("pre_attention", same(norm_out, seen[attn_in][0])),
                ("pre_mlp", same(norm_out, seen[mlp_in][0])),
                ("post_attention", same(norm_in, seen[o_proj][1])),
                ("post_mlp", same(norm_in, seen[down_proj][1])),
            ) if hit
        ]
        if matches == ["pre_attention", "pre_mlp"]:
            raise ValueError(f"the norm `{name}` feeds both the attention and the MLP (a parallel block, not supported)")
        if len(matches) != 1:
            raise ValueError(
                f"the norm `{name}` neither feeds the attention / MLP projections nor normalises their output "
                f"(matched roles {matches})"
            )
        roles[name] = matches[0]
    if len(set(roles.values())) != len(roles):
        raise ValueError(f"two norms share a role: {roles}")
    return roles


def infer_layout(model: nn.Module) -> ArchitectureLayout:
    """Build an :class:`ArchitectureLayout` for an unregistered Llama-like ``*ForCausalLM``.

    Expects ``model.embed_tokens``, ``model.layers``, ``model.norm`` and ``lm_head``; per layer
    ``self_attn.{q,k,v}_proj`` (or fused ``qkv_proj``) and ``o_proj``, ``mlp.{gate,up}_proj`` (or fused
    ``gate_up_proj``, or only ``up_proj``) and ``down_proj``, and norms that are direct children of the layer.

    Raises:
        ValueError: the structure does not match; the message says what is missing.
    """
    config = getattr(model, "config", None)
    missing = [f for f in _REQUIRED_CONFIG if not isinstance(getattr(config, f, None), int)]
    if missing:
        raise ValueError(f"the config has no integer {missing}")
    for path in ("model.embed_tokens", "model.layers", "model.norm", "lm_head"):
        if not _has(model, path):
            raise ValueError(f"no `{path}` module")
    layers = model.get_submodule("model.layers")
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError("`model.layers` is not a non-empty ModuleList")
    layer = layers[0]
    attn = _first(layer, (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", None, "self_attn.o_proj"),
        (None, None, None, "self_attn.qkv_proj", "self_attn.o_proj"),
    ))
    if attn is None:
        raise ValueError("no `self_attn.{q,k,v,o}_proj` (or `self_attn.qkv_proj` + `o_proj`) in the decoder layers")
    mlp = _first(layer, (
        ("mlp.gate_proj", "mlp.up_proj", None, "mlp.down_proj"),
        (None, None, "mlp.gate_up_proj", "mlp.down_proj"),
        (None, "mlp.up_proj", None, "mlp.down_proj"),
    ))
    if mlp is None:
        raise ValueError("no `mlp.{gate,up,down}_proj` (or `mlp.gate_up_proj` + `down_proj`) in the decoder layers")

    hidden = config.hidden_size
    norms = tuple(
        name for name, child in layer.named_children()
        if name not in ("self_attn", "mlp") and _norm_weight(child) is not None and _norm_weight(child).numel() == hidden
    )
    if not norms:
        raise ValueError("no hidden-sized norm with a weight among the decoder layer's children")
    kinds = {probe_norm_kind(layer.get_submodule(n)) for n in norms} | {probe_norm_kind(model.get_submodule("model.norm"))}
    if len(kinds) != 1:
        raise ValueError(f"the norms apply different formulas {sorted(kinds)}")

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    q_norm = "self_attn.q_norm" if _has(layer, "self_attn.q_norm") else None
    k_norm = "self_attn.k_norm" if _has(layer, "self_attn.k_norm") else None
    scope = "head"
    if q_norm is not None:
        size = _norm_weight(layer.get_submodule(q_norm)).numel() if _norm_weight(layer.get_submodule(q_norm)) is not None else head_dim
        if size == heads * head_dim and size != head_dim:
            scope = "projection"
        elif size != head_dim:
            raise ValueError(f"`self_attn.q_norm` has {size} channels, neither head_dim={head_dim} nor heads * head_dim")

    attn_in = attn[0] or attn[3]
    mlp_in = next(p for p in (mlp[0], mlp[2], mlp[1]) if p is not None)
    roles = probe_norm_roles(model, layer, norms, attn_in, mlp_in, attn[4], mlp[3])

    embed = model.get_submodule("model.embed_tokens")
    embed_scale = None
    scale = getattr(embed, "embed_scale", None)
    if scale is not None:
        value = float(scale)
        if math.isclose(value, hidden**0.5, rel_tol=1e-3):
            embed_scale = "sqrt_hidden"
        elif not math.isclose(value, 1.0):
            raise ValueError(f"the token embedding has an unrecognised `embed_scale`={value}")

    num_layers = config.num_hidden_layers
    per_layer = tuple(
        name for name, value in config.to_dict().items()
        if isinstance(value, list) and len(value) == num_layers and name not in ("architectures",)
    )
    layout = ArchitectureLayout(
        model_types=(config.model_type,),
        q_proj=attn[0], k_proj=attn[1], v_proj=attn[2], qkv_proj=attn[3], o_proj=attn[4],
        q_norm=q_norm, k_norm=k_norm, qk_norm_scope=scope,
        gate_proj=mlp[0], up_proj=mlp[1], gate_up_proj=mlp[2], down_proj=mlp[3],
        **{attr: None for attr in NORM_ROLES.values()} | {NORM_ROLES[role]: name for name, role in roles.items()},
        norm_kind=kinds.pop(), embed_scale=embed_scale,
        per_layer_config_fields=per_layer,
    )
    layout.check_model(model)
    logger.warning_once(
        f"model_type {config.model_type!r} is not a registered family: using a layout inferred from its module names "
        f"({layout.norm_kind} norms {roles}, per-layer config lists {list(per_layer)}). Check the pruned model "
        "(e.g. its logits after a no-op prune) and consider registering the layout."
    )
    return layout
