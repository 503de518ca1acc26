#!/usr/bin/env bash
# ReLU-fy SmolLM2-135M-Instruct on one CUDA GPU and measure it, in one call:
#   1. perplexity and FFN sparsity of the original (SiLU) model on WikiText-2 test;
#   2. `relufy`: activation swap + distillation from the original, for RELUFY_MINUTES of training;
#   3. the same measurements of the ReLU-fied model;
#   4. `powerinfer build`, `eval` and `bench` on it, where those subcommands exist.
# Results: $OUT/relufy_results.json (summary: sparsity_test, ppl_original, ppl_relufied, ppl_ratio,
# tokens_trained, minutes_trained, neuron_share_for_80pct_activations), $OUT/relufy-log.jsonl (training
# log) and one log per later step.
#
# Needs: SMOLLM2_GGUF (the GGUF file), DATA_DIR (holding wikitext2-valid.txt and wikitext2-test.txt), the
# `gguf` package importable (e.g. on PYTHONPATH). Optional: OUT (default runs/relufy-smollm2), WORK (where
# the model is written; default /tmp/relufy-smollm2), RELUFY_MINUTES (default 6.5: the relufy part then
# takes about 7 minutes in all), RELUFY_ACTIVATION (relu|drelu; default relu), RELUFY_L1 (default 3),
# RELUFY_LR (5e-4), RELUFY_BATCH (32 sequences of 512 tokens), RELUFY_SAMPLE_SHARE (0.5), RELUFY_THRESHOLD
# (FATReLU gate threshold, default 0),
# VRAM_BUDGET_GIB (for `build`, default 0.2: less than the model, so part of the FFN is placed on the CPU),
# STEP_TIMEOUT (seconds allowed to each of build, eval and bench; default 600), PROFILE_TOKENS (calibration
# tokens profiled; default 65536), SAMPLE_TOKENS (of those, the tokens whose FFN inputs train the predictors;
# default 8192, as in the measured int4-gate run; with 65536 the low-rank predictors alone took ~14 s per layer
# on an H100), RECALL (the predictors' recall floor for `build`; default 0.9), STEPS (default "relufy build eval
# bench"; a later call can run "build eval bench" on the model an earlier call left in WORK). If SMOLLM2_GGUF is missing
# but SMOLLM2_GGUF.part-* pieces exist, they are joined first.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${SMOLLM2_GGUF:?set SMOLLM2_GGUF to the SmolLM2-135M-Instruct GGUF file}"
if [ ! -f "$SMOLLM2_GGUF" ] && compgen -G "$SMOLLM2_GGUF.part-*" >/dev/null; then
    cat "$SMOLLM2_GGUF".part-* >"$SMOLLM2_GGUF"  # carried in pieces: a call carries at most 64 MiB
fi
: "${DATA_DIR:?set DATA_DIR to the folder holding wikitext2-valid.txt and wikitext2-test.txt}"
OUT=${OUT:-runs/relufy-smollm2}
WORK=${WORK:-/tmp/relufy-smollm2}
ACTIVATION=${RELUFY_ACTIVATION:-relu}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt" || true
python3 -c "import gguf, torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

STEPS=" ${STEPS:-relufy build eval bench} "  # a 10-minute device call fits relufy alone, then the rest
if [[ $STEPS == *" relufy "* ]]; then
python3 scripts/relufy_smollm2.py --model "$SMOLLM2_GGUF" --data-dir "$DATA_DIR" --work "$WORK" --out "$OUT" \
    --minutes "${RELUFY_MINUTES:-6.5}" --activation "$ACTIVATION" --l1 "${RELUFY_L1:-3}" \
    --lr "${RELUFY_LR:-5e-4}" --batch-size "${RELUFY_BATCH:-32}" --sample-share "${RELUFY_SAMPLE_SHARE:-0.5}" \
    --threshold "${RELUFY_THRESHOLD:-0}" \
    2>&1 | tee "$OUT/relufy.log"
fi
MODEL_DIR="$WORK/smollm2-$ACTIVATION"
[ -f "$MODEL_DIR/config.json" ] || { echo "relufy did not produce $MODEL_DIR" >&2; exit 1; }

# The registered subcommands (read from the CLI's table: importing every command module is not needed).
commands=" $(python3 -c 'from powerinfer.cli import SUBCOMMANDS; print(*SUBCOMMANDS)') "
has() { [[ $commands == *" $1 "* && $STEPS == *" $1 "* ]]; }
run_step() {  # name, then the command; stdout goes to $OUT/<name>.out, stderr to <name>.log; a failure is reported
    local name=$1; shift
    echo "== $name: $*"
    if timeout "${STEP_TIMEOUT:-600}" "$@" >"$OUT/$name.out" 2>"$OUT/$name.log"; then tail -n 60 "$OUT/$name.out"; else
        echo "$name failed (exit $?); see $OUT/$name.log"; tail -n 5 "$OUT/$name.log"; fi
}
if has build; then
    run_step build python3 -m powerinfer build --model "$MODEL_DIR" --data "$DATA_DIR/wikitext2-valid.txt" \
        --vram-budget "${VRAM_BUDGET_GIB:-0.2}" -o "$WORK/artifact" --force --device cuda \
        --tokens "${PROFILE_TOKENS:-65536}" --sample-tokens "${SAMPLE_TOKENS:-8192}" --recall "${RECALL:-0.9}"
else echo "powerinfer build does not exist yet: skipped"; fi
if has eval; then
    target="$MODEL_DIR"; [ -d "$WORK/artifact" ] && target="$WORK/artifact"
    run_step eval python3 -m powerinfer eval --model "$target" --data "$DATA_DIR/wikitext2-test.txt" --json \
        --device cuda
else echo "powerinfer eval does not exist yet: skipped"; fi
if has bench; then
    target="$MODEL_DIR"; [ -d "$WORK/artifact" ] && target="$WORK/artifact"
    run_step bench python3 -m powerinfer bench --model "$target" --json "$OUT/bench.json" --threads 16 \
        --vram-budget "${VRAM_BUDGET_GIB:-0.2}" --modes hybrid,gpu,dense-gpu,cpu,dense-cpu
else echo "powerinfer bench does not exist yet: skipped"; fi
