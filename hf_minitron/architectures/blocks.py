"""Sub-layouts for blocks beyond attention + dense MLP: sparse mixture-of-experts and Mamba2 mixers.

Both are plain data held by :class:`~hf_minitron.architectures.layout.ArchitectureLayout` (``moe=`` / ``mamba=``).
Paths are relative to one decoder layer unless said otherwise. Whether a given layer holds one of these blocks is
read off the built model (does the path resolve?), so models that mix block types per layer (Qwen-MoE dense layers,
Nemotron-H, GraniteMoeHybrid) need no per-family code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


# Sizes a module attribute can mirror, beyond the dense ones of `layout.SIZE_NAMES`.
BLOCK_SIZE_NAMES = (
    "experts", "moe_intermediate", "shared_intermediate",
    "mamba_heads", "mamba_head_dim", "mamba_intermediate", "mamba_conv_dim", "mamba_group_size",
)


@dataclass(frozen=True)
class MoELayout:
    """A sparse mixture-of-experts block with transformers-5 fused experts, and its optional shared expert.

    The experts module holds 3-D parameters, one slice per expert: ``gate_up_proj [E, 2 * I, H]`` (rows
    ``[gate; up]``) or, for non-gated experts, ``up_proj [E, I, H]``; and ``down_proj [E, H, I]``. Its forward is
    ``experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`` and computes, for every
    token and each of its ``k`` experts, ``w * down(act(gate(x)) * up(x))`` (or ``w * down(act(up(x)))``). The router
    holds ``weight [E, H]`` and possibly per-expert tensors ``[E]`` (``router_expert_tensors``).

    The shared expert is an ordinary MLP every token goes through (``shared_*`` paths; fused ``[gate; up]`` rows in
    ``shared_gate_up_proj``), optionally scaled per token by ``sigmoid(shared_expert_gate(x))`` (a ``[1, H]`` linear).

    Example:
        >>> from hf_minitron.architectures import get_layout
        >>> get_layout("qwen2_moe").moe.shared_expert_gate
        'mlp.shared_expert_gate'
    """

    router: str = "mlp.gate"
    experts: str = "mlp.experts"
    # Parameter names on the experts module.
    expert_gate_up_proj: str | None = "gate_up_proj"
    expert_up_proj: str | None = None
    expert_down_proj: str = "down_proj"
    expert_activation: str = "act_fn"  # attribute of the experts module holding the activation
    router_expert_tensors: tuple[str, ...] = ()
    # How router logits (the router's first output, [T, E]) become per-expert probabilities: "softmax" or "sigmoid".
    router_probability: str = "softmax"
    # Shared expert (paths relative to the layer; None: the family has none).
    shared_gate_proj: str | None = None
    shared_up_proj: str | None = None
    shared_gate_up_proj: str | None = None
    shared_down_proj: str | None = None
    shared_expert_gate: str | None = None
    # Config field names.
    num_experts_field: str = "num_experts"
    top_k_field: str = "num_experts_per_tok"
    intermediate_size_field: str = "moe_intermediate_size"
    shared_intermediate_size_field: str | None = None
    # Group-limited routing (Nemotron-H `n_group`): the router first picks groups of experts, so experts are pruned
    # evenly within each group; `min_experts_per_group` is what its group scoring needs (top-2 per group).
    expert_groups_field: str | None = None
    min_experts_per_group: int = 1
    # Which layers are sparse, when the config says it with a list of dense layer indices and a step (Qwen-MoE
    # `mlp_only_layers`, `decoder_sparse_step`): rewritten from the kept layers on depth pruning.
    dense_layers_field: str | None = None
    sparse_step_field: str | None = None
    # A config field that, when set, moves the experts to a latent width behind extra projections (Nemotron-H
    # `moe_latent_size`): not supported, such models are refused with a clear error.
    latent_size_field: str | None = None
    # Module attributes that cache sizes: {module path relative to the layer: {attribute: size name}}.
    attributes: dict[str, dict[str, str]] = field(default_factory=dict)
    # Attributes of the *ForCausalLM model itself that cache sizes (its load-balancing loss reads `num_experts`).
    model_attributes: dict[str, str] = field(default_factory=lambda: {"num_experts": "experts"})

    def __post_init__(self) -> None:
        if (self.expert_gate_up_proj is None) == (self.expert_up_proj is None):
            raise ValueError("Set exactly one of expert_gate_up_proj (gated experts) and expert_up_proj (non-gated).")
        if self.shared_down_proj is not None and self.shared_gate_up_proj is None and self.shared_up_proj is None:
            raise ValueError("A shared expert needs shared_up_proj (with or without shared_gate_proj) or shared_gate_up_proj.")
        if self.shared_down_proj is not None and self.shared_intermediate_size_field is None:
            raise ValueError("A shared expert needs shared_intermediate_size_field (its config width).")
        if self.router_probability not in ("softmax", "sigmoid"):
            raise ValueError(f"router_probability must be 'softmax' or 'sigmoid', got {self.router_probability!r}.")
        if self.min_experts_per_group < 1:
            raise ValueError("min_experts_per_group must be >= 1.")

    def read_sizes(self, config) -> dict[str, int]:
        """``num_experts``, ``moe_intermediate_size``, ``num_experts_per_tok``, ``num_expert_groups`` (1 without
        group-limited routing) and, with a shared expert, ``shared_expert_intermediate_size``."""
        sizes = {
            "num_experts": getattr(config, self.num_experts_field),
            "moe_intermediate_size": getattr(config, self.intermediate_size_field),
            "num_experts_per_tok": getattr(config, self.top_k_field),
            "num_expert_groups": getattr(config, self.expert_groups_field) if self.expert_groups_field else 1,
        }
        if self.shared_intermediate_size_field is not None:
            sizes["shared_expert_intermediate_size"] = getattr(config, self.shared_intermediate_size_field)
        return sizes

    def write_sizes(self, config, sizes: dict[str, int]) -> None:
        setattr(config, self.num_experts_field, sizes["num_experts"])
        setattr(config, self.intermediate_size_field, sizes["moe_intermediate_size"])
        if self.shared_intermediate_size_field is not None:
            setattr(config, self.shared_intermediate_size_field, sizes["shared_expert_intermediate_size"])

    @property
    def gated(self) -> bool:
        return self.expert_gate_up_proj is not None

    @property
    def shared_paths(self) -> dict[str, str | None]:
        """The shared expert as MLP paths (``gate_proj``, ``up_proj``, ``gate_up_proj``, ``down_proj``)."""
        return {
            "gate_proj": self.shared_gate_proj,
            "up_proj": self.shared_up_proj,
            "gate_up_proj": self.shared_gate_up_proj,
            "down_proj": self.shared_down_proj,
        }


@dataclass(frozen=True)
class MambaLayout:
    """A Mamba2 mixer (selective SSM with multi-head state, grouped B/C and a gated group RMSNorm).

    With ``Hm`` heads of ``P`` channels (``I = Hm * P``), ``G`` groups and state size ``N``:

    * ``in_proj`` ``[I + (I + 2 G N) + Hm, H]``, output rows ``[z (I); x (I); B (G N); C (G N); dt (Hm)]``;
    * ``conv1d`` depthwise over the ``I + 2 G N`` channels ``[x; B; C]``;
    * per-head tensors ``A_log``, ``D``, ``dt_bias`` ``[Hm]``;
    * ``norm``: ``RMSNorm(y * act(z))`` with the RMS taken within each of the ``G`` groups of ``I / G`` channels;
    * ``out_proj`` ``[H, I]``.

    Head ``h`` reads group ``h // (Hm / G)`` of B and C, so heads are pruned within groups (every group keeps the same
    count, arXiv 2504.11409 section 3); head channels (``P``) are independent within a head and can be pruned per head.

    Example:
        >>> from hf_minitron.architectures import get_layout
        >>> get_layout("nemotron_h").mamba.in_proj
        'mixer.in_proj'
    """

    mixer: str = "mamba"
    in_proj: str = "mamba.in_proj"
    conv1d: str = "mamba.conv1d"
    out_proj: str = "mamba.out_proj"
    norm: str | None = "mamba.norm"  # a norm module without a weight (nn.Identity: Falcon-H1 `mamba_rms_norm=False`) is skipped
    norm_gate_activation: str = "silu"
    # Attribute of the norm that, when true, applies the gate after normalising (Falcon-H1 `norm_before_gate`): the RMS
    # is then taken over y alone instead of y * act(z).
    norm_before_gate_attribute: str | None = None
    head_tensors: tuple[str, ...] = ("A_log", "D", "dt_bias")  # relative to the mixer
    # Buffers laid out along in_proj's output rows (e.g. a per-row multiplier), sliced with those rows on the last axis.
    in_proj_buffers: tuple[str, ...] = ()  # relative to the mixer
    # Config field names.
    num_heads_field: str = "mamba_num_heads"
    head_dim_field: str = "mamba_head_dim"
    n_groups_field: str = "n_groups"
    state_size_field: str = "ssm_state_size"
    # A config integer holding the mixer width heads * head_dim (Falcon-H1 `mamba_d_ssm`): rewritten when set.
    width_field: str | None = None
    # A config integer with mixer width = expand * hidden_size (GraniteMoeHybrid `mamba_expand`, and Falcon-H1 when its
    # width field is None): rewritten, and the target refused when the new width is not a whole multiple of the new
    # hidden size.
    expand_field: str | None = None
    # Module attributes that cache sizes: {path relative to the mixer ("" = the mixer): {attribute: size name}}.
    attributes: dict[str, dict[str, str]] = field(
        default_factory=lambda: {
            "": {
                "num_heads": "mamba_heads",
                "head_dim": "mamba_head_dim",
                "intermediate_size": "mamba_intermediate",
                "conv_dim": "mamba_conv_dim",
                "hidden_size": "hidden",
            },
            "norm": {"group_size": "mamba_group_size"},
        }
    )

    def read_sizes(self, config) -> dict[str, int]:
        """``mamba_num_heads``, ``mamba_head_dim``, ``mamba_n_groups``, ``mamba_state_size``, and ``mamba_expand`` when
        the config derives the width from ``expand * hidden_size`` (see :meth:`expand`)."""
        sizes = {
            "mamba_num_heads": getattr(config, self.num_heads_field),
            "mamba_head_dim": getattr(config, self.head_dim_field),
            "mamba_n_groups": getattr(config, self.n_groups_field),
            "mamba_state_size": getattr(config, self.state_size_field),
        }
        if self.ties_width_to_hidden(config):
            sizes["mamba_expand"] = getattr(config, self.expand_field)
        return sizes

    def ties_width_to_hidden(self, config) -> bool:
        """Whether ``config`` derives the Mamba width from ``expand * hidden_size`` (no explicit width field value)."""
        explicit = self.width_field is not None and getattr(config, self.width_field, None) is not None
        return self.expand_field is not None and not explicit

    def write_sizes(self, config, sizes: dict[str, int]) -> None:
        setattr(config, self.num_heads_field, sizes["mamba_num_heads"])
        setattr(config, self.head_dim_field, sizes["mamba_head_dim"])
        if "mamba_expand" in sizes:
            setattr(config, self.expand_field, mamba_expand(sizes, self.expand_field))
        elif self.width_field is not None and getattr(config, self.width_field, None) is not None:
            setattr(config, self.width_field, sizes["mamba_num_heads"] * sizes["mamba_head_dim"])

    def norm_module(self, layer: nn.Module) -> nn.Module | None:
        """The gated norm of ``layer``'s mixer, or ``None`` when the family or this model has none (no weight)."""
        if self.norm is None:
            return None
        try:
            norm = layer.get_submodule(self.norm)
        except AttributeError:
            return None
        return norm if isinstance(getattr(norm, "weight", None), torch.Tensor) else None

    def relative(self, path: str) -> str:
        """``path`` (relative to the layer) made relative to the mixer."""
        prefix = f"{self.mixer}."
        if not path.startswith(prefix):
            raise ValueError(f"Mamba path {path!r} is not under the mixer {self.mixer!r}.")
        return path[len(prefix):]


def mamba_expand(sizes: dict[str, int], field_name: str = "mamba_expand") -> int:
    """The integer ``expand`` with Mamba width ``heads * head_dim == expand * hidden_size``.

    Raises:
        ValueError: the width is not a whole multiple of ``hidden_size``; the message says what would be.
    """
    heads, head_dim, hidden = sizes["mamba_num_heads"], sizes["mamba_head_dim"], sizes["hidden_size"]
    width = heads * head_dim
    if width % hidden:
        raise ValueError(
            f"This model ties the Mamba width to `{field_name}` x hidden_size with an integer `{field_name}`: "
            f"mamba_num_heads x mamba_head_dim = {heads} x {head_dim} = {width} is not a multiple of hidden_size={hidden}. "
            f"Choose a hidden_size that divides {width}, or Mamba heads and head_dim whose product is a multiple of {hidden}."
        )
    return width // hidden
