"""Speed and memory of hf-minitron on SmolLM2-135M-Instruct, every comparison measured side by side in one run.

1. Importance-pass overhead: the importance pass (all hooks) vs a decoder-body forward vs a full forward with
   logits, on the same batches, interleaved repeats, median (reuses `bench_importance.py`). Targets:
   importance / body <= 1.05, importance / full <= 0.85. Also the accumulators' memory.
2. KD-loss peak memory and time: `fused_linear_kd_loss` vs TRL 1.16's chunked kernel
   (`trl.kernels.chunked_divergence.ChunkedDivergenceFunction`, its PyTorch path on CPU) vs naive full-logits KL vs
   TRL `GKDTrainer`'s `generalized_jsd_loss(beta=0)`, each in a fresh subprocess (reuses `bench_kd_loss.py`; extra
   peak RSS), ours also at half the chunk. Targets: ours / GKD <= 0.10x peak memory, <= 0.5x time; ours / TRL's
   kernel <= 1.0x memory and time (the kernel we would otherwise use).
3. Forward throughput (tokens/s, fp32, `torch.inference_mode`, full forward with logits, interleaved repeats,
   median) of the original model vs the width target (hidden 432 / MLP 1024) and the depth target
   (30 -> 20 layers) at batch 1 and batch 8; measured speed-up vs the ideal ratio of forward FLOPs per token
   computed from the configs (see `forward_flops_per_token`). Target: speed-up >= 0.8 x the FLOPs ratio.
4. Pruning wall time: the importance pass over the calibration set, and `prune_model` on a deep copy of the
   model for each target (the copy is not timed).

Ends with a markdown table of every ratio, its target and whether it is met.

    python benchmarks/speed.py --output_json runs/speed.json
    python benchmarks/speed.py --quick --skip_kd      # smoke run (< 2 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch

from hf_minitron import (
    MinitronPruneConfig,
    estimate_importance,
    load_default_corpus,
    prune_model,
)
from hf_minitron.data import pack_texts
from hf_minitron.embedded import load_smollm2

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `python benchmarks/speed.py` from anywhere
import bench_importance
import bench_kd_loss

TARGET_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers")
SPEEDUP_TARGET_FRACTION = 0.8  # a pruned model "meets" its speed-up target at >= 80% of the ideal FLOPs ratio


@dataclass
class Settings:
    """Sizes and repeats of every part (the `--quick` values are tiny)."""

    imp_batches: int = 4
    imp_batch_size: int = 8
    imp_seq_length: int = 256
    imp_repeats: int = 3
    kd_tokens: int = 2048
    kd_vocab: int = 128256
    kd_hidden: int = 256
    kd_chunk: int = 512
    kd_repeats: int = 1
    tp_seq_length: int = 256
    tp_batch_sizes: tuple[int, ...] = (1, 8)
    tp_repeats: int = 5
    calib_samples: int = 64
    calib_seq_length: int = 256

    @classmethod
    def quick(cls) -> Settings:
        return cls(imp_batches=1, imp_batch_size=2, imp_seq_length=64, imp_repeats=1, kd_tokens=512,
                   tp_seq_length=64, tp_repeats=1, calib_samples=8, calib_seq_length=64)


# ------------------------------------------------------------------------------------------------------- FLOPs
def forward_flops_per_token(config: Any, seq_length: int) -> dict[str, float]:
    """Forward FLOPs per token of a Llama-style decoder, analytically from its config.

    FLOPs/token = 2 * P_matmul + 4 * T * L * n_heads * d_head, where

    - P_matmul = L * (H * n_heads * d_head [q] + 2 * H * n_kv * d_head [k, v] + n_heads * d_head * H [o]
      + 3 * H * I [gate, up, down]) + V * H [lm_head]: every weight of a matmul is one multiply-add
      (2 FLOPs) per token; embeddings (a lookup), norms, RoPE, SiLU and softmax are left out;
    - 4 * T * L * n_heads * d_head: the attention scores Q K^T and the weighted sum of the values, each
      T * d_head multiply-adds per head per layer for a sequence of T tokens (counted without the causal
      halving, as the dense SDPA kernel computes it).
    """
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    per_layer = h * heads * head_dim + 2 * h * kv * head_dim + heads * head_dim * h + 3 * h * inter
    matmul_params = layers * per_layer + config.vocab_size * h
    attention = 4 * seq_length * layers * heads * head_dim
    return {"matmul_params": float(matmul_params), "attention_flops": float(attention),
            "flops": float(2 * matmul_params + attention)}


# ------------------------------------------------------------------------------------------------- the parts
def part_importance(model: torch.nn.Module, s: Settings) -> dict[str, float]:
    batches = bench_importance.make_batches(model.config.vocab_size, s.imp_batches, s.imp_batch_size, s.imp_seq_length)
    med = bench_importance.measure_overhead(model, batches, s.imp_repeats)
    med["tokens"] = s.imp_batches * s.imp_batch_size * s.imp_seq_length
    med["importance_over_body"] = med["importance"] / med["body"]
    med["importance_over_full"] = med["importance"] / med["full"]
    print(f"\n## 1. Importance-pass overhead: {s.imp_batches} batches x {s.imp_batch_size} x {s.imp_seq_length} = "
          f"{int(med['tokens'])} tokens, median of {s.imp_repeats} interleaved repeats")
    print("| pass | seconds | / body |\n|---|---:|---:|")
    print(f"| decoder body forward | {med['body']:.3f} | 1.000 |")
    print(f"| full forward (logits) | {med['full']:.3f} | {med['full'] / med['body']:.3f} |")
    print(f"| importance pass (all hooks) | {med['importance']:.3f} | {med['importance_over_body']:.3f} |")
    print(f"importance / body = {med['importance_over_body']:.3f} (target <= 1.05); "
          f"importance / full = {med['importance_over_full']:.3f} (target <= 0.85); "
          f"accumulator memory {med['accumulator_bytes'] / 2**20:.2f} MiB", flush=True)
    return med


def part_kd(s: Settings) -> dict[str, Any]:
    """Part 2 through `bench_kd_loss._spawn` (the same workers and measurement as `bench_kd_loss.py`)."""
    a = argparse.Namespace(tokens=s.kd_tokens, step_tokens=s.kd_tokens, vocab=s.kd_vocab, hidden=s.kd_hidden,
                           chunk=s.kd_chunk, repeats=s.kd_repeats)
    tmp = tempfile.mkdtemp()  # the workers' losses and gradients (~0.4 GB at the defaults), removed below
    try:
        return _kd_in(a, s, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _kd_in(a: argparse.Namespace, s: Settings, tmp: str) -> dict[str, Any]:
    """Run ours / naive / gkd, each in a fresh `bench_kd_loss.py` worker writing under ``tmp``; print the ratios."""
    res: dict[str, Any] = {}
    for m in ("ours", "trl", "naive", "gkd"):
        res[m] = bench_kd_loss._spawn("loss", m, a, os.path.join(tmp, f"{m}.pt"))  # fresh process per method
    # The chunk size is the memory knob (`kd_chunk_size`): peak ~ 3 [chunk, V] fp32 buffers + the lm_head gradient
    half = argparse.Namespace(**{**vars(a), "chunk": max(1, s.kd_chunk // 2)})
    res["ours_half_chunk"] = bench_kd_loss._spawn("loss", "ours", half, os.path.join(tmp, "ours_half_chunk.pt"))
    print(f"\n## 2. KD loss fwd+bwd: N = B·T = {s.kd_tokens}, V = {s.kd_vocab}, H = {s.kd_hidden}, "
          f"chunk = {s.kd_chunk} (ours_half_chunk: {half.chunk}); each method in a fresh process "
          "(extra peak = peak RSS during the work minus RSS before it)")
    print("| method | loss | extra peak (GiB) | seconds | grads == ours |\n|---|---:|---:|---:|---|")
    ref = torch.load(os.path.join(tmp, "ours.pt")) if "error" not in res["ours"] else None
    for m, r in res.items():
        if "error" in r:
            print(f"| {m} | FAILED: {r['error'].strip().splitlines()[-1] if r['error'].strip() else '?'} | | | |")
            continue
        same: Any = "-"
        if ref is not None and m != "ours":
            g = torch.load(os.path.join(tmp, f"{m}.pt"))
            same = all(torch.allclose(g[k], ref[k], rtol=1e-4, atol=1e-6) for k in ("loss", "h", "w"))
            r["grads_match_ours"] = same
        print(f"| {m} | {r['loss']:.6f} | {r['peak_bytes'] / 2**30:.3f} | {r['time_s']:.2f} | {same} |")
    if "error" not in res["ours"] and "error" not in res["gkd"]:
        res["memory_ours_over_gkd"] = res["ours"]["peak_bytes"] / res["gkd"]["peak_bytes"]
        res["time_ours_over_gkd"] = res["ours"]["time_s"] / res["gkd"]["time_s"]
        print(f"ours / gkd: peak memory {res['memory_ours_over_gkd']:.3f}x (target <= 0.10x), "
              f"time {res['time_ours_over_gkd']:.3f}x (target <= 0.5x)")
        if "error" not in res["ours_half_chunk"]:
            res["memory_ours_half_chunk_over_gkd"] = res["ours_half_chunk"]["peak_bytes"] / res["gkd"]["peak_bytes"]
            res["time_ours_half_chunk_over_gkd"] = res["ours_half_chunk"]["time_s"] / res["gkd"]["time_s"]
            print(f"ours (chunk {half.chunk}) / gkd: peak memory {res['memory_ours_half_chunk_over_gkd']:.3f}x, "
                  f"time {res['time_ours_half_chunk_over_gkd']:.3f}x")
    if "error" not in res["ours"] and "error" not in res["trl"]:
        res["memory_ours_over_trl"] = res["ours"]["peak_bytes"] / res["trl"]["peak_bytes"]
        res["time_ours_over_trl"] = res["ours"]["time_s"] / res["trl"]["time_s"]
        print(f"ours / TRL chunked kernel: peak memory {res['memory_ours_over_trl']:.3f}x, "
              f"time {res['time_ours_over_trl']:.3f}x (targets <= 1.0x)")
    if "error" not in res["ours"] and "error" not in res["naive"]:
        res["memory_ours_over_naive"] = res["ours"]["peak_bytes"] / res["naive"]["peak_bytes"]
        res["time_ours_over_naive"] = res["ours"]["time_s"] / res["naive"]["time_s"]
        print(f"ours / naive: peak memory {res['memory_ours_over_naive']:.3f}x, time {res['time_ours_over_naive']:.3f}x")
    sys.stdout.flush()
    return res


def part_prune(model: torch.nn.Module, tokenizer: Any, s: Settings) -> tuple[dict[str, torch.nn.Module], dict[str, Any]]:
    calib = pack_texts(load_default_corpus("train"), tokenizer, s.calib_seq_length, s.calib_samples)
    config = MinitronPruneConfig(num_calibration_samples=len(calib), calibration_seq_length=s.calib_seq_length)
    start = time.perf_counter()
    scores = estimate_importance(model, calib, config, show_progress=False)
    t_importance = time.perf_counter() - start
    targets = {
        "width": MinitronPruneConfig(hidden_size=432, intermediate_size=1024),
        "depth": MinitronPruneConfig(num_hidden_layers=20),
    }
    pruned: dict[str, torch.nn.Module] = {}
    out: dict[str, Any] = {"calibration": f"{len(calib)} x {s.calib_seq_length} tokens (pydoc_data train topics)",
                           "importance_s": t_importance, "prune_s": {}, "params": {}, "targets": {}}
    out["params"]["original"] = sum(p.numel() for p in model.parameters())
    for name, cfg in targets.items():
        copied = copy.deepcopy(model)
        start = time.perf_counter()
        pruned[name] = prune_model(copied, cfg, importance=scores).eval()
        out["prune_s"][name] = time.perf_counter() - start
        out["params"][name] = sum(p.numel() for p in pruned[name].parameters())
        out["targets"][name] = {k: v for k, v in cfg.to_dict().items() if k in TARGET_KEYS and v is not None}
    return pruned, out


def print_pruning(out: dict[str, Any]) -> None:
    print(f"\n## 4. Pruning wall time (calibration: {out['calibration']})")
    print("| step | seconds | parameters after |\n|---|---:|---:|")
    print(f"| importance pass (estimate_importance) | {out['importance_s']:.2f} | |")
    print(f"| (original model) | | {out['params']['original']:,} |")
    for name, what in out["targets"].items():
        print(f"| prune_model {name} {what} | {out['prune_s'][name]:.2f} | {out['params'][name]:,} |")
    sys.stdout.flush()


def part_throughput(models: dict[str, torch.nn.Module], s: Settings) -> dict[str, Any]:
    flops = {n: forward_flops_per_token(m.config, s.tp_seq_length) for n, m in models.items()}
    gen = torch.Generator().manual_seed(1)
    vocab = models["original"].config.vocab_size
    out: dict[str, Any] = {"flops_per_token": flops, "tokens_per_s": {}, "speedup": {}, "ideal_speedup": {}}
    for name in models:
        if name != "original":
            out["ideal_speedup"][name] = flops["original"]["flops"] / flops[name]["flops"]
    with torch.inference_mode():
        for bs in s.tp_batch_sizes:
            ids = torch.randint(0, vocab, (bs, s.tp_seq_length), generator=gen)
            times: dict[str, list[float]] = {n: [] for n in models}
            for m in models.values():  # warm-up
                m(input_ids=ids, use_cache=False)
            for _ in range(s.tp_repeats):
                for n, m in models.items():  # interleaved: machine noise hits every model alike
                    start = time.perf_counter()
                    m(input_ids=ids, use_cache=False)
                    times[n].append(time.perf_counter() - start)
            tps = {n: bs * s.tp_seq_length / statistics.median(t) for n, t in times.items()}
            out["tokens_per_s"][f"batch{bs}"] = tps
            out["speedup"][f"batch{bs}"] = {n: tps[n] / tps["original"] for n in models if n != "original"}
    print(f"\n## 3. Forward throughput: seq {s.tp_seq_length}, fp32, inference_mode, full forward with logits, "
          f"median of {s.tp_repeats} interleaved repeats")
    print("FLOPs/token = 2 * matmul params (q, k, v, o, gate, up, down, lm_head) + 4 * seq * layers * heads * head_dim")
    cols = " | ".join(f"batch {bs} tok/s | batch {bs} speed-up" for bs in s.tp_batch_sizes)
    print(f"| model | matmul params | GFLOPs/token | ideal speed-up | {cols} |")
    print("|---|---:|---:|---:|" + "---:|---:|" * len(s.tp_batch_sizes))
    for n in models:
        f = flops[n]
        ideal = out["ideal_speedup"].get(n, 1.0)
        cells = " | ".join(
            f"{out['tokens_per_s'][f'batch{bs}'][n]:.0f} | {out['speedup'][f'batch{bs}'].get(n, 1.0):.3f}"
            for bs in s.tp_batch_sizes
        )
        print(f"| {n} | {f['matmul_params'] / 1e6:.2f}M | {f['flops'] / 1e9:.4f} | {ideal:.3f} | {cells} |")
    sys.stdout.flush()
    return out


# ------------------------------------------------------------------------------------------------------ driver
def summary_rows(results: dict[str, Any]) -> list[tuple[str, float, str, bool]]:
    """(metric, measured, target text, met) for every ratio that has a target."""
    rows: list[tuple[str, float, str, bool]] = []
    imp = results["importance"]
    rows.append(("importance / decoder-body forward", imp["importance_over_body"], "<= 1.05",
                 imp["importance_over_body"] <= 1.05))
    rows.append(("importance / full forward", imp["importance_over_full"], "<= 0.85", imp["importance_over_full"] <= 0.85))
    kd = results.get("kd")
    if kd is not None and "memory_ours_over_gkd" in kd:
        rows.append(("KD loss peak memory, ours / GKD", kd["memory_ours_over_gkd"], "<= 0.10",
                     kd["memory_ours_over_gkd"] <= 0.10))
        rows.append(("KD loss time, ours / GKD", kd["time_ours_over_gkd"], "<= 0.50", kd["time_ours_over_gkd"] <= 0.5))
        if "memory_ours_half_chunk_over_gkd" in kd:
            half = results["settings"]["kd_chunk"] // 2
            rows.append((f"KD loss peak memory, ours (chunk {half}) / GKD", kd["memory_ours_half_chunk_over_gkd"], "<= 0.10",
                         kd["memory_ours_half_chunk_over_gkd"] <= 0.10))
            rows.append((f"KD loss time, ours (chunk {half}) / GKD", kd["time_ours_half_chunk_over_gkd"], "<= 0.50",
                         kd["time_ours_half_chunk_over_gkd"] <= 0.5))
    if kd is not None and "memory_ours_over_trl" in kd:
        rows.append(("KD loss peak memory, ours / TRL chunked kernel", kd["memory_ours_over_trl"], "<= 1.00",
                     kd["memory_ours_over_trl"] <= 1.0))
        rows.append(("KD loss time, ours / TRL chunked kernel", kd["time_ours_over_trl"], "<= 1.00",
                     kd["time_ours_over_trl"] <= 1.0))
    tp = results["throughput"]
    for batch, speedups in tp["speedup"].items():
        for name, measured in speedups.items():
            need = SPEEDUP_TARGET_FRACTION * tp["ideal_speedup"][name]
            rows.append((f"{name} speed-up, {batch.replace('batch', 'batch ')}", measured,
                         f">= {need:.3f} ({SPEEDUP_TARGET_FRACTION:g} x FLOPs {tp['ideal_speedup'][name]:.3f})",
                         measured >= need))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one repeat: a smoke run")
    parser.add_argument("--skip_kd", action="store_true", help="skip part 2 (the KD-loss subprocesses)")
    parser.add_argument("--kd_tokens", type=int, default=None, help="B·T of the KD-loss part (default 2048; quick 512)")
    parser.add_argument("--output_json", default=None, help="write every measurement here")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (also OMP_NUM_THREADS of the KD workers)")
    args = parser.parse_args()

    s = Settings.quick() if args.quick else Settings()
    if args.kd_tokens is not None:
        s.kd_tokens = args.kd_tokens
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the KD-loss subprocesses
    wall = time.perf_counter()
    model, tokenizer = load_smollm2()
    print(f"model: SmolLM2-135M-Instruct ({sum(p.numel() for p in model.parameters()):,} parameters, fp32); "
          f"{torch.get_num_threads()} threads; torch {torch.__version__}; {'quick' if args.quick else 'full'} settings")
    results: dict[str, Any] = {"settings": vars(s) | {"tp_batch_sizes": list(s.tp_batch_sizes)},
                               "threads": torch.get_num_threads(), "quick": args.quick}

    results["importance"] = part_importance(model, s)
    if not args.skip_kd:
        results["kd"] = part_kd(s)
    pruned, results["pruning"] = part_prune(model, tokenizer, s)
    results["throughput"] = part_throughput({"original": model, **pruned}, s)
    print_pruning(results["pruning"])

    rows = summary_rows(results)
    results["summary"] = [{"metric": m, "measured": v, "target": t, "met": ok} for m, v, t, ok in rows]
    results["wall_s"] = time.perf_counter() - wall
    print(f"\n## Summary ({'quick smoke run: sizes too small for the targets' if args.quick else 'full run'}; "
          f"wall {results['wall_s']:.0f} s)")
    print("| ratio | measured | target | |\n|---|---:|---|---|")
    for m, v, t, ok in rows:
        print(f"| {m} | {v:.3f} | {t} | {'met' if ok else 'not met'} |")
    if args.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=2, default=str)
        print(f"wrote {args.output_json}")


if __name__ == "__main__":
    main()
