"""Model-card sections for task accuracy, GGUF files and "how to run"; pure functions returning Markdown.

Each takes plain data (dicts as stored in ``minitron_results.json``, or the dataclasses of
:mod:`hf_minitron.harness` / :mod:`hf_minitron.gguf_export`) and renders one section, so the card writer
(:mod:`hf_minitron.hub`) only concatenates them. Nothing here runs a model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


ENGINES = ("transformers", "vllm", "llama.cpp")


def _as_dict(item: Any) -> dict[str, Any]:
    return item.to_dict() if hasattr(item, "to_dict") else dict(item)


def _rows_of(evaluation: Any) -> list[dict[str, Any]]:
    """Rows of a ``TaskEvaluation`` / its ``to_dict()`` / a plain list of result dicts."""
    data = _as_dict(evaluation) if not isinstance(evaluation, (list, tuple)) else {"results": evaluation}
    return [_as_dict(r) for r in data["results"]]


def _format_value(row: Mapping[str, Any]) -> str:
    value, stderr = row["value"], row.get("stderr")
    if row["metric"].startswith("acc") or row["metric"] in ("exact_match", "f1", "mcc"):
        text = f"{100 * value:.1f}%" + (f" ± {100 * stderr:.1f}" if stderr is not None else "")
    else:
        text = f"{value:,.2f}" + (f" ± {stderr:,.2f}" if stderr is not None else "")
    return text


def render_task_table(evaluations: Mapping[str, Any], title: str = "## Task accuracy (lm-evaluation-harness)") -> str:
    """One Markdown table, a row per (task, metric) and a column per model, from lm-eval results per model.

    ``evaluations`` maps a model label (``"teacher"``, ``"pruned (zero-shot)"``, ``"distilled"``) to a
    :class:`~hf_minitron.harness.TaskEvaluation`, its ``to_dict()``, or a list of result dicts
    (``task, metric, value, stderr, n``). Accuracies print as percentages ± one standard error. Returns ``""``
    when there is nothing to show.

    Example:
        >>> print(render_task_table({"teacher": [{"task": "minitron_cloze", "metric": "acc", "value": 0.5,
        ...                                       "stderr": 0.05, "n": 75, "num_fewshot": 0, "higher_is_better": True}]}, title=""))
        | task | metric | n | shots | teacher |
        |---|---|---:|---:|---:|
        | minitron_cloze | acc ↑ | 75 | 0 | 50.0% ± 5.0 |
    """
    if not evaluations:
        return ""
    labels = list(evaluations)
    table: dict[tuple[str, str], dict[str, Any]] = {}
    for label in labels:
        for row in _rows_of(evaluations[label]):
            entry = table.setdefault((row["task"], row["metric"]), {"row": row, "values": {}})
            entry["values"][label] = _format_value(row)
    if not table:
        return ""
    arrows = {True: " ↑", False: " ↓"}
    lines = [
        "| task | metric | n | shots | " + " | ".join(labels) + " |",
        "|---|---|---:|---:|" + "---:|" * len(labels),
    ]
    for (task, metric), entry in table.items():
        row = entry["row"]
        shots = "" if row.get("num_fewshot") is None else str(row["num_fewshot"])
        n = "" if row.get("n") is None else f"{row['n']:,}"
        cells = [entry["values"].get(label, "") for label in labels]
        lines.append(f"| {task} | {metric}{arrows.get(row.get('higher_is_better'), '')} | {n} | {shots} | " + " | ".join(cells) + " |")
    body = "\n".join(lines)
    return f"{title}\n\n{body}" if title else body


def _size(num_bytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:,.0f} {unit}" if unit == "B" else f"{num_bytes:,.1f} {unit}"
        num_bytes /= 1024
    return ""  # pragma: no cover


def render_gguf_files(exports: Sequence[Any], title: str = "## GGUF files (llama.cpp, Ollama)") -> str:
    """A table of exported GGUF files: name, type, size, tensors per type, and the round-trip check.

    ``exports`` holds :class:`~hf_minitron.gguf_export.GGUFExport` objects or their ``to_dict()``. Returns ``""``
    when there is none.

    Example:
        >>> print(render_gguf_files([{"path": "/o/m-f32.gguf", "outtype": "f32", "size_bytes": 2048,
        ...                           "max_abs_dlogit": 0.0, "max_abs_logit": 20.0}], title=""))
        | file | type | size | tensors | round trip (transformers `gguf_file=`) |
        |---|---|---:|---|---|
        | m-f32.gguf | f32 | 2.0 KiB |  | max \\|Δlogit\\| 0 (largest \\|logit\\| 20.0) |
    """
    if not exports:
        return ""
    lines = ["| file | type | size | tensors | round trip (transformers `gguf_file=`) |", "|---|---|---:|---|---|"]
    for item in exports:
        e = _as_dict(item)
        name = e.get("file") or e["path"].replace("\\", "/").rsplit("/", 1)[-1]
        if e.get("max_abs_dlogit") is None:
            check = "not checked"
        else:
            check = f"max \\|Δlogit\\| {e['max_abs_dlogit']:.3g} (largest \\|logit\\| {e['max_abs_logit']:.1f})"
            if e.get("top1_agreement") is not None:
                check += f", same top-1 token at {100 * e['top1_agreement']:.1f}% of positions"
            if e.get("tokenizer_matches") is False:
                check += "; tokenizer differs"
        types = ", ".join(f"{k} ×{v}" for k, v in (e.get("tensor_types") or {}).items())
        lines.append(f"| {name} | {e['outtype']} | {_size(int(e['size_bytes']))} | {types} | {check} |")
    body = "\n".join(lines)
    return f"{title}\n\n{body}" if title else body


def render_how_to_run(
    repo_id: str,
    gguf_file: str | None = None,
    tested: Mapping[str, str] | None = None,
    title: str = "## How to run",
) -> str:
    """Snippets for transformers, vLLM and llama.cpp (+ Ollama when a GGUF file exists), each marked tested or not.

    ``tested`` maps an engine (``"transformers"``, ``"vllm"``, ``"llama.cpp"``) to what was actually run, e.g.
    ``{"transformers": "loaded and evaluated by hf-minitron 0.1.0 with transformers 5.24.0"}``. Engines missing
    from it are marked *not tested*; only give evidence of a run that happened.

    Example:
        >>> block = render_how_to_run("me/smollm2-pruned", "smollm2-pruned-f16.gguf", {"transformers": "loaded"})
        >>> "Not tested" in block and "Tested: loaded" in block
        True
    """
    tested = dict(tested or {})
    unknown = sorted(set(tested) - set(ENGINES))
    if unknown:
        raise ValueError(f"Unknown engine(s) {unknown} in `tested`; use {ENGINES}.")

    def mark(engine: str) -> str:
        return f"*Tested: {tested[engine]}.*" if tested.get(engine) else "*Not tested by hf-minitron.*"

    sections = [
        "**transformers** " + mark("transformers"),
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
        'inputs = tokenizer("The capital of France is", return_tensors="pt")',
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))",
        "```",
        "",
        "**vLLM** " + mark("vllm"),
        "",
        "```bash",
        f"vllm serve {repo_id}",
        "```",
    ]
    if gguf_file:
        stem = gguf_file.removesuffix(".gguf")
        quant = stem.rsplit("-", 1)[-1].upper() if "-" in stem else None
        sections += [
            "",
            "**llama.cpp** " + mark("llama.cpp"),
            "",
            "```bash",
            f"llama-cli --hf-repo {repo_id} --hf-file {gguf_file} -p \"The capital of France is\"",
            f"ollama run hf.co/{repo_id}" + (f":{quant}" if quant else ""),
            "```",
        ]
    body = "\n".join(sections)
    return f"{title}\n\n{body}" if title else body


__all__ = ["ENGINES", "render_gguf_files", "render_how_to_run", "render_task_table"]
