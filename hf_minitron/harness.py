"""Task accuracy with EleutherAI's lm-evaluation-harness, run on the in-memory model (optional extra ``[eval]``).

:func:`evaluate_tasks` wraps the model in lm-eval's ``HFLM`` (no reload, no copy of the weights) and runs
``lm_eval.simple_evaluate`` on built-in or local tasks. The built-in perplexity (:mod:`hf_minitron.evaluation`)
stays the recipe's per-stage metric; see ``docs/evaluation_and_export.md`` for how the two relate.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import importlib.util
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from transformers.utils import logging as hf_logging

from .cloze import CLOZE_TASK_NAME, write_cloze_task


logger = hf_logging.get_logger(__name__)

LM_EVAL_MISSING = (
    "Task evaluation needs EleutherAI's lm-evaluation-harness: `pip install 'hf-minitron[eval]'` "
    "(or `pip install lm-eval`)."
)
# Messages lm-eval logs on every in-memory run; they describe exactly what we intend.
_BENIGN_LM_EVAL_MESSAGES = ("model kwarg is not of type `str`", "Passed an already-initialized model")


@dataclass
class TaskResult:
    """One metric of one task: ``value`` ± ``stderr`` (standard error; ``None`` when lm-eval gives none) on ``n`` examples."""

    task: str
    metric: str
    value: float
    stderr: float | None
    n: int | None
    higher_is_better: bool | None = None
    num_fewshot: int | None = None
    filter: str = "none"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TaskEvaluation:
    """What :func:`evaluate_tasks` returns: one :class:`TaskResult` per (task, metric) plus the run's settings."""

    results: list[TaskResult]
    tasks: list[str]
    lm_eval_version: str
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)

    def get(self, task: str, metric: str) -> TaskResult:
        """The result of ``metric`` on ``task``; ``KeyError`` naming what exists otherwise."""
        for r in self.results:
            if r.task == task and r.metric == metric:
                return r
        raise KeyError(f"No {metric!r} for {task!r}; have {[(r.task, r.metric) for r in self.results]}.")

    def to_dict(self) -> dict[str, Any]:
        return {
            "results": [r.to_dict() for r in self.results],
            "tasks": list(self.tasks),
            "lm_eval_version": self.lm_eval_version,
            "seconds": round(self.seconds, 2),
            "settings": dict(self.settings),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskEvaluation:
        return cls(
            results=[TaskResult(**r) for r in data["results"]],
            tasks=list(data["tasks"]),
            lm_eval_version=data["lm_eval_version"],
            seconds=float(data["seconds"]),
            settings=dict(data.get("settings", {})),
        )


def is_lm_eval_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def _require_lm_eval() -> None:
    if not is_lm_eval_available():
        raise ImportError(LM_EVAL_MISSING)


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Forbid Hub access (``HF_HUB_OFFLINE``) for ``huggingface_hub``, ``datasets`` and ``transformers`` meanwhile.

    The libraries read the environment variable once at import; their module-level flags are what they check
    at request time, so those are set (and restored afterwards).
    """
    import huggingface_hub.constants as hub_constants

    targets = [(hub_constants, "HF_HUB_OFFLINE")]
    try:
        import datasets.config as ds_config

        targets += [(ds_config, "HF_HUB_OFFLINE"), (ds_config, "HF_DATASETS_OFFLINE")]
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass
    saved = [(m, name, getattr(m, name)) for m, name in targets if hasattr(m, name)]
    for m, name, _ in saved:
        setattr(m, name, True)
    try:
        yield
    finally:
        for m, name, value in saved:
            setattr(m, name, value)


class _DropBenign(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(m in message for m in _BENIGN_LM_EVAL_MESSAGES)


def _task_manager(names: list[str], include_paths: list[str]):
    """A ``TaskManager`` that knows every requested name; lm-eval's ~15k built-in tasks are indexed only if needed."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_paths or None, include_defaults=False)
    missing = [n for n in names if n not in manager.all_tasks and not os.path.isfile(n)]
    if missing:
        manager = TaskManager(include_path=include_paths or None)  # indexing the built-ins takes a few seconds
        missing = [n for n in names if n not in manager.all_tasks and not os.path.isfile(n)]
    if missing:
        hints = {n: difflib.get_close_matches(n, manager.all_tasks, n=3) for n in missing}
        raise ValueError(
            f"Unknown lm-eval task(s) {missing} (close matches: {hints}). Built-in offline task: {CLOZE_TASK_NAME!r}; "
            "for your own task YAMLs pass `include_path=` (the folder holding them)."
        )
    return manager


def _rows(raw: Mapping[str, Any]) -> list[TaskResult]:
    """Flatten lm-eval's ``{"results": {task: {"acc,none": v, "acc_stderr,none": s, ...}}}`` into rows."""
    rows = []
    for task, metrics in raw.get("results", {}).items():
        n_samples = raw.get("n-samples", {}).get(task, {})
        n = n_samples.get("effective", metrics.get("sample_len"))
        better = raw.get("higher_is_better", {}).get(task, {})
        shots = raw.get("n-shot", {}).get(task)
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, filter_name = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            rows.append(
                TaskResult(
                    task=task,
                    metric=metric,
                    value=float(value),
                    stderr=float(stderr) if isinstance(stderr, (int, float)) else None,
                    n=int(n) if n is not None else None,
                    higher_is_better=better.get(metric),
                    num_fewshot=int(shots) if isinstance(shots, int) else None,
                    filter=filter_name,
                )
            )
    return rows


def evaluate_tasks(
    model,
    tokenizer,
    tasks: str | Sequence[str | dict] = (CLOZE_TASK_NAME,),
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    cloze_texts: Sequence[str] | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    bootstrap_iters: int = 1000,
    offline: bool = True,
    seed: int = 1234,
    **hflm_kwargs,
) -> TaskEvaluation:
    """Run lm-evaluation-harness tasks on ``model`` as it is in memory (lm-eval's ``HFLM``; nothing is reloaded).

    Args:
        model: a causal LM (``PreTrainedModel``) on any device; it is put in eval mode for the run and its
            train/eval mode is restored afterwards.
        tokenizer: its tokenizer (a copy is given to lm-eval, which may set a pad token).
        tasks: task names, YAML paths or inline task dicts, as ``lm_eval --tasks`` takes them (a comma-separated
            string works). ``"minitron_cloze"`` (default) is the built-in offline last-word cloze
            (:mod:`hf_minitron.cloze`), built from ``cloze_texts`` (default: the embedded corpus's held-out split).
        include_path: folder(s) of your own task YAMLs (lm-eval's ``--include_path``).
        num_fewshot: shots for tasks that do not fix them (default: the task's own, else 0).
        limit: examples per task (an int, or a fraction < 1), for quick checks only.
        batch_size: sequences per forward pass.
        max_length: longest input in tokens (default: the model config's ``max_position_embeddings``); longer
            contexts are cut from the left.
        bootstrap_iters: bootstrap resamples for the standard error of non-mean metrics such as perplexity (0: none).
        offline: forbid Hub access during the run (default). Local tasks need none; a Hub task whose dataset is
            not in the local ``datasets`` cache then fails with an error saying so.
        seed: seed for Python, NumPy, torch and few-shot sampling.
        **hflm_kwargs: passed to ``lm_eval.models.huggingface.HFLM`` (e.g. ``add_bos_token=True``).

    Returns:
        A :class:`TaskEvaluation`: ``results`` holds one :class:`TaskResult` (task, metric, value, stderr, n) per
        metric; ``to_dict()`` is JSON-ready.

    Raises:
        ImportError: lm-eval is not installed (the message names the ``[eval]`` extra).
        ValueError: an unknown task name, an empty task list, or held-out text that yields no cloze example;
            raised before any forward pass.
        RuntimeError: a task's data could not be loaded (e.g. a Hub dataset while ``offline=True``).

    Example:
        >>> from hf_minitron import evaluate_tasks
        >>> result = evaluate_tasks(model, tokenizer)  # doctest: +SKIP
        >>> result.get("minitron_cloze", "acc").value  # doctest: +SKIP
    """
    _require_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    tasks = list(tasks)
    if not tasks:
        raise ValueError("`tasks` is empty: name at least one task (the built-in offline one is 'minitron_cloze').")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    include_paths = [] if include_path is None else [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
    include_paths = [os.path.abspath(os.fspath(p)) for p in include_paths]
    for path in include_paths:
        if not os.path.isdir(path):
            raise ValueError(f"`include_path` {path!r} is not a folder of task YAML files.")
    names = [t for t in tasks if isinstance(t, str)]

    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if CLOZE_TASK_NAME in names:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="hf-minitron-tasks-"))
            write_cloze_task(folder, cloze_texts)
            include_paths = [folder, *include_paths]  # later paths win: a user's own `minitron_cloze` overrides ours
        if offline:
            stack.enter_context(hub_offline())
        manager = _task_manager(names, include_paths)

        benign = _DropBenign()  # a logger's filters see only its own records: attach to each lm_eval logger
        for name in [n for n in logging.root.manager.loggerDict if n == "lm_eval" or n.startswith("lm_eval.")]:
            logging.getLogger(name).addFilter(benign)
            stack.callback(logging.getLogger(name).removeFilter, benign)

        was_training = model.training
        stack.callback(model.train, was_training)
        lm = HFLM(
            pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size, max_length=max_length, **hflm_kwargs
        )
        try:
            raw = lm_eval.simple_evaluate(
                model=lm,
                tasks=tasks,
                num_fewshot=num_fewshot,
                limit=limit,
                bootstrap_iters=bootstrap_iters,
                task_manager=manager,
                log_samples=False,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
        except (ConnectionError, FileNotFoundError, OSError) as err:
            hint = " Hub access is off (`offline=True`): pass `offline=False` or use local task data." if offline else ""
            raise RuntimeError(f"lm-eval could not load a task's data: {err}.{hint}") from err
    rows = _rows(raw or {})
    settings = {"num_fewshot": num_fewshot, "limit": limit, "batch_size": batch_size, "bootstrap_iters": bootstrap_iters, "seed": seed}
    if CLOZE_TASK_NAME in names:
        settings["cloze_texts"] = "embedded held-out corpus" if cloze_texts is None else f"{len(cloze_texts)} given texts"
    return TaskEvaluation(
        results=rows,
        tasks=[t if isinstance(t, str) else str(t.get("task", t)) for t in tasks],
        lm_eval_version=getattr(lm_eval, "__version__", "unknown"),
        seconds=time.perf_counter() - start,
        settings=settings,
    )


__all__ = ["LM_EVAL_MISSING", "TaskEvaluation", "TaskResult", "evaluate_tasks", "hub_offline", "is_lm_eval_available"]
