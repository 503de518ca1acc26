"""Neuron-aware sparse FFN operators (PowerInfer, arXiv 2312.12456, §5).

The public entry points are the dispatchers in ``sparse_ffn``; ``cpu`` (numba) and
``triton_gpu`` (Triton, imported on first use with CUDA tensors) hold the fast kernels.
"""

from powerinfer.kernels.dense import linear, linear_reference
from powerinfer.kernels.sparse_ffn import (
    ACTIVATIONS,
    compact_active,
    compact_active_reference,
    masked_ffn,
    masked_ffn_reference,
    select_backend,
    set_num_threads,
    should_use_dense,
    sparse_down,
    sparse_down_reference,
    sparse_gate_up,
    sparse_gate_up_reference,
)

__all__ = [
    "ACTIVATIONS",
    "compact_active",
    "compact_active_reference",
    "linear",
    "linear_reference",
    "masked_ffn",
    "masked_ffn_reference",
    "select_backend",
    "set_num_threads",
    "should_use_dense",
    "sparse_down",
    "sparse_down_reference",
    "sparse_gate_up",
    "sparse_gate_up_reference",
]
