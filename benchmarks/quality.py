"""Quality of Minitron pruning + distillation on a real model (SmolLM2-135M-Instruct or Gemma-3-270M), against baselines.

One script, resumable (every finished row is written to ``<output_dir>/quality.json`` and skipped on rerun):

1. **Zero-shot pruning** to a width target (default hidden 432 / MLP 1024, ~60% of the parameters) and a depth
   target (30 -> 20 layers): activation importance (ours) with and without norm rescaling vs weight magnitude vs
   random; for depth, Block Importance vs per-layer perplexity vs the contiguous block vs weight magnitude vs
   random layers.
2. **Recovery at one equal token budget** (``--steps`` x ``--batch_size`` x ``--seq_length`` tokens per run, the
   same data in the same order, same schedule): forward-KL distillation (KD) vs cross-entropy fine-tuning of the
   same pruned model vs KD + CE mixes vs KD + hidden-state (cosine) loss vs the same shape trained from random
   init; and KD of the depth-pruned model.
3. **Teacher correction**: the teacher fine-tuned on the distillation data for the same budget, its perplexity
   before/after, and the student pruned from and distilled by the corrected teacher.

Every model is scored twice: **in-domain** (held-out WikiText-2 articles; calibration and training use the
other articles only) and **out-of-domain** (CPython's bundled pydoc documentation, never trained on).

    python benchmarks/quality.py --data ../shared/data/wikitext2-valid.txt --output_dir runs/quality \
        --plot_dir docs

A smoke run (a few minutes): ``--steps 2 --calib_samples 8 --eval_windows 2 --depth_calib_samples 2``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from typing import Any

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, set_seed
from transformers.utils import logging
from trl import SFTConfig, SFTTrainer

from hf_minitron import (
    DistillationConfig,
    DistillationTrainer,
    ImportanceScores,
    MinitronPruneConfig,
    estimate_importance,
    load_default_corpus,
    load_text_file,
    prune_model,
    save_pruned_model,
)
from hf_minitron.data import pack_texts
from hf_minitron.embedded import EMBEDDED_MODELS
from hf_minitron.evaluation import perplexity
from hf_minitron.importance.baselines import magnitude_importance, random_importance
from hf_minitron.atomic import atomic_write_json
from hf_minitron.plots import new_figure, save_figure
from hf_minitron.teacher_correction import TeacherCorrectionConfig, correct_teacher


logger = logging.get_logger("hf_minitron.benchmarks.quality")
# Per embedded model: width target (hidden, MLP; about 60% of the parameters) and depth target.
WIDTH_TARGETS = {
    "smollm2-135m": {"hidden_size": 432, "intermediate_size": 1024, "num_hidden_layers": 20},
    "gemma3-270m": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 14},
}
ZERO_SHOT_DEFAULT = "width: activation + calibrated norms (default)"
DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "wikitext2-valid.txt")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help="WikiText-2 text file, split by article into train / held-out")
    p.add_argument("--output_dir", default="runs/quality")
    p.add_argument("--plot_dir", default=None, help="where the two PNG plots go (default: output_dir)")
    p.add_argument("--model", choices=sorted(EMBEDDED_MODELS), default="smollm2-135m", help="embedded real model")
    p.add_argument("--hidden_size", type=int, default=None, help="width target (default per model, see WIDTH_TARGETS)")
    p.add_argument("--intermediate_size", type=int, default=None)
    p.add_argument("--num_hidden_layers", type=int, default=None, help="depth target (default per model)")
    p.add_argument("--eval_batch_size", type=int, default=4, help="windows per evaluation forward (Gemma's 262k vocab: 2)")
    p.add_argument("--calib_samples", type=int, default=256)
    p.add_argument("--calib_seq_length", type=int, default=256)
    p.add_argument("--depth_calib_samples", type=int, default=16, help="samples for per-layer / block perplexity")
    p.add_argument("--eval_seq_length", type=int, default=512)
    p.add_argument("--eval_windows", type=int, default=None, help="cap on eval windows per domain (default: all in-domain, 35 OOD)")
    p.add_argument("--ood_windows", type=int, default=35)
    p.add_argument("--steps", type=int, default=80, help="optimizer steps per training run (the token budget)")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--seq_length", type=int, default=256)
    p.add_argument("--learning_rate", type=float, default=3e-4)
    p.add_argument("--scratch_learning_rate", type=float, default=1e-3, help="random init gets a pre-training LR")
    p.add_argument("--teacher_correction_lr", type=float, default=2e-5)
    p.add_argument("--logging_steps", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", nargs="*", default=[], help="row names (or prefixes) to skip")
    args = p.parse_args()
    defaults = WIDTH_TARGETS[args.model]
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


class Results:
    """Rows persisted after each one, so an interrupted run resumes where it stopped."""

    def __init__(self, path: str, meta: dict[str, Any]) -> None:
        self.path = path
        self.data = {"meta": meta, "rows": {}}
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                self.data["rows"] = json.load(f).get("rows", {})

    def has(self, name: str) -> bool:
        return name in self.data["rows"]

    def add(self, name: str, **row: Any) -> None:
        self.data["rows"][name] = row
        atomic_write_json(self.path, self.data)


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    args = parse_args()
    if not os.path.isfile(args.data):
        raise SystemExit(f"WikiText-2 not found at {args.data}; pass --data PATH (see ../shared/data/README.md).")
    torch.set_num_threads(os.cpu_count() or 1)
    os.makedirs(args.output_dir, exist_ok=True)
    plot_dir = args.plot_dir or args.output_dir
    tokens_per_run = args.steps * args.batch_size * args.seq_length
    results = Results(
        os.path.join(args.output_dir, "quality.json"),
        {"args": vars(args), "date": time.strftime("%Y-%m-%d"), "tokens_per_run": tokens_per_run, "threads": torch.get_num_threads()},
    )

    teacher, tok = EMBEDDED_MODELS[args.model]()
    train_texts = load_text_file(args.data, "train")
    train_blocks = pack_texts(train_texts, tok, args.seq_length)
    needed = args.steps * args.batch_size
    if len(train_blocks) < needed:
        raise SystemExit(f"--steps x --batch_size = {needed} samples but the train articles give {len(train_blocks)}; lower --steps.")
    calib = pack_texts(train_texts, tok, args.calib_seq_length, args.calib_samples)
    in_domain = pack_texts(load_text_file(args.data, "eval"), tok, args.eval_seq_length, args.eval_windows)
    ood = pack_texts(load_default_corpus("all"), tok, args.eval_seq_length, min(args.ood_windows, args.eval_windows or args.ood_windows))
    train_dataset = Dataset.from_dict({"input_ids": [b.tolist() for b in train_blocks[:needed]]})
    print(
        f"train: {len(train_blocks)} x {args.seq_length}-token blocks (first {needed} used once: {tokens_per_run:,} tokens per run); "
        f"calibration {len(calib)} x {args.calib_seq_length}; in-domain eval {len(in_domain)} x {args.eval_seq_length}; "
        f"out-of-domain eval {len(ood)} x {args.eval_seq_length}",
        flush=True,
    )

    def skipped(name: str) -> bool:
        return any(name.startswith(s) for s in args.skip)

    def score(name: str, model, group: str, **extra: Any) -> None:
        start = time.perf_counter()
        ind = perplexity(model, in_domain, seq_length=args.eval_seq_length, batch_size=args.eval_batch_size, show_progress=False)
        out = perplexity(model, ood, seq_length=args.eval_seq_length, batch_size=args.eval_batch_size, show_progress=False)
        results.add(name, group=group, params=num_params(model), in_domain=ind, out_of_domain=out, **extra)
        print(f"{name:<52} {num_params(model) / 1e6:7.2f}M  in-domain {ind:12.2f}  out-of-domain {out:12.2f}  ({time.perf_counter() - start:.0f}s eval)", flush=True)

    # 1. Zero-shot ------------------------------------------------------------------------------------------------
    if not results.has("teacher"):
        score("teacher", teacher, "teacher")
    calib_config = MinitronPruneConfig(num_calibration_samples=len(calib), calibration_seq_length=args.calib_seq_length)
    scores_path = os.path.join(args.output_dir, "importance.safetensors")
    if os.path.isfile(scores_path):
        scores = ImportanceScores.load(scores_path)
    else:
        start = time.perf_counter()
        scores = estimate_importance(teacher, calib, calib_config)
        # Per-layer perplexity (one pass per dropped layer) on a smaller calibration subset
        depth_cfg = MinitronPruneConfig(
            num_calibration_samples=args.depth_calib_samples, calibration_seq_length=args.calib_seq_length, depth_criterion="perplexity"
        )
        scores.layer_perplexity = estimate_importance(teacher, calib[: args.depth_calib_samples], depth_cfg).layer_perplexity
        scores.save(scores_path)
        print(f"importance pass: {time.perf_counter() - start:.0f}s", flush=True)

    width = dict(hidden_size=args.hidden_size, intermediate_size=args.intermediate_size)
    baselines = {"magnitude": magnitude_importance(teacher), "random": random_importance(teacher, seed=args.seed)}
    for label, s, rescale in [
        (ZERO_SHOT_DEFAULT, scores, "calibrated"),
        ("width: activation + sqrt norm rescaling", scores, "sqrt"),
        ("width: activation, no norm correction", scores, "none"),
        ("width: magnitude + sqrt norm rescaling", baselines["magnitude"], "sqrt"),
        ("width: magnitude, no norm correction", baselines["magnitude"], "none"),
        ("width: random + sqrt norm rescaling", baselines["random"], "sqrt"),
        ("width: random, no norm correction", baselines["random"], "none"),
    ]:
        if not results.has(label) and not skipped(label):
            score(label, prune_model(copy.deepcopy(teacher), MinitronPruneConfig(**width, rescale_norms=rescale), importance=s), "zero-shot width")

    drop = teacher.config.num_hidden_layers - args.num_hidden_layers
    contiguous_path = os.path.join(args.output_dir, "contiguous_block.json")
    if os.path.isfile(contiguous_path):
        with open(contiguous_path, encoding="utf-8") as f:
            block_ppl = {int(k): v for k, v in json.load(f).items()}
    else:
        # The contiguous block whose removal hurts calibration perplexity least (the second paper's depth baseline)
        block_ppl = {}
        for first in range(teacher.config.num_hidden_layers - drop + 1):
            trial = prune_model(copy.deepcopy(teacher), MinitronPruneConfig(layers_to_drop=list(range(first, first + drop))))
            block_ppl[first] = perplexity(trial, calib[: args.depth_calib_samples], seq_length=args.calib_seq_length, show_progress=False)
            del trial
        with open(contiguous_path, "w", encoding="utf-8") as f:
            json.dump(block_ppl, f)
    best_first = min(block_ppl, key=block_ppl.get)
    gen = torch.Generator().manual_seed(args.seed)
    random_layers = sorted(torch.randperm(teacher.config.num_hidden_layers, generator=gen)[:drop].tolist())
    depth_configs = {
        "depth: block importance": MinitronPruneConfig(num_hidden_layers=args.num_hidden_layers, depth_criterion="block_importance"),
        "depth: per-layer perplexity": MinitronPruneConfig(num_hidden_layers=args.num_hidden_layers, depth_criterion="perplexity"),
        f"depth: contiguous block {best_first}-{best_first + drop - 1}": MinitronPruneConfig(layers_to_drop=list(range(best_first, best_first + drop))),
        "depth: random layers": MinitronPruneConfig(layers_to_drop=random_layers),
    }
    depth_scores = {"depth: weight magnitude": baselines["magnitude"]}  # layers ranked by the norm of what they write
    depth_configs["depth: weight magnitude"] = depth_configs["depth: block importance"]
    for label, cfg in depth_configs.items():
        if not results.has(label) and not skipped(label):
            pruned = prune_model(copy.deepcopy(teacher), cfg, importance=depth_scores.get(label, scores))
            score(label, pruned, "zero-shot depth", kept_layers=pruned.minitron_provenance["kept"]["layers"])

    # 2. Recovery at an equal token budget -------------------------------------------------------------------------
    def trainable(model):
        # `DistillationTrainer` freezes its teacher in place; copies of that teacher must be made trainable again
        return model.requires_grad_(True)

    def width_student(source, source_scores: ImportanceScores):
        return trainable(prune_model(copy.deepcopy(source), MinitronPruneConfig(**width), importance=source_scores))

    common = dict(
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 20),
        logging_steps=args.logging_steps,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        data_seed=args.seed,
        max_length=args.seq_length,
        bf16=False,
        gradient_checkpointing=False,
        activation_checkpointing=False,
        dataloader_drop_last=True,
    )

    def train(label: str, student, group: str, teacher_model=None, **loss_args: Any) -> None:
        """KD-family runs use `DistillationTrainer`; plain cross-entropy runs use TRL's `SFTTrainer` (no teacher)."""
        if results.has(label) or skipped(label):
            return
        set_seed(args.seed)
        run_dir = os.path.join(args.output_dir, "runs", label.replace(" ", "_").replace(":", "").replace("/", "-"))
        lr = loss_args.pop("learning_rate", args.learning_rate)
        start = time.perf_counter()
        if teacher_model is None:
            trainer = SFTTrainer(
                model=student, args=SFTConfig(run_dir, **{**common, "learning_rate": lr}), train_dataset=train_dataset, processing_class=tok
            )
        else:
            trainer = DistillationTrainer(
                model=student,
                teacher_model=teacher_model,
                args=DistillationConfig(run_dir, **{**common, "learning_rate": lr}, **loss_args),
                train_dataset=train_dataset,
                processing_class=tok,
            )
        trainer.train()
        seconds = time.perf_counter() - start
        model = trainer.accelerator.unwrap_model(trainer.model).eval()
        history = [h for h in trainer.state.log_history if "step" in h]
        score(label, model, group, train_seconds=seconds, tokens=tokens_per_run, learning_rate=lr, log_history=history, **loss_args)
        del trainer, model

    zero = ZERO_SHOT_DEFAULT
    train("width: KD (forward KL)", width_student(teacher, scores), "trained width", teacher)
    train("width: CE fine-tuning", width_student(teacher, scores), "trained width")
    train("width: KD + CE (0.5 / 0.5)", width_student(teacher, scores), "trained width", teacher, kd_weight=0.5, ce_weight=0.5)
    train(
        "width: KD + hidden-state cosine", width_student(teacher, scores), "trained width", teacher,
        hidden_state_loss="cosine", hidden_state_weight="dynamic",
    )
    if not results.has("width: from random init (CE)") and not skipped("width: from random init"):
        set_seed(args.seed)
        scratch = AutoModelForCausalLM.from_config(width_student(teacher, scores).config)
        train("width: from random init (CE)", scratch, "trained width", learning_rate=args.scratch_learning_rate)
    train("depth: KD (forward KL), block importance", trainable(prune_model(copy.deepcopy(teacher), depth_configs["depth: block importance"], importance=scores)), "trained depth", teacher)

    # 3. Teacher correction ----------------------------------------------------------------------------------------
    corrected_dir = os.path.join(args.output_dir, "teacher_corrected")
    tc_rows = ("teacher (corrected)", "width (corrected teacher): zero-shot", "width (corrected teacher): KD (forward KL)",
               "width (corrected teacher): KD + CE (0.5 / 0.5)")
    if not skipped("teacher (corrected)") and not all(results.has(r) for r in tc_rows):
        tc_seconds = {}
        if os.path.isfile(os.path.join(corrected_dir, "config.json")):
            corrected = AutoModelForCausalLM.from_pretrained(corrected_dir, dtype=torch.float32).eval()
        else:
            set_seed(args.seed)
            start = time.perf_counter()
            tc_args = TeacherCorrectionConfig(
                os.path.join(args.output_dir, "runs", "teacher_correction"),
                **{**common, "learning_rate": args.teacher_correction_lr},
            )
            corrected = correct_teacher(trainable(copy.deepcopy(teacher)), tc_args, train_dataset, processing_class=tok)
            tc_seconds = {"train_seconds": time.perf_counter() - start}
            save_pruned_model(corrected, corrected_dir, overwrite=True)  # atomic: a resume never finds half a model
        if not results.has("teacher (corrected)"):
            score("teacher (corrected)", corrected, "teacher", tokens=tokens_per_run, learning_rate=args.teacher_correction_lr, **tc_seconds)
        corrected_scores = estimate_importance(corrected, calib, calib_config, show_progress=False)
        if not results.has(tc_rows[1]):
            score(tc_rows[1], width_student(corrected, corrected_scores), "zero-shot width")
        train(tc_rows[2], width_student(corrected, corrected_scores), "trained width", corrected)
        train(tc_rows[3], width_student(corrected, corrected_scores), "trained width", corrected, kd_weight=0.5, ce_weight=0.5)

    rows = results.data["rows"]
    print_tables(rows, tokens_per_run, zero)
    write_plots(rows, plot_dir, tokens_per_run, args.model)


