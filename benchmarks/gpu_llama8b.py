#!/usr/bin/env python
"""One-shot GPU benchmark of the Minitron pipeline at Llama-3.1-8B scale (random weights, random tokens, offline).

Steps, each time-guarded (SIGALRM) and wrapped so that a failure is recorded and the later steps still run when
they can:

0. kd_loss  : the logit loss alone at the distillation head shapes (N = distill batch x sequence tokens, V = 128,256,
              H 3072 student / 4096 teacher, bf16 weights, forward KL, forward + backward), three ways on the same
              inputs: ours (``fused_linear_kd_loss``), TRL 1.16's ``ChunkedDivergenceFunction`` (Triton on CUDA) and a
              naive full-logits KL (both ``[N, V]`` logits materialized, plain autograd): median time, peak memory
              above the inputs, loss / gradient agreement;
1. build    : random-init ``LlamaForCausalLM`` shaped like Llama-3.1-8B, bf16, directly on the GPU (no download);
2. importance: ``hf_minitron.estimate_importance`` over ``calib_samples x seq_length`` (1,024 x 4,096) random tokens
              (sdpa), against the 120 s target;
3. prune    : ``prune_model`` on a copy of the 8B to the Llama-3.1-Minitron-4B-Width shape (hidden 3072, MLP 9216,
              32 layers, 32/8 heads; ``recipes/configs/llama3.1-8b-4b-width.yaml``), 4.5B parameters;
4. distill  : ``DistillationTrainer`` steps with fp32 master weights (the student in fp32, bf16 autocast; teacher =
              the 8B in bf16; forward KL, activation checkpointing, fused AdamW): tokens/s, peak memory and MFU
              (model FLOPs: 6 x student + 2 x teacher matmul parameters per token, plus causal attention, over
              ``--peak_tflops``), once per ``--hidden_state_loss`` variant (default ``none``);
5. streaming: ``estimate_importance_streaming`` (the 8B in CPU memory, one decoder layer at a time on the GPU) against
              ``estimate_importance`` in GPU memory on the same ``--stream_samples`` samples: time, peak GPU memory,
              largest score difference.

Random weights and tokens measure speed and memory only. Results go to ``<out>/gpu_llama8b.json`` (rewritten after
every step, so a hard kill keeps what finished). ``--tiny`` runs the same code on a tiny shape (CPU allowed) as a
smoke test. Usually started by ``benchmarks/gpu.sh``, which also tees the log to ``<out>/log.txt``.

Usage:
    bash benchmarks/gpu.sh                                   # H200: the full run (<= 5.5 min)
    bash benchmarks/gpu.sh --tiny                            # CPU smoke test (< 2 min)
    python benchmarks/gpu_llama8b.py --batch_size 16 --distill_batch_size 1 --hidden_state_loss none,cosine
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import os
import platform
import signal
import statistics
import sys
import time
import traceback

GB = 1e9
T0 = time.perf_counter()

# Llama-3.1-8B and the Minitron 4B-Width target (hidden 3072 is a multiple of 32 heads, as transformers 5 requires).
FULL = {
    "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "rope_theta": 500000.0, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001,
}
FULL_TARGET = {"hidden_size": 3072, "intermediate_size": 9216}
TINY = {
    "vocab_size": 2048, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8,
    "num_key_value_heads": 2, "head_dim": 32, "rope_theta": 500000.0, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
}
TINY_TARGET = {"hidden_size": 192, "intermediate_size": 320}
FULL_DEFAULTS = {"calib_samples": 1024, "seq_length": 4096, "batch_size": 8, "distill_steps": 5, "distill_batch_size": 2,
                 "stream_samples": 128}
TINY_DEFAULTS = {"calib_samples": 16, "seq_length": 128, "batch_size": 4, "distill_steps": 2, "distill_batch_size": 1,
                 "stream_samples": 8}


def log(msg: str = "") -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


class StepTimeout(BaseException):
    """Raised by SIGALRM when a step exceeds its time limit (a BaseException so `except Exception` cannot eat it)."""


@contextlib.contextmanager
def time_limit(name: str, seconds: float):
    def handler(signum, frame):
        raise StepTimeout(f"step {name!r} exceeded its {seconds:.0f} s limit")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ------------------------------------------------------------------------------------------------------- helpers
def num_params_analytic(c: dict, hidden: int | None = None, inter: int | None = None) -> int:
    h = hidden or c["hidden_size"]
    i = inter or c["intermediate_size"]
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
    embed = c["vocab_size"] * h * (1 if c["tie_word_embeddings"] else 2)
    return embed + c["num_hidden_layers"] * per_layer + h


def forward_flops_per_token(c: dict, seq: int, hidden: int | None = None, inter: int | None = None) -> float:
    """Matmul FLOPs of one forward per token: projections, causal attention (QK^T and AV over T/2 keys on average),
    and `lm_head` (as the fused loss computes it)."""
    h = hidden or c["hidden_size"]
    i = inter or c["intermediate_size"]
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    per_layer = 2 * (h * q + 2 * h * kv + q * h + 3 * h * i) + 2 * seq * q
    return c["num_hidden_layers"] * per_layer + 2 * c["vocab_size"] * h


def importance_memory_estimate(c: dict, params: int, w_bytes: int, batch: int, seq: int) -> dict:
    """Rough peak of the importance pass: weights + one layer's forward transients + the fp32 hook temporaries."""
    bt = batch * seq
    fwd = bt * (3 * c["intermediate_size"] + 6 * c["hidden_size"]) * w_bytes  # gate/up/act + a few hidden tensors
    hooks = 3 * bt * c["intermediate_size"] * 4  # .float(), .abs() and the einsum input of the MLP hook
    total = params * w_bytes + fwd + hooks
    return {"weights_gb": params * w_bytes / GB, "activations_gb": (fwd + hooks) / GB, "total_gb": total / GB}


