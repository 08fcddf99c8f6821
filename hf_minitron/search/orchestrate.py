"""`search_architectures`: enumerate, count, select, prune, (retrain,) evaluate and rank the candidates."""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from ..config import MinitronPruneConfig
from ..counting import active_params as _active_params
from ..data import batch_samples, to_samples
from ..importance import ImportanceScores, estimate_importance
from ..importance.baselines import random_importance
from ..logging import get_logger
from ..pruning import prune_model
from ..pruning.plan import make_plan
from ..pruning.prune import check_plan_reloads
from ..validation import check_prunable_model
from .counting import _ParamCounter, _unique_numel
from .evaluation import heldout_loss
from .results import Candidate, SearchResult
from .retraining import _EvalAtSteps, _free, _restore, distill_candidate
from .space import _resolve_search_space, enumerate_shapes, search_axes


logger = get_logger(__name__)

SELECTIONS = ("spread", "closest")

RetrainFn = Callable[..., nn.Module]


# ----------------------------------------------------------------------------------------------- selection
class _Targets:
    """The total and/or active parameter targets and their windows; distance = summed relative deviation."""

    def __init__(self, total: int | None, active: int | None, tolerance: float) -> None:
        self.total, self.active, self.tolerance = total, active, tolerance

    def deviations(self, c: Candidate) -> list[float]:
        out = []
        if self.total is not None:
            out.append(c.num_params / self.total - 1)
        if self.active is not None:
            out.append(c.active_params / self.active - 1)
        return out

    def within(self, c: Candidate) -> bool:
        return all(abs(d) <= self.tolerance + 1e-12 for d in self.deviations(c))

    def distance(self, c: Candidate) -> float:
        return sum(abs(d) for d in self.deviations(c))


def _tie_key(c: Candidate, targets: _Targets) -> tuple:
    """Deterministic order among equals: closest to the target(s), then the larger shape (layers, hidden, ...)."""
    return (targets.distance(c), tuple(-v for v in c.shape))


def _select(candidates: list[Candidate], k: int, how: str, source: Mapping[str, int], targets: _Targets) -> list[Candidate]:
    ordered = sorted(candidates, key=lambda c: _tie_key(c, targets))
    if len(ordered) <= k or how == "closest":
        return ordered[:k]
    # "spread": greedy farthest-point sampling in relative-size space, starting from the closest to the target.
    axes = search_axes(source)
    points = [[c.sizes[a] / source[a] for a in axes] for c in ordered]
    chosen = [0]
    dist = [math.dist(points[0], p) for p in points]
    while len(chosen) < k:
        best = max(range(len(ordered)), key=lambda i: (dist[i], -i))  # ties -> earlier in the tie order
        chosen.append(best)
        dist = [min(d, math.dist(points[best], p)) for d, p in zip(dist, points)]
    return [ordered[i] for i in sorted(chosen)]


def _rebuilds(model: nn.Module, layout, source, parts, c: Candidate, scores: ImportanceScores) -> bool:
    """Whether the shape prunes to a model stock transformers rebuilds and runs (meta dry run; e.g. OLMoE and Helium
    tie ``heads x head_dim`` to ``hidden_size``, hybrids keep an attention layer). Shapes do not depend on which units
    ``scores`` keep, only which layers (mixed-layer models are searched over depth with real scores)."""
    try:  # make_plan refuses e.g. a hybrid without attention layers (no cache); the dry run, tied sizes
        plan = make_plan(dataclasses.replace(c.config, rescale_norms="none"), dict(source), scores, parts, layout)
        check_plan_reloads(model, plan, layout)
    except ValueError as err:
        logger.info(f"{c.name} is left out: {err}")
        return False
    return True


def _select_rebuildable(model, layout, source, parts, within, k, how, targets, scores) -> tuple[list[Candidate], int]:
    """:func:`_select` among the shapes that rebuild; re-selects without the ones that do not. Returns (chosen, dropped)."""
    pool, verified, dropped = list(within), set(), 0
    while pool:
        chosen = _select(pool, k, how, source, targets)
        bad = [c for c in chosen if id(c) not in verified and not _rebuilds(model, layout, source, parts, c, scores)]
        verified.update(id(c) for c in chosen if c not in bad)
        if not bad:
            return chosen, dropped
        dropped += len(bad)
        pool = [c for c in pool if all(c is not b for b in bad)]
    return [], dropped


