#!/usr/bin/env bash
# The headline benchmark (PowerInfer §8 shapes) on one CUDA machine, in one device call of at most ~9.5 min:
#   0. environment: GPU, cores, memory, which Python packages are importable (gguf, tqdm and matplotlib are
#      optional: bench --synth needs none of them);
#   1. smoke: `bench --synth tiny` over every GPU mode (compiles the Triton and numba kernels once, checks the
#      instrumentation) at a budget that splits the tiny model between GPU and CPU;
#   2. `bench --synth llama2-7b --vram-budget 8 --modes $MODES --threads 16` (default modes hybrid,gpu,dense-gpu,offload);
#   3. if time is left: the same for llama2-13b at 12 GiB;
#   4. if time is still left and PEER=1: the 7B through transformers + accelerate (hf-accelerate) at 8 GiB.
# Every model is SYNTHETIC (random weights with a planted ReLU activation profile, built in memory on the GPU);
# say so wherever the numbers go. Each step runs under `timeout` (SIGINT first: the JSON written after each
# mode survives). Output in $OUT (at most 8 files): script.log (environment and elapsed time per phase),
# smoke.log, bench_7b.{log,json}, bench_13b.{log,json}, peer_7b.{log,json}.
#
# Device call (from the repository root):  POWERINFER_COMMIT=<local git HEAD> OUT=$OUT bash scripts/gpu_bench_synth.sh
# (the copied tree's git HEAD may be stale; bench records POWERINFER_COMMIT as the commit).
# Knobs: BUDGET_S (whole script, default 560), SMOKE_S (smoke step, default 150), GEN_TOKENS (128), REPEATS (2), THREADS (16), PEER (0),
# CPU_DTYPE (bench --cpu-dtype; int8 applies to hybrid's CPU rows, the dense baselines keep their default),
# MODES (default hybrid,gpu,dense-gpu,offload; e.g. hybrid,hybrid:int8 compares CPU row dtypes in one run),
# STEPS (which of "smoke 7b 13b peer" to run, default all). The peer needs accelerate: carry its wheel (+ psutil) in .whl/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/bench-synth}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
BUDGET_S=${BUDGET_S:-560}
GEN=${GEN_TOKENS:-128}
REPEATS=${REPEATS:-2}
THREADS=${THREADS:-16}
MODES=${MODES:-hybrid,gpu,dense-gpu,offload}
LOG="$OUT/script.log"
T0=$SECONDS

phase() { echo "== [$((SECONDS - T0)) s elapsed] $*" | tee -a "$LOG"; }
left() { echo $((BUDGET_S - (SECONDS - T0))); }
run_step() {  # name, timeout (s), command...: output to $OUT/<name>.log; a failure is reported, not fatal
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    phase "$name (timeout ${limit} s): $*"
    timeout --signal=INT --kill-after=20 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    tail -n 30 "$OUT/$name.log" | tr '\r' '\n' | grep -v '^\s*$' | tail -n 30
    phase "$name: exit $rc after $((SECONDS - start)) s"
}

if compgen -G ".whl/*.whl" >/dev/null; then  # optional packages carried as wheels (accelerate for the peer)
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -2
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
phase "environment"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    echo "cores: $(nproc)"; free -g | head -2
    python3 - <<'EOF'
import importlib
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
for name in ("triton", "numba", "scipy", "numpy", "tokenizers", "safetensors", "jinja2", "tqdm", "transformers",
             "accelerate", "gguf", "matplotlib"):
    try:
        print(f"{name} {getattr(importlib.import_module(name), '__version__', '?')}")
    except Exception as e:  # a missing optional package is reported, not fatal
        print(f"{name} MISSING ({type(e).__name__})")
EOF
} 2>&1 | tee -a "$LOG"

BENCH=(python3 -m powerinfer bench --threads "$THREADS" ${CPU_DTYPE:+--cpu-dtype "$CPU_DTYPE"})
has() { [[ " ${STEPS:-smoke 7b 13b peer} " == *" $1 "* ]]; }
has smoke && run_step smoke "${SMOKE_S:-150}" "${BENCH[@]}" --synth tiny --modes gpu,dense-gpu,offload,hybrid --vram-budget 0.008 \
    --prompt-tokens 16 --gen-tokens 16 --repeats 1 --bandwidth-mib 256

limit=$(( $(left) < 380 ? $(left) : 380 ))
has 7b && run_step bench_7b "$limit" "${BENCH[@]}" --synth llama2-7b --vram-budget 8 --modes "$MODES" \
    --gen-tokens "$GEN" --repeats "$REPEATS" --json "$OUT/bench_7b.json"

if ! has 13b; then
    phase "bench_13b not in STEPS"
elif [ "$(left)" -gt 200 ]; then
    run_step bench_13b $(( $(left) - 15 )) "${BENCH[@]}" --synth llama2-13b --vram-budget 12 \
        --modes "$MODES" --gen-tokens "$GEN" --repeats "$REPEATS" --json "$OUT/bench_13b.json"
else
    phase "bench_13b skipped: $(left) s left"
fi

if [ "${PEER:-0}" = 1 ] && has peer && [ "$(left)" -gt 150 ]; then
    run_step peer_7b $(( $(left) - 10 )) "${BENCH[@]}" --synth llama2-7b --vram-budget 8 --modes hf-accelerate \
        --gen-tokens 32 --repeats 1 --json "$OUT/peer_7b.json"
else
    phase "peer_7b skipped (PEER=${PEER:-0}, $(left) s left)"
fi
phase "done"