def print_tables(rows: dict[str, dict], tokens_per_run: int, zero_shot_ref: str) -> None:
    teacher = rows.get("teacher", {})
    print("\n| model | params (M) | in-domain ppl | out-of-domain ppl | tokens trained |\n|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['params'] / 1e6:.2f} | {r['in_domain']:,.2f} | {r['out_of_domain']:,.2f} | {r.get('tokens', 0):,} |")
    if teacher and zero_shot_ref in rows:
        # Recovery: the share of the zero-shot -> teacher gap in log-perplexity (mean NLL) that training closed
        print(f"\nRecovery toward the (original) teacher at {tokens_per_run:,} tokens per run: share of the gap in mean NLL "
              "between the zero-shot pruned model and the teacher that training closed")
        print("| model | train seconds | in-domain | out-of-domain |\n|---|---:|---:|---:|")
        for name, r in rows.items():
            ref = {"trained width": zero_shot_ref, "trained depth": "depth: block importance"}.get(r["group"])
            if ref not in rows:
                continue
            cells = []
            for key in ("in_domain", "out_of_domain"):
                gap = math.log(rows[ref][key]) - math.log(teacher[key])
                cells.append(f"{(math.log(rows[ref][key]) - math.log(r[key])) / gap:.1%}")
            print(f"| {name} | {r.get('train_seconds', 0):.0f} | {cells[0]} | {cells[1]} |")


