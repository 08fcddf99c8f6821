"""The stages of the Minitron recipe (see :mod:`hf_minitron.stages` for how stages are fingerprinted and reused).

========================  =========================================  ======================  =====================
stage (folder)            reads                                      produces                settings
========================  =========================================  ======================  =====================
source                    -                                          teacher, tokenizer      model, dtype, files
calibration / train /     tokenizer, teacher (config)                calibration / train /   corpus, split,
held_out                                                             held_out token blocks   seq_length, caps
teacher_correction        teacher, tokenizer, train, held_out        teacher (corrected)     steps, LR, LoRA
(teacher_corrected/)
teacher_cache             teacher, tokenizer, train                  teacher_cache           top_k, dtype
(teacher_cache/)
importance (importance/)  teacher, calibration                       importance              aggregations
target / search           - / teacher, importance, train, held_out,  prune_config            target / search
(search/)                 [teacher_cache]
prune (pruned/)           teacher, tokenizer, importance,            pruned                  -
                          prune_config
distill (distilled/)      pruned, teacher, tokenizer, train,         distilled, distill_log  DistillationConfig
                          [teacher_cache]
evaluate (evaluation/)    teacher, pruned, held_out, [distilled]     results                 -
export (<final_subdir>/)  pruned / distilled, tokenizer, importance  final_dir               hub_model_id
push                      final_dir                                  hub_commit              repo, private
========================  =========================================  ======================  =====================

Non-cached stages (source, data, target) run only when a stage that runs reads their outputs.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback

from .atomic import atomic_write_json, atomic_write_text, check_writable_dir, clean_stale_temp, kill_point, remove_dir
from .config import TARGET_FIELDS, MinitronPruneConfig
from .data import pack_texts
from .distillation.sharding import gather_full_state_dict, release_deepspeed_accelerator, sharded_engine
from .eval_export_stages import (
    GGUFExportStage,
    check_transformers_reload,
    GGUFSetup,
    OriginalTeacherTasksStage,
    TaskEvaluateStage,
    TaskPlan,
    gguf_file_name,
    join_results,
    link_gguf_files,
    model_labels,
    plan_tasks,
    prepare_gguf,
)
from .evaluation import masked_nll, perplexity
from .hub import check_hub_push, push_folder_to_hub, render_model_card
from .importance import SCORES_NAME, ImportanceScores, estimate_importance
from .logging import get_logger, progress_enabled
from .pipeline import RESULTS_NAME, STATE_NAME, MinitronRecipeArguments, _dtype, last_complete_checkpoint, load_model_and_tokenizer, load_model_folder, load_texts
from .pruning import prune_model
from .pruning.prune import write_model_folder
from .stages import LazyValue, Stage, StageChangedError, StageContext
from .validation import check_token_ids


logger = get_logger(__name__)

_CALIBRATION_FIELDS = ("num_calibration_samples", "calibration_seq_length", "calibration_batch_size")
_TARGET_FIELDS = TARGET_FIELDS + ("layers_to_drop",)
# DistillationConfig fields that change neither the trained weights nor the data order: left out of the fingerprint.
_TRAINING_FIELDS_WITHOUT_EFFECT = (
    "output_dir", "logging_strategy", "logging_steps", "logging_first_step", "log_on_each_node", "logging_nan_inf_filter",
    "include_num_input_tokens_seen", "log_level", "log_level_replica", "disable_tqdm", "report_to", "run_name", "project",
    "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id", "eval_strategy", "eval_steps", "eval_delay",
    "per_device_eval_batch_size", "prediction_loss_only", "eval_on_start", "eval_do_concat_batches", "eval_use_gather_object",
    "eval_accumulation_steps", "include_for_metrics", "batch_eval_metrics", "save_only_model", "save_strategy", "save_steps",
    "save_on_each_node", "save_total_limit", "enable_jit_checkpoint", "push_to_hub", "hub_token", "hub_private_repo",
    "hub_model_id", "hub_strategy", "hub_always_push", "hub_revision", "dataloader_num_workers", "dataloader_pin_memory",
    "dataloader_persistent_workers", "dataloader_prefetch_factor", "dataloader_multiprocessing_context", "skip_memory_metrics",
    "do_train", "do_eval", "do_predict", "resume_from_checkpoint", "local_rank", "ddp_timeout", "debug", "torch_empty_cache_steps",
    "trust_remote_code", "eval_packing",
)
CHECKPOINTS_DIR = "distill_checkpoints"
CHECKPOINTS_MARKER = ".minitron_checkpoints.json"


def _file_identity(path: str) -> dict[str, Any]:
    """Size and modification time of a file, or of every top-level file of a folder (cheap: no hashing)."""
    def one(p: str) -> list[int]:
        st = os.stat(p)
        return [st.st_size, st.st_mtime_ns]

    if os.path.isfile(path):
        return {os.path.basename(path): one(path)}
    if os.path.isdir(path):
        return {n: one(os.path.join(path, n)) for n in sorted(os.listdir(path)) if os.path.isfile(os.path.join(path, n)) and not n.startswith(".")}
    return {}


def _num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class RecipeContext(StageContext):
    """The recipe's arguments, shared by its stages."""

    args: MinitronRecipeArguments | None = None
    training_args: Any = None
    prune_config: MinitronPruneConfig | None = None
    hub_token: str | None = None
    push: bool = False
    task_plan: TaskPlan | None = None  # None: perplexity only (task_note says why when it was not the user's choice)
    task_note: str | None = None
    gguf: GGUFSetup | None = None
    engine: str | None = None  # "fsdp" / "deepspeed" when the trainers shard the models (accelerate config or arguments)
    _texts: tuple[list[str], list[str]] | None = field(default=None, repr=False)

    @classmethod
    def create(cls, args: MinitronRecipeArguments, training_args) -> "RecipeContext":
        """Check everything that can be checked without loading a model, prepare ``output_dir`` and clean it."""
        if not isinstance(args, MinitronRecipeArguments):
            raise TypeError(f"`args` must be MinitronRecipeArguments, got {type(args).__name__}.")
        training_args = copy.deepcopy(training_args)
        push = training_args.push_to_hub
        training_args.push_to_hub = False  # the final folder (with its card) is pushed once, by the push stage
        hub_token = check_hub_push(training_args.hub_model_id, training_args.hub_token) if push else None
        _check_teacher_cache_options(args, training_args)
        out = os.path.abspath(training_args.output_dir)
        engine = sharded_engine(training_args)
        if engine is not None and args.search and args.search_retrain_steps > 0:
            raise ValueError(
                f"Architecture search with retraining (`search_retrain_steps > 0`) is not supported under {engine}: run "
                "the search zero-shot (`search_retrain_steps: 0`) or without sharding, then distill the chosen shape."
            )
        ctx = cls(output_dir=out, resume=args.resume, state_file=os.path.join(out, STATE_NAME), args=args,
                  training_args=training_args, prune_config=args.prune_config(), hub_token=hub_token, push=push,
                  engine=engine)
        ctx.texts()  # a corpus too small for the held-out split fails here, before any model is loaded
        # Task and GGUF options are checked before any model loads too (unknown tasks, no cloze example, no converter).
        ctx.task_plan, ctx.task_note = plan_tasks(args, ctx.texts()[1])
        if ctx.task_note and ctx.is_main_process:
            logger.warning(ctx.task_note)
        if ctx.is_main_process:
            check_writable_dir(out, what="output_dir")
            clean_stale_temp(out, all_entries=True)
        ctx.barrier()
        if args.gguf_outtypes:
            ctx.gguf = prepare_gguf(ctx)
        return ctx

    @property
    def num_processes(self) -> int:
        return self.state.num_processes

    def texts(self) -> tuple[list[str], list[str]]:
        if self._texts is None:
            self._texts = load_texts(self.args.dataset_path, self.args.eval_dataset_path, self.args.eval_fraction)
        return self._texts

    def load_model(self, folder: str):
        return self.to_device(load_model_folder(folder, self.args.model_dtype, trust_remote_code=self.training_args.trust_remote_code))

    def to_device(self, model):
        """Under FSDP2 / ZeRO-3, whole models (importance, pruning, evaluation) live on this process's accelerator:
        the trainers shard them from there. Elsewhere models stay where they were loaded."""
        if self.engine is not None and self.state.device.type != "cpu":
            model.to(self.state.device)
        return model

    def gathered_dir(self, name: str) -> str:
        """A folder every process can read, where the main process writes a model gathered from its shards (a
        ``.tmp-`` name: a killed run's is cleaned at the next start)."""
        return os.path.join(self.output_dir, f".tmp-gathered-{name}")

    def temp_run_dir(self) -> tempfile.TemporaryDirectory:
        """Scratch space for a trainer's ``output_dir`` (removed afterwards; a killed run's is cleaned at start)."""
        return tempfile.TemporaryDirectory(prefix=".tmp-trainer-", dir=self.output_dir)

    def results(self) -> dict[str, Any]:
        """What ``run_minitron`` returns: the evaluation rows, the final folder, the Hub commit, the stage table."""
        art = self.artifacts
        results = dict(art.get("results")) if "results" in art else {"rows": []}
        gguf = None
        if "gguf_exports" in art:
            final = os.path.join(self.output_dir, self.args.final_subdir)
            gguf = [{**e, "file": gguf_file_name(self, e["outtype"]), "path": os.path.join(final, gguf_file_name(self, e["outtype"]))}
                    for e in art.get("gguf_exports")]
        results = join_results(results, art.get("task_results") if "task_results" in art else None, self.task_note, gguf)
        results["output_dir"] = self.output_dir
        results["final_dir"] = art.get("final_dir") if "final_dir" in art else None
        if "hub_commit" in art:
            results["hub_commit"] = art.get("hub_commit")
        results["stages"] = {k: {"action": v["action"], "seconds": v["seconds"]} for k, v in self.report.items() if v["action"] != "not needed"}
        return results