def distill_memory_estimate(
    c: dict, t_params: int, s_params: int, s_hidden: int, s_inter: int, batch: int, seq: int, chunk: int,
    hidden_loss: bool, student_bytes: int, act_bytes: int = 2,
) -> dict:
    """Rough peak of a distillation step. torch AdamW keeps exp_avg / exp_avg_sq in the parameter dtype."""
    bt, L, V = batch * seq, c["num_hidden_layers"], c["vocab_size"]
    teacher = t_params * 2
    student = s_params * student_bytes * 4  # weights + grads + 2 Adam states
    ckpt = (L + 1) * bt * s_hidden * act_bytes * 2  # checkpointed layer inputs + hidden_states (+ their grads, worst)
    recompute = bt * (3 * s_inter + 8 * s_hidden) * act_bytes * 2  # one layer re-run forward + backward
    kd = 4 * min(chunk, bt) * V * 4  # student/teacher chunk logits, softmaxes and grad (fp32)
    teacher_fwd = bt * (3 * c["intermediate_size"] + 6 * c["hidden_size"]) * 2
    hs = (L + 1) * bt * c["hidden_size"] * 2 + bt * c["hidden_size"] * 4 * 3 if hidden_loss else 0
    acts = ckpt + recompute + kd + teacher_fwd + hs
    return {
        "teacher_gb": teacher / GB, "student_w_grad_adam_gb": student / GB, "activations_gb": acts / GB,
        "total_gb": (teacher + student + acts) / GB,
    }


def gb(x: float | None) -> str:
    return "n/a (CPU)" if x is None else f"{x:.1f} GB"


def fmt_est(est: dict) -> str:
    return ", ".join(f"{k[:-3]} {v:.1f} GB" for k, v in est.items())


class Results:
    def __init__(self, path: str) -> None:
        self.path = path
        self.data: dict = {"steps": {}, "errors": {}}

    def set(self, key: str, value) -> None:
        self.data["steps"][key] = value
        self.write()

    def error(self, key: str, err: str) -> None:
        self.data["errors"][key] = err
        self.write()

    def write(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=2, default=str)
        os.replace(tmp, self.path)


def run_step(name: str, limit_s: float, deadline: float, results: Results, fn):
    """Run ``fn()`` under min(limit, time left before the deadline); on failure record the error and return None."""
    left = deadline - time.perf_counter()
    if left < 5:
        msg = f"skipped: only {left:.0f} s left of the time budget"
        log(f"== {name}: {msg}")
        results.error(name, msg)
        return None
    limit = min(limit_s, left)
    log(f"== {name} (limit {limit:.0f} s)")
    try:
        with time_limit(name, limit):
            return fn()
    except (Exception, StepTimeout) as err:  # noqa: BLE001 - every failure is recorded, later steps still run
        tb = traceback.format_exc()
        msg = f"{type(err).__name__}: {err}"
        log(f"!! {name} FAILED: {msg}")
        print(tb[-4000:], flush=True)
        results.error(name, msg + "\n" + tb[-4000:])
        return None
    finally:
        gc.collect()


