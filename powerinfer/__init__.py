"""powerinfer: fast local LLM inference that exploits activation sparsity (PowerInfer, arXiv 2312.12456).

    import powerinfer
    llm = powerinfer.load()                      # the embedded SmolLM2-135M-Instruct
    print(llm.generate("The capital of France is", max_tokens=16).text)
    for chunk in llm.stream("Tell me a story"):  # streaming
        print(chunk.text, end="", flush=True)
"""

import os
import sys
import warnings

# torch and numba each bring an OpenMP runtime (libgomp), configured from the environment when first loaded.
# Idle threads that spin without bound steal the cores of the other runtime when their parallel regions
# alternate; threads that sleep at once must be woken for every kernel (a hybrid step runs one per layer).
# A bounded spin sits between. Measured: synthetic 7B hybrid decode on a 16-core H100 host 28.4 ms/token
# with OMP_WAIT_POLICY=PASSIVE, 22.3 with GOMP_SPINCOUNT=100000; tiny ReLU model on a 2-core VM, cpu mode
# 446-452 vs 565-568 tok/s. A user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT is left alone.
_OPENMP_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
if not any(os.environ.get(name) for name in _OPENMP_SETTINGS):
    if "torch" in sys.modules:  # too late: the OpenMP runtime read its settings when torch was imported
        warnings.warn("torch was imported before powerinfer: its CPU kernels may run slower; import powerinfer "
                      "first or set GOMP_SPINCOUNT=100000 in the environment", stacklevel=2)
    os.environ["GOMP_SPINCOUNT"] = "100000"

# cuBLAS and cuBLASLt each keep a workspace per stream, cut from PyTorch's caching allocator: 32 MiB each on
# Hopper by default. A CUDA-graph decode runs matmuls on three streams (default, warm-up, capture), so on an
# H100 ~128 MiB of GPU memory went to workspaces (synthetic tiny model at a 0.05 GiB budget: peak reserved
# 140 MiB); at 4 MiB each, every stream's workspaces still took a 20 MiB allocator segment (peak 88 MiB).
# Decode GEMVs need no workspace: 1 MiB each fits the allocator's 2 MiB small-block segments, which is what
# placements budget (offline.placement.cublas_workspace_bytes). Read when cuBLAS starts; a user's own
# setting is kept (and budgeted).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":1024:1")
os.environ.setdefault("CUBLASLT_WORKSPACE_SIZE", "1024")  # KiB

from powerinfer.api import load  # noqa: E402
from powerinfer.errors import PowerInferError  # noqa: E402
from powerinfer.loading import load_model  # noqa: E402
from powerinfer.runtime import Generator, SamplingParams  # noqa: E402

__version__ = "0.1.0"


__all__ = ["load", "load_model", "Generator", "SamplingParams", "PowerInferError", "__version__"]
