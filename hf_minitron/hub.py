"""Model card and Hub upload of a pruned / distilled model folder (only the files a user wants on the Hub)."""

from __future__ import annotations

import fnmatch
import json
import os
from typing import Any

from .atomic import atomic_write_text
from .logging import get_logger


logger = get_logger(__name__)

# What goes to the Hub from a model folder: weights, config, generation config, tokenizer, card, provenance,
# scores, results and plots. Never checkpoints, optimizer / scheduler / RNG state, training_args.bin or any
# other folder. Patterns apply to top-level files (plus `plots/*.png`).
HUB_FILE_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "*.tiktoken",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "README.md",
    "minitron_config.json",
    "minitron_prune_config.json",
    "minitron_results.json",
    "architecture_search.json",
    "plots/*.png",
)


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
    """Write ``README.md`` into ``folder`` (atomically) and return its path."""
    return atomic_write_text(os.path.join(os.fspath(folder), "README.md"), render_model_card(info))


def hub_files(folder: str | os.PathLike) -> list[str]:
    """The files of ``folder`` that :func:`push_folder_to_hub` uploads (relative paths, sorted).

    Top-level files matching :data:`HUB_FILE_PATTERNS`, ``plots/*.png``, and the Python files named by
    ``config.json``'s ``auto_map`` (a remote-code model cannot load without them). Everything else (checkpoints,
    ``optimizer.pt``, ``scheduler.pt``, ``rng_state*.pth``, ``training_args.bin``, stage folders) stays local.
    """
    folder = os.fspath(folder)
    code = set()
    config_path = os.path.join(folder, "config.json")
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            auto_map = json.load(f).get("auto_map") or {}
        for ref in auto_map.values():
            for item in ref if isinstance(ref, (list, tuple)) else [ref]:
                if isinstance(item, str) and "--" not in item:  # "repo--module.Class" lives in another repo
                    code.add(item.rsplit(".", 1)[0] + ".py")
    selected = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if os.path.relpath(os.path.join(root, d), folder) == "plots"]
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if rel in code or any(fnmatch.fnmatchcase(rel, p) for p in HUB_FILE_PATTERNS if ("/" in p) == ("/" in rel)):
                selected.append(rel)
    return sorted(selected)


def check_hub_push(repo_id: str | None, token: str | None = None) -> str:
    """Check, without any network access, that a push can be attempted; returns the token to use.

    Raises:
        ValueError: no ``repo_id``, a malformed one, or no token (argument, ``HF_TOKEN`` or ``hf auth login``).
    """
    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not repo_id:
        raise ValueError("`push_to_hub` needs `hub_model_id` (e.g. --hub_model_id me/smollm2-minitron).")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"`hub_model_id` {repo_id!r} is not a valid Hub repo id ({err}); use `owner/name`.") from None
    token = token or get_token()
    if not token:
        raise ValueError(
            "Pushing to the Hub needs a token with write access and none was found: run `hf auth login`, set the "
            "HF_TOKEN environment variable, or pass `--hub_token` (Python: `token=`). Nothing was uploaded."
        )
    return token


def _exact_pattern(path: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in path)


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload Minitron-pruned model (hf-minitron)",
) -> str:
    """Upload the model files of ``folder`` (see :func:`hub_files`) to ``repo_id``; returns the commit URL.

    Uses ``huggingface_hub``'s ``create_repo`` and ``upload_folder`` with ``allow_patterns`` set to exactly the
    selected files, so checkpoints, optimizer / scheduler / RNG state and stage folders never leave the machine.

    Raises:
        ValueError: no token or a malformed ``repo_id`` (checked before any request), or no model files in
            ``folder``.

    Example:
        >>> push_folder_to_hub("runs/smollm2-minitron/final", "me/smollm2-pruned")  # doctest: +SKIP
    """
    from huggingface_hub import HfApi

    token = check_hub_push(repo_id, token)
    folder = os.fspath(folder)
    files = hub_files(folder)
    if "config.json" not in files or not any(f.endswith(".safetensors") for f in files):
        raise ValueError(f"{folder!r} holds no model to push (config.json and *.safetensors weights are needed).")
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True)
    repo_id = getattr(repo, "repo_id", repo_id)
    logger.info(f"Uploading {len(files)} files from {folder} to {repo_id}")
    info = api.upload_folder(
        repo_id=repo_id, folder_path=folder, commit_message=commit_message, allow_patterns=[_exact_pattern(f) for f in files]
    )
    return getattr(info, "commit_url", str(info))
