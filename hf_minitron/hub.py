"""Model card and Hub upload of a pruned / distilled model folder."""

from __future__ import annotations

import os
from typing import Any

from transformers.utils import logging


logger = logging.get_logger(__name__)


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = []
        for k in keys:
            v = row.get(k, "")
            cells.append(f"{v:,.2f}" if isinstance(v, float) else (f"{v:,}" if isinstance(v, int) else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_model_card(info: dict[str, Any]) -> str:
    """A README.md model card for a Minitron-pruned model.

    ``info`` keys (all optional but ``base_model``): ``base_model``, ``teacher_correction`` (dict or None),
    ``prune_config`` (dict), ``importance`` (dict), ``source_config`` / ``target_config`` (dicts),
    ``tokens_distilled`` (int), ``distillation`` (dict), ``evaluation`` (list of row dicts), ``repo_id``.

    Example:
        >>> card = render_model_card({"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct"})
    """
    base = info.get("base_model", "unknown")
    repo = info.get("repo_id") or "path/to/this/folder"
    sections = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:\n- hf-minitron\n- pruning\n- distillation",
        *([f"base_model: {base}"] if base.count("/") == 1 and " " not in base and not os.path.exists(base) else []),
        "---",
        "",
        f"# Minitron-pruned {base}",
        "",
        f"Pruned from **{base}** with hf-minitron (activation-based structured pruning, "
        "then knowledge distillation). It is a standard `transformers` model: no extra code is needed to load it.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
        "```",
    ]
    if info.get("source_config") and info.get("target_config"):
        rows = [
            {"": k, "source": info["source_config"][k], "pruned": info["target_config"][k]}
            for k in info["target_config"]
        ]
        sections += ["", "## Shape", "", _table(rows)]
    tc = info.get("teacher_correction")
    sections += ["", "## Teacher correction", ""]
    sections.append(
        "None: the teacher was used as released."
        if not tc
        else "The teacher was first fine-tuned on the distillation data: "
        + ", ".join(f"{k}={v}" for k, v in tc.items())
        + "."
    )
    if info.get("prune_config"):
        pc = {k: v for k, v in info["prune_config"].items() if v not in (None, {}, [])}
        sections += ["", "## Pruning", "", "`MinitronPruneConfig`: " + ", ".join(f"`{k}={v}`" for k, v in pc.items())]
    if info.get("importance"):
        imp = {k: v for k, v in info["importance"].items() if k != "source_sizes"}
        sections += ["", "Importance: " + ", ".join(f"{k}={v}" for k, v in imp.items())]
    if info.get("distillation"):
        sections += ["", "## Distillation", "", ", ".join(f"{k}={v}" for k, v in info["distillation"].items())]
    if info.get("tokens_distilled") is not None:
        sections += ["", f"Tokens distilled: {info['tokens_distilled']:,}"]
    if info.get("evaluation"):
        sections += ["", "## Evaluation", "", _table(info["evaluation"])]
    sections += ["", "`minitron_config.json` holds the full provenance (kept layers, channels, heads and neurons).", ""]
    return "\n".join(sections)


def write_model_card(folder: str | os.PathLike, info: dict[str, Any]) -> str:
    """Write ``README.md`` into ``folder`` and return its path."""
    path = os.path.join(os.fspath(folder), "README.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_model_card(info))
    return path


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload Minitron-pruned model (hf-minitron)",
) -> str:
    """Upload everything in ``folder`` (weights, tokenizer, card, provenance, scores) to ``repo_id``.

    Example:
        >>> push_folder_to_hub("smollm2-pruned", "me/smollm2-pruned")  # doctest: +SKIP
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True)
    repo_id = getattr(repo, "repo_id", repo_id)
    logger.info(f"Uploading {folder} to {repo_id}")
    info = api.upload_folder(repo_id=repo_id, folder_path=os.fspath(folder), commit_message=commit_message)
    return getattr(info, "commit_url", str(info))
