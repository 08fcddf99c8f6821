"""Pipeline stages: small units with declared inputs, outputs and settings, reused on rerun only when unchanged.

A pipeline is a list of :class:`Stage` objects run in order by :func:`run_stages`. Stages pass values to each
other as named *artifacts* (``"teacher"``, ``"importance"``, ``"pruned"``, ...): a stage reads the artifacts named
in ``inputs`` (and ``optional_inputs`` when an earlier stage produced them) and produces those in ``outputs``; a
later stage may produce an artifact again (teacher correction replaces ``"teacher"``).

Each stage has a **fingerprint**: a hash of its name, ``version``, ``settings(ctx)`` and its inputs'
fingerprints. A *cached* stage writes its outputs to ``<output_dir>/<folder>/`` together with a record of its
fingerprint and of the settings of every stage it depends on (its *lineage*), atomically. On a rerun:

- same fingerprint: the folder is reused (loaded only if a later stage needs it);
- different fingerprint: the stage is recomputed, and so is every stage downstream of it (their fingerprints
  include this one's); with ``resume="strict"`` the run is refused before any work, and the message names the
  changed settings (``"target.hidden_size: 48 -> 32"``);
- ``resume="never"``: every cached stage is recomputed.

Non-cached stages are cheap (loading the model, packing text) and run lazily, the first time a later stage
reads one of their outputs; a rerun that reuses everything loads nothing. *Action* stages (``cached=False``,
``lazy=False``) run every time (the Hub push).

Adding a stage (e.g. a teacher-logit cache, lm-eval task scores, a GGUF export) is a subclass and one list entry:

    >>> class TaskEvalStage(Stage):  # doctest: +SKIP
    ...     name, inputs, outputs = "task_eval", ("final_dir",), ("task_scores",)
    ...     main_process_only = True
    ...     def settings(self, ctx):
    ...         return {"tasks": ctx.args.eval_tasks}
    ...     def run(self, ctx, inputs):
    ...         return {"task_scores": run_lm_eval(inputs["final_dir"], ctx.args.eval_tasks)}
    ...     def save(self, ctx, outputs, folder):
    ...         atomic_write_json(os.path.join(folder, "scores.json"), outputs["task_scores"])
    ...     def load(self, ctx, folder):
    ...         return {"task_scores": json.load(open(os.path.join(folder, "scores.json")))}
    >>> stages = [*minitron_stages(), TaskEvalStage()]  # doctest: +SKIP

Only the main process writes (``save``); every process runs ``run`` unless ``main_process_only`` (then the
others wait and read the saved folder when they need it).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .atomic import atomic_write_json, kill_point, staged_dir
from .logging import get_logger


logger = get_logger(__name__)

RECORD_NAME = ".minitron_stage.json"
RESUME_MODES = ("auto", "strict", "never")


class StageChangedError(ValueError):
    """``resume="strict"`` found finished stages whose settings (or whose inputs' settings) changed."""


# ---------------------------------------------------------------------------------------------- stages
class Stage:
    """One unit of a pipeline. Subclasses set the class attributes and implement the methods they need.

    Attributes:
        name: Unique name (logs, records, kill points ``<name>:ran`` / ``<name>:saved``).
        inputs: Artifacts this stage reads; an earlier stage must produce each.
        optional_inputs: Artifacts read when an earlier (enabled) stage produced them.
        outputs: Artifacts this stage produces.
        mutates: Inputs this stage changes in place (e.g. training a model): afterwards they are reloaded from
            their producer's folder when read again.
        version: Bump when the stage's code changes what it produces: old results are then recomputed.
        cached: Save outputs to ``<output_dir>/<folder>`` and reuse them while the fingerprint matches.
        lazy: For non-cached stages: run only when a later stage reads an output (else run every time).
        main_process_only: Only the main process runs it; the others read the saved folder if needed.
        replaces_foreign_folder: Whether a non-empty folder without a stage record (e.g. from an older version) may
            be replaced; ``False`` for a folder the user names (the final model's), which is refused instead.
        folder_setting: The option that names the folder, for error messages (e.g. ``"--final_subdir"``).
    """

    name: str = ""
    inputs: tuple[str, ...] = ()
    optional_inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    mutates: tuple[str, ...] = ()
    version: int = 1
    cached: bool = True
    lazy: bool = True
    main_process_only: bool = False
    replaces_foreign_folder: bool = True
    folder_setting: str = ""

    def enabled(self, ctx: "StageContext") -> bool:
        """Whether the stage is part of this run (e.g. teacher correction only with ``--teacher_correction``)."""
        return True

    def folder(self, ctx: "StageContext") -> str:
        """Where a cached stage's outputs live (default ``<output_dir>/<name>``)."""
        return os.path.join(ctx.output_dir, self.name)

    def settings(self, ctx: "StageContext") -> dict[str, Any]:
        """Every setting (JSON values) the outputs depend on, besides the inputs; part of the fingerprint."""
        return {}

    def run(self, ctx: "StageContext", inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Compute the outputs (``{artifact: value}``) from ``inputs`` (read lazily: only what is used loads)."""
        raise NotImplementedError

    def save(self, ctx: "StageContext", outputs: Mapping[str, Any], folder: str) -> None:
        """Write the outputs into ``folder`` (a fresh temporary folder, renamed into place afterwards)."""

    def load(self, ctx: "StageContext", folder: str) -> dict[str, Any]:
        """Read the outputs back from a finished ``folder``."""
        raise NotImplementedError

    def summary(self, outputs: Mapping[str, Any]) -> str:
        """A few words for the one-line log after the stage finished."""
        return ""

    def info(self, outputs: Mapping[str, Any]) -> dict[str, Any]:
        """Small JSON facts kept in the record and the run's state file (sample counts, losses...)."""
        return {}


# ---------------------------------------------------------------------------------------------- context
class LazyValue:
    """An output that :meth:`Stage.load` does not read until a stage uses it (e.g. a model beside a small JSON).

    Example:
        >>> def load(self, ctx, folder):  # doctest: +SKIP
        ...     return {"teacher": LazyValue(lambda: load_model(folder)), "info": read_json(folder)}
    """

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn


class Artifacts:
    """Values passed between stages, keyed by ``(artifact, producing stage)``; loaded lazily on first access.

    Keying by producer lets a stage replace an artifact it also reads (teacher correction reads the source
    ``"teacher"`` and produces the corrected one) without either overwriting the other.
    """

    def __init__(self) -> None:
        self.producer: dict[str, str] = {}  # artifact -> stage that produced its current version
        self._values: dict[tuple[str, str], Any] = {}
        self._loaders: dict[str, Callable[[], Mapping[str, Any]]] = {}  # stage -> returns all its outputs

    def set_loader(self, stage: str, loader: Callable[[], Mapping[str, Any]]) -> None:
        """``loader()`` returns every output of ``stage``; it runs once, when the first of them is read."""
        self._loaders[stage] = loader

    def set_values(self, stage: str, values: Mapping[str, Any]) -> None:
        for name, value in values.items():
            self._values[(name, stage)] = value
        self._loaders.pop(stage, None)

    def forget(self, name: str, stage: str) -> None:
        self._values.pop((name, stage), None)

    def get(self, name: str, stage: str | None = None) -> Any:
        """The value of ``name`` as produced by ``stage`` (default: its latest producer)."""
        stage = stage or self.producer.get(name)
        if stage is None:
            raise KeyError(f"Artifact {name!r} has no value (no enabled stage produced it).")
        if (name, stage) not in self._values:
            if stage not in self._loaders:
                raise KeyError(f"Artifact {name!r} of stage {stage!r} has no value.")
            loaded = self._loaders.pop(stage)()
            for n, value in loaded.items():
                self._values.setdefault((n, stage), value)
        value = self._values[(name, stage)]
        if isinstance(value, LazyValue):
            value = self._values[(name, stage)] = value.fn()
        return value

    __getitem__ = get

    def __contains__(self, name: str) -> bool:
        return name in self.producer


class _Inputs(Mapping):
    """The inputs of one stage (``{name: producing stage}``), read from :class:`Artifacts` on access."""

    def __init__(self, artifacts: Artifacts, sources: Mapping[str, str]) -> None:
        self._artifacts, self._sources = artifacts, dict(sources)

    def __getitem__(self, name: str) -> Any:
        if name not in self._sources:
            raise KeyError(f"{name!r} is not an input of this stage (declare it in `inputs` / `optional_inputs`).")
        return self._artifacts.get(name, self._sources[name])

    def __contains__(self, name: object) -> bool:  # without loading the value
        return name in self._sources

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)


@dataclass
class StageContext:
    """What stages share: the output folder, the resume mode, the artifacts and the process layout.

    Pipelines subclass it to carry their arguments (see :class:`hf_minitron.minitron_stages.RecipeContext`).
    """

    output_dir: str
    resume: str = "auto"
    state_file: str | None = None
    artifacts: Artifacts = field(default_factory=Artifacts)
    fingerprints: dict[str, str] = field(default_factory=dict)
    lineages: dict[str, dict[str, Any]] = field(default_factory=dict)
    report: dict[str, dict[str, Any]] = field(default_factory=dict)
    reloaders: dict[str, Callable[[], Mapping[str, Any]]] = field(default_factory=dict)  # stage -> loader

    def __post_init__(self) -> None:
        if self.resume not in RESUME_MODES:
            raise ValueError(f"`resume` must be one of {RESUME_MODES}, got {self.resume!r}.")

    @property
    def state(self):
        from accelerate import PartialState

        return PartialState()

    @property
    def is_main_process(self) -> bool:
        return self.state.is_main_process

    def barrier(self) -> None:
        self.state.wait_for_everyone()


# ---------------------------------------------------------------------------------------------- fingerprints
def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def fingerprint(stage: Stage, settings: Mapping[str, Any], input_fingerprints: Mapping[str, str]) -> str:
    """sha256 of the stage's name, version, settings and its inputs' fingerprints (first 16 hex digits)."""
    blob = json.dumps(
        {"stage": stage.name, "version": stage.version, "settings": settings, "inputs": dict(input_fingerprints)},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_record(folder: str) -> dict[str, Any] | None:
    """The record of a finished cached stage, ``{}`` for a folder without one (older version), else ``None``."""
    path = os.path.join(folder, RECORD_NAME)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    return {} if os.path.isdir(folder) else None


def lineage_changes(before: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two lineages (``{stage: {"version", "settings"}}``)."""
    changes = []
    for stage in sorted(set(before) | set(now), key=lambda s: (list(now).index(s) if s in now else len(now), s)):
        old, new = before.get(stage), now.get(stage)
        if old is None:
            changes.append(f"stage {stage!r} added")
        elif new is None:
            changes.append(f"stage {stage!r} removed")
        else:
            if old.get("version") != new.get("version"):
                changes.append(f"{stage} code version {old.get('version')} -> {new.get('version')}")
            old_s, new_s = _flatten(old.get("settings", {})), _flatten(new.get("settings", {}))
            for key in sorted(set(old_s) | set(new_s)):
                if old_s.get(key, "<unset>") != new_s.get(key, "<unset>"):
                    changes.append(f"{stage}.{key}: {old_s.get(key, '<unset>')} -> {new_s.get(key, '<unset>')}")
    return changes


def _flatten(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"files": {"a.txt": [1, 2]}}`` -> ``{"files.a.txt": [1, 2]}``, so a diff names the leaf that changed."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@dataclass
class PlannedStage:
    """How :func:`plan_stages` will treat one enabled stage."""

    stage: Stage
    fingerprint: str
    settings: dict[str, Any]
    lineage: dict[str, Any]
    input_fingerprints: dict[str, str]
    input_sources: dict[str, str]
    action: str  # "reuse", "run", "lazy" (non-cached, on demand) or "always" (action stage)
    reason: str = ""
    changes: list[str] = field(default_factory=list)


def plan_stages(stages: Sequence[Stage], ctx: StageContext) -> list[PlannedStage]:
    """Fingerprint every enabled stage and decide reuse / run from the records on disk (nothing is loaded).

    Raises:
        ValueError: a stage reads an artifact no earlier enabled stage produces, or two stages share a name.
        StageChangedError: ``ctx.resume == "strict"`` and a finished stage's fingerprint changed.
    """
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"Stage names must be unique, got {names}.")
    available: dict[str, tuple[str, dict[str, Any], str]] = {}  # artifact -> (fingerprint, lineage, producer)
    plan = []
    for stage in stages:
        if not stage.enabled(ctx):
            continue
        missing = [n for n in stage.inputs if n not in available]
        if missing:
            raise ValueError(f"Stage {stage.name!r} reads {missing}, which no earlier enabled stage produces.")
        used = [n for n in (*stage.inputs, *stage.optional_inputs) if n in available]
        settings = _jsonable(stage.settings(ctx))
        input_fps = {n: available[n][0] for n in used}
        lineage: dict[str, Any] = {}
        for n in used:
            lineage.update(available[n][1])
        lineage[stage.name] = {"version": stage.version, "settings": settings}
        fp = fingerprint(stage, settings, input_fps)
        sources = {n: available[n][2] for n in used}
        item = PlannedStage(stage, fp, settings, lineage, input_fps, sources, action="lazy" if stage.lazy else "always")
        if stage.cached:
            record = read_record(stage.folder(ctx))
            if record == {} and not stage.replaces_foreign_folder and os.listdir(stage.folder(ctx)):
                raise ValueError(
                    f"{stage.folder(ctx)} exists and was not written by stage {stage.name!r}: it would be replaced. "
                    f"Move it away or choose another {stage.folder_setting or 'folder for this stage'}."
                )
            if record is None:
                item.action, item.reason = "run", "not run yet"
            elif ctx.resume == "never":
                item.action, item.reason = "run", "--resume never"
            elif record.get("fingerprint") == fp:
                item.action, item.reason = "reuse", "settings unchanged"
            else:
                item.action = "run"
                item.changes = lineage_changes(record.get("lineage", {}), lineage) if record else []
                item.reason = "settings changed: " + "; ".join(item.changes) if item.changes else (
                    "no fingerprint (made by an older hf-minitron)" if not record else "inputs changed"
                )
        for n in stage.outputs:
            available[n] = (fp, lineage, stage.name)
        plan.append(item)
    if ctx.resume == "strict":
        changed = [p for p in plan if p.action == "run" and p.reason not in ("not run yet",)]
        if changed:
            lines = [f"  - {p.stage.name} ({os.path.relpath(p.stage.folder(ctx), ctx.output_dir)}/): {p.reason}" for p in changed]
            raise StageChangedError(
                f"--resume strict: {len(changed)} finished stage(s) in {ctx.output_dir} were made with other settings:\n"
                + "\n".join(lines)
                + "\nRerun with `--resume auto` to recompute them (and everything after them), or choose another `--output_dir`."
            )
    return plan


# ---------------------------------------------------------------------------------------------- running
def _format_seconds(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _write_record(item: PlannedStage, outputs: Mapping[str, Any], folder: str, seconds: float) -> None:
    atomic_write_json(
        os.path.join(folder, RECORD_NAME),
        {
            "stage": item.stage.name,
            "version": item.stage.version,
            "fingerprint": item.fingerprint,
            "settings": item.settings,
            "inputs": item.input_fingerprints,
            "lineage": item.lineage,
            "seconds": round(seconds, 2),
            "info": _jsonable(item.stage.info(outputs)),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )


def _run_stage(item: PlannedStage, ctx: StageContext, synchronize: bool) -> dict[str, Any]:
    """Run one stage; the main process saves a cached stage's outputs. ``synchronize``: barrier after saving
    (never for lazy stages, which a single process may trigger on its own)."""
    stage, art = item.stage, ctx.artifacts
    start = time.perf_counter()
    outputs: dict[str, Any] | None = None
    if ctx.is_main_process or not stage.main_process_only:
        outputs = stage.run(ctx, _Inputs(art, item.input_sources))
        missing = set(stage.outputs) - set(outputs)
        if missing:
            raise RuntimeError(f"Stage {stage.name!r} did not return its outputs {sorted(missing)}.")
        kill_point(f"{stage.name}:ran")
    seconds = time.perf_counter() - start
    if stage.cached and outputs is not None and ctx.is_main_process:
        with staged_dir(stage.folder(ctx), overwrite=True, what=f"{stage.name} folder") as tmp:
            stage.save(ctx, outputs, tmp)
            seconds = time.perf_counter() - start  # saving is part of the work (the export stage writes the model there)
            _write_record(item, outputs, tmp, seconds)
            kill_point(f"{stage.name}:saved")
    if synchronize:
        ctx.barrier()
    if outputs is not None:
        art.set_values(stage.name, {n: outputs[n] for n in stage.outputs})
    elif stage.cached:  # main-process-only stage seen from another process: read the saved folder if needed
        art.set_loader(stage.name, ctx.reloaders[stage.name])
    else:
        art.set_values(stage.name, {n: None for n in stage.outputs})
    for name in stage.mutates:  # changed in place: produce it again (reload / rerun) when next read
        producer = item.input_sources.get(name)
        if producer is not None:
            art.forget(name, producer)
            art.set_loader(producer, ctx.reloaders[producer])
    return {
        "seconds": round(seconds, 2),
        "info": _jsonable(stage.info(outputs)) if outputs is not None else {},
        "summary": stage.summary(outputs) if outputs is not None else "",
    }


def _save_state(ctx: StageContext) -> None:
    if ctx.state_file and ctx.is_main_process:
        atomic_write_json(ctx.state_file, {"stages": ctx.report})


def run_stages(stages: Sequence[Stage], ctx: StageContext) -> StageContext:
    """Plan, then run or reuse every enabled stage in order; returns ``ctx`` (artifacts and ``ctx.report``).

    ``ctx.report[name]`` holds ``action`` (``"computed"``, ``"reused"``, ``"loaded"`` for a non-cached stage that
    ran, ``"not needed"``), ``seconds`` (of the run that computed it), ``reason``, ``info`` and ``summary``; the
    main process also writes it to ``ctx.state_file`` after every stage.

    Raises:
        StageChangedError: ``resume="strict"`` and a finished stage changed (before any stage runs).
    """
    plan = plan_stages(stages, ctx)
    for item in plan:
        if item.stage.cached:
            logger.info(f"Plan: {item.stage.name}: {'reuse' if item.action == 'reuse' else 'run'} ({item.reason})")
    art = ctx.artifacts
    for item in plan:
        stage = item.stage
        ctx.fingerprints[stage.name], ctx.lineages[stage.name] = item.fingerprint, item.lineage
        entry: dict[str, Any] = {"action": item.action, "reason": item.reason, "fingerprint": item.fingerprint, "seconds": 0.0,
                                 "info": {}, "summary": ""}
        ctx.report[stage.name] = entry
        if stage.cached:
            reload = (lambda s=stage: s.load(ctx, s.folder(ctx)))
        else:
            def reload(i=item, e=entry):
                e.update(action="loaded", **_run_stage(i, ctx, synchronize=False))
                return {n: art.get(n, i.stage.name) for n in i.stage.outputs}
        ctx.reloaders[stage.name] = reload
        for name in stage.outputs:
            art.producer[name] = stage.name
        if item.action == "reuse":
            record = read_record(stage.folder(ctx)) or {}
            entry.update(action="reused", seconds=record.get("seconds", 0.0), info=record.get("info", {}))
            art.set_loader(stage.name, reload)
            logger.info(f"[{stage.name}] reused {stage.folder(ctx)} (settings unchanged)")
        elif item.action == "lazy":
            entry["action"] = "not needed"
            art.set_loader(stage.name, reload)
        else:
            ctx.barrier()
            logger.info(f"[{stage.name}] running ({item.reason})" if item.reason else f"[{stage.name}] running")
            entry.update(action="computed", **_run_stage(item, ctx, synchronize=True))
            logger.info(
                f"[{stage.name}] done in {_format_seconds(entry['seconds'])}" + (f": {entry['summary']}" if entry["summary"] else "")
            )
        _save_state(ctx)
    return ctx


def stage_table(ctx: StageContext) -> str:
    """The stages of a run as a markdown table (stage, what happened, seconds of the computing run)."""
    lines = ["| stage | status | seconds |", "|---|---|---:|"]
    for name, entry in ctx.report.items():
        if entry["action"] == "not needed":
            continue
        lines.append(f"| {name} | {entry['action']} | {entry['seconds']:.1f} |")
    return "\n".join(lines)


__all__ = [
    "Artifacts",
    "LazyValue",
    "PlannedStage",
    "RECORD_NAME",
    "RESUME_MODES",
    "Stage",
    "StageChangedError",
    "StageContext",
    "fingerprint",
    "lineage_changes",
    "plan_stages",
    "read_record",
    "run_stages",
    "stage_table",
]