def _check_teacher_cache_options(args: MinitronRecipeArguments, training_args) -> None:
    """The recipe takes its cache as a stage (``--teacher_cache``); refuse what a cache cannot serve before any work."""
    if getattr(training_args, "teacher_logits_cache", None):
        raise ValueError(
            f"`teacher_logits_cache={training_args.teacher_logits_cache!r}` is for `hf-minitron distill` / DistillationTrainer. "
            "The recipe takes the cache itself, on its own training rows and (corrected) teacher: use `--teacher_cache` "
            "(with `--teacher_cache_top_k`, `--teacher_cache_dtype`) and leave `teacher_logits_cache` unset."
        )
    if args.teacher_cache and not args.skip_distillation:  # (search retraining uses its own forward-KL defaults)
        from .distillation.config import check_cache_options

        probe = copy.copy(training_args)
        probe.teacher_logits_cache = "<output_dir>/teacher_cache"
        try:
            check_cache_options(probe)
        except ValueError as err:
            raise ValueError(f"--teacher_cache: {err}") from None


# ---------------------------------------------------------------------------------------------- inputs
class SourceModelStage(Stage):
    """The model to prune (the teacher) and its tokenizer."""

    name, outputs, cached = "source", ("teacher", "tokenizer"), False

    def settings(self, ctx: RecipeContext) -> dict[str, Any]:
        a = ctx.args
        if a.model_name_or_path is None:
            from .embedded import SMOLLM2_GGUF, smollm2_path

            folder = smollm2_path()
            files = _file_identity(os.path.join(folder, SMOLLM2_GGUF)) if folder else {}
        else:
            files = _file_identity(a.model_name_or_path)
        return {"model_name_or_path": a.model_name_or_path, "gguf_file": a.gguf_file, "model_dtype": a.model_dtype,
                "trust_remote_code": bool(ctx.training_args.trust_remote_code), "files": files}

    def run(self, ctx: RecipeContext, inputs) -> dict[str, Any]:
        a = ctx.args
        teacher, tokenizer = load_model_and_tokenizer(a.model_name_or_path, a.gguf_file, a.model_dtype, ctx.training_args.trust_remote_code)
        ctx.to_device(teacher)
        max_positions = getattr(teacher.config.get_text_config(), "max_position_embeddings", None)
        if isinstance(max_positions, int) and a.seq_length > max_positions:
            raise ValueError(
                f"`seq_length` {a.seq_length} is longer than the model's max_position_embeddings={max_positions}: "
                f"use --seq_length {max_positions} or less."
            )
        return {"teacher": teacher, "tokenizer": tokenizer}


