#!/usr/bin/env bash
# One-shot GPU benchmark at Llama-3.1-8B scale (random weights, bf16), steps in benchmarks/gpu_llama8b.py:
#   0. KD loss at V = 128,256: ours vs TRL's ChunkedDivergenceFunction (Triton) vs a naive full-logits KL
#   1-2. build the 8B; importance over 1,024 x 4,096 tokens (target <= 120 s)
#   3-4. prune to the 4.5B width student; KD steps with fp32 master weights (tokens/s, peak memory, MFU)
#   5. layer-streaming importance vs the in-memory pass on the same model and samples
# Fully offline. Writes $OUT/gpu_llama8b.json (after every step) and $OUT/log.txt (OUT defaults to runs/gpu).
#
#   bash benchmarks/gpu.sh                 # the H200 run (hard limit 330 s for the python part, so that one
#                                          # rerun fits a 15-minute device lease)
#   bash benchmarks/gpu.sh --tiny          # CPU smoke test of the same code (< 2 min)
#   bash benchmarks/gpu.sh --batch_size 16 --hidden_state_loss none,cosine   # extra args go to gpu_llama8b.py
#   bash benchmarks/gpu.sh --skip_kd_bench --skip_streaming                  # a rerun of steps 1-4 only
#
# Environment: OUT (output folder), PY_TIMEOUT_S (hard limit of the python run, default 330 s;
# the script's own budget, --budget_s, is 300 s; every step has its own time limit inside it (kd_loss 45 s,
# build 90 s, importance 140 s, prune 60 s, distill 60 s per variant, streaming 60 s); the set-up commands before
# it have their own `timeout`s too.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu}"
export OUT
mkdir -p "$OUT"
LOG="$OUT/log.txt"
: > "$LOG"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"

{
  echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), $(nproc) CPUs, repo $(pwd), git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo "== args: $*"
  if command -v nvidia-smi >/dev/null 2>&1; then
    timeout 30 nvidia-smi || echo "nvidia-smi failed (rc $?)"
  else
    echo "nvidia-smi: not found (no NVIDIA driver here; skipping)"
  fi
  timeout 60 python - <<'EOF'
import importlib.metadata as md, sys
print("python", sys.version.split()[0])
for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers", "safetensors", "hf-minitron"):
    try:
        print(f"  {name:<13} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name:<13} not installed")
EOF
  if ! timeout 120 python -c "import hf_minitron" >/dev/null 2>&1; then
    echo "== hf_minitron not importable: pip install -e . --no-deps (offline)"
    timeout 180 pip install --no-deps --no-index --no-build-isolation -e . 2>&1 | tail -n 3
    if ! timeout 120 python -c "import hf_minitron" >/dev/null 2>&1; then
      echo "== editable install failed: using PYTHONPATH=$(pwd)"
    fi
  fi
} 2>&1 | tee -a "$LOG"
# Harmless when the install worked; makes the repo importable when it did not.
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"

timeout -k 10 "${PY_TIMEOUT_S:-330}" python -u benchmarks/gpu_llama8b.py --out "$OUT" "$@" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
  echo "== TIMED OUT (rc $rc): partial results in $OUT/gpu_llama8b.json" | tee -a "$LOG"
fi
echo "== exit code $rc; results: $OUT/gpu_llama8b.json, log: $LOG" | tee -a "$LOG"
exit "$rc"
