"""Zero-shot pruning quality on a real model: hidden-importance sources x norm corrections, BOS, depth criteria.

Runs on either embedded real model (`--model smollm2-135m`: Llama family, pre-norm; `--model gemma3-270m`:
Gemma-3, sandwich norms, BOS expected) and prints held-out WikiText-2 perplexity for:

1. the teacher, with and without a BOS token at the start of every evaluation window;
2. hidden-size pruning alone, for every hidden-importance source x every norm correction (one importance pass
   records every source, so the grid costs only the evaluations);
3. the combined width(+depth) target with today's defaults, with hf-minitron 0.1's settings, and with weight-magnitude
   and random scores;
4. depth pruning by Block Importance vs per-layer calibration perplexity;
5. query-head pruning with and without the first paper's head merge.

Calibration uses the article-split *train* part, evaluation the held-out *eval* part: never the same text. Every
finished row is written to `--output_json` and skipped on rerun (resumable).

    python benchmarks/zero_shot_pruning.py --model gemma3-270m --data ../shared/data/wikitext2-valid.txt \
        --output_json runs/zero_shot_gemma3.json
    python benchmarks/zero_shot_pruning.py --model smollm2-135m --output_json runs/zero_shot_smollm2.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from hf_minitron import MinitronPruneConfig, ImportanceScores, estimate_importance, load_text_file, prune_model
from hf_minitron.config import HIDDEN_IMPORTANCE_SOURCES, NORM_CORRECTIONS
from hf_minitron.data import pack_texts
from hf_minitron.embedded import EMBEDDED_MODELS
from hf_minitron.evaluation import perplexity
from hf_minitron.importance.baselines import magnitude_importance, random_importance


# Per model: (hidden-only target, combined width target, depth target, query-head target)
TARGETS = {
    "smollm2-135m": ({"hidden_size": 432}, {"hidden_size": 432, "intermediate_size": 1024}, 20, 6),
    "gemma3-270m": ({"hidden_size": 512}, {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 16}, 16, 2),
}
DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "wikitext2-valid.txt")


def _save(path: str | None, state: dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(state, f, indent=2)
    os.replace(tmp, path)


class _SharedCPU:
    """An exclusive ``fcntl`` lock on ``path``, held for runs of rows of about ``hold`` seconds, then released so other
    jobs that use the same lock get the machine between them (no-op without a path)."""

    def __init__(self, path: str | None, hold: float) -> None:
        self.path, self.hold = path, hold
        self.handle = None
        self.since = 0.0

    @contextmanager
    def __call__(self) -> Iterator[None]:
        if self.path and self.handle is None:
            import fcntl

            self.handle = open(self.path, "a")
            fcntl.flock(self.handle, fcntl.LOCK_EX)
            self.since = time.monotonic()
        try:
            yield
        finally:
            if self.handle is not None and time.monotonic() - self.since > self.hold:
                self.handle.close()  # closing releases the lock
                self.handle = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(EMBEDDED_MODELS), default="smollm2-135m")
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--calib_samples", type=int, default=256)
    parser.add_argument("--calib_seq_length", type=int, default=256)
    parser.add_argument("--depth_calib_samples", type=int, default=16, help="samples for per-layer perplexity")
    parser.add_argument("--eval_seq_length", type=int, default=512)
    parser.add_argument("--eval_samples", type=int, default=None, help="cap on held-out windows (default: all)")
    parser.add_argument("--grid_eval_samples", type=int, default=None,
                        help="evaluate the sources x corrections grid on the first N held-out windows only (default: all)")
    parser.add_argument("--eval_batch_size", type=int, default=2)
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: bos,grid,combined,depth,heads")
    parser.add_argument("--output_json", default=None, help="rows (and the importance scores beside) are saved here and reused on rerun")
    parser.add_argument("--lock_file", default=None, help="hold this file's lock (fcntl) while working: on a shared machine, "
                        "other jobs that use the same lock get the CPU between runs of rows")
    parser.add_argument("--lock_hold", type=float, default=900.0, help="seconds of rows per lock acquisition")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    skip = set(filter(None, args.skip.split(",")))

    if not os.path.isfile(args.data):
        raise SystemExit(f"WikiText-2 not found at {args.data}; pass --data.")
    state = {"args": vars(args), "rows": {}}
    if args.output_json and os.path.isfile(args.output_json):
        with open(args.output_json, encoding="utf-8") as f:
            state["rows"] = json.load(f).get("rows", {})
    locked = _SharedCPU(args.lock_file, args.lock_hold)
    model, tok = EMBEDDED_MODELS[args.model]()
    train, held = load_text_file(args.data, "train"), load_text_file(args.data, "eval")
    calib = pack_texts(train, tok, args.calib_seq_length, args.calib_samples)
    held_out = pack_texts(held, tok, args.eval_seq_length, args.eval_samples)
    print(f"{args.model}: calibration {len(calib)} x {args.calib_seq_length} tokens; held-out {len(held_out)} x "
          f"{args.eval_seq_length} tokens; BOS per sample: {bool(calib[0][0] == tok.bos_token_id)}", flush=True)

    def measure(build, data) -> dict:
        with locked():
            start = time.perf_counter()
            m = build()
            seconds = time.perf_counter() - start
            ppl = perplexity(m, data, seq_length=args.eval_seq_length, batch_size=args.eval_batch_size, show_progress=False)
            r = {"perplexity": ppl, "params": sum(p.numel() for p in m.parameters()), "seconds": round(seconds, 2)}
            kept = getattr(m, "minitron_provenance", {}).get("kept", {}).get("layers")
            if kept is not None and len(kept) != model.config.num_hidden_layers:
                r["kept_layers"] = kept
        return r

    def row(name: str, build, data=held_out) -> float:
        if name not in state["rows"]:
            state["rows"][name] = measure(build, data)
            _save(args.output_json, state)
        r = state["rows"][name]
        print(f"{name:<62} params {r['params'] / 1e6:7.2f}M  ppl {r['perplexity']:12.2f}", flush=True)
        return r["perplexity"]

    row("teacher", lambda: model)
    if "bos" not in skip:
        no_bos = pack_texts(held, tok, args.eval_seq_length, args.eval_samples, add_bos=False)
        row("teacher, no BOS in the evaluation windows", lambda: model, data=no_bos)

    config = MinitronPruneConfig(num_calibration_samples=args.calib_samples, calibration_seq_length=args.calib_seq_length,
                                 calibration_batch_size=4)
    scores_path = f"{os.path.splitext(args.output_json)[0]}.scores.safetensors" if args.output_json else None
    if scores_path and os.path.isfile(scores_path):
        scores = ImportanceScores.load(scores_path)
    else:
        with locked():
            start = time.perf_counter()
            scores = estimate_importance(model, calib, config)
            print(f"importance pass: {time.perf_counter() - start:.1f}s", flush=True)
        if scores_path:
            scores.save(scores_path)
    hidden_only, combined, depth, heads = TARGETS[args.model]

    def pruned(scores_: ImportanceScores, **settings):
        return lambda: prune_model(copy.deepcopy(model), MinitronPruneConfig(**settings), importance=scores_)

    if "grid" not in skip:
        grid_data, suffix = held_out, ""
        if args.grid_eval_samples is not None and args.grid_eval_samples < len(held_out):
            grid_data, suffix = held_out[: args.grid_eval_samples], f" | first {args.grid_eval_samples} windows"
            row(f"teacher{suffix}", lambda: model, data=grid_data)
        for source in HIDDEN_IMPORTANCE_SOURCES:
            for correction in NORM_CORRECTIONS:
                row(f"hidden {hidden_only['hidden_size']} | {source} | {correction}{suffix}",
                    pruned(scores, **hidden_only, hidden_importance_source=source, rescale_norms=correction), data=grid_data)
        if suffix:  # the defaults on every window too
            row(f"hidden {hidden_only['hidden_size']} | matmul_inputs | calibrated", pruned(scores, **hidden_only))
            row(f"hidden {hidden_only['hidden_size']} | all_norms | sqrt",
                pruned(scores, **hidden_only, hidden_importance_source="all_norms", rescale_norms="sqrt"))

    if "combined" not in skip:
        label = "/".join(str(v) for v in combined.values())
        row(f"width {label} | defaults (matmul_inputs, calibrated)", pruned(scores, **combined))
        row(f"width {label} | hf-minitron 0.1 (all_norms, sqrt)",
            pruned(scores, **combined, hidden_importance_source="all_norms", rescale_norms="sqrt"))
        row(f"width {label} | weight magnitude (sqrt)", pruned(magnitude_importance(model), **combined, rescale_norms="sqrt"))
        row(f"width {label} | random (sqrt)", pruned(random_importance(model), **combined, rescale_norms="sqrt"))

    if "depth" not in skip:
        with locked():
            depth_scores = estimate_importance(
                model, calib[: args.depth_calib_samples],
                MinitronPruneConfig(num_calibration_samples=args.depth_calib_samples, calibration_seq_length=args.calib_seq_length,
                                    calibration_batch_size=4, depth_criterion="perplexity"),
            )
        depth_scores.block_importance = scores.block_importance  # Block Importance from the full calibration pass
        source_layers = model.config.num_hidden_layers
        for criterion in ("block_importance", "perplexity"):
            row(f"depth {source_layers} -> {depth} | {criterion}",
                pruned(depth_scores, num_hidden_layers=depth, depth_criterion=criterion))

    if "heads" not in skip:
        source_heads = model.config.num_attention_heads
        for merge in (False, True):
            row(f"heads {source_heads} -> {heads} | {'head merge' if merge else 'no merge'}",
                pruned(scores, num_attention_heads=heads, merge_pruned_heads=merge))

    print("\n| setting | params (M) | held-out ppl |\n|---|---:|---:|")
    for name, r in state["rows"].items():
        print(f"| {name} | {r['params'] / 1e6:.2f} | {r['perplexity']:,.2f} |")


if __name__ == "__main__":
    main()