# ------------------------------------------------------------------------------------------------------- main
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shape smoke test (CPU if no GPU)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="model dtype (default bf16 on GPU)")
    p.add_argument("--student_dtype", choices=["bf16", "fp32"], default="fp32",
                   help="student dtype for distillation (fp32 = fp32 master weights with bf16 autocast, the default)")
    p.add_argument("--calib_samples", type=int, default=None)
    p.add_argument("--seq_length", type=int, default=None, help="calibration and distillation sequence length")
    p.add_argument("--batch_size", type=int, default=None, help="importance batch size")
    p.add_argument("--distill_steps", type=int, default=None)
    p.add_argument("--distill_batch_size", type=int, default=None)
    p.add_argument("--hidden_state_loss", default="none",
                   help="comma-separated distillation variants run one after another: none, cosine, mse")
    p.add_argument("--kd_chunk_size", type=int, default=1024)
    p.add_argument("--optim", default="adamw_torch_fused")
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--budget_s", type=float, default=300.0, help="total time budget of this script")
    p.add_argument("--importance_limit_s", type=float, default=140.0)
    p.add_argument("--distill_limit_s", type=float, default=60.0, help="per variant")
    p.add_argument("--stream_samples", type=int, default=None,
                   help="samples of the layer-streaming vs in-memory importance comparison (step 5)")
    p.add_argument("--stream_limit_s", type=float, default=60.0, help="time limit of step 5 (both passes)")
    p.add_argument("--skip_streaming", action="store_true", help="skip step 5")
    p.add_argument("--peak_tflops", type=float, default=989.0,
                   help="dense bf16 peak of the GPU for MFU (H100/H200 SXM: 989)")
    p.add_argument("--target_importance_s", type=float, default=120.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kd_bench_tokens", type=int, default=None, help="N of the KD-loss step (default batch x seq)")
    p.add_argument("--kd_bench_repeats", type=int, default=3, help="timed runs per method after a warm-up")
    p.add_argument("--kd_bench_limit_s", type=float, default=45.0, help="time limit of the KD-loss step")
    p.add_argument("--skip_kd_bench", action="store_true", help="skip step 0 (ours vs TRL's kernel vs naive)")
    p.add_argument("--skip_naive", action="store_true", help="step 0 without the naive full-logits KL")
    p.add_argument("--plan_only", action="store_true", help="print the memory plan and exit (no GPU needed)")
    p.add_argument("--out", default=os.environ.get("OUT", "runs/gpu"))
    args = p.parse_args()
    deadline = T0 + args.budget_s

    import torch

    defaults = TINY_DEFAULTS if args.tiny else FULL_DEFAULTS
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    shape, target = (TINY, TINY_TARGET) if args.tiny else (FULL, FULL_TARGET)
    if args.device.startswith("cuda") and not torch.cuda.is_available() and not args.plan_only:
        if not args.tiny:
            print("CUDA is not available: the full benchmark needs a GPU (use --tiny for a CPU smoke test).")
            return 2
        log("CUDA not available: --tiny falls back to --device cpu")
        args.device = "cpu"
    device = torch.device(args.device)
    cuda = device.type == "cuda" and torch.cuda.is_available()
    if args.dtype is None:
        args.dtype = "bf16" if cuda else "fp32"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    w_bytes = 2 if args.dtype == "bf16" else 4
    variants = [v.strip() for v in args.hidden_state_loss.split(",") if v.strip()]

    results = Results(os.path.join(args.out, "gpu_llama8b.json"))
    import transformers
    import trl

    import hf_minitron

    env = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "transformers": transformers.__version__, "trl": trl.__version__, "hf_minitron": hf_minitron.__version__,
        "hf_minitron_path": os.path.dirname(hf_minitron.__file__), "device": str(device),
    }
    for mod in ("accelerate", "peft", "datasets"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as err:  # noqa: BLE001
            env[mod] = f"unavailable ({err})"
    if cuda:
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_mem_gb=props.total_memory / GB, capability=f"{props.major}.{props.minor}",
                   flash_sdp=torch.backends.cuda.flash_sdp_enabled())
    results.data.update(args=vars(args), env=env, shape=shape, target=target)
    results.write()
    log("env: " + json.dumps(env))
    log("args: " + json.dumps(vars(args)))

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def peak_gb():
        return torch.cuda.max_memory_allocated(device) / GB if cuda else None

    def reset_peak():
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)

    # ---- memory plan (analytic, printed before anything runs)
    t_params_a = num_params_analytic(shape)
    s_params_a = num_params_analytic(shape, target["hidden_size"], target["intermediate_size"])
    gpu_gb = env.get("gpu_mem_gb", 141.0)
    plan = {
        "teacher_params": t_params_a, "student_params": s_params_a,
        "importance": importance_memory_estimate(shape, t_params_a, w_bytes, args.batch_size, args.seq_length),
        "prune_peak_gb": (2 * t_params_a * w_bytes) / GB,  # teacher + its copy being sliced
    }
    for sd in ("bf16", "fp32"):
        for hl in (False, True):
            plan[f"distill_student_{sd}{'_hidden' if hl else ''}"] = distill_memory_estimate(
                shape, t_params_a, s_params_a, target["hidden_size"], target["intermediate_size"],
                args.distill_batch_size, args.seq_length, args.kd_chunk_size, hl, 2 if sd == "bf16" else 4)
    log(f"plan: teacher {t_params_a / 1e9:.3f} B params, student {s_params_a / 1e9:.3f} B params")
    log(f"  importance est.: {fmt_est(plan['importance'])}")
    log(f"  prune est. peak: {plan['prune_peak_gb']:.1f} GB (teacher + copy being sliced)")
    for k, v in plan.items():
        if k.startswith("distill_"):
            fits = "fits" if v["total_gb"] < 0.9 * gpu_gb else "DOES NOT FIT"
            log(f"  {k} est.: {fmt_est(v)} -> {fits} in {gpu_gb:.0f} GB")
    results.data["memory_plan"] = plan
    results.write()
    if args.plan_only:
        return 0

    torch.manual_seed(args.seed)

    # ---- 0. the KD loss alone: ours vs TRL's chunked divergence kernel, same inputs, same process
    def kd_bench():
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

        from hf_minitron.distillation import fused_linear_kd_loss, kd_loss_from_logits

        n = args.kd_bench_tokens or args.distill_batch_size * args.seq_length
        V, hs, ht = shape["vocab_size"], target["hidden_size"], shape["hidden_size"]
        gen = torch.Generator(device=device).manual_seed(args.seed)
        h_s = torch.randn(n, hs, device=device, dtype=dtype, generator=gen).requires_grad_()
        w_s = (torch.randn(V, hs, device=device, dtype=dtype, generator=gen) * hs**-0.5).requires_grad_()
        h_t = torch.randn(n, ht, device=device, dtype=dtype, generator=gen)
        w_t = torch.randn(V, ht, device=device, dtype=dtype, generator=gen) * 2 * ht**-0.5

        def ours():
            return fused_linear_kd_loss(h_s, w_s, h_t, w_t, chunk_size=args.kd_chunk_size)

        def trl_kernel():
            per_token, _ = ChunkedDivergenceFunction.apply(h_s, w_s, None, h_t, w_t, None, 0.0, 1.0)
            return per_token.mean()

        def naive():
            # Both [N, V] logits materialized (bf16 matmul, fp32 softmaxes), plain autograd
            with torch.no_grad():
                t_logits = h_t @ w_t.t()
            return kd_loss_from_logits(h_s @ w_s.t(), t_logits)

        out = {"tokens": n, "vocab": V, "student_hidden": hs, "teacher_hidden": ht, "dtype": str(dtype),
               "kd_chunk_size": args.kd_chunk_size}
        methods = [("ours", ours), ("trl", trl_kernel)] + ([] if args.skip_naive else [("naive", naive)])
        grads = {}
        for name, fn in methods:
            try:
                h_s.grad = w_s.grad = None
                fn().backward()  # warm-up (Triton compilation, allocator)
                times = []
                for _ in range(args.kd_bench_repeats):
                    h_s.grad = w_s.grad = None
                    sync()
                    reset_peak()
                    base = torch.cuda.memory_allocated(device) if cuda else 0
                    t = time.perf_counter()
                    loss = fn()
                    loss.backward()
                    sync()
                    times.append(time.perf_counter() - t)
            except torch.cuda.OutOfMemoryError as err:  # the naive loss at a large N: recorded, the others stand
                out[name] = {"error": f"OutOfMemoryError: {err}"[:300]}
                log(f"kd_loss[{name}]: out of memory")
                h_s.grad = w_s.grad = None
                gc.collect()
                torch.cuda.empty_cache()
                continue
            peak = (torch.cuda.max_memory_allocated(device) - base) / GB if cuda else None
            grads[name] = (loss.detach().float(), h_s.grad.float(), w_s.grad.float())
            out[name] = {"loss": float(loss), "s_median": statistics.median(times), "times": times, "extra_peak_gb": peak}
            log(f"kd_loss[{name}]: {statistics.median(times) * 1e3:.1f} ms fwd+bwd, extra peak {gb(peak)}, loss {float(loss):.6f}")
        tol = dict(rtol=2e-2, atol=1e-4) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-6)
        for other in ("trl", "naive"):
            if other not in grads or "ours" not in grads:
                continue
            out[f"grads_match_{other}"] = all(torch.allclose(a, b, **tol) for a, b in zip(grads["ours"], grads[other]))
            out[f"time_ours_over_{other}"] = out["ours"]["s_median"] / out[other]["s_median"]
            if cuda:
                out[f"memory_ours_over_{other}"] = out["ours"]["extra_peak_gb"] / out[other]["extra_peak_gb"]
            log(f"kd_loss: ours / {other}: time {out[f'time_ours_over_{other}']:.3f}x"
                + (f", memory {out[f'memory_ours_over_{other}']:.3f}x" if cuda else "")
                + f", loss and gradients match: {out[f'grads_match_{other}']}")
        results.set("kd_loss", out)  # the inputs are freed when this returns (run_step collects garbage)

    if not args.skip_kd_bench:
        run_step("kd_loss", args.kd_bench_limit_s, deadline, results, kd_bench)

    # ---- 1. build
    from transformers import AutoModelForCausalLM, LlamaConfig

    def build():
        config = LlamaConfig(**shape, attn_implementation=args.attn)
        reset_peak()
        sync()
        t = time.perf_counter()
        with device:
            try:
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
            except TypeError:  # transformers < 4.56
                model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
        sync()
        secs = time.perf_counter() - t
        moved = any(p.device.type != device.type for p in model.parameters())
        if moved:  # a transformers version that ignores the device context: move it (slower, still correct)
            log("build: weights were not created on the target device; moving them")
            model = model.to(device)
            sync()
            secs = time.perf_counter() - t
        n = sum(p.numel() for p in model.parameters())
        dev = {str(p.device) for p in model.parameters()}
        res = {"seconds": secs, "params": n, "params_b": n / 1e9, "devices": sorted(dev), "moved": moved, "peak_gb": peak_gb(),
               "dtype": str(next(model.parameters()).dtype), "attn": model.config._attn_implementation}
        log(f"build: {n:,} params ({n / 1e9:.3f} B) in {secs:.1f} s on {sorted(dev)}, dtype {res['dtype']}, "
            f"attn {res['attn']}, peak {gb(res['peak_gb'])}")
        results.set("build", res)
        return model

    teacher = run_step("build", 90, deadline, results, build)
    if teacher is None:
        log("cannot continue without the model")
        return 1

    # ---- 2. importance
    from hf_minitron import (
        DistillationConfig,
        DistillationTrainer,
        MinitronPruneConfig,
        estimate_importance,
        prune_model,
    )
    from hf_minitron.importance.baselines import random_importance

    prune_config = MinitronPruneConfig(
        hidden_size=target["hidden_size"], intermediate_size=target["intermediate_size"],
        num_calibration_samples=args.calib_samples, calibration_seq_length=args.seq_length,
        calibration_batch_size=args.batch_size,
    )
    progress = {"batches": 0, "tokens": 0, "t_first": None}

    def count(module, a, kw):
        ids = kw.get("input_ids") if kw else a[0]
        progress["batches"] += 1
        progress["tokens"] += int(ids.numel())
        if progress["t_first"] is None:
            progress["t_first"] = time.perf_counter()

    def importance():
        gen = torch.Generator().manual_seed(args.seed)
        data = torch.randint(0, shape["vocab_size"], (args.calib_samples, args.seq_length), generator=gen)
        handle = teacher.get_decoder().register_forward_pre_hook(count, with_kwargs=True)
        reset_peak()
        sync()
        t = time.perf_counter()
        try:
            scores = estimate_importance(teacher, data, prune_config, show_progress=False)
        except StepTimeout:
            sync()
            secs = time.perf_counter() - t
            partial = {"completed": False, "seconds_until_timeout": secs, "batches_started": progress["batches"],
                       "tokens_started": progress["tokens"], "tokens_per_s_approx": progress["tokens"] / secs,
                       "peak_gb": peak_gb()}
            log(f"importance timed out after {secs:.1f} s: {progress['batches']} batches started, "
                f"~{partial['tokens_per_s_approx']:,.0f} tokens/s")
            results.set("importance", partial)
            raise
        finally:
            handle.remove()
        sync()
        secs = time.perf_counter() - t
        tokens = args.calib_samples * args.seq_length
        met = secs <= args.target_importance_s
        res = {
            "completed": True, "seconds": secs, "tokens": tokens, "tokens_per_s": tokens / secs,
            "samples": args.calib_samples, "seq_length": args.seq_length, "batch_size": args.batch_size,
            "peak_gb": peak_gb(), "target_s": args.target_importance_s, "target_met": met,
            "heads_shape": list(scores.heads.shape), "neurons_shape": list(scores.neurons.shape),
            "hidden_shape": list(scores.hidden.shape),
            "finite": bool(torch.isfinite(scores.hidden).all() and torch.isfinite(scores.neurons).all()),
        }
        log(f"importance: {tokens:,} tokens in {secs:.1f} s = {tokens / secs:,.0f} tokens/s, peak "
            f"{gb(res['peak_gb'])} (est. {plan['importance']['total_gb']:.1f}); "
            f"target <= {args.target_importance_s:.0f} s: {'met' if met else 'NOT MET'}")
        results.set("importance", res)
        return scores

    scores = run_step("importance", args.importance_limit_s, deadline, results, importance)
    if scores is None:
        log("importance failed: pruning uses random scores (speed is unaffected)")
        scores = random_importance(teacher, seed=args.seed)
        results.data["pruned_with_random_scores"] = True

    # ---- 3. prune a copy (the 8B stays as the teacher)
    def prune():
        reset_peak()
        sync()
        t = time.perf_counter()
        student = copy.deepcopy(teacher)
        sync()
        t_copy = time.perf_counter() - t
        t = time.perf_counter()
        student = prune_model(student, prune_config, importance=scores)
        sync()
        secs = time.perf_counter() - t
        n = sum(p.numel() for p in student.parameters())
        c = student.config
        res = {"copy_seconds": t_copy, "seconds": secs, "params": n, "params_b": n / 1e9, "peak_gb": peak_gb(),
               "config": {k: getattr(c, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                     "num_attention_heads", "num_key_value_heads", "head_dim")}}
        log(f"prune: deepcopy {t_copy:.1f} s, prune_model {secs:.1f} s -> {n:,} params ({n / 1e9:.3f} B), "
            f"config {res['config']}, peak {gb(res['peak_gb'])}")
        results.set("prune", res)
        return student

    student = run_step("prune", 60, deadline, results, prune)
    if student is None:
        log("cannot distill without a student")
        summary(results)
        return 1
    if args.student_dtype != args.dtype:
        student = student.to({"bf16": torch.bfloat16, "fp32": torch.float32}[args.student_dtype])

    # ---- 4. distill
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, TrainerCallback

    V = shape["vocab_size"]
    vocab = {f"t{i}": i for i in range(V)}
    vocab["<pad>"], vocab["<eos>"] = 0, shape["eos_token_id"]
    del vocab["t0"], vocab[f"t{shape['eos_token_id']}"]
    tok_model = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok_model.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok_model, pad_token="<pad>", eos_token="<eos>")

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self._t = None

        def on_step_begin(self, a, state, control, **kw):
            sync()
            self._t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            sync()
            self.times.append(time.perf_counter() - self._t)
            log(f"  step {state.global_step}: {self.times[-1]:.2f} s")

    config_fields = {f.name for f in dataclasses.fields(DistillationConfig)}
    n_rows = args.distill_steps * args.distill_batch_size
    gen = torch.Generator().manual_seed(args.seed + 1)
    rows = torch.randint(3, V, (n_rows, args.seq_length), generator=gen).tolist()
    train_dataset = Dataset.from_dict({"input_ids": rows})
    student.config.use_cache = False

    def distill(variant: str):
        def fn():
            ckpt = "activation_checkpointing" if "activation_checkpointing" in config_fields else "gradient_checkpointing"
            kw = dict(
                output_dir=os.path.join(args.out, f"distill_{variant}"), max_steps=args.distill_steps,
                per_device_train_batch_size=args.distill_batch_size, gradient_accumulation_steps=1,
                learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, optim=args.optim,
                bf16=cuda and args.dtype == "bf16", logging_steps=1, save_strategy="no", report_to="none",
                max_length=args.seq_length, packing=False, kd_loss="forward_kl", hidden_state_loss=variant,
                kd_chunk_size=args.kd_chunk_size, disable_tqdm=True, dataloader_num_workers=0, seed=args.seed,
                use_cpu=not cuda, **{ckpt: True},
            )
            if ckpt == "activation_checkpointing" and "activation_checkpointing_kwargs" in config_fields:
                kw["activation_checkpointing_kwargs"] = {"use_reentrant": False}
            elif "gradient_checkpointing_kwargs" in config_fields:
                kw["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
            dargs = DistillationConfig(**kw)
            timer = StepTimer()
            reset_peak()
            mem_before = torch.cuda.memory_allocated(device) / GB if cuda else None
            t = time.perf_counter()
            trainer = DistillationTrainer(
                model=student, teacher_model=teacher, args=dargs, train_dataset=train_dataset,
                processing_class=tokenizer, callbacks=[timer],
            )
            setup_s = time.perf_counter() - t
            reset_peak()
            sync()
            t = time.perf_counter()
            try:
                out = trainer.train()
                sync()
                total = time.perf_counter() - t
                steady = timer.times[1:] or timer.times
                s_step = statistics.median(steady)
                tokens_step = args.distill_batch_size * args.seq_length
                # Model FLOPs (MFU convention: activation-checkpointing recompute not counted): student forward +
                # backward (3x its forward), teacher forward
                flops_token = 3 * forward_flops_per_token(shape, args.seq_length, target["hidden_size"],
                                                          target["intermediate_size"]) + forward_flops_per_token(
                    shape, args.seq_length)
                mfu = tokens_step / s_step * flops_token / (args.peak_tflops * 1e12) if cuda else None
                losses = [h.get("kd_loss") for h in trainer.state.log_history if "kd_loss" in h]
                hs = [h.get("hidden_state_loss") for h in trainer.state.log_history if "hidden_state_loss" in h]
                est = plan[f"distill_student_{args.student_dtype}{'' if variant == 'none' else '_hidden'}"]
                res = {
                    "variant": variant, "setup_seconds": setup_s, "train_seconds": total, "steps": len(timer.times),
                    "step_times": timer.times, "s_per_step_median_after_first": s_step,
                    "tokens_per_step": tokens_step, "tokens_per_s": tokens_step / s_step,
                    "model_flops_per_token": flops_token, "mfu": mfu, "peak_tflops_assumed": args.peak_tflops,
                    "peak_gb": peak_gb(), "allocated_before_gb": mem_before, "est_total_gb": est["total_gb"],
                    "kd_loss": losses, "hidden_state_loss": hs, "train_loss": out.training_loss,
                    "checkpointing": bool(getattr(dargs, ckpt)),
                    "student_is_checkpointing": getattr(student, "is_activation_checkpointing", None)
                    if hasattr(student, "is_activation_checkpointing")
                    else getattr(student, "is_gradient_checkpointing", None), "optim": str(dargs.optim), "bf16": dargs.bf16,
                    "student_dtype": str(next(student.parameters()).dtype),
                }
                log(f"distill[{variant}]: setup {setup_s:.1f} s, {len(timer.times)} steps in {total:.1f} s; "
                    f"{s_step:.2f} s/step (median after the first; first {timer.times[0]:.2f} s), "
                    f"{tokens_step / s_step:,.0f} tokens/s, "
                    + (f"MFU {mfu:.1%} of {args.peak_tflops:.0f} TFLOP/s, " if mfu is not None else "")
                    + f"peak {gb(res['peak_gb'])} "
                    f"(est. {est['total_gb']:.1f}), kd_loss {losses}")
                results.set(f"distill_{variant}", res)
            finally:
                # free the optimizer states / grads before the next variant
                with contextlib.suppress(Exception):
                    trainer.accelerator.free_memory()
                trainer.optimizer = None
                trainer.lr_scheduler = None
                student.zero_grad(set_to_none=True)
                del trainer
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
                    log(f"  after cleanup: {torch.cuda.memory_allocated(device) / GB:.1f} GB allocated")

        return fn

    for variant in variants:
        run_step(f"distill_{variant}", args.distill_limit_s, deadline, results, distill(variant))
    del student
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

    # ---- 5. layer-streaming importance vs the in-memory pass, same model, same samples
    def streaming():
        from hf_minitron import estimate_importance_streaming

        n = min(args.stream_samples, args.calib_samples)
        gen = torch.Generator().manual_seed(args.seed)
        data = torch.randint(0, shape["vocab_size"], (args.calib_samples, args.seq_length), generator=gen)[:n]
        config = dataclasses.replace(prune_config, num_calibration_samples=n)
        out = {"samples": n, "seq_length": args.seq_length, "batch_size": args.batch_size}
        teacher.to(device)
        reset_peak()
        sync()
        t = time.perf_counter()
        in_memory = estimate_importance(teacher, data, config, show_progress=False)
        sync()
        out["in_memory"] = {"seconds": time.perf_counter() - t, "peak_gb": peak_gb()}
        t = time.perf_counter()
        teacher.to("cpu")  # the model in CPU memory; one decoder layer at a time goes to the device
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        out["model_to_cpu_seconds"] = time.perf_counter() - t
        reset_peak()
        sync()
        t = time.perf_counter()
        streamed = estimate_importance_streaming(teacher, data, config, device=device, show_progress=False)
        sync()
        out["streaming"] = {"seconds": time.perf_counter() - t, "peak_gb": peak_gb()}
        a, b = in_memory.tensors(), streamed.tensors()
        diffs = {k: float((b[k].float() - v.float()).abs().max() / v.float().abs().max().clamp(min=1e-30))
                 for k, v in a.items() if k in b and v.numel()}
        out["max_relative_difference"] = max(diffs.values()) if diffs else None
        out["relative_difference_per_score"] = diffs
        out["same_scores"] = set(a) == set(b)
        out["time_streaming_over_in_memory"] = out["streaming"]["seconds"] / out["in_memory"]["seconds"]
        if cuda:
            out["peak_streaming_over_in_memory"] = out["streaming"]["peak_gb"] / out["in_memory"]["peak_gb"]
        log(f"streaming: {n} x {args.seq_length} tokens; in memory {out['in_memory']['seconds']:.1f} s, peak "
            f"{gb(out['in_memory']['peak_gb'])}; layer streaming {out['streaming']['seconds']:.1f} s, peak "
            f"{gb(out['streaming']['peak_gb'])}; largest relative score difference {out['max_relative_difference']:.2e}")
        results.set("streaming", out)

    if not args.skip_streaming:
        run_step("streaming", args.stream_limit_s, deadline, results, streaming)

    summary(results)
    results.data["total_seconds"] = time.perf_counter() - T0
    results.write()
    log(f"done in {time.perf_counter() - T0:.1f} s; wrote {results.path}")
    return 0 if not results.data["errors"] else 3


def summary(results: Results) -> None:
    s = results.data["steps"]
    log("== summary")
    if "kd_loss" in s:
        k = s["kd_loss"]
        parts = [f"{m} {k[m]['s_median'] * 1e3:.1f} ms" + (f" / {k[m]['extra_peak_gb']:.2f} GB" if k[m].get("extra_peak_gb")
                 is not None else "") for m in ("ours", "trl", "naive") if m in k and "s_median" in k[m]]
        ratios = [f"ours / {o}: time {k[f'time_ours_over_{o}']:.3f}x"
                  + (f", memory {k[f'memory_ours_over_{o}']:.3f}x" if f"memory_ours_over_{o}" in k else "")
                  + f", match {k[f'grads_match_{o}']}" for o in ("trl", "naive") if f"time_ours_over_{o}" in k]
        print(f"  kd_loss    : {', '.join(parts)}; {'; '.join(ratios)}", flush=True)
    if "build" in s:
        b = s["build"]
        print(f"  build      : {b['params_b']:.3f} B params in {b['seconds']:.1f} s", flush=True)
    if "importance" in s:
        i = s["importance"]
        if i.get("completed"):
            print(f"  importance : {i['seconds']:.1f} s, {i['tokens_per_s']:,.0f} tokens/s, peak {gb(i['peak_gb'])}, "
                  f"target <= {i['target_s']:.0f} s {'met' if i['target_met'] else 'NOT MET'}", flush=True)
        else:
            print(f"  importance : timed out, ~{i['tokens_per_s_approx']:,.0f} tokens/s", flush=True)
    if "prune" in s:
        q = s["prune"]
        print(f"  prune      : {q['seconds']:.1f} s (+ copy {q['copy_seconds']:.1f} s) -> {q['params_b']:.3f} B params",
              flush=True)
    for k, d in s.items():
        if k.startswith("distill_"):
            mfu = f", MFU {d['mfu']:.1%}" if d.get("mfu") is not None else ""
            print(f"  {k:<11}: {d['s_per_step_median_after_first']:.2f} s/step, {d['tokens_per_s']:,.0f} tokens/s{mfu}, "
                  f"peak {gb(d['peak_gb'])}, student {d['student_dtype']}", flush=True)
    if "streaming" in s:
        st = s["streaming"]
        print(f"  streaming  : {st['samples']} samples; in memory {st['in_memory']['seconds']:.1f} s / "
              f"{gb(st['in_memory']['peak_gb'])}, layer streaming {st['streaming']['seconds']:.1f} s / "
              f"{gb(st['streaming']['peak_gb'])}, max rel. score difference {st['max_relative_difference']:.2e}", flush=True)
    for k, e in results.data["errors"].items():
        print(f"  ERROR {k}: {e.splitlines()[0]}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