def write_plots(rows: dict[str, dict], plot_dir: str, tokens_per_run: int, model_name: str = "smollm2-135m") -> None:
    try:
        import matplotlib

        fig, axes = new_figure(1, 2, figsize=(13, 5.5), sharey=True)
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib).")
        return
    os.makedirs(plot_dir, exist_ok=True)
    markers = {"teacher": "*", "zero-shot width": "o", "zero-shot depth": "s", "trained width": "D", "trained depth": "P"}
    colors = matplotlib.colormaps["tab20"].colors
    # Models of one size sit at one x: spread them sideways (0.6M apart) so every point stays visible
    offsets, seen = {}, {}
    for name, r in rows.items():
        offsets[name] = 0.6 * seen.get(r["params"], 0)
        seen[r["params"]] = seen.get(r["params"], 0) + 1
    for ax, key, title in [(axes[0], "in_domain", "in-domain (held-out WikiText-2)"), (axes[1], "out_of_domain", "out-of-domain (pydoc)")]:
        for i, (name, r) in enumerate(rows.items()):
            ax.scatter(r["params"] / 1e6 + offsets[name], r[key], marker=markers.get(r["group"], "o"), s=60,
                       color=colors[i % len(colors)], edgecolors="black", linewidths=0.4, label=name)
        ax.set(xlabel="parameters (M; equal sizes spread sideways)", title=title, yscale="log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("perplexity (log scale)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7.5)
    fig.suptitle(f"{model_name} pruned to hidden/MLP or depth; trained runs: {tokens_per_run:,} tokens each")
    fig.tight_layout(rect=(0, 0.22, 1, 1))
    path = save_figure(fig, os.path.join(plot_dir, "quality_ppl_vs_params.png"))
    print(f"wrote {path}")

    fig, axes = new_figure(1, 2, figsize=(13, 4.8))
    for i, (name, r) in enumerate(rows.items()):
        history = r.get("log_history") or []
        kd = [(h["step"], h["kd_loss"]) for h in history if "kd_loss" in h and r.get("kd_weight", 1.0) > 0]
        ce = [(h["step"], h.get("ce_loss", h.get("loss"))) for h in history if "ce_loss" in h or "loss" in h]
        if kd:
            axes[0].plot(*zip(*kd), label=name, color=colors[i % len(colors)])
        if ce:
            axes[1].plot(*zip(*ce), label=name, color=colors[i % len(colors)])
    axes[0].set(xlabel="step", ylabel="forward KL to the teacher (train batch)", title="KD loss", yscale="log")
    axes[1].set(xlabel="step", ylabel="next-token cross-entropy (train batch)", title="CE on the training tokens", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7.5)
    fig.tight_layout()
    path = save_figure(fig, os.path.join(plot_dir, "quality_loss_curves.png"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