class _TextStage(Stage):
    """Token blocks of ``seq_length`` packed from the corpus (train split or held-out split)."""

    inputs, cached = ("tokenizer", "teacher"), False
    split = "train"
    cap_field = ""

    def settings(self, ctx: RecipeContext) -> dict[str, Any]:
        a = ctx.args
        return {
            "dataset_path": a.dataset_path, "eval_dataset_path": a.eval_dataset_path, "eval_fraction": a.eval_fraction,
            "seq_length": a.seq_length, "max_samples": self.max_samples(ctx),
            "files": {p: _file_identity(p) for p in (a.dataset_path, a.eval_dataset_path) if p},
        }

    def max_samples(self, ctx: RecipeContext) -> int | None:
        return getattr(ctx.args, self.cap_field)

    def run(self, ctx: RecipeContext, inputs) -> dict[str, Any]:
        train, held_out = ctx.texts()
        blocks = pack_texts(train if self.split == "train" else held_out, inputs["tokenizer"], ctx.args.seq_length, self.max_samples(ctx))
        if not blocks:
            raise ValueError(f"The {self.split} text produced no token: give more text.")
        check_token_ids(blocks, inputs["teacher"].config, what=f"{self.name.replace('_', ' ')} data")
        return {self.outputs[0]: blocks}

    def summary(self, outputs) -> str:
        return f"{len(outputs[self.outputs[0]])} samples"


class CalibrationDataStage(_TextStage):
    name, outputs = "calibration", ("calibration",)

    def max_samples(self, ctx: RecipeContext) -> int:
        return ctx.prune_config.num_calibration_samples


class TrainDataStage(_TextStage):
    name, outputs, cap_field = "train_data", ("train",), "max_train_samples"


class HeldOutDataStage(_TextStage):
    name, outputs, split, cap_field = "held_out_data", ("held_out",), "eval", "max_eval_samples"


def _dataset(blocks: list[torch.Tensor]):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [b.tolist() for b in blocks]})


