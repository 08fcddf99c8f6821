"""`hf-minitron evaluate` (perplexity + lm-eval tasks) and `hf-minitron export-gguf` entry points.

    hf-minitron evaluate --model_name_or_path out --tasks minitron_cloze
    hf-minitron evaluate --model_name_or_path out --tasks minitron_cloze,my_task --include_path my_tasks
    hf-minitron export-gguf out --outtype q8_0 --outfile out/model-q8_0.gguf --verify

Each ``run_*`` takes the argument list after the subcommand and returns what it printed as a dict.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .atomic import atomic_write_json
from .gguf_export import GGUF_OUTTYPES


@dataclass
class EvaluateArguments:
    """Options of `hf-minitron evaluate` besides the model/data ones (``CommandDataArguments``: ``max_samples`` caps the
    held-out perplexity windows)."""

    tasks: str | None = field(
        default=None,
        metadata={"help": "Comma-separated lm-eval tasks, e.g. `minitron_cloze` (offline, built from the held-out "
                  "text). Needs `pip install 'hf-minitron[eval]'`. Default: perplexity only."},
    )
    include_path: str | None = field(default=None, metadata={"help": "Folder of your own lm-eval task YAMLs."})
    num_fewshot: int | None = field(default=None, metadata={"help": "Few-shot examples (default: each task's own, else 0)."})
    limit: float | None = field(default=None, metadata={"help": "Examples per task (a count, or a fraction < 1); for quick checks."})
    eval_batch_size: int = field(default=8, metadata={"help": "Batch size of the task evaluation."})
    allow_downloads: bool = field(default=False, metadata={"help": "Let lm-eval fetch Hub datasets (off: local tasks only)."})
    output_json: str | None = field(default=None, metadata={"help": "Also write the results to this JSON file."})


@dataclass
class ExportGGUFArguments:
    """`hf-minitron export-gguf MODEL_DIR --outtype ... --outfile PATH` (llama.cpp converter flag names)."""

    model_dir: str | None = field(default=None, metadata={"help": "Saved model folder (with its tokenizer); also the first positional argument."})
    outtype: str = field(default="f16", metadata={"help": "GGUF tensor type.", "choices": list(GGUF_OUTTYPES)})
    outfile: str | None = field(default=None, metadata={"help": "Output .gguf path (default: MODEL_DIR/<name>-<outtype>.gguf)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output file."})
    verify: bool = field(default=False, metadata={"help": "Load the file back with transformers and report max |Δlogit|."})


def run_evaluate(argv: list[str]) -> dict:
    """`hf-minitron evaluate`: held-out perplexity, plus lm-eval task results with ``--tasks``."""
    from .cli import CommandDataArguments, RemoteCodeArguments, _parse, _setup, _texts_and_model
    from .data import pack_texts
    from .evaluation import perplexity

    data, remote, args = _parse((CommandDataArguments, RemoteCodeArguments, EvaluateArguments), argv)
    if args.tasks is not None:
        from .harness import _require_lm_eval

        _require_lm_eval()  # before the model loads
    state = _setup()
    if not state.is_main_process:  # nothing to share: one process evaluates
        state.wait_for_everyone()
        return {}
    model, tokenizer, _, held_out = _texts_and_model(data, remote.trust_remote_code)
    blocks = pack_texts(held_out, tokenizer, data.seq_length, data.max_samples)
    output = {
        "model": data.model_name_or_path or "embedded SmolLM2-135M-Instruct",
        "held_out_samples": len(blocks),
        "seq_length": data.seq_length,
        "perplexity": perplexity(model, blocks, seq_length=data.seq_length),
    }
    if args.tasks is not None:
        from .harness import evaluate_tasks

        limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
        evaluation = evaluate_tasks(
            model, tokenizer, args.tasks, include_path=args.include_path, cloze_texts=held_out,
            num_fewshot=args.num_fewshot, limit=limit, batch_size=args.eval_batch_size, offline=not args.allow_downloads,
        )
        output["tasks"] = evaluation.to_dict()
    print(json.dumps(output, indent=2, default=str))
    if args.output_json:
        atomic_write_json(args.output_json, output)
    state.wait_for_everyone()
    return output


def run_export_gguf(argv: list[str]) -> dict:
    """`hf-minitron export-gguf MODEL_DIR --outtype f16 --outfile PATH [--verify]`."""
    from .cli import _parse, _setup
    from .gguf_export import export_gguf

    if argv and not argv[0].startswith("-"):
        argv = ["--model_dir", argv[0], *argv[1:]]
    (args,) = _parse((ExportGGUFArguments,), argv)
    if not args.model_dir:
        raise ValueError("Give the model folder: `hf-minitron export-gguf MODEL_DIR --outtype f16 --outfile PATH`.")
    state = _setup()
    output = {}
    if state.is_main_process:  # one process converts; the others wait for the file
        output = export_gguf(args.model_dir, args.outfile, args.outtype, overwrite=args.overwrite, verify=args.verify).to_dict()
        print(json.dumps(output, indent=2, default=str))
    state.wait_for_everyone()
    return output


__all__ = ["EvaluateArguments", "ExportGGUFArguments", "run_evaluate", "run_export_gguf"]
