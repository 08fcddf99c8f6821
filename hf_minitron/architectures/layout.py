"""Per-family model layouts: where every prunable piece of a decoder-only LM lives.

A layout is plain data. Importance hooks and weight slicing read it and contain no family-specific
``if`` chains; supporting a new family means adding one :class:`ArchitectureLayout` entry to the
registry (see :mod:`hf_minitron.architectures.registry`).

Nothing in this sub-package imports from the rest of ``hf_minitron``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .blocks import BLOCK_SIZE_NAMES, MambaLayout, MoELayout
from .logits import LogitTransform


# How a norm layer applies its weight (``x_hat`` is the RMS- or mean/std-normalised input):
#   "rms":                x_hat * w                 (Llama, Mistral, Qwen, Phi-3, OLMo2, Granite)
#   "rms_one_plus":       x_hat * (1 + w)           (Gemma 1/2/3)
#   "layernorm":          x_hat * w + b
#   "layernorm_one_plus": x_hat * (1 + w) + b       (Nemotron's LayerNorm1P)
# Rescaling after hidden pruning multiplies the *effective* gain, so the weight update depends on the kind.
NORM_KINDS = ("rms", "rms_one_plus", "layernorm", "layernorm_one_plus")

# Where per-layer q/k norms apply:
#   "head":       weight [head_dim], shared by every head (Qwen3, Gemma3): untouched by any pruning.
#   "projection": weight [heads * head_dim] over the whole projection (OLMo2): sliced with the kept heads,
#                 and, being an RMS over all heads, rescaled like a hidden-axis norm when heads are dropped.
QK_NORM_SCOPES = ("head", "projection")

# How the token embedding output is scaled at forward time:
#   None:          not scaled (or by a config scalar that does not depend on sizes, e.g. Granite's multiplier).
#   "sqrt_hidden": multiplied by sqrt(hidden_size), computed from the config at construction (Gemma 1/2/3).
EMBED_SCALES = (None, "sqrt_hidden")

# Roles of the per-layer norms, in forward order (the layout field that holds each one):
#   "pre_attention":  output enters the token mixer: q/k/v, or a Mamba in_proj (``attention_norm``)
#   "post_attention": normalises the attention output before the add   (``attention_output_norm``; Gemma2/3, OLMo2)
#   "pre_mlp":        output enters the MLP / MoE router and experts   (``mlp_norm``)
#   "post_mlp":       normalises the MLP output before the add         (``mlp_output_norm``; Gemma2/3, OLMo2)
# plus "final" (the final norm; its output enters lm_head) and the q/k norms (``q_norm``/``k_norm``).
NORM_ROLES = {
    "pre_attention": "attention_norm",
    "post_attention": "attention_output_norm",
    "pre_mlp": "mlp_norm",
    "post_mlp": "mlp_output_norm",
}

# Sizes a module attribute can mirror (see ``attention_attributes`` and friends).
SIZE_NAMES = ("hidden", "intermediate", "heads", "kv_heads", "kv_groups") + BLOCK_SIZE_NAMES

# The blocks a decoder layer can hold, found per layer from the built model (see `ArchitectureLayout.layer_parts`), and
# the sublayer slot each belongs to: a "mixer" (token mixing: attention or Mamba) and an "ffn" (MLP, MoE, shared
# expert). Norm roles follow the slot: a family whose blocks hold one sublayer each (Nemotron-H) gives the same norm as
# `attention_norm` and `mlp_norm`, and each layer uses the role of the slot it has.
PART_SLOTS = {"attention": "mixer", "mamba": "mixer", "mlp": "ffn", "moe": "ffn", "shared_expert": "ffn"}
_ROLE_SLOTS = {"pre_attention": "mixer", "post_attention": "mixer", "pre_mlp": "ffn", "post_mlp": "ffn"}
# Target sizes (keys of `read_sizes`) and the block that must exist in some layer for them to apply.
BLOCK_SIZE_KEYS = {
    "num_attention_heads": "attention",
    "num_key_value_heads": "attention",
    "intermediate_size": "mlp",
    "num_experts": "moe",
    "moe_intermediate_size": "moe",
    "shared_expert_intermediate_size": "shared_expert",
    "mamba_num_heads": "mamba",
    "mamba_head_dim": "mamba",
}


@dataclass(frozen=True)
class ArchitectureLayout:
    """Where the parts of one model family live, as dotted module paths, and how they behave.

    Paths under ``layers`` are relative to one decoder layer; the others are relative to the
    ``*ForCausalLM`` model. Optional pieces are ``None`` when the family does not have them.

    Attention is either separate ``q_proj``/``k_proj``/``v_proj`` or one fused ``qkv_proj`` whose output rows
    are ``[q (heads * head_dim); k (kv_heads * head_dim); v (kv_heads * head_dim)]`` (Phi-3). The MLP is
    gated (``gate_proj`` + ``up_proj``), fused gated (``gate_up_proj`` with rows ``[gate; up]``, Phi-3), or
    non-gated (only ``up_proj``, Nemotron); ``down_proj=None`` for families without a dense MLP (Mixtral).

    Sparse MoE blocks and Mamba2 mixers are described by the optional sub-layouts ``moe``
    (:class:`~hf_minitron.architectures.blocks.MoELayout`) and ``mamba``
    (:class:`~hf_minitron.architectures.blocks.MambaLayout`). Which blocks a layer holds is read off the model (see
    :meth:`layer_parts`): hybrid families mix attention, Mamba, MLP and MoE layers.

    Example:
        >>> from hf_minitron.architectures import get_layout
        >>> get_layout("llama").o_proj
        'self_attn.o_proj'
        >>> get_layout("phi3").qkv_proj
        'self_attn.qkv_proj'
    """

    model_types: tuple[str, ...]
    # Top level (relative to the *ForCausalLM model).
    decoder: str = "model"
    embed_tokens: str = "model.embed_tokens"
    layers: str = "model.layers"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    # Attention (relative to one decoder layer). Set ``qkv_proj`` and ``q/k/v_proj=None`` for a fused projection.
    attention: str = "self_attn"
    q_proj: str | None = "self_attn.q_proj"
    k_proj: str | None = "self_attn.k_proj"
    v_proj: str | None = "self_attn.v_proj"
    qkv_proj: str | None = None
    o_proj: str = "self_attn.o_proj"
    q_norm: str | None = None
    k_norm: str | None = None
    qk_norm_scope: str = "head"
    # MLP (relative to one decoder layer). ``gate_proj`` is None for a non-gated MLP; for a fused gated MLP set
    # ``gate_up_proj`` and ``gate_proj=up_proj=None``.
    mlp: str = "mlp"
    gate_proj: str | None = "mlp.gate_proj"
    up_proj: str | None = "mlp.up_proj"
    gate_up_proj: str | None = None
    down_proj: str | None = "mlp.down_proj"
    # Per-layer norms on the hidden axis, by role (see NORM_ROLES). A *pre-sublayer* norm's output is what the
    # sublayer's first matmul reads (q/k/v, gate/up); a *post-sublayer* ("sandwich", OLMo2-style) norm normalises the
    # sublayer's output before it is added to the residual stream. ``None``: the family has no norm in that place
    # (OLMo2's attention and MLP read the raw residual stream). Llama names its pre-MLP norm
    # `post_attention_layernorm`; Gemma 2/3 use that name for the post-attention sandwich norm.
    attention_norm: str | None = "input_layernorm"
    mlp_norm: str | None = "post_attention_layernorm"
    attention_output_norm: str | None = None
    mlp_output_norm: str | None = None
    norm_kind: str = "rms"
    # Embedding scale that depends on hidden_size (see EMBED_SCALES); the attributes of the embedding module
    # that cache it (a non-persistent buffer and/or a float), rewritten after hidden pruning.
    embed_scale: str | None = None
    embed_scale_attributes: tuple[str, ...] = ("embed_scale", "scalar_embed_scale")
    # Config field names.
    hidden_size_field: str = "hidden_size"
    intermediate_size_field: str | None = "intermediate_size"  # None: no dense MLP (Mixtral's is the expert width)
    num_heads_field: str = "num_attention_heads"
    num_kv_heads_field: str = "num_key_value_heads"
    num_layers_field: str = "num_hidden_layers"
    head_dim_field: str = "head_dim"
    # Config lists with one entry per layer, re-indexed on depth pruning (and while a layer is scored out).
    per_layer_config_fields: tuple[str, ...] = ("layer_types",)
    # Config integers that count a prefix of the layers (Qwen2/3 `max_window_layers`: layers below it use full
    # attention). After depth pruning each becomes the number of kept layers below its old value.
    layer_prefix_config_fields: tuple[str, ...] = ()
    # Module attributes that cache sizes and must follow the new shapes. Each maps an attribute name to the
    # size it mirrors (one of SIZE_NAMES). Attributes a module does not have are skipped.
    attention_attributes: dict[str, str] = field(
        default_factory=lambda: {
            "num_key_value_groups": "kv_groups",
            "num_heads": "heads",
            "num_key_value_heads": "kv_heads",
            "hidden_size": "hidden",
        }
    )
    mlp_attributes: dict[str, str] = field(
        default_factory=lambda: {"hidden_size": "hidden", "intermediate_size": "intermediate"}
    )
    layer_attributes: dict[str, str] = field(default_factory=lambda: {"hidden_size": "hidden"})
    # Elementwise steps from the `lm_head` output to `.logits`, in order (see `architectures/logits.py`): e.g.
    # Granite divides by `logits_scaling`, Gemma-2/3 soft-cap. Code that rebuilds logits from the head's weights
    # (the fused distillation loss) applies them.
    logit_transforms: tuple[LogitTransform, ...] = ()
    # Whether a decoder layer returns ``(hidden_states,)`` rather than the tensor (Falcon-H1).
    layer_output_tuple: bool = False
    # Blocks beyond attention + dense MLP.
    moe: MoELayout | None = None
    mamba: MambaLayout | None = None

    def __post_init__(self) -> None:
        if self.norm_kind not in NORM_KINDS:
            raise ValueError(f"norm_kind must be one of {NORM_KINDS}, got {self.norm_kind!r}.")
        if self.qk_norm_scope not in QK_NORM_SCOPES:
            raise ValueError(f"qk_norm_scope must be one of {QK_NORM_SCOPES}, got {self.qk_norm_scope!r}.")
        if self.embed_scale not in EMBED_SCALES:
            raise ValueError(f"embed_scale must be one of {EMBED_SCALES}, got {self.embed_scale!r}.")
        separate = (self.q_proj, self.k_proj, self.v_proj)
        if (self.qkv_proj is None) == (None in separate) or (self.qkv_proj is not None and any(separate)):
            raise ValueError("Set either q_proj, k_proj and v_proj, or a fused qkv_proj (and q/k/v_proj=None).")
        if self.gate_up_proj is not None and (self.gate_proj is not None or self.up_proj is not None):
            raise ValueError("A fused gate_up_proj replaces gate_proj and up_proj: set those to None.")
        if self.down_proj is not None and self.gate_up_proj is None and self.up_proj is None:
            raise ValueError("The MLP needs an up_proj (non-gated / gated) or a fused gate_up_proj.")
        if (self.down_proj is None) != (self.intermediate_size_field is None):
            raise ValueError("A family without a dense MLP sets both down_proj=None and intermediate_size_field=None.")
        # One norm may be both pre-norms when every block holds a single sublayer (Nemotron-H); otherwise one role each.
        paths = [p for p in (self.attention_norm, self.attention_output_norm, self.mlp_norm, self.mlp_output_norm) if p]
        shared_pre = self.attention_norm is not None and self.attention_norm == self.mlp_norm
        if len(set(paths)) != len(paths) - shared_pre:
            raise ValueError(f"A norm can hold one role only (or be both pre-norms); got the same path twice in {paths}.")
        if not all(isinstance(t, LogitTransform) for t in self.logit_transforms):
            raise ValueError(f"logit_transforms must be a tuple of LogitTransform, got {self.logit_transforms!r}.")
        attribute_maps = [(n, getattr(self, n)) for n in ("attention_attributes", "mlp_attributes", "layer_attributes")]
        for sub in (self.moe, self.mamba):
            if sub is not None:
                attribute_maps += [(f"{type(sub).__name__}.attributes[{k!r}]", v) for k, v in sub.attributes.items()]
        if self.moe is not None:
            attribute_maps.append(("MoELayout.model_attributes", self.moe.model_attributes))
        for name, mapping in attribute_maps:
            bad = {k: v for k, v in mapping.items() if v not in SIZE_NAMES}
            if bad:
                raise ValueError(f"{name} values must be in {SIZE_NAMES}, got {bad}.")

    # ------------------------------------------------------------------ access helpers
    @property
    def family(self) -> str:
        return self.model_types[0]

    @property
    def layer_norm_roles(self) -> dict[str, str]:
        """``{norm path within a layer: role}`` for every per-layer hidden-axis norm a layer may have, in forward order.

        For a layer of a hybrid family use :meth:`layer_norm_roles_of`, which keeps only the norms of the blocks it holds.
        """
        roles: dict[str, str] = {}
        for role, attr in NORM_ROLES.items():
            path = getattr(self, attr)
            if path is not None and path not in roles:
                roles[path] = role
        return roles

    @property
    def layer_norms(self) -> tuple[str, ...]:
        """Every per-layer norm on the hidden axis (pre- and post-sublayer) a layer may have, in forward order."""
        return tuple(self.layer_norm_roles)

    def get(self, root: nn.Module, path: str | None) -> nn.Module | None:
        """Return the sub-module at dotted ``path`` of ``root`` (``None`` if ``path`` is ``None``)."""
        if path is None:
            return None
        return root.get_submodule(path)

    @staticmethod
    def has(root: nn.Module, path: str | None) -> bool:
        """Whether ``path`` resolves to a module under ``root`` (``False`` for ``None`` and for attributes set to None)."""
        if path is None:
            return False
        try:
            root.get_submodule(path)
        except AttributeError:
            return False
        return True

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def layer_parts(self, layer: nn.Module) -> frozenset[str]:
        """The blocks (keys of ``PART_SLOTS``) one decoder layer holds, read off its modules.

        ``"attention"`` when ``o_proj`` resolves, ``"mamba"`` for the Mamba ``out_proj``, ``"mlp"`` for the dense
        ``down_proj``, ``"moe"`` for the experts module and ``"shared_expert"`` for the shared expert's ``down_proj``.

        Example:
            >>> sorted(get_layout(model).layer_parts(model.model.layers[0]))  # doctest: +SKIP
            ['attention', 'moe', 'shared_expert']
        """
        parts = set()
        if self.has(layer, self.o_proj):
            parts.add("attention")
        if self.mamba is not None and self.has(layer, self.mamba.out_proj):
            parts.add("mamba")
        if self.has(layer, self.down_proj) and isinstance(getattr(layer.get_submodule(self.down_proj), "weight", None), torch.Tensor):
            parts.add("mlp")
        if self.moe is not None and self.has(layer, self.moe.experts):
            parts.add("moe")
        if self.moe is not None and self.has(layer, self.moe.shared_down_proj):
            parts.add("shared_expert")
        return frozenset(parts)

    def layer_norm_roles_of(self, layer: nn.Module, parts: frozenset[str] | None = None) -> dict[str, str]:
        """``{norm path: role}`` of the hidden-axis norms of one layer: those of the sublayer slots it holds.

        A norm listed as both pre-norms (Nemotron-H's one norm per block) takes the role of the slot present.
        """
        parts = self.layer_parts(layer) if parts is None else parts
        slots = {PART_SLOTS[p] for p in parts}
        roles: dict[str, str] = {}
        for role, attr in NORM_ROLES.items():
            path = getattr(self, attr)
            if path is not None and _ROLE_SLOTS[role] in slots and path not in roles and self.has(layer, path):
                roles[path] = role
        return roles

    def norm_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """Every norm whose output lives on the hidden axis: per-layer norms, then the final norm."""
        return [(path, module) for path, module, _ in self.norm_modules_with_roles(model)]

    def norm_modules_with_roles(self, model: nn.Module) -> list[tuple[str, nn.Module, str]]:
        """``(path, module, role)`` of every hidden-axis norm: per-layer norms in forward order, then ``"final"``."""
        norms = []
        for i, layer in enumerate(self.decoder_layers(model)):
            for name, role in self.layer_norm_roles_of(layer).items():
                norms.append((f"{self.layers}.{i}.{name}", layer.get_submodule(name), role))
        norms.append((self.final_norm, model.get_submodule(self.final_norm), "final"))
        return norms

    def read_sizes(self, config) -> dict[str, int]:
        """The prunable sizes of a model config, with ``head_dim`` made explicit.

        Keys: ``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``, ``num_hidden_layers``, ``head_dim``,
        ``intermediate_size`` (families with a dense MLP); with ``moe``: ``num_experts``, ``moe_intermediate_size``,
        ``num_experts_per_tok``, ``num_expert_groups`` and ``shared_expert_intermediate_size`` (with a shared expert);
        with ``mamba``: ``mamba_num_heads``, ``mamba_head_dim``, ``mamba_n_groups``, ``mamba_state_size``.
        """
        hidden = getattr(config, self.hidden_size_field)
        heads = getattr(config, self.num_heads_field)
        kv_heads = getattr(config, self.num_kv_heads_field, None) or heads
        head_dim = getattr(config, self.head_dim_field, None) or hidden // heads
        sizes = {"hidden_size": hidden}
        if self.intermediate_size_field is not None:
            sizes["intermediate_size"] = getattr(config, self.intermediate_size_field)
        sizes.update(
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            num_hidden_layers=getattr(config, self.num_layers_field),
            head_dim=head_dim,
        )
        for sub in (self.moe, self.mamba):
            if sub is not None:
                sizes.update(sub.read_sizes(config))
        return sizes

    def write_sizes(self, config, sizes: dict[str, int]) -> None:
        """Rewrite the config's sizes. ``head_dim`` is always written: the pruned hidden/heads ratio differs
        from ``head_dim`` in general, and families without a ``head_dim`` field (Phi-3, OLMo2, Granite) read
        it with ``getattr(config, "head_dim", hidden_size // num_attention_heads)``, so it is saved as an extra
        config attribute and honoured on reload.

        Raises:
            ValueError: the Mamba width is tied to ``expand * hidden_size`` (``mamba.expand_field``) and the new
                width is not a whole multiple of the new hidden size.
        """
        setattr(config, self.hidden_size_field, sizes["hidden_size"])
        if self.intermediate_size_field is not None:
            setattr(config, self.intermediate_size_field, sizes["intermediate_size"])
        setattr(config, self.num_heads_field, sizes["num_attention_heads"])
        setattr(config, self.num_kv_heads_field, sizes["num_key_value_heads"])
        setattr(config, self.num_layers_field, sizes["num_hidden_layers"])
        setattr(config, self.head_dim_field, sizes["head_dim"])
        for sub in (self.moe, self.mamba):
            if sub is not None:
                sub.write_sizes(config, sizes)

    def check_model(self, model: nn.Module) -> None:
        """Check every path of this layout exists and has the shape the config's sizes imply, block by block.

        Raises:
            ValueError: naming the first module that is missing or mis-shaped.
        """
        s = self.read_sizes(model.config)
        hidden, hd = s["hidden_size"], s["head_dim"]
        q_width, kv_width = s["num_attention_heads"] * hd, s["num_key_value_heads"] * hd
        where = f"The {self.family!r} layout does not match this {type(model).__name__}"

        def shape(root: nn.Module, path: str, prefix: str = "", param: str = "weight") -> tuple[int, ...]:
            try:
                module = root.get_submodule(path)
            except AttributeError:
                raise ValueError(f"{where}: no module `{prefix}{path}`.") from None
            weight = getattr(module, param, None)
            if not isinstance(weight, torch.Tensor):
                raise ValueError(f"{where}: `{prefix}{path}` has no {param}.")
            return tuple(weight.shape)

        def expect(root: nn.Module, path: str | None, expected: tuple[int, ...], prefix: str = "", param: str = "weight") -> None:
            if path is not None and shape(root, path, prefix, param) != expected:
                raise ValueError(
                    f"{where}: `{prefix}{path}.{param}` has shape {shape(root, path, prefix, param)}, expected {expected} "
                    f"from the config sizes {s}."
                )

        latent = self.moe.latent_size_field if self.moe is not None else None
        if latent is not None and getattr(model.config, latent, None):
            raise ValueError(
                f"{type(model).__name__} routes its experts through latent projections (`{latent}`="
                f"{getattr(model.config, latent)}), which hf-minitron does not prune; use a model with `{latent}=None`."
            )
        expect(model, self.embed_tokens, (model.get_submodule(self.embed_tokens).weight.shape[0], hidden))
        expect(model, self.final_norm, (hidden,))
        layers = self.decoder_layers(model)
        if len(layers) != s["num_hidden_layers"]:
            raise ValueError(f"{where}: {len(layers)} layers in `{self.layers}`, config says {s['num_hidden_layers']}.")
        qk_norm = {"head": (hd, hd), "projection": (q_width, kv_width)}[self.qk_norm_scope]
        for i, layer in enumerate(layers):
            p = f"{self.layers}.{i}."
            parts = self.layer_parts(layer)
            if not parts:
                raise ValueError(f"{where}: layer `{p[:-1]}` holds none of the blocks this layout describes.")
            if "attention" in parts:
                expect(layer, self.q_proj, (q_width, hidden), p)
                expect(layer, self.k_proj, (kv_width, hidden), p)
                expect(layer, self.v_proj, (kv_width, hidden), p)
                expect(layer, self.qkv_proj, (q_width + 2 * kv_width, hidden), p)
                expect(layer, self.o_proj, (hidden, q_width), p)
                expect(layer, self.q_norm, (qk_norm[0],), p)
                expect(layer, self.k_norm, (qk_norm[1],), p)
            if "mlp" in parts:
                self._expect_mlp(layer, expect, p, hidden, s["intermediate_size"],
                                 self.gate_proj, self.up_proj, self.gate_up_proj, self.down_proj)
            if "moe" in parts:
                moe, e, inter = self.moe, s["num_experts"], s["moe_intermediate_size"]
                expect(layer, moe.router, (e, hidden), p)
                rows = (2 if moe.gated else 1) * inter
                expect(layer, moe.experts, (e, rows, hidden), p, moe.expert_gate_up_proj or moe.expert_up_proj)
                expect(layer, moe.experts, (e, hidden, inter), p, moe.expert_down_proj)
            if "shared_expert" in parts:
                self._expect_mlp(layer, expect, p, hidden, s["shared_expert_intermediate_size"],
                                 *self.moe.shared_paths.values())
                expect(layer, self.moe.shared_expert_gate, (1, hidden), p)
            if "mamba" in parts:
                m = self.mamba
                width = s["mamba_num_heads"] * s["mamba_head_dim"]
                state = 2 * s["mamba_n_groups"] * s["mamba_state_size"]
                expect(layer, m.in_proj, (2 * width + state + s["mamba_num_heads"], hidden), p)
                expect(layer, m.conv1d, (width + state, 1, getattr(layer.get_submodule(m.conv1d), "kernel_size", (1,))[0]), p)
                expect(layer, m.out_proj, (hidden, width), p)
                if m.norm_module(layer) is not None:
                    expect(layer, m.norm, (width,), p)
                for name in m.head_tensors:
                    expect(layer, m.mixer, (s["mamba_num_heads"],), p, name)
            for name in self.layer_norm_roles_of(layer, parts):
                expect(layer, name, (hidden,), p)

    @staticmethod
    def _expect_mlp(layer, expect, prefix, hidden, inter, gate, up, gate_up, down) -> None:
        expect(layer, gate, (inter, hidden), prefix)
        expect(layer, up, (inter, hidden), prefix)
        expect(layer, gate_up, (2 * inter, hidden), prefix)
        expect(layer, down, (hidden, inter), prefix)

    @property
    def linear_paths(self) -> tuple[str, ...]:
        """Every attention and MLP projection of a decoder layer (fused ones included), e.g. for LoRA targets.

        Shared-expert and Mamba projections are included; fused 3-D experts are not ``nn.Linear`` modules.
        """
        paths = [self.q_proj, self.k_proj, self.v_proj, self.qkv_proj, self.o_proj,
                 self.gate_proj, self.up_proj, self.gate_up_proj, self.down_proj]
        if self.moe is not None:
            paths += list(self.moe.shared_paths.values())
        if self.mamba is not None:
            paths += [self.mamba.in_proj, self.mamba.out_proj]
        return tuple(dict.fromkeys(p for p in paths if p is not None))

    def up_weight(self, layer: nn.Module) -> torch.Tensor:
        """The MLP's up-projection weight ``[intermediate, hidden]`` (the second half of a fused ``gate_up_proj``)."""
        if self.gate_up_proj is not None:
            weight = layer.get_submodule(self.gate_up_proj).weight
            return weight[weight.shape[0] // 2 :]
        return layer.get_submodule(self.up_proj).weight

    def norm_gain(self, norm: nn.Module) -> torch.Tensor:
        """A norm's effective per-channel gain: ``w``, or ``1 + w`` for Gemma / Nemotron norms."""
        return norm.weight + 1.0 if self.norm_one_plus else norm.weight

    def embed_scale_value(self, hidden_size: int) -> float | None:
        """The forward-time embedding multiplier for ``hidden_size`` (``None``: not size-dependent)."""
        if self.embed_scale == "sqrt_hidden":
            return float(hidden_size**0.5)
        return None

    # ------------------------------------------------------------------ norm math
    @property
    def norm_one_plus(self) -> bool:
        """Whether norms apply ``(1 + w)`` rather than ``w``."""
        return self.norm_kind.endswith("one_plus")

    @torch.no_grad()
    def scale_norm(self, norm: nn.Module, factor: float, include_bias: bool = False) -> None:
        """Multiply a norm's effective gain by ``factor``.

        With ``include_bias=False`` (rescaling after pruning) a LayerNorm bias is untouched: it is added after
        the gain and does not depend on the channel count. With ``include_bias=True`` the whole output is
        scaled (``y -> factor * y``), used to fold an exact constant into the norm.
        """
        if self.norm_one_plus:
            # y = x_hat * (1 + w)  ->  (1 + w') = factor * (1 + w)
            norm.weight.mul_(factor).add_(factor - 1.0)
        else:
            norm.weight.mul_(factor)
        bias = getattr(norm, "bias", None)
        if include_bias and isinstance(bias, torch.Tensor):
            bias.mul_(factor)
