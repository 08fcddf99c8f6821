"""`MinitronPruneConfig`: what to prune to, and how importance is measured."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from transformers.utils import PushToHubMixin


CONFIG_NAME = "minitron_prune_config.json"

AGGREGATIONS = ("l2", "mean", "var")
DEPTH_CRITERIA = ("block_importance", "perplexity")
# Which recorded activations make the per-channel hidden score (see `ImportanceScores.hidden_scores`):
#   "matmul_inputs":        the activations that enter a matmul reading the hidden axis: pre-sublayer norm outputs
#                           (q/k/v and gate/up inputs), the final norm output (lm_head input), and the residual stream
#                           itself where a sublayer has no pre-norm (OLMo2). The papers' models are pre-norm only, so
#                           there this is exactly their "LayerNorm activations"; post-sublayer (sandwich) norms are
#                           left out.
#   "pre_sublayer":         "matmul_inputs" without the final norm: only what the attention and MLP sublayers read.
#   "all_norms":            every norm's output, pre- and post-sublayer (hf-minitron 0.1).
#   "all_norms_normalized": every norm's output, each norm's scores divided by their mean before summing.
#   "residual":             the residual stream (each decoder layer's output).
HIDDEN_IMPORTANCE_SOURCES = ("matmul_inputs", "pre_sublayer", "all_norms", "all_norms_normalized", "residual")
# How norm gains are corrected after hidden channels (or whole-projection q/k norm heads) are dropped:
#   "calibrated": each norm's gain is scaled so that the RMS over the kept channels matches the RMS over all of them,
#                 from the share of its input energy E[x^2] the kept channels carried on the calibration data
#                 (sqrt(share * H / H')); LayerNorm also shifts its bias by the change of mean. Equals "sqrt" when
#                 the dropped channels carried no energy.
#   "sqrt":       every gain times sqrt(H / H') (hf-minitron 0.1's `rescale_norms=True`): exact when the dropped
#                 channels are zero.
#   "none":       gains kept as they are (`rescale_norms=False`).
NORM_CORRECTIONS = ("calibrated", "sqrt", "none")
TARGET_FIELDS = (
    "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
    "num_experts", "moe_intermediate_size", "shared_expert_intermediate_size", "mamba_num_heads", "mamba_head_dim",
)
# How routed experts are ranked (all recorded in the same pass; see `ImportanceScores.expert_scores`):
#   "output_norm":    aggregated ||w_t * expert(x_t)||, the routing-weighted output norm of the expert (0 for tokens not
#                     routed to it): the expert analogue of the attention-head score.
#   "routing_weight": aggregated routing weight w_t the router gave the expert (0 when not in the token's top-k).
#   "router_probability": aggregated router probability of the expert on every token, picked or not (softmax, or sigmoid
#                     for Nemotron-H, of the router logits).
#   "frequency":      aggregated share of tokens routed to the expert.
EXPERT_IMPORTANCE_SOURCES = ("output_norm", "routing_weight", "router_probability", "frequency")


@dataclass
class MinitronPruneConfig(PushToHubMixin):
    """Target shape and importance settings for Minitron structured pruning.

    Target fields mirror the Hugging Face config names; ``None`` keeps the source model's value.

    Args:
        hidden_size: Target embedding / residual width (must stay a multiple of the target head count).
        intermediate_size: Target MLP width (the same for every layer).
        num_attention_heads: Target query heads; a multiple of the target ``num_key_value_heads``.
        num_key_value_heads: Target KV heads (whole KV groups are dropped with their query heads).
        num_hidden_layers: Target depth; layers of every block type (attention, Mamba, MLP, MoE) are ranked by
            ``depth_criterion``.
        num_experts: Target routed experts per MoE layer (Mixtral / Qwen3-MoE / GraniteMoeHybrid
            ``num_local_experts``, OLMoE / Qwen-MoE ``num_experts``, Nemotron-H ``n_routed_experts``); must stay
            ``>= num_experts_per_tok``. Experts are ranked per layer by ``expert_importance``.
        moe_intermediate_size: Target width of every routed expert (one width for all experts and layers: each
            expert keeps its own best neurons). Mixtral / OLMoE / GraniteMoeHybrid call it ``intermediate_size``.
        shared_expert_intermediate_size: Target width of the shared expert (Qwen2-MoE, Nemotron-H
            ``moe_shared_expert_intermediate_size``, GraniteMoeHybrid ``shared_intermediate_size``).
        mamba_num_heads: Target Mamba2 heads per Mamba layer, a multiple of the SSM groups (``n_groups``): heads are
            ranked within each group and every group keeps the same count (arXiv 2504.11409).
        mamba_head_dim: Target channels per Mamba head (each head keeps its own best channels).
        layers_to_drop: Explicit source layer indices to remove (overrides ranking).
        batch_aggregation: How per-sample scores are reduced over samples: ``"l2"``, ``"mean"`` or ``"var"``.
        sequence_aggregation: How per-token activations are reduced over a sample's tokens.
        depth_criterion: ``"block_importance"`` (1 - cos(in, out), same pass as width scores) or
            ``"perplexity"`` (one extra pass over the calibration data per layer).
        merge_pruned_heads: Opt-in head merge of the first Minitron paper: within each KV group the weakest kept
            query heads absorb the strongest pruned ones (``h_i <- 2 h_i - h_j`` on query rows and ``o_proj``
            columns). Off by default: measured on SmolLM2-135M (9 -> 6 heads), it raised zero-shot held-out
            WikiText-2 perplexity from 284 to 2.5M (docs/results.md).
        rescale_norms: Norm-gain correction after hidden pruning (and after dropping heads under a q/k norm that
            spans the whole projection, OLMo2), one of ``NORM_CORRECTIONS``: ``"calibrated"`` (default) scales each
            norm's gain by ``sqrt(s * H / H')``, where ``s`` is the share of that norm's input energy ``E[x^2]`` the
            kept channels carried on the calibration data, so the RMS over the kept channels matches what the norm
            computed over all of them (LayerNorm families also shift the bias by the change of mean);
            ``"sqrt"`` multiplies every gain by ``sqrt(H / H')`` (exact only when the dropped channels are zero);
            ``"none"`` keeps the gains. ``True``/``False`` (hf-minitron 0.1) mean ``"sqrt"``/``"none"``. Scores
            without recorded norm statistics (magnitude, random, 0.1 files) fall back from ``"calibrated"`` to
            ``"sqrt"``. Chosen by measurement on SmolLM2-135M and Gemma-3-270M (docs/results.md).
        hidden_importance_source: Which recorded activations rank hidden channels, one of
            ``HIDDEN_IMPORTANCE_SOURCES``: ``"matmul_inputs"`` (default: what the q/k/v, gate/up and lm_head matmuls
            read, i.e. the pre-sublayer and final norms' outputs, or the residual stream where a sublayer has no
            pre-norm), ``"all_norms"`` (every norm's output, post-sublayer "sandwich" norms included: hf-minitron
            0.1), ``"all_norms_normalized"`` (each norm's scores scaled to mean 1 before summing) or ``"residual"``
            (each layer's output). A pruning-time choice: one importance pass records every source. The default
            was chosen by measurement on SmolLM2-135M and Gemma-3-270M (docs/results.md, "Hidden importance on real
            weights"): on Gemma-3 hidden 640 -> 512, 386 held-out perplexity vs 3,433 for ``all_norms``.
        expert_importance: How routed experts are ranked, one of ``EXPERT_IMPORTANCE_SOURCES``: ``"output_norm"``
            (default: the routing-weighted output norm of the expert), ``"routing_weight"`` (routing weight mass),
            ``"router_probability"`` (router probability on every token) or ``"frequency"`` (share of tokens routed). A pruning-time choice: one importance pass records all three.
        num_calibration_samples: Calibration sequences to use (the papers use 1024).
        calibration_seq_length: Tokens per calibration sequence when text is tokenized for you.
        calibration_batch_size: Sequences per forward pass.

    Example:
        >>> from hf_minitron import MinitronPruneConfig
        >>> config = MinitronPruneConfig(hidden_size=432, intermediate_size=1024)
        >>> config.save_pretrained("prune_config")  # doctest: +SKIP
        >>> MinitronPruneConfig.from_pretrained("prune_config").hidden_size  # doctest: +SKIP
        432
    """

    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    num_hidden_layers: int | None = None
    num_experts: int | None = None
    moe_intermediate_size: int | None = None
    shared_expert_intermediate_size: int | None = None
    mamba_num_heads: int | None = None
    mamba_head_dim: int | None = None
    layers_to_drop: list[int] | None = None
    batch_aggregation: str = "l2"
    sequence_aggregation: str = "mean"
    depth_criterion: str = "block_importance"
    # Typed `str` so command-line parsing (TrlParser) accepts the named values; True/False are accepted too.
    rescale_norms: str = "calibrated"
    hidden_importance_source: str = "matmul_inputs"
    merge_pruned_heads: bool = False
    expert_importance: str = "output_norm"
    num_calibration_samples: int = 1024
    calibration_seq_length: int = 512
    calibration_batch_size: int = 8
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in TARGET_FIELDS:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"`{name}` must be a positive integer or None, got {value!r}.")
        for name in ("batch_aggregation", "sequence_aggregation"):
            if getattr(self, name) not in AGGREGATIONS:
                raise ValueError(f"`{name}` must be one of {AGGREGATIONS}, got {getattr(self, name)!r}.")
        legacy = {"true": "sqrt", "false": "none"}  # hf-minitron 0.1's boolean, from Python, YAML or a flag
        if isinstance(self.rescale_norms, bool):
            self.rescale_norms = "sqrt" if self.rescale_norms else "none"
        elif isinstance(self.rescale_norms, str) and self.rescale_norms.lower() in legacy:
            self.rescale_norms = legacy[self.rescale_norms.lower()]
        if self.rescale_norms not in NORM_CORRECTIONS:
            raise ValueError(
                f"`rescale_norms` must be one of {NORM_CORRECTIONS} (or True/False for 'sqrt'/'none'), got {self.rescale_norms!r}."
            )
        if self.hidden_importance_source not in HIDDEN_IMPORTANCE_SOURCES:
            raise ValueError(
                f"`hidden_importance_source` must be one of {HIDDEN_IMPORTANCE_SOURCES}, got {self.hidden_importance_source!r}."
            )
        if self.expert_importance not in EXPERT_IMPORTANCE_SOURCES:
            raise ValueError(
                f"`expert_importance` must be one of {EXPERT_IMPORTANCE_SOURCES}, got {self.expert_importance!r}."
            )
        if self.depth_criterion not in DEPTH_CRITERIA:
            raise ValueError(f"`depth_criterion` must be one of {DEPTH_CRITERIA}, got {self.depth_criterion!r}.")
        if self.layers_to_drop is not None:
            if isinstance(self.layers_to_drop, (str, bytes)) or not hasattr(self.layers_to_drop, "__iter__"):
                raise ValueError(f"`layers_to_drop` must be a list of layer indices such as [3, 7], got {self.layers_to_drop!r}.")
            drop = list(self.layers_to_drop)
            # bool is an int subclass: `[true]` in YAML must not silently mean layer 1.
            bad = [i for i in drop if isinstance(i, bool) or not isinstance(i, int) or i < 0]
            if bad or len(set(drop)) != len(drop):
                raise ValueError(f"`layers_to_drop` must be distinct non-negative layer indices (integers), got {drop}.")
            self.layers_to_drop = sorted(drop)
        for name in ("num_calibration_samples", "calibration_seq_length", "calibration_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
        if self.calibration_seq_length < 2:
            raise ValueError("`calibration_seq_length` must be >= 2 tokens.")

    @property
    def prunes_depth(self) -> bool:
        return self.num_hidden_layers is not None or bool(self.layers_to_drop)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MinitronPruneConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown MinitronPruneConfig field(s) {unknown}; valid fields are {sorted(known)}.")
        return cls(**data)

    def without_targets(self) -> "MinitronPruneConfig":
        """This config's selection settings with no target sizes: what an importance pass needs when the target is
        chosen later (architecture search), so that no target check applies."""
        return replace(self, **{name: None for name in TARGET_FIELDS}, layers_to_drop=None)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> str:
        """Write the config as ``minitron_prune_config.json`` in ``save_directory`` (atomically); returns the file.

        Raises:
            ValueError: ``save_directory`` is a file or is not writable.
        """
        from .atomic import atomic_write_json, check_writable_dir

        folder = check_writable_dir(save_directory, what="save_directory")
        return atomic_write_json(os.path.join(folder, CONFIG_NAME), self.to_dict(), sort_keys=True)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, subfolder: str | None = None, **hub_kwargs) -> "MinitronPruneConfig":
        """Load from a local folder or JSON file, or from a Hub repo (``hf_hub_download``).

        Args:
            path: A folder holding ``minitron_prune_config.json``, the JSON file itself, or a Hub repo id.
            subfolder: A sub-folder of ``path`` (local folder or Hub repo) holding the file.
            hub_kwargs: Passed to ``huggingface_hub.hf_hub_download`` (``revision``, ``token``, ``cache_dir``, ...).

        Raises:
            ValueError: the file is not found locally or on the Hub, or it holds an unknown field.

        Example:
            >>> MinitronPruneConfig.from_pretrained("me/smollm2-minitron", subfolder="search")  # doctest: +SKIP
        """
        path = os.fspath(path)
        local = os.path.join(path, subfolder) if subfolder else path
        if os.path.isfile(local):
            file = local
        elif os.path.isdir(local):
            file = os.path.join(local, CONFIG_NAME)
            if not os.path.isfile(file):
                raise ValueError(f"No {CONFIG_NAME} in the folder {local!r}; save one with `MinitronPruneConfig.save_pretrained`.")
        elif os.path.isdir(path):  # a local folder without that subfolder
            raise ValueError(f"The folder {path!r} has no subfolder {subfolder!r}.")
        else:
            file = _download(path, subfolder, hub_kwargs)
        with open(file, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def _download(repo_id: str, subfolder: str | None, hub_kwargs: dict[str, Any]) -> str:
    """``minitron_prune_config.json`` of a Hub repo (``subfolder`` inside it), with an error that says what to check."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    where = f"{repo_id!r}" + (f" (subfolder {subfolder!r})" if subfolder else "")
    try:
        return hf_hub_download(repo_id, CONFIG_NAME, subfolder=subfolder or None, **hub_kwargs)
    except HFValidationError:
        raise ValueError(f"{repo_id!r} is neither a local folder or file nor a valid Hub repo id (`owner/name`).") from None
    except RepositoryNotFoundError:
        raise ValueError(f"No Hub repo {repo_id!r} (or it is private: log in with `hf auth login`), and no local path of that name.") from None
    except LocalEntryNotFoundError:
        raise ValueError(
            f"Could not download {CONFIG_NAME} from {where}: the Hub cannot be reached and the file is not cached. "
            "Check the connection, or pass a local folder."
        ) from None
    except EntryNotFoundError:
        raise ValueError(f"The Hub repo {where} has no {CONFIG_NAME}.") from None
