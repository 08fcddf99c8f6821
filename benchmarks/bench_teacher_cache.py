"""Teacher-logit cache vs live teacher on SmolLM2-135M-Instruct, side by side in one run (issue 16).

1. **Cache cost and size**: one teacher pass per k in --top_ks (float16 log-probabilities, the default) over the
   training rows; wall time, tokens/s and disk bytes per token. Target: <= 400 B/token at k = 64.
2. **KD step time and memory**, equal batch (--batch_size x --seq_length): the width student distilled from the k = 64
   cache vs from the live teacher, each mode in a fresh subprocess, interleaved (live, cache, live, cache, ...);
   median optimizer-step time after --warmup_steps, RSS when training starts and peak RSS during training (sampled
   every 5 ms). Target: cache / live <= 0.7x time.
3. **Quality**: the width student (hidden 432 / MLP 1024, activation importance) distilled for --steps steps of
   --batch_size x --seq_length tokens, same seed, data order and schedule, from the live teacher and from each cache;
   held-out WikiText-2 perplexity (--eval_seq_length windows of the held-out articles).
4. **Search** (--search): `search_architectures` wall time for the same candidates and retraining, live teacher vs
   one cache (`cached_teacher_retrain_fn`); the cache pass is timed on its own.

Resumable: finished parts are kept in <output_dir>/results.json and skipped on rerun.

    flock /tmp/hf_minitron_heavy.lock python benchmarks/bench_teacher_cache.py --output_dir runs/teacher_cache --search
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, set_seed


HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(HERE, "..", "..", "shared", "data", "wikitext2-valid.txt")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help="WikiText-2 text, split by article into train / held-out")
    p.add_argument("--output_dir", default="runs/teacher_cache")
    p.add_argument("--top_ks", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--step_top_k", type=int, default=64, help="the cache the step-time comparison reads")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per quality run (the token budget)")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--seq_length", type=int, default=256)
    p.add_argument("--learning_rate", type=float, default=3e-4)
    p.add_argument("--calib_samples", type=int, default=64)
    p.add_argument("--eval_seq_length", type=int, default=512)
    p.add_argument("--eval_windows", type=int, default=32)
    p.add_argument("--timing_steps", type=int, default=6, help="measured steps per timing run")
    p.add_argument("--warmup_steps", type=int, default=2)
    p.add_argument("--timing_repeats", type=int, default=2, help="interleaved (live, cache) pairs")
    p.add_argument("--search", action="store_true", help="also time search_architectures live vs cached")
    p.add_argument("--search_candidates", type=int, default=3)
    p.add_argument("--search_retrain_steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--_step_worker", choices=["live", "cache"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


class Results:
    def __init__(self, path: str, meta: dict[str, Any]):
        self.path, self.data = path, {"meta": meta, "parts": {}}
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                self.data["parts"] = json.load(f).get("parts", {})

    def get(self, name: str):
        return self.data["parts"].get(name)

    def put(self, name: str, value: Any) -> None:
        self.data["parts"][name] = value
        tmp = f"{self.path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.data, f, indent=2)
        os.replace(tmp, self.path)


def training_args(out: str, args, max_steps: int, **kw):
    from hf_minitron import DistillationConfig

    return DistillationConfig(
        out, max_steps=max_steps, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        learning_rate=args.learning_rate, lr_scheduler_type="cosine", warmup_steps=max(1, max_steps // 20),
        logging_steps=max(1, max_steps // 10), save_strategy="no", report_to="none", seed=args.seed, data_seed=args.seed,
        max_length=args.seq_length, bf16=False, gradient_checkpointing=False, activation_checkpointing=False,
        dataloader_drop_last=True, disable_tqdm=True, **kw,
    )


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _StepClock(TrainerCallback):
    def __init__(self):
        self.times, self._t = [], None

    def on_step_begin(self, args, state, control, **kw):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self._t)


def step_worker(args) -> None:
    """One timing run in this (fresh) process: prints a JSON line."""
    from hf_minitron import DistillationTrainer

    torch.set_num_threads(os.cpu_count() or 1)
    out = args.output_dir
    tok = AutoTokenizer.from_pretrained(os.path.join(out, "teacher"))
    rows = json.load(open(os.path.join(out, "train_rows.json")))
    n = (args.warmup_steps + args.timing_steps) * args.batch_size
    ds = Dataset.from_dict({"input_ids": rows[:n]})
    student = AutoModelForCausalLM.from_pretrained(os.path.join(out, "pruned"), dtype=torch.float32)
    teacher, kw = None, {}
    if args._step_worker == "live":
        teacher = AutoModelForCausalLM.from_pretrained(os.path.join(out, "teacher"), dtype=torch.float32).eval()
    else:
        kw["teacher_logits_cache"] = os.path.join(out, f"cache_k{args.step_top_k}")
    set_seed(args.seed)
    clock = _StepClock()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, processing_class=tok, train_dataset=ds, callbacks=[clock],
                                  args=training_args(os.path.join(out, "timing_run"), args, args.warmup_steps + args.timing_steps, **kw))
    start_rss, peak = rss_mb(), [0.0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    trainer.train()
    stop.set()
    thread.join()
    measured = clock.times[args.warmup_steps :]
    print(json.dumps({"mode": args._step_worker, "step_s": statistics.median(measured), "steps": clock.times,
                      "rss_start_mb": start_rss, "rss_peak_mb": max(peak[0], rss_mb()),
                      "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args._step_worker:
        return step_worker(args)
    from hf_minitron import (
        MinitronPruneConfig, cache_teacher_logits, estimate_importance, load_text_file, prune_model, save_pruned_model,
    )
    from hf_minitron.data import pack_texts
    from hf_minitron.distillation import DistillationTrainer, cached_teacher_retrain_fn
    from hf_minitron.embedded import load_smollm2
    from hf_minitron.evaluation import perplexity

    if not os.path.isfile(args.data):
        raise SystemExit(f"WikiText-2 not found at {args.data}; pass --data PATH.")
    torch.set_num_threads(os.cpu_count() or 1)
    out = os.path.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)
    results = Results(os.path.join(out, "results.json"), {"args": vars(args), "date": time.strftime("%Y-%m-%d"),
                                                           "threads": torch.get_num_threads(), "torch": torch.__version__})
    teacher, tok = load_smollm2()
    train_texts = load_text_file(args.data, "train")
    needed = args.steps * args.batch_size
    rows = [b.tolist() for b in pack_texts(train_texts, tok, args.seq_length)][:needed]
    if len(rows) < needed:
        raise SystemExit(f"--steps x --batch_size = {needed} rows but the train articles give {len(rows)}.")
    held_out = pack_texts(load_text_file(args.data, "eval"), tok, args.eval_seq_length, args.eval_windows)
    with open(os.path.join(out, "train_rows.json"), "w") as f:
        json.dump(rows, f)
    train_ds = Dataset.from_dict({"input_ids": rows})
    print(f"train: {len(rows)} x {args.seq_length} tokens ({len(rows) * args.seq_length:,} per run); "
          f"held-out: {len(held_out)} x {args.eval_seq_length}", flush=True)

    # Teacher (saved once as safetensors, for the subprocesses) and the width student
    if not os.path.isdir(os.path.join(out, "teacher")):
        teacher.save_pretrained(os.path.join(out, "teacher"))
        tok.save_pretrained(os.path.join(out, "teacher"))
    if not os.path.isdir(os.path.join(out, "pruned")):
        calib = pack_texts(train_texts, tok, args.seq_length, args.calib_samples)
        cfg = MinitronPruneConfig(hidden_size=432, intermediate_size=1024, num_calibration_samples=len(calib),
                                  calibration_seq_length=args.seq_length)
        scores = estimate_importance(teacher, calib, cfg)
        save_pruned_model(prune_model(teacher_copy(teacher), cfg, importance=scores), os.path.join(out, "pruned"), tokenizer=tok,
                          importance=scores)

    # 1. Caches ---------------------------------------------------------------------------------------------------
    for k in args.top_ks:
        name = f"cache k={k}"
        if results.get(name):
            continue
        start = time.perf_counter()
        cache = cache_teacher_logits(teacher, train_ds, os.path.join(out, f"cache_k{k}"), top_k=k, tokenizer=tok,
                                     batch_size=args.batch_size, overwrite=True)
        seconds = time.perf_counter() - start
        results.put(name, {"top_k": k, "dtype": cache.logprob_dtype, "seconds": seconds, "tokens": cache.num_tokens,
                           "tokens_per_s": cache.num_tokens / seconds, "bytes": cache.disk_bytes(),
                           "bytes_per_token": cache.disk_bytes() / cache.num_tokens})
        print(f"{name}: {seconds:.0f}s, {cache.disk_bytes() / cache.num_tokens:.1f} B/token", flush=True)

    # 2. Step time and memory, interleaved fresh processes --------------------------------------------------------
    if not results.get("timing"):
        runs = []
        for _ in range(args.timing_repeats):
            for mode in ("live", "cache"):
                cmd = [sys.executable, os.path.abspath(__file__), "--_step_worker", mode, "--output_dir", out,
                       "--batch_size", str(args.batch_size), "--seq_length", str(args.seq_length),
                       "--timing_steps", str(args.timing_steps), "--warmup_steps", str(args.warmup_steps),
                       "--step_top_k", str(args.step_top_k), "--learning_rate", str(args.learning_rate), "--seed", str(args.seed)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
                if proc.returncode != 0:
                    raise SystemExit(f"timing worker failed:\n{proc.stderr[-3000:]}")
                runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(f"timing {mode}: {runs[-1]['step_s']:.2f} s/step, peak RSS {runs[-1]['rss_peak_mb']:.0f} MB", flush=True)
        summary = {}
        for mode in ("live", "cache"):
            mine = [r for r in runs if r["mode"] == mode]
            summary[mode] = {key: statistics.median(r[key] for r in mine) for key in ("step_s", "rss_start_mb", "rss_peak_mb")}
        summary["ratio_time"] = summary["cache"]["step_s"] / summary["live"]["step_s"]
        summary["ratio_peak_rss"] = summary["cache"]["rss_peak_mb"] / summary["live"]["rss_peak_mb"]
        results.put("timing", {"runs": runs, **summary})

    # 3. Quality at an equal token budget ---------------------------------------------------------------------------
    if not results.get("quality zero-shot"):
        pruned = AutoModelForCausalLM.from_pretrained(os.path.join(out, "pruned"), dtype=torch.float32)
        results.put("quality zero-shot", {"perplexity": perplexity(pruned, held_out, seq_length=args.eval_seq_length, show_progress=False)})
        results.put("quality teacher", {"perplexity": perplexity(teacher, held_out, seq_length=args.eval_seq_length, show_progress=False)})
    for label in ["live"] + [f"k={k}" for k in args.top_ks]:
        name = f"quality {label}"
        if results.get(name):
            continue
        set_seed(args.seed)
        student = AutoModelForCausalLM.from_pretrained(os.path.join(out, "pruned"), dtype=torch.float32)
        kw = {} if label == "live" else {"teacher_logits_cache": os.path.join(out, f"cache_k{label[2:]}")}
        trainer = DistillationTrainer(model=student, teacher_model=teacher if label == "live" else None, processing_class=tok,
                                      train_dataset=train_ds, args=training_args(os.path.join(out, "runs", label), args, args.steps, **kw))
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        model = trainer.accelerator.unwrap_model(trainer.model).eval()
        ppl = perplexity(model, held_out, seq_length=args.eval_seq_length, show_progress=False)
        history = [h for h in trainer.state.log_history if "kd_loss" in h]
        results.put(name, {"perplexity": ppl, "train_seconds": seconds, "tokens": len(rows) * args.seq_length,
                           "kd_loss": [h["kd_loss"] for h in history], "ce_loss": [h["ce_loss"] for h in history]})
        teacher.requires_grad_(True)  # the trainer froze it; nothing else changes
        print(f"{name}: perplexity {ppl:.2f} ({seconds:.0f}s training)", flush=True)
        del trainer, model, student

    # 4. Search wall time -------------------------------------------------------------------------------------------
    if args.search and not results.get("search"):
        from hf_minitron import ImportanceScores, search_architectures
        from hf_minitron.distillation import ensure_search_cache

        scores = ImportanceScores.load(os.path.join(out, "pruned", "importance_scores.safetensors"))
        search_rows = rows[: 4 * args.search_retrain_steps]
        kw = dict(target_params=0.6, max_candidates=args.search_candidates, retrain_steps=args.search_retrain_steps,
                  train_dataset=[torch.tensor(r) for r in search_rows], eval_dataset=held_out[:8], tokenizer=tok,
                  seq_length=args.seq_length, seed=args.seed)
        timings = {}
        start = time.perf_counter()
        live = search_architectures(teacher, scores, **kw)
        timings["live_s"] = time.perf_counter() - start
        start = time.perf_counter()
        cache = ensure_search_cache(teacher, [torch.tensor(r) for r in search_rows], os.path.join(out, "search_cache"), tok,
                                    top_k=args.step_top_k, overwrite=True)
        timings["cache_pass_s"] = time.perf_counter() - start
        start = time.perf_counter()
        cached = search_architectures(teacher, scores, retrain_fn=cached_teacher_retrain_fn(cache, tok), **kw)
        timings["cached_search_s"] = time.perf_counter() - start
        timings["ratio_search_only"] = timings["cached_search_s"] / timings["live_s"]
        timings["ratio_with_cache_pass"] = (timings["cached_search_s"] + timings["cache_pass_s"]) / timings["live_s"]
        timings["live_ranking"] = [c.name for c in live]
        timings["cached_ranking"] = [c.name for c in cached]
        timings["live_losses"] = [c.retrain_loss for c in live]
        timings["cached_losses"] = [c.retrain_loss for c in cached]
        results.put("search", timings)

    print_tables(results, args)


def teacher_copy(model):
    import copy

    return copy.deepcopy(model)


def print_tables(results: Results, args) -> None:
    p = results.data["parts"]
    print("\n| k | stored log-prob dtype | bytes / token | cache pass | tokens / s |\n|---:|---|---:|---:|---:|")
    for k in args.top_ks:
        c = p.get(f"cache k={k}")
        if c:
            print(f"| {k} | {c['dtype']} | {c['bytes_per_token']:.1f} | {c['seconds']:.0f} s | {c['tokens_per_s']:.0f} |")
    t = p.get("timing")
    if t:
        print(f"\n| KD step (batch {args.batch_size} x {args.seq_length}) | s / step (median) | RSS at start | peak RSS in training |\n|---|---:|---:|---:|")
        for mode, label in (("live", "live teacher"), ("cache", f"cache (k = {args.step_top_k})")):
            print(f"| {label} | {t[mode]['step_s']:.2f} | {t[mode]['rss_start_mb']:.0f} MB | {t[mode]['rss_peak_mb']:.0f} MB |")
        print(f"| **cache / live** | **{t['ratio_time']:.2f}x** | | **{t['ratio_peak_rss']:.2f}x** |")
    if p.get("quality live"):
        live = p["quality live"]["perplexity"]
        print("\n| student trained from | held-out perplexity | vs live teacher | training wall time |\n|---|---:|---:|---:|")
        print(f"| (teacher, unpruned) | {p['quality teacher']['perplexity']:.2f} | | |")
        print(f"| (pruned, zero-shot) | {p['quality zero-shot']['perplexity']:.2f} | | |")
        for label in ["live"] + [f"k={k}" for k in args.top_ks]:
            q = p.get(f"quality {label}")
            if q:
                name = "live teacher" if label == "live" else f"cache, k = {label[2:]}"
                print(f"| {name} | {q['perplexity']:.2f} | {100 * (q['perplexity'] / live - 1):+.1f}% | {q['train_seconds']:.0f} s |")
    s = p.get("search")
    if s:
        print("\n| search (same candidates) | wall time |\n|---|---:|")
        print(f"| live teacher | {s['live_s']:.0f} s |\n| cache pass (once) | {s['cache_pass_s']:.0f} s |")
        print(f"| cached search | {s['cached_search_s']:.0f} s |")
        print(f"| cached / live (search only; with the cache pass) | {s['ratio_search_only']:.2f}x; {s['ratio_with_cache_pass']:.2f}x |")


if __name__ == "__main__":
    main()
