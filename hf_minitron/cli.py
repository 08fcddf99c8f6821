"""`hf-minitron` command line: thin wrappers over the library functions.

    hf-minitron run --output_dir out                      # the whole recipe (same as recipes/minitron.py)
    hf-minitron importance --dataset_path text.txt --output scores.safetensors
    hf-minitron prune --importance scores.safetensors --hidden_size 432 --output_dir pruned
    hf-minitron distill --student pruned --output_dir distilled --max_steps 100
    hf-minitron cache-teacher --output_dir teacher-cache --top_k 64   # then: distill ... --teacher_logits_cache teacher-cache
    hf-minitron search --target_params 0.6 --max_candidates 6 --output_dir search
    hf-minitron evaluate --model_name_or_path distilled [--tasks minitron_cloze]   # lm-eval tasks: extra [eval]
    hf-minitron export-gguf distilled --outtype f16 --outfile distilled-f16.gguf  # llama.cpp's converter
    hf-minitron correct-teacher --output_dir teacher-corrected --max_steps 50 --original_learning_rate 1e-4

Omitting `--model_name_or_path` uses the embedded SmolLM2-135M-Instruct; omitting `--dataset_path` uses the
embedded CPython documentation text. Every subcommand accepts `--config file.yaml` (TrlParser).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

from .eval_export_cli import run_evaluate, run_export_gguf
from .pipeline import ModelDataArguments


DEFAULT_RECIPE_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "smollm2-135m-default.yaml")


@dataclass
class CommandDataArguments(ModelDataArguments):
    max_samples: int | None = field(default=None, metadata={"help": "Cap on samples."})


@dataclass
class RemoteCodeArguments:
    """For subcommands whose other arguments do not already have it (the training configs do)."""

    trust_remote_code: bool = field(default=False, metadata={"help": "Allow a model's own modeling code (`auto_map`) to run."})


@dataclass
class PruneCommandArguments:
    importance: str | None = field(default=None, metadata={"help": "Scores from `hf-minitron importance` (else computed)."})
    output: str = field(default="importance_scores.safetensors", metadata={"help": "`importance`: where to save scores."})
    output_dir: str = field(default="pruned", metadata={"help": "`prune`: folder of the pruned model."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output folder."})


@dataclass
class SearchCommandArguments:
    target_params: float | None = field(
        default=None, metadata={"help": "Fraction (<= 1) of the source's parameters, or a count (0.6 when no target is set)."}
    )
    target_active_params: float | None = field(
        default=None, metadata={"help": "MoE: parameters used per token, a fraction (<= 1) of the source's or a count."}
    )
    tolerance: float = field(default=0.05, metadata={"help": "Relative window around the target."})
    search_space: str = field(default="all", metadata={"help": "all, width or depth."})
    max_candidates: int = field(default=6, metadata={"help": "Candidates to evaluate."})
    retrain_steps: int = field(default=0, metadata={"help": "Short distillation steps per candidate."})
    use_lora: bool = field(default=False, metadata={"help": "Retrain with LoRA adapters."})
    importance: str | None = field(default=None, metadata={"help": "Precomputed scores (else estimated)."})
    num_calibration_samples: int = field(default=256, metadata={"help": "Calibration samples when estimating."})
    output_dir: str = field(default="search", metadata={"help": "Where the candidates table and winner config go."})


@dataclass
class DistillCommandArguments:
    student: str = field(default="pruned", metadata={"help": "Pruned student folder."})


def _config_path(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config":
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ValueError("`--config` needs the path of a YAML file (e.g. --config recipes/configs/smollm2-135m-depth.yaml).")
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def _parse(dataclasses: tuple, argv: list[str]):
    """Parse YAML (``--config``) + flags; an unknown field in either is an error that names it."""
    from trl import TrlParser

    valid = {f for d in dataclasses for f in d.__dataclass_fields__}
    path = _config_path(argv)
    if path is not None:
        import yaml

        if not os.path.isfile(path):
            raise ValueError(f"Config file {path!r} does not exist.")
        with open(path, encoding="utf-8") as f:
            try:
                config = yaml.safe_load(f)
            except yaml.YAMLError as err:
                raise ValueError(f"Config file {path!r} is not valid YAML: {err}") from None
        config = {} if config is None else config
        if not isinstance(config, dict):
            raise ValueError(f"Config file {path!r} must be a mapping of `field: value` lines, got a {type(config).__name__}.")
        unknown = sorted(k for k in config if k not in valid and k != "env")
        if unknown:
            raise ValueError(f"Unknown field(s) {unknown} in {path}: not a field of {', '.join(d.__name__ for d in dataclasses)}.")
    *parsed, from_config, from_flags = TrlParser(dataclasses).parse_args_and_config(
        argv, return_remaining_strings=True, separate_remaining_strings=True
    )
    unknown = [s.lstrip("-") for s in from_config[::2]] + [s for s in from_flags if s.startswith("-")]
    if unknown or from_flags:
        raise ValueError(
            f"Unknown option(s) {unknown or from_flags}: not a field of {', '.join(d.__name__ for d in dataclasses)}; "
            "check the spelling (`--help` lists every option)."
        )
    return parsed


def _setup(num_cpu_threads: int | None = None, log_level: str | int | None = "info"):
    """Script entry: process group (under `accelerate launch`), torch threads, hf-minitron's log level.

    `accelerate launch` without --cpu exports OMP_NUM_THREADS=1; on a machine without GPU each process gets its
    share of the cores instead. Only script entries do this: library calls leave global state alone.
    """
    import torch
    from accelerate import PartialState

    from .logging import set_verbosity

    state = PartialState()
    if not torch.cuda.is_available():
        torch.set_num_threads(num_cpu_threads or max(1, (os.cpu_count() or 1) // state.num_processes))
    set_verbosity(log_level if state.is_main_process else "warning")
    return state


def _texts_and_model(data: CommandDataArguments, trust_remote_code: bool = False):
    from .pipeline import load_model_and_tokenizer, load_texts

    train, held_out = load_texts(data.dataset_path, data.eval_dataset_path, data.eval_fraction)
    model, tokenizer = load_model_and_tokenizer(data.model_name_or_path, data.gguf_file, data.model_dtype, trust_remote_code)
    return model, tokenizer, train, held_out


def _log_level(training_args) -> str | int:
    """The recipe logs hf-minitron's progress at INFO unless `--log_level` asks otherwise."""
    level = getattr(training_args, "log_level", "passive")
    return "info" if level in (None, "passive") else level


