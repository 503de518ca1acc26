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

# torch and numba each bring an OpenMP runtime; spinning idle threads of one steal the cores of the other
# when dense torch ops and sparse numba kernels alternate (measured 3-10x slowdowns on 2 cores).
if "torch" in sys.modules and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
    # too late: the OpenMP runtime read its settings when torch was imported (measured: CPU kernels 50x slower)
    warnings.warn("torch was imported before powerinfer: CPU sparse kernels may run many times slower; import "
                  "powerinfer first or set OMP_WAIT_POLICY=PASSIVE in the environment", stacklevel=2)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from powerinfer.api import load  # noqa: E402
from powerinfer.errors import PowerInferError  # noqa: E402
from powerinfer.loading import load_model  # noqa: E402
from powerinfer.runtime import Generator, SamplingParams  # noqa: E402

__version__ = "0.1.0"


__all__ = ["load", "load_model", "Generator", "SamplingParams", "PowerInferError", "__version__"]