# ------------------------------------------------------------------------------------------------- search
def _resolve_target(target_params: int | float, source_params: int, name: str = "target_params") -> int:
    if isinstance(target_params, bool) or not isinstance(target_params, (int, float)):
        raise TypeError(f"`{name}` must be an int (parameters) or a float fraction of the source, got {target_params!r}.")
    if isinstance(target_params, float) and target_params > 1.0 and target_params.is_integer():
        target_params = int(target_params)  # a count written as a float (YAML `8.0e7`, a float CLI flag)
    if isinstance(target_params, float):
        if not 0.0 < target_params <= 1.0:
            raise ValueError(
                f"A fractional `{name}` must be in (0, 1], got {target_params}: pruning can only shrink "
                f"(pass an absolute count <= {source_params:,} or a fraction such as 0.6)."
            )
        return int(round(target_params * source_params))
    if target_params < 1:
        raise ValueError(f"`{name}` must be positive, got {target_params}.")
    if target_params > source_params:
        raise ValueError(
            f"{name}={target_params:,} is larger than the source model ({source_params:,} parameters): pruning "
            f"can only shrink; choose <= {source_params:,} or a fraction such as 0.6."
        )
    return int(target_params)


def search_architectures(
    model: nn.Module,
    importance: ImportanceScores | None,
    target_params: int | float | None,
    tolerance: float = 0.05,
    search_space: Mapping[str, Sequence[int]] | str | None = None,
    max_candidates: int = 8,
    retrain_steps: int = 0,
    train_dataset: Any = None,
    eval_dataset: Any = None,
    use_lora: bool = False,
    *,
    multiple_of: int | None = None,
    selection: str = "spread",
    prune_config: MinitronPruneConfig | None = None,
    tokenizer=None,
    seq_length: int = 512,
    eval_batch_size: int = 8,
    seed: int = 0,
    retrain_eval_steps: Sequence[int] = (),
    training_kwargs: Mapping[str, Any] | None = None,
    lora_config=None,
    retrain_fn: RetrainFn | None = None,
    calibration_data: Any = None,
    target_active_params: int | float | None = None,
) -> SearchResult:
    """Find the best pruned shape of ``model`` with about ``target_params`` parameters (Minitron §3).

    1. Enumerate every valid shape of ``search_space`` and keep those whose exact parameter count (meta-device
       build, tied embeddings counted once) is within ``±tolerance`` of the target. For mixture-of-experts models
       ``target_active_params`` bounds the parameters used per token (the total minus the routed experts a token is
       not sent to, :func:`hf_minitron.counting.active_params`) instead of, or as well as, the total.
    2. If more than ``max_candidates`` remain, choose deterministically by ``selection``: ``"spread"`` (default:
       the shape closest to the target, then greedily the shape farthest from those chosen, in sizes relative to
       the source, so the candidates cover the space) or ``"closest"`` (the ones nearest the target).
    3. With ``eval_dataset``, prune a copy of ``model`` to each candidate (one at a time, from the one
       ``importance`` pass) and measure the zero-shot held-out loss.
    4. With ``retrain_steps > 0``, distill each pruned copy from ``model`` for ``retrain_steps`` on
       ``train_dataset`` (same data, order, seed and budget for all; full weights, or LoRA adapters with
       ``use_lora``) and measure the held-out loss again.

    Candidates are ranked by the retrained loss when ``retrain_steps > 0``, else by the zero-shot loss, else (no
    held-out data) by distance to the target. Equal scores are broken by distance to the target, then by the
    larger shape (layers, hidden, heads, KV heads, MLP, then the block axes), so the order is deterministic. With
    both targets the distance is the sum of the two relative deviations.

    MoE and hybrid families search their block axes too (``num_experts``, ``moe_intermediate_size``,
    ``shared_expert_intermediate_size``, ``mamba_num_heads``, ``mamba_head_dim``; see :func:`default_search_space`).
    In a model whose layers hold different blocks (Mamba / attention / MoE / dense), which layers depth pruning keeps
    decides the count, so a search over fewer layers ranks them with ``importance`` first, exactly as pruning will.

    Args:
        model: The source ``*ForCausalLM`` (not modified; it is the teacher when retraining).
        importance: Scores from :func:`~hf_minitron.estimate_importance` on ``model``; estimated from
            ``calibration_data`` when ``None``.
        target_params: Absolute parameter count (int) or fraction of the source's parameters (float in (0, 1]);
            ``None`` to bound only the active parameters.
        tolerance: Relative window around the target, in (0, 1).
        search_space: ``{axis: [values]}`` overriding any default axis (axes: ``num_hidden_layers``,
            ``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size``), or a preset:
            ``"all"`` (default axes, see :func:`default_search_space`), ``"width"`` (depth fixed, the paper's width
            search) or ``"depth"`` (only layers vary). MoE / hybrid models add their block axes.
        max_candidates: Most candidates to evaluate.
        retrain_steps: Distillation steps per candidate (0: zero-shot ranking only).
        train_dataset: Retraining data: anything :func:`hf_minitron.data.to_samples` accepts.
        eval_dataset: Held-out data for the ranking loss, same formats.
        use_lora: Retrain LoRA adapters (PEFT) on the pruned model instead of all its weights.
        multiple_of: Keep only hidden and MLP sizes that are multiples of this (e.g. 64/128/256 for fast kernels;
            the source's own size is always allowed); also the step of the default axes.
        selection: ``"spread"`` or ``"closest"`` (see 2.).
        prune_config: Importance / pruning settings copied into every candidate's config (e.g.
            ``depth_criterion``, ``rescale_norms``); its target sizes are ignored.
        tokenizer: Needed for text datasets and for retraining.
        seq_length: Tokens per sample when datasets are text.
        eval_batch_size: Sequences per held-out forward pass.
        seed: Seed of every retraining run.
        retrain_eval_steps: Also record the held-out loss after these steps (``Candidate.retrain_curve``); with
            the constant learning rate of the default retraining, the loss at step ``n`` equals an ``n``-step run.
        training_kwargs: Overrides of the retraining :class:`~hf_minitron.distillation.DistillationConfig`.
        lora_config: A ``peft.LoraConfig`` for ``use_lora`` (default rank 16 on q/k/v/o/gate/up/down).
        retrain_fn: Replaces the default :func:`distill_candidate`; called as ``retrain_fn(student, teacher=model,
            train_dataset=Dataset, max_steps=retrain_steps, seed=seed)`` and returns the trained model.
        calibration_data: Used to estimate ``importance`` once when it is ``None``.
        target_active_params: Parameters used per token: a count, or a fraction of the source's active parameters.
            Candidates must lie within ``±tolerance`` of it (and of ``target_params`` when that is set too).

    Returns:
        A :class:`SearchResult`: the candidates best first, each with ``.config``, ``.num_params``,
        ``.active_params`` and its scores.

    Raises:
        ValueError: neither target is set, a target exceeds the source, ``tolerance`` is out of range, the search
            space is invalid (e.g. an expert axis on a dense model), no valid shape lies within the tolerance (the
            message says what to change), a depth search of a model with mixed layers has neither ``importance`` nor
            ``calibration_data``, or data is missing.

    Example:
        >>> n = sum(p.numel() for p in model.parameters())  # doctest: +SKIP
        >>> result = search_architectures(model, scores, target_params=int(0.6 * n), max_candidates=6)  # doctest: +SKIP
        >>> [(c.name, c.num_params) for c in result]  # doctest: +SKIP
    """
    start = time.perf_counter()
    layout = check_prunable_model(model)
    source = layout.read_sizes(model.config)
    source_params = _unique_numel(model)
    source_active = _active_params(model)
    if target_params is None and target_active_params is None:
        raise ValueError("Set `target_params` (total parameters) and/or `target_active_params` (parameters used per token).")
    target = None if target_params is None else _resolve_target(target_params, source_params)
    active_target = (
        None if target_active_params is None
        else _resolve_target(target_active_params, source_active, "target_active_params")
    )
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0.0 < tolerance < 1.0:
        raise ValueError(f"`tolerance` must be a fraction in (0, 1) such as 0.05 (±5%), got {tolerance!r}.")
    if isinstance(max_candidates, bool) or not isinstance(max_candidates, int) or max_candidates < 1:
        raise ValueError(f"`max_candidates` must be a positive integer, got {max_candidates!r}.")
    if isinstance(retrain_steps, bool) or not isinstance(retrain_steps, int) or retrain_steps < 0:
        raise ValueError(f"`retrain_steps` must be a non-negative integer, got {retrain_steps!r}.")
    if selection not in SELECTIONS:
        raise ValueError(f"`selection` must be one of {SELECTIONS}, got {selection!r}.")
    eval_steps = sorted(set(retrain_eval_steps))
    if any(not isinstance(s, int) or not 0 < s <= retrain_steps for s in eval_steps):
        raise ValueError(f"`retrain_eval_steps` must be steps in 1..retrain_steps={retrain_steps}, got {list(retrain_eval_steps)}.")
    if eval_steps and retrain_fn is not None:
        raise ValueError("`retrain_eval_steps` works with the default retraining only; record them in your `retrain_fn`.")
    if retrain_steps > 0:
        if train_dataset is None:
            raise ValueError("`retrain_steps > 0` needs `train_dataset=` (the short distillation data).")
        if eval_dataset is None:
            raise ValueError("`retrain_steps > 0` needs `eval_dataset=`: candidates are ranked by held-out loss.")
    elif use_lora:
        logger.warning("`use_lora=True` has no effect with `retrain_steps=0` (LoRA only applies to retraining).")
    base_config = prune_config or MinitronPruneConfig()
    if base_config.layers_to_drop:
        raise ValueError("`prune_config.layers_to_drop` conflicts with a search over `num_hidden_layers`; leave it unset.")

    # 1. Enumerate and count.
    parts = [layout.layer_parts(layer) for layer in layout.decoder_layers(model)]
    shapes = enumerate_shapes(source, search_space, multiple_of, layout, parts)
    if not shapes:
        raise ValueError(
            f"The search space {_resolve_search_space(source, search_space, multiple_of)} has no valid shape: hidden_size "
            "must be a multiple of num_attention_heads, itself a multiple of num_key_value_heads (and num_experts at "
            "least num_experts_per_tok, Mamba heads a multiple of the SSM groups); add such values."
        )
    counter = _ParamCounter(model.config, layout)
    if len(counter.kinds) > 1 and any(s["num_hidden_layers"] < source["num_hidden_layers"] for s in shapes) and importance is None:
        if calibration_data is None:
            raise ValueError(
                f"This {model.config.model_type} model's layers hold different blocks, so which layers a shallower shape "
                "keeps decides its size: pass `importance=estimate_importance(model, ...)` or `calibration_data=`, or fix "
                "the depth (`search_space={'num_hidden_layers': [%d]}` or the 'width' preset)." % source["num_hidden_layers"]
            )
        importance = estimate_importance(model, calibration_data, base_config.without_targets(), tokenizer=tokenizer)
    counter.prepare(shapes)
    axes = search_axes(source)
    targets = _Targets(target, active_target, float(tolerance))
    counted = []
    for s in shapes:
        kept = counter.kept_layers(s, base_config, importance)
        total, active = counter(s, kept)
        config = dataclasses.replace(base_config, **{a: s[a] for a in axes})
        counted.append(Candidate(config=config, num_params=total, sizes=s, active_params=active, kept_layers=kept))
    within = [c for c in counted if targets.within(c)]
    if not within:
        nearest = min(counted, key=lambda c: _tie_key(c, targets))
        what = " and ".join(
            f"{name}={value:,} ({100 * value / src:.1f}% of the source's {src:,})"
            for name, value, src in (("target_params", target, source_params), ("target_active_params", active_target, source_active))
            if value is not None
        )
        smallest = min(c.num_params for c in counted) if target is not None else min(c.active_params for c in counted)
        high = (target if target is not None else active_target) * (1 + tolerance)
        hint = (
            f"Even the smallest shape has {smallest:,} {'parameters' if target is not None else 'active parameters'}: add "
            "smaller values to `search_space` (fewer layers, smaller hidden/MLP sizes, fewer or narrower experts) or raise "
            "the target."
            if smallest > high
            else f"Widen `tolerance`, move the target (the nearest valid shape {nearest.name} has {nearest.num_params:,} "
            f"parameters, {nearest.active_params:,} active), or add values to `search_space`."
        )
        raise ValueError(
            f"No valid shape of the {len(counted)} enumerated lies within ±{100 * tolerance:g}% of {what}. {hint}"
        )
    dry_scores = importance if importance is not None else random_importance(model)  # shapes only
    chosen, dropped = _select_rebuildable(model, layout, source, parts, within, max_candidates, selection, targets, dry_scores)
    if dropped:
        logger.warning(
            f"{dropped} shape(s) within the tolerance were left out: pruning refuses them (e.g. this "
            f"{model.config.model_type} model ties num_attention_heads x head_dim to hidden_size, or a hybrid would keep "
            "no attention layer); see the info log for each."
        )
    if not chosen:
        raise ValueError(
            f"None of the {len(within)} shapes within the tolerance can be pruned to a model stock transformers rebuilds "
            f"and runs (this {model.config.model_type} model may tie num_attention_heads x head_dim to hidden_size, or "
            "a hybrid must keep an attention layer); add other shapes to `search_space` or move the target."
        )
    for c in chosen:
        exact = counter.exact(c.sizes, c.kept_layers)
        if exact != (c.num_params, c.active_params):  # trust the full build
            logger.warning(f"{c.name}: block-wise count {(c.num_params, c.active_params)} != full count {exact}; using the latter.")
            c.num_params, c.active_params = exact
        c.param_fraction = c.num_params / source_params
        c.target_deviation = c.num_params / target - 1 if target is not None else 0.0
        c.active_deviation = c.active_params / active_target - 1 if active_target is not None else None
    logger.info(
        f"Architecture search: {len(shapes)} valid shapes, {len(within)} within ±{100 * tolerance:g}% of the target; "
        f"evaluating {len(chosen)} ({selection})."
    )

    # 2. Zero-shot and retrained held-out losses, one pruned copy at a time.
    ranked_by = "param_distance"
    if eval_dataset is not None:
        pad = getattr(model.config, "pad_token_id", None)
        pad = pad if isinstance(pad, int) else 0
        eval_batches = batch_samples(to_samples(eval_dataset, tokenizer, seq_length), eval_batch_size, pad)
        train_ds = None
        if retrain_steps > 0:
            from datasets import Dataset

            train_ds = Dataset.from_dict({"input_ids": [s.tolist() for s in to_samples(train_dataset, tokenizer, seq_length)]})
        needs_scores = any(c.sizes[a] != source[a] for c in chosen for a in axes)
        if importance is None and needs_scores:
            if calibration_data is None:
                raise ValueError("Pass `importance=estimate_importance(model, ...)` or `calibration_data=` to prune candidates.")
            importance = estimate_importance(model, calibration_data, base_config.without_targets(), tokenizer=tokenizer)
        grad_flags = {name: p.requires_grad for name, p in model.named_parameters()}
        was_training = model.training
        try:
            for c in tqdm(chosen, desc="Evaluating candidates"):
                student = prune_model(copy.deepcopy(model), c.config, importance=importance)
                actual = _unique_numel(student)
                if actual != c.num_params:
                    logger.warning(f"{c.name}: predicted {c.num_params:,} parameters but the pruned model has {actual:,}.")
                    c.num_params, c.param_fraction = actual, actual / source_params
                    c.target_deviation = actual / target - 1 if target is not None else 0.0
                    c.active_params = _active_params(student)
                    c.active_deviation = c.active_params / active_target - 1 if active_target is not None else None
                c.zero_shot_loss = heldout_loss(student, eval_batches)
                if retrain_steps > 0:
                    student.requires_grad_(True)  # even if the source model was frozen (PEFT re-freezes for LoRA)
                    if retrain_fn is None:
                        callbacks = [_EvalAtSteps(eval_steps, eval_batches, c.retrain_curve)] if eval_steps else []
                        student = distill_candidate(
                            student, model, train_ds, retrain_steps, seed=seed, tokenizer=tokenizer, use_lora=use_lora,
                            lora_config=lora_config, training_kwargs=training_kwargs, callbacks=callbacks,
                        )
                    else:
                        student = retrain_fn(student, teacher=model, train_dataset=train_ds, max_steps=retrain_steps, seed=seed)
                    c.retrain_loss = heldout_loss(student, eval_batches)
                    c.retrain_curve[retrain_steps] = c.retrain_loss
                    # The trainer froze the teacher; the next candidate is copied from it and must be trainable.
                    _restore(model, grad_flags, was_training)
                logger.info(f"{c.name}: {c.num_params:,} params, zero-shot {c.zero_shot_loss:.4f}, retrained {c.retrain_loss}")
                del student
                _free(collect=source_params >= 10_000_000)
        finally:
            _restore(model, grad_flags, was_training)
        ranked_by = "retrain_loss" if retrain_steps > 0 else "zero_shot_loss"
    else:
        logger.warning(
            "No `eval_dataset`: candidates are only enumerated and ordered by distance to the target, not ranked by loss."
        )

    def rank_key(c: Candidate) -> tuple:
        score = c.score
        return (math.inf if score is None or math.isnan(score) else score, *_tie_key(c, targets))

    ranked = sorted(chosen, key=rank_key)
    for i, c in enumerate(ranked, 1):
        c.rank = i
    return SearchResult(
        candidates=ranked,
        source_sizes=dict(source),
        source_params=source_params,
        target_params=target,
        target_active_params=active_target,
        source_active_params=source_active,
        tolerance=float(tolerance),
        ranked_by=ranked_by,
        num_valid_shapes=len(shapes),
        num_within_tolerance=len(within),
        retrain_steps=retrain_steps,
        use_lora=bool(use_lora and retrain_steps > 0),
        selection=selection,
        seconds=time.perf_counter() - start,
    )