def run_recipe(argv: list[str]) -> dict:
    """`hf-minitron run` / `recipes/minitron.py`: the whole pipeline (embedded default config without --config)."""
    from .distillation import DistillationConfig
    from .logging import only_own_progress_bars
    from .pipeline import MinitronRecipeArguments, format_results, run_minitron

    if _config_path(argv) is None:
        argv = ["--config", DEFAULT_RECIPE_CONFIG, *argv]
    recipe_args, training_args = _parse((MinitronRecipeArguments, DistillationConfig), argv)
    state = _setup(recipe_args.num_cpu_threads, _log_level(training_args))
    with only_own_progress_bars():
        results = run_minitron(recipe_args, training_args)
    if state.is_main_process:
        print(format_results(results), flush=True)
    return results


def _save_scores(scores, path: str) -> None:
    from .atomic import check_writable_dir

    if os.path.isdir(path):
        raise ValueError(f"`--output` {path!r} is a folder; give a file path such as {os.path.join(path, 'importance_scores.safetensors')!r}.")
    check_writable_dir(os.path.dirname(os.path.abspath(path)), what="folder of --output")
    scores.save(path)


def _importance(argv: list[str], save: bool = True):
    from .atomic import run_on_main_process
    from .config import TARGET_FIELDS, MinitronPruneConfig
    from .data import pack_texts
    from .importance import ImportanceScores, estimate_importance

    data, prune_args, config, remote = _parse((CommandDataArguments, PruneCommandArguments, MinitronPruneConfig, RemoteCodeArguments), argv)
    if not save and all(getattr(config, k) is None for k in TARGET_FIELDS) and not config.layers_to_drop:
        raise ValueError("Nothing to prune: set at least one of " + ", ".join(TARGET_FIELDS) + " or layers_to_drop.")
    state = _setup()
    model, tokenizer, train, _ = _texts_and_model(data, remote.trust_remote_code)
    if prune_args.importance:
        scores = ImportanceScores.load(prune_args.importance)
    else:
        n = config.num_calibration_samples if data.max_samples is None else min(config.num_calibration_samples, data.max_samples)
        calibration = pack_texts(train, tokenizer, data.seq_length, n)
        scores = estimate_importance(model, calibration, config, show_progress=state.is_main_process)  # sharded
        if save:
            run_on_main_process(_save_scores, scores, prune_args.output)
            if state.is_main_process:
                print(f"Saved importance scores of {scores.metadata['num_samples']} samples to {prune_args.output}")
    return model, tokenizer, scores, prune_args, config


def _prune(argv: list[str]) -> None:
    from .atomic import run_on_main_process
    from .pruning import prune_model, save_pruned_model

    model, tokenizer, scores, prune_args, config = _importance(argv, save=False)
    pruned = prune_model(model, config, importance=scores)
    folder = run_on_main_process(
        save_pruned_model, pruned, prune_args.output_dir, tokenizer=tokenizer, importance=scores, overwrite=prune_args.overwrite
    )
    if folder is not None:
        print(json.dumps({"output_dir": folder, "target_config": pruned.minitron_provenance["target_config"],
                          "parameters": sum(p.numel() for p in pruned.parameters())}, indent=2))


