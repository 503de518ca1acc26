"""Dense matrix-vector products for decoding: a reference, fast kernels (numba on the CPU, Triton on CUDA) and a
dispatcher.

At batch 1 a decode step is a chain of GEMVs that read every weight once, so its speed is the memory
bandwidth the GEMV reaches. torch's CPU `x @ W.T` with one row of x measured ~12 GB/s on the project's
2-core VM, where a plain read (`W.sum()`) reaches ~33 GB/s and a row-parallel numba dot (the sparse
gate/up kernel with every row active) ~31 GB/s; so few-token float32 products on the CPU go to numba.
Prefill (many tokens) stays with torch's GEMM, which is compute-bound there and well tuned.
On CUDA one float16 / bfloat16 token goes to a Triton GEMV (kernels/triton_gpu.py): on LLaMA-2's attention and
LM-head shapes cuBLAS read its weights at 67-91% of an H100's copy bandwidth (a copy also writes), the kernel at
81-102% (benchmarks/results/dense_gemv_h100.json).
"""

import torch
import torch.nn.functional as F

from powerinfer.kernels.sparse_ffn import _cpu_kernels, _triton, _triton_available

# Up to this many tokens the product is bandwidth-bound (every weight row read once, used T times).
GEMV_MAX_TOKENS = 4


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear; bfloat16 weights with float32 inputs are widened to float32 (as the kernel does)."""
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    return F.linear(x, weight, bias)


def use_gemv_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    rows = x.numel() // x.shape[-1] if x.numel() else 0
    return (_cpu_kernels is not None and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype in (torch.float32, torch.bfloat16) and 0 < rows <= GEMV_MAX_TOKENS
            and (weight.is_contiguous() or _cpu_kernels.row_stride(weight) is not None)  # or a bundle's slice
            and not torch.is_grad_enabled())


def use_gpu_gemv_kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    return (x.is_cuda and x.numel() == x.shape[-1] > 0 and x.dtype in (torch.float16, torch.bfloat16)
            and weight.dtype == x.dtype and weight.device == x.device and weight.stride(-1) == 1
            and (bias is None or (bias.dtype == x.dtype and bias.device == x.device)) and not torch.is_grad_enabled()
            and _triton_available())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with a GEMV kernel outside autograd for few-token float32 CPU inputs (float32 or bfloat16 weights,
    numba) and for one float16 / bfloat16 CUDA token (Triton)."""
    if use_gpu_gemv_kernel(x, weight, bias):
        return _triton().dense_gemv(x.reshape(-1), weight, bias).view(*x.shape[:-1], weight.shape[0])
    if not use_gemv_kernel(x, weight):
        return linear_reference(x, weight, bias)
    y = _cpu_kernels.dense_gemv(x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[0])
    return y + bias if bias is not None else y