# ---------------------------------------------------------------------------------------------- teacher correction
class TeacherCorrectionStage(Stage):
    """Fine-tune the teacher on the distillation corpus first (arXiv 2408.11796); replaces ``teacher``."""

    name, inputs, outputs = "teacher_correction", ("teacher", "tokenizer", "train", "held_out"), ("teacher", "teacher_correction")
    mutates = ("teacher",)

    def enabled(self, ctx: RecipeContext) -> bool:
        return ctx.args.teacher_correction

    def folder(self, ctx: RecipeContext) -> str:
        return os.path.join(ctx.output_dir, "teacher_corrected")

    def settings(self, ctx: RecipeContext) -> dict[str, Any]:
        a, t = ctx.args, ctx.training_args
        return {"steps": a.teacher_correction_steps, "learning_rate": a.teacher_original_learning_rate * a.teacher_correction_lr_fraction,
                "lora": a.teacher_correction_use_lora, "per_device_train_batch_size": t.per_device_train_batch_size,
                "gradient_accumulation_steps": t.gradient_accumulation_steps, "seed": t.seed, "bf16": t.bf16, "use_cpu": t.use_cpu,
                "num_processes": ctx.num_processes, **({"engine": ctx.engine} if ctx.engine else {})}

    def run(self, ctx: RecipeContext, inputs) -> dict[str, Any]:
        from .teacher_correction import TeacherCorrectionConfig, correct_teacher

        a, t = ctx.args, ctx.training_args
        teacher = inputs["teacher"]
        before = perplexity(teacher, inputs["held_out"], seq_length=a.seq_length, show_progress=False)
        with ctx.temp_run_dir() as run_dir:
            tc_args = TeacherCorrectionConfig(
                output_dir=run_dir, original_learning_rate=a.teacher_original_learning_rate, lr_fraction=a.teacher_correction_lr_fraction,
                use_lora=a.teacher_correction_use_lora, max_steps=a.teacher_correction_steps,
                per_device_train_batch_size=t.per_device_train_batch_size, gradient_accumulation_steps=t.gradient_accumulation_steps,
                seed=t.seed, use_cpu=t.use_cpu, bf16=t.bf16, report_to="none", save_strategy="no",
                logging_steps=max(1, a.teacher_correction_steps // 10), max_length=a.seq_length,
                disable_tqdm=not (ctx.is_main_process and progress_enabled()),
                # The engine of distillation when set by arguments (an accelerate config applies to every trainer)
                fsdp=t.fsdp, fsdp_config=t.fsdp_config if t.fsdp else None, deepspeed=t.deepspeed,
            )
            # Sharded: gathered into a shared folder by the main process and loaded back whole on every process
            gathered = ctx.gathered_dir(self.name) if ctx.engine else None
            corrected = correct_teacher(teacher, tc_args, _dataset(inputs["train"]), processing_class=inputs["tokenizer"],
                                        save_directory=gathered)
            if gathered is not None:  # every process has loaded it
                ctx.barrier()
                if ctx.is_main_process:
                    remove_dir(gathered)
        ctx.to_device(corrected)
        info = {"steps": a.teacher_correction_steps, "learning_rate": tc_args.learning_rate, "lora": a.teacher_correction_use_lora,
                "teacher_perplexity_before": before}
        return {"teacher": corrected.eval(), "teacher_correction": info, "_tokenizer": inputs["tokenizer"]}

    def save(self, ctx, outputs, folder) -> None:
        write_model_folder(outputs["teacher"], folder, tokenizer=outputs["_tokenizer"])
        atomic_write_json(os.path.join(folder, "teacher_correction.json"), outputs["teacher_correction"])

    def load(self, ctx: RecipeContext, folder: str) -> dict[str, Any]:
        with open(os.path.join(folder, "teacher_correction.json"), encoding="utf-8") as f:
            info = json.load(f)
        return {"teacher": LazyValue(lambda: ctx.load_model(folder)), "teacher_correction": info}

    def summary(self, outputs) -> str:
        return f"teacher perplexity before {outputs['teacher_correction']['teacher_perplexity_before']:.2f}"


# ---------------------------------------------------------------------------------------------- teacher-logit cache
class TeacherCacheStage(Stage):
    """The teacher's top-k log-probabilities and tail mass on the training rows, taken once (``--teacher_cache``).

    Search retraining and distillation read it instead of running the teacher (``teacher_model=None``); its
    fingerprint covers the teacher (corrected or not), the tokenizer, the training rows, ``top_k`` and the dtype, so
    changing any of them recomputes it and everything that trained from it. The cache is written into
    ``teacher_cache.partial/`` (resumable shard by shard after a kill; every process writes its own shards) and
    moved into ``teacher_cache/`` once complete.
    """

    name, inputs, outputs = "teacher_cache", ("teacher", "tokenizer", "train"), ("teacher_cache",)

    def enabled(self, ctx: RecipeContext) -> bool:
        return ctx.args.teacher_cache

    def partial_folder(self, ctx: RecipeContext) -> str:
        return os.path.join(ctx.output_dir, "teacher_cache.partial")

    def settings(self, ctx: RecipeContext) -> dict[str, Any]:
        return {"top_k": ctx.args.teacher_cache_top_k, "logprob_dtype": ctx.args.teacher_cache_dtype}

    def run(self, ctx: RecipeContext, inputs) -> dict[str, Any]:
        from .distillation import cache_teacher_logits

        # overwrite=True: a partial cache of other settings (an older run's) is replaced, one of these settings resumed
        cache = cache_teacher_logits(
            inputs["teacher"], inputs["train"], self.partial_folder(ctx), top_k=ctx.args.teacher_cache_top_k,
            dtype=ctx.args.teacher_cache_dtype, tokenizer=inputs["tokenizer"], overwrite=True,
            show_progress=ctx.is_main_process and progress_enabled(),
        )
        info = {"top_k": cache.top_k, "logprob_dtype": cache.logprob_dtype, "rows": cache.num_rows, "tokens": cache.num_tokens,
                "bytes": cache.disk_bytes()}
        return {"teacher_cache": self.folder(ctx), "_info": info}

    def save(self, ctx, outputs, folder) -> None:
        partial = self.partial_folder(ctx)
        for name in os.listdir(partial):  # same file system: renames, no copy
            os.replace(os.path.join(partial, name), os.path.join(folder, name))
        os.rmdir(partial)

    def load(self, ctx, folder) -> dict[str, Any]:
        return {"teacher_cache": folder}

    def info(self, outputs) -> dict[str, Any]:
        return outputs["_info"]

    def summary(self, outputs) -> str:
        i = outputs["_info"]
        return f"top-{i['top_k']} {i['logprob_dtype']}, {i['tokens']:,} tokens, {i['bytes'] / i['tokens']:.0f} bytes/token"


# ---------------------------------------------------------------------------------------------- importance and target
class ImportanceStage(Stage):
    """Activation importance of heads, neurons, channels and layers (arXiv 2407.14679 §2.2)."""

    name, inputs, outputs = "importance", ("teacher", "calibration"), ("importance",)

    def settings(self, ctx: RecipeContext) -> dict[str, Any]:
        c = ctx.prune_config
        return {"batch_aggregation": c.batch_aggregation, "sequence_aggregation": c.sequence_aggregation, "depth_criterion": c.depth_criterion}

    def run(self, ctx: RecipeContext, inputs) -> dict[str, Any]:
        show = ctx.is_main_process and progress_enabled()
        config = ctx.prune_config
        if ctx.args.search:  # the search picks the shape later: the config's sizes are not a target to check now
            config = config.without_targets()
        return {"importance": estimate_importance(inputs["teacher"], inputs["calibration"], config, show_progress=show)}

    def save(self, ctx, outputs, folder) -> None:
        outputs["importance"].save(os.path.join(folder, SCORES_NAME))

    def load(self, ctx, folder) -> dict[str, Any]:
        return {"importance": ImportanceScores.load(os.path.join(folder, SCORES_NAME))}

    def info(self, outputs) -> dict[str, Any]:
        return {"num_samples": outputs["importance"].metadata.get("num_samples")}

    def summary(self, outputs) -> str:
        meta = outputs["importance"].metadata
        return f"{meta.get('num_samples')} calibration samples, {meta.get('num_tokens')} tokens"


def _prune_settings(config: MinitronPruneConfig, with_target: bool) -> dict[str, Any]:
    skip = _CALIBRATION_FIELDS + (() if with_target else _TARGET_FIELDS)
    return {k: v for k, v in config.to_dict().items() if k not in skip}


class TargetStage(Stage):
    """The explicit target shape (``hidden_size`` ... ``layers_to_drop``) when there is no architecture search."""

    name, outputs, cached = "target", ("prune_config",), False

    def enabled(self, ctx: RecipeContext) -> bool:
        return not ctx.args.search

    def settings(self, ctx: RecipeContext) -> dict[str, Any]:
        return _prune_settings(ctx.prune_config, with_target=True)

    def run(self, ctx: RecipeContext, inputs) -> dict[str, Any]:
        return {"prune_config": ctx.prune_config}


class SearchStage(Stage):
    """Architecture search: the best shape within ±tolerance of ``target_params`` (arXiv 2407.14679 §3)."""

    name, outputs = "search", ("prune_config", "search_result")
    inputs = ("teacher", "importance", "tokenizer", "train", "held_out")
    optional_inputs = ("teacher_cache",)

    def enabled(self, ctx: RecipeContext) -> bool:
        return ctx.args.search

    def settings(self, ctx: RecipeContext) -> dict[str, Any]:
        a = ctx.args
        return {"target_params": a.target_params, "target_active_params": a.target_active_params, "tolerance": a.search_tolerance, "search_space": a.search_space,
                "max_candidates": a.search_max_candidates, "retrain_steps": a.search_retrain_steps, "use_lora": a.search_use_lora,
                "seed": ctx.training_args.seed, **_prune_settings(ctx.prune_config, with_target=False)}

    def run(self, ctx: RecipeContext, inputs) -> dict[str, Any]:
        from .search import search_architectures

        a = ctx.args
        retrain_fn = None
        if "teacher_cache" in inputs and a.search_retrain_steps > 0:  # every candidate retrains from the one cache
            from .distillation import cached_teacher_retrain_fn

            retrain_fn = cached_teacher_retrain_fn(inputs["teacher_cache"], inputs["tokenizer"], use_lora=a.search_use_lora)
        result = search_architectures(
            inputs["teacher"], inputs["importance"], target_params=a.target_params,
            target_active_params=a.target_active_params, tolerance=a.search_tolerance,
            search_space=a.search_space, max_candidates=a.search_max_candidates, retrain_steps=a.search_retrain_steps,
            train_dataset=inputs["train"], eval_dataset=inputs["held_out"], use_lora=a.search_use_lora, prune_config=ctx.prune_config,
            tokenizer=inputs["tokenizer"], seq_length=a.seq_length, seed=ctx.training_args.seed, retrain_fn=retrain_fn,
        )
        if ctx.is_main_process:
            logger.info(f"Architecture search (best first):\n{result.to_table()}")
        return {"prune_config": result.best.config, "search_result": result}

    def save(self, ctx, outputs, folder) -> None:
        outputs["search_result"].save(folder)
        atomic_write_text(os.path.join(folder, "candidates.md"), outputs["search_result"].to_table() + "\n")

    def load(self, ctx, folder) -> dict[str, Any]:
        from .search import SearchResult

        result = SearchResult.load(folder)
        return {"prune_config": result.best.config, "search_result": result}

    def summary(self, outputs) -> str:
        best = outputs["search_result"].best
        return f"winner {best.name} ({best.num_params:,} parameters) of {len(outputs['search_result'])} candidates"


# ---------------------------------------------------------------------------------------------- prune and distill
class PruneStage(Stage):
    """Slice a copy of the teacher to the target shape."""

    name, inputs, outputs = "prune", ("teacher", "tokenizer", "importance", "prune_config"), ("pruned",)

    def folder(self, ctx: RecipeContext) -> str:
        return os.path.join(ctx.output_dir, "pruned")

    def run(self, ctx: RecipeContext, inputs) -> dict[str, Any]:
        pruned = prune_model(copy.deepcopy(inputs["teacher"]), inputs["prune_config"], importance=inputs["importance"])
        return {"pruned": pruned, "_tokenizer": inputs["tokenizer"], "_importance": inputs["importance"]}

    def save(self, ctx, outputs, folder) -> None:
        write_model_folder(outputs["pruned"], folder, tokenizer=outputs["_tokenizer"], importance=outputs["_importance"])

    def load(self, ctx: RecipeContext, folder: str) -> dict[str, Any]:
        return {"pruned": ctx.load_model(folder)}

    def summary(self, outputs) -> str:
        target = outputs["pruned"].minitron_provenance["target_config"]
        return f"{_num_params(outputs['pruned']):,} parameters, " + ", ".join(f"{k}={v}" for k, v in target.items())


class _KillAtCheckpoint(TrainerCallback):
    """Crash-test hook: ``HF_MINITRON_KILL_AT=distill:checkpoint`` kills the run right after the first checkpoint."""

    def on_save(self, args, state, control, **kwargs):
        kill_point("distill:checkpoint")


def _trainer_state(checkpoint: str | None) -> dict[str, Any] | None:
    if checkpoint is None:
        return None
    with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as f:
        return json.load(f)


class DistillStage(Stage):
    """Knowledge distillation of the pruned student from the teacher; resumes from its own checkpoints."""

    name, inputs, outputs = "distill", ("pruned", "teacher", "tokenizer", "train"), ("distilled", "distill_log")
    optional_inputs = ("teacher_cache",)  # with --teacher_cache: trains from it; the teacher is not loaded
    mutates = ("pruned",)

    def enabled(self, ctx: RecipeContext) -> bool:
        return not ctx.args.skip_distillation

    def folder(self, ctx: RecipeContext) -> str:
        return os.path.join(ctx.output_dir, "distilled")

    def training_args(self, ctx: RecipeContext):
        run_args = copy.deepcopy(ctx.training_args)
        run_args.output_dir = os.path.join(ctx.output_dir, CHECKPOINTS_DIR)
        if run_args.max_length is None or run_args.max_length > ctx.args.seq_length:
            run_args.max_length = ctx.args.seq_length
        return run_args

    def settings(self, ctx: RecipeContext) -> dict[str, Any]:
        values = self.training_args(ctx).to_dict()
        return {**{k: v for k, v in values.items() if k not in _TRAINING_FIELDS_WITHOUT_EFFECT}, "num_processes": ctx.num_processes,
                **({"engine": ctx.engine} if ctx.engine else {})}

    def _checkpoints(self, ctx: RecipeContext, run_dir: str) -> str | None:
        """The checkpoint to resume from, after removing checkpoints made with other settings."""
        marker = os.path.join(run_dir, CHECKPOINTS_MARKER)
        fp = ctx.fingerprints[self.name]
        if ctx.is_main_process and os.path.isdir(run_dir):
            found = None
            if os.path.isfile(marker):
                with open(marker, encoding="utf-8") as f:
                    found = json.load(f)
            if found is None or found.get("fingerprint") != fp or ctx.resume == "never":
                from .stages import lineage_changes

                changes = lineage_changes(found.get("lineage", {}), ctx.lineages[self.name]) if found else ["no fingerprint"]
                if ctx.resume == "strict":
                    raise StageChangedError(
                        f"--resume strict: the distillation checkpoints in {run_dir} were made with other settings: "
                        f"{'; '.join(changes)}. Rerun with `--resume auto` to start distillation over, or choose another `--output_dir`."
                    )
                logger.info(f"Removing distillation checkpoints made with other settings ({'; '.join(changes)}).")
                remove_dir(run_dir)
        if ctx.is_main_process:
            atomic_write_json(marker, {"fingerprint": fp, "lineage": ctx.lineages[self.name]})
        ctx.barrier()
        return last_complete_checkpoint(run_dir)

    def run(self, ctx: RecipeContext, inputs) -> dict[str, Any]:
        from .distillation import DistillationTrainer

        run_args = self.training_args(ctx)
        teacher = inputs["teacher"] if "teacher_cache" not in inputs else None
        if teacher is None:
            run_args.teacher_logits_cache = inputs["teacher_cache"]
        last = self._checkpoints(ctx, run_args.output_dir)
        student = inputs["pruned"]
        provenance = student.minitron_provenance
        state = _trainer_state(last)
        trainer = None
        if state is not None and run_args.max_steps > 0 and state["global_step"] >= run_args.max_steps:
            # Killed after the last checkpoint: training is complete. (Resuming would run one step too many.)
            logger.info(f"Distillation had finished in {last}: taking its weights")
            distilled = self._finished_checkpoint(ctx, last, student)
            global_step, history = state["global_step"], state["log_history"]
            logged = [(h["step"], h["loss"]) for h in history if "loss" in h]
            steps = [b[0] - a[0] for a, b in zip([(0, None)] + logged[:-1], logged)]
            train_loss = sum(n * loss for n, (_, loss) in zip(steps, logged)) / max(1, sum(steps))
        else:
            if last:
                logger.info(f"Resuming distillation from {last}")
            if ctx.engine == "deepspeed":
                release_deepspeed_accelerator()  # teacher correction's finished trainer held this process's DeepSpeed state
            trainer = DistillationTrainer(
                model=student, teacher_model=teacher, args=run_args, train_dataset=_dataset(inputs["train"]),
                processing_class=inputs["tokenizer"], callbacks=[_KillAtCheckpoint()],
            )
            train_output = trainer.train(resume_from_checkpoint=last)
            distilled = trainer.accelerator.unwrap_model(trainer.model)
            global_step, history, train_loss = trainer.state.global_step, trainer.state.log_history, train_output.training_loss
        distilled.minitron_provenance = provenance
        tokens = global_step * run_args.per_device_train_batch_size * run_args.gradient_accumulation_steps * ctx.num_processes
        log = {"tokens": tokens * ctx.args.seq_length, "train_loss": train_loss, "log_history": history}
        outputs = {"distilled": distilled.eval(), "distill_log": log, "_tokenizer": inputs["tokenizer"]}
        if trainer is not None and ctx.engine is not None:
            # Both models were sharded in place. The student's full weights are gathered (a collective, every process)
            # for `save`; later stages read whole models: the student from this stage's folder, the teacher reloaded.
            outputs["_state_dict"] = gather_full_state_dict(trainer, _dtype(ctx.args.model_dtype))
            outputs["_model"] = distilled
            folder = self.folder(ctx)
            outputs["distilled"] = LazyValue(lambda: ctx.load_model(folder))
            self.mutates = type(self).mutates + ("teacher",)
            trainer.accelerator.free_memory()
        return outputs

    def _finished_checkpoint(self, ctx: RecipeContext, checkpoint: str, student):
        """The student's weights in a checkpoint of a finished run: a whole model, or (FSDP's ``SHARDED_STATE_DICT``)
        DCP shards merged by accelerate's ``merge_fsdp_weights`` into ``student``."""
        names = os.listdir(checkpoint)
        if any(n.startswith(("model", "pytorch_model")) and n.endswith((".safetensors", ".bin", ".json")) for n in names):
            return ctx.load_model(checkpoint)
        shards = os.path.join(checkpoint, "pytorch_model_fsdp_0")
        if not os.path.isdir(shards):
            raise ValueError(f"{checkpoint} holds no model weights: remove it to rerun the last steps of distillation.")
        from accelerate.utils import merge_fsdp_weights
        from safetensors.torch import load_file

        merged = ctx.gathered_dir(self.name)
        merge_fsdp_weights(shards, merged, safe_serialization=True)  # the main process writes, every process waits
        student.load_state_dict(load_file(os.path.join(merged, "model.safetensors")))
        ctx.barrier()
        if ctx.is_main_process:
            remove_dir(merged)
        return ctx.to_device(student)

    def save(self, ctx, outputs, folder) -> None:
        if "_state_dict" in outputs:  # gathered from the shards
            write_model_folder(outputs["_model"], folder, tokenizer=outputs["_tokenizer"], state_dict=outputs["_state_dict"])
        else:
            write_model_folder(outputs["distilled"], folder, tokenizer=outputs["_tokenizer"])
        atomic_write_json(os.path.join(folder, "distill_log.json"), outputs["distill_log"])

    def load(self, ctx: RecipeContext, folder: str) -> dict[str, Any]:
        with open(os.path.join(folder, "distill_log.json"), encoding="utf-8") as f:
            return {"distilled": LazyValue(lambda: ctx.load_model(folder)), "distill_log": json.load(f)}

    def info(self, outputs) -> dict[str, Any]:
        return {"tokens": outputs["distill_log"]["tokens"], "train_loss": outputs["distill_log"]["train_loss"]}

    def summary(self, outputs) -> str:
        return f"{outputs['distill_log']['tokens']:,} tokens, train loss {outputs['distill_log']['train_loss']:.4f}"


# ---------------------------------------------------------------------------------------------- evaluate, export, push
class EvaluateStage(Stage):
    """Held-out perplexity of the teacher, the zero-shot pruned model and the distilled model."""

    name, inputs, outputs = "evaluate", ("teacher", "pruned", "held_out"), ("results",)
    optional_inputs = ("distilled", "teacher_correction")
    main_process_only = True

    def folder(self, ctx: RecipeContext) -> str:
        return os.path.join(ctx.output_dir, "evaluation")

    def run(self, ctx: RecipeContext, inputs) -> dict[str, Any]:
        from .data import batch_samples

        samples = [b[: ctx.args.seq_length] for b in inputs["held_out"] if b.numel() >= 2]
        if not samples:
            raise ValueError("No held-out sequence has 2 or more tokens: give more held-out text.")
        batches = batch_samples(samples, 8)
        corrected = inputs.get("teacher_correction")
        labels = model_labels(corrected is not None, "distilled" in inputs)
        rows = []
        if corrected:
            rows.append({"model": "teacher (original)", "parameters": None, "perplexity": corrected["teacher_perplexity_before"]})
        with tqdm(total=len(labels) * len(batches), desc="Evaluate", disable=not progress_enabled()) as bar:
            for name, key in labels:
                model = inputs[key]
                nll, count = masked_nll(model, batches, progress=bar)
                rows.append({"model": name, "parameters": _num_params(model), "perplexity": float(torch.tensor(nll / count).exp())})
        if corrected:
            rows[0]["parameters"] = rows[1]["parameters"]
        return {"results": {"rows": rows, "held_out_samples": len(samples), "seq_length": ctx.args.seq_length}}

    def save(self, ctx, outputs, folder) -> None:
        atomic_write_json(os.path.join(folder, RESULTS_NAME), outputs["results"])

    def load(self, ctx, folder) -> dict[str, Any]:
        with open(os.path.join(folder, RESULTS_NAME), encoding="utf-8") as f:
            return {"results": json.load(f)}

    def summary(self, outputs) -> str:
        return "held-out perplexity " + ", ".join(f"{r['model']} {r['perplexity']:.2f}" for r in outputs["results"]["rows"])


class ExportStage(Stage):
    """The final model folder: weights, tokenizer, model card, provenance, scores, results and plots."""

    name, inputs, outputs = "export", ("pruned", "tokenizer", "importance", "results"), ("final_dir",)
    optional_inputs = ("distilled", "distill_log", "teacher_correction", "search_result", "task_results", "gguf_exports")
    main_process_only, replaces_foreign_folder, folder_setting = True, False, "--final_subdir"
    version = 2  # v2: task table, GGUF files, "how to run" with the reload check

    def folder(self, ctx: RecipeContext) -> str:
        return os.path.join(ctx.output_dir, ctx.args.final_subdir)

    def settings(self, ctx: RecipeContext) -> dict[str, Any]:
        return {"hub_model_id": ctx.training_args.hub_model_id, "base_model": ctx.args.model_name_or_path, "task_note": ctx.task_note}

    def run(self, ctx: RecipeContext, inputs) -> dict[str, Any]:
        model = inputs["distilled"] if "distilled" in inputs else inputs["pruned"]
        provenance = model.minitron_provenance
        t = ctx.training_args
        distill_log = inputs.get("distill_log")
        card = {
            "base_model": provenance.get("source_model") or ctx.args.model_name_or_path or "HuggingFaceTB/SmolLM2-135M-Instruct",
            "repo_id": t.hub_model_id,
            "teacher_correction": inputs.get("teacher_correction"),
            "prune_config": provenance.get("prune_config"),
            "importance": provenance.get("importance"),
            "source_config": provenance.get("source_config"),
            "target_config": provenance.get("target_config"),
            "tokens_distilled": distill_log["tokens"] if distill_log else 0,
            "distillation": None if distill_log is None else {
                k: getattr(t, k) for k in ("kd_loss", "temperature", "kd_weight", "ce_weight", "hidden_state_loss", "learning_rate", "max_steps")
            },
            "evaluation": [{"model": r["model"], "parameters": r["parameters"], "held-out perplexity": r["perplexity"]}
                           for r in inputs["results"]["rows"]],
            "tasks": inputs["task_results"]["models"] if "task_results" in inputs else None,
            "task_note": ctx.task_note,
        }
        return {"final_dir": self.folder(ctx), "_model": model, "_card": card, "_inputs": inputs}

    def save(self, ctx: RecipeContext, outputs, folder) -> None:
        inputs, card = outputs["_inputs"], dict(outputs["_card"])
        write_model_folder(outputs["_model"], folder, tokenizer=inputs["tokenizer"], importance=inputs["importance"])
        # Load the written folder back with stock transformers, as a user would, before it is renamed into place.
        reload = check_transformers_reload(folder, outputs["_model"], inputs["tokenizer"], ctx.training_args.trust_remote_code)
        # GGUF records name their file only: minitron_results.json and the card are pushed (no local paths on the Hub).
        gguf = link_gguf_files(inputs["gguf_exports"], ctx, folder) if "gguf_exports" in inputs else None
        card.update(gguf=gguf, how_to_run={"gguf_file": gguf[0]["file"] if gguf else None, "tested": {"transformers": reload["tested"]}})
        atomic_write_text(os.path.join(folder, "README.md"), render_model_card(card))
        results = join_results(inputs["results"], inputs["task_results"] if "task_results" in inputs else None, ctx.task_note, gguf)
        results["reload_check"] = {k: v for k, v in reload.items() if k != "tested"}
        results["stages"] = {k: {"action": v["action"], "seconds": v["seconds"]} for k, v in ctx.report.items() if v["action"] not in ("not needed",)}
        atomic_write_json(os.path.join(folder, RESULTS_NAME), results)
        if "search_result" in inputs:
            inputs["search_result"].save(os.path.join(folder, "architecture_search.json"))
        _write_plots(os.path.join(folder, "plots"), inputs["importance"], (inputs.get("distill_log") or {}).get("log_history"))

    def load(self, ctx, folder) -> dict[str, Any]:
        return {"final_dir": folder}

    def summary(self, outputs) -> str:
        return f"final model in {outputs['final_dir']}"


def _write_plots(folder: str, scores: ImportanceScores, log_history: list | None) -> None:
    try:
        from .plots import plot_importance, plot_loss_curves

        os.makedirs(folder, exist_ok=True)
        plot_importance(scores, os.path.join(folder, "importance.png"))
        if log_history:
            plot_loss_curves(log_history, os.path.join(folder, "distillation_loss.png"))
    except ImportError:
        logger.info("matplotlib is not installed: no plots (`pip install matplotlib`).")


class PushStage(Stage):
    """Upload the final folder's model files to the Hub (``--push_to_hub --hub_model_id``); runs every time."""

    name, inputs, outputs = "push", ("final_dir",), ("hub_commit",)
    cached, lazy, main_process_only = False, False, True

    def enabled(self, ctx: RecipeContext) -> bool:
        return ctx.push

    def settings(self, ctx: RecipeContext) -> dict[str, Any]:
        return {"hub_model_id": ctx.training_args.hub_model_id, "private": ctx.training_args.hub_private_repo}

    def run(self, ctx: RecipeContext, inputs) -> dict[str, Any]:
        t = ctx.training_args
        return {"hub_commit": push_folder_to_hub(inputs["final_dir"], t.hub_model_id, token=ctx.hub_token, private=t.hub_private_repo)}

    def summary(self, outputs) -> str:
        return f"pushed {outputs['hub_commit']}"


def minitron_stages() -> list[Stage]:
    """The Minitron recipe, in order. Append or insert your own :class:`~hf_minitron.stages.Stage` to extend it."""
    return [
        SourceModelStage(),
        CalibrationDataStage(),
        TrainDataStage(),
        HeldOutDataStage(),
        OriginalTeacherTasksStage(),
        TeacherCorrectionStage(),
        TeacherCacheStage(),
        ImportanceStage(),
        TargetStage(),
        SearchStage(),
        PruneStage(),
        DistillStage(),
        EvaluateStage(),
        TaskEvaluateStage(),
        GGUFExportStage(),
        ExportStage(),
        PushStage(),
    ]


__all__ = [
    "CalibrationDataStage",
    "DistillStage",
    "EvaluateStage",
    "ExportStage",
    "HeldOutDataStage",
    "ImportanceStage",
    "PruneStage",
    "PushStage",
    "RecipeContext",
    "SearchStage",
    "SourceModelStage",
    "TargetStage",
    "TeacherCacheStage",
    "TeacherCorrectionStage",
    "TrainDataStage",
    "minitron_stages",
]