def _distill(argv: list[str]) -> None:
    from datasets import Dataset

    from .atomic import run_on_main_process
    from .data import pack_texts
    from .distillation import DistillationConfig, DistillationTrainer
    from .pipeline import load_model_and_tokenizer
    from .pruning import save_pruned_model

    data, distill_args, training_args = _parse((CommandDataArguments, DistillCommandArguments, DistillationConfig), argv)
    _setup(log_level=_log_level(training_args))
    if training_args.teacher_logits_cache:  # the teacher is not loaded: its tokenizer comes with the cache
        from .distillation import TeacherLogitCache
        from .pipeline import load_texts

        teacher, tokenizer = None, TeacherLogitCache(training_args.teacher_logits_cache).tokenizer()
        train, _ = load_texts(data.dataset_path, data.eval_dataset_path, data.eval_fraction)
    else:
        teacher, tokenizer, train, _ = _texts_and_model(data, training_args.trust_remote_code)
    student, _ = load_model_and_tokenizer(distill_args.student, dtype=data.model_dtype, trust_remote_code=training_args.trust_remote_code)
    blocks = pack_texts(train, tokenizer, data.seq_length, data.max_samples)
    dataset = Dataset.from_dict({"input_ids": [b.tolist() for b in blocks]})
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=training_args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    student = trainer.accelerator.unwrap_model(trainer.model)
    run_on_main_process(save_pruned_model, student, os.path.join(training_args.output_dir, "final"), tokenizer=tokenizer, overwrite=True)


def _correct_teacher(argv: list[str]) -> None:
    from datasets import Dataset

    from .atomic import run_on_main_process
    from .data import pack_texts
    from .pruning import save_pruned_model
    from .teacher_correction import TeacherCorrectionConfig, correct_teacher

    data, args = _parse((CommandDataArguments, TeacherCorrectionConfig), argv)
    _setup(log_level=_log_level(args))
    model, tokenizer, train, _ = _texts_and_model(data, args.trust_remote_code)
    blocks = pack_texts(train, tokenizer, data.seq_length, data.max_samples)
    dataset = Dataset.from_dict({"input_ids": [b.tolist() for b in blocks]})
    corrected = correct_teacher(model, args, dataset, processing_class=tokenizer)
    run_on_main_process(save_pruned_model, corrected, os.path.join(os.path.abspath(args.output_dir), "final"), tokenizer=tokenizer, overwrite=True)


def _search(argv: list[str]) -> None:
    from .atomic import atomic_write_text, run_on_main_process
    from .config import MinitronPruneConfig
    from .data import pack_texts
    from .importance import ImportanceScores, estimate_importance
    from .search import search_architectures

    data, args, remote = _parse((CommandDataArguments, SearchCommandArguments, RemoteCodeArguments), argv)
    state = _setup()
    model, tokenizer, train, held_out = _texts_and_model(data, remote.trust_remote_code)
    train_blocks = pack_texts(train, tokenizer, data.seq_length, data.max_samples)
    eval_blocks = pack_texts(held_out, tokenizer, data.seq_length, 32)
    config = MinitronPruneConfig(num_calibration_samples=args.num_calibration_samples, calibration_seq_length=data.seq_length)
    scores = ImportanceScores.load(args.importance) if args.importance else estimate_importance(model, train_blocks, config)
    result = search_architectures(
        model, scores, target_params=args.target_params if args.target_params or args.target_active_params else 0.6,
        target_active_params=args.target_active_params, tolerance=args.tolerance, search_space=args.search_space,
        max_candidates=args.max_candidates, retrain_steps=args.retrain_steps, train_dataset=train_blocks,
        eval_dataset=eval_blocks, use_lora=args.use_lora, prune_config=config, tokenizer=tokenizer, seq_length=data.seq_length,
    )

    def save() -> None:
        result.save(args.output_dir)
        atomic_write_text(os.path.join(args.output_dir, "candidates.md"), result.to_table() + "\n")

    run_on_main_process(save)
    if state.is_main_process:
        print(result.to_table())
        print(f"Winner's config: {os.path.join(args.output_dir, 'minitron_prune_config.json')}")


def _cache_teacher(argv: list[str]) -> None:
    from .distillation.logit_cache import cache_teacher_main

    cache_teacher_main(argv)


COMMANDS = {
    "run": run_recipe,
    "importance": lambda argv: _importance(argv, save=True),
    "prune": _prune,
    "distill": _distill,
    "search": _search,
    "evaluate": run_evaluate,
    "correct-teacher": _correct_teacher,
    "export-gguf": run_export_gguf,
    "cache-teacher": _cache_teacher,
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        usage = f"usage: hf-minitron {{{','.join(COMMANDS)}}} [options]  (`hf-minitron <command> --help` for options)"
        if argv and argv[0] in ("-h", "--help"):
            print(__doc__)
            print(usage)
            raise SystemExit(0)
        print(usage, file=sys.stderr)
        problem = f"unknown command {argv[0]!r}" if argv else "no command given"
        print(f"hf-minitron: error: {problem}; choose one of {', '.join(COMMANDS)}.", file=sys.stderr)
        raise SystemExit(2)
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
