"""Neuron-aware sparse FFN operators (PowerInfer, arXiv 2312.12456, §5) and the CPU decode GEMV.

The public entry points are the dispatchers in ``sparse_ffn`` and ``dense``; ``cpu`` (numba) and
``triton_gpu`` (Triton, imported on first use with CUDA tensors) hold the fast kernels.
"""

from powerinfer.kernels import sparse_ffn
from powerinfer.kernels.dense import linear, linear_reference
from powerinfer.kernels.sparse_ffn import *  # noqa: F403  (its __all__ is the public list)

__all__ = ["linear", "linear_reference", *sparse_ffn.__all__]
