"""4-bit GEMV with group-wise scales: the product of the quantized-gate activation predictor.

A ReLU-family neuron is active exactly where its gate pre-activation exceeds the threshold, so a
low-precision copy of the gate matrix predicts the active set up to its rounding error. SparseInfer (Shin
et al. 2024, arXiv 2411.12692) compares sign bits alone; four bits with one scale per `group` weights keep
the pre-activation itself, so a calibrated threshold on it recalls nearly every active neuron while
reading ~9% of the FFN's 16-bit bytes (`models.predictor.QuantizedGatePredictor`).

Format (row = neuron, [n, d] weights, d a multiple of `group`, `group` even):

    q[n, j]      = clamp(round(w[n, j] / scales[n, j // group]), -8, 7)
    scales[n, g] = max |w[n, g*group:(g+1)*group]| / 7
    packed[n, i] = (q[n, 2i] + 8) | (q[n, 2i + 1] + 8) << 4      (uint8, [n, d / 2])

Adjacent columns share a byte, so a byte never straddles two groups. As every kernel here: a plain-PyTorch
reference, fast kernels (numba `cpu.int4_gemv`, Triton `triton_gpu.int4_gemv`) and a dispatcher.
"""

import torch

from powerinfer.kernels import sparse_ffn

try:
    from powerinfer.kernels import cpu as _cpu_kernels
except ImportError:  # numba not installed
    _cpu_kernels = None

# Up to this many tokens the CPU kernel (bandwidth-bound) runs; more go to a dequantize + matmul.
CPU_KERNEL_MAX_TOKENS = 4


def quantize_int4(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [n, d / 2], scales float32 [n, d / group]) of a [n, d] matrix (module docstring)."""
    n, d = weight.shape
    if group < 2 or group % 2 or d % group:
        raise ValueError(f"group {group} must be even and divide d = {d}")
    groups = weight.detach().float().reshape(n, d // group, group)
    scales = groups.abs().amax(-1) / 7
    q = torch.where(scales[..., None] > 0, groups / scales[..., None].clamp_min(1e-30), 0.0)
    q = q.round().clamp(-8, 7).to(torch.int16).reshape(n, d) + 8
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)
    return packed.contiguous(), scales.contiguous()


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 [n, d] matrix that `packed` and `scales` encode."""
    n, half = packed.shape
    values = torch.stack([(packed & 15).float(), (packed >> 4).float()], dim=-1).reshape(n, 2 * half) - 8
    group = 2 * half // scales.shape[1]
    return (values.reshape(n, scales.shape[1], group) * scales.float()[..., None]).reshape(n, 2 * half)


def _check(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> None:
    if packed.dtype != torch.uint8 or packed.dim() != 2 or scales.dim() != 2 or scales.shape[0] != packed.shape[0]:
        raise ValueError("packed must be uint8 [n, d / 2] with scales [n, d / group]")
    d = 2 * packed.shape[1]
    if x.dim() != 2 or x.shape[1] != d:
        raise ValueError(f"expected a [T, {d}] input, got shape {tuple(x.shape)}")
    if d % scales.shape[1] or (d // scales.shape[1]) % 2:
        raise ValueError(f"{scales.shape[1]} scale groups do not split d = {d} into even groups")


def int4_gemv_reference(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [T, d] @ dequantize(packed, scales).T -> [T, n] in x's dtype (float32 accumulation)."""
    _check(x, packed, scales)
    return (x.float() @ dequantize_int4(packed, scales).to(x.device).T).to(x.dtype)


def int4_gemv(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, *, use_kernel: bool | None = None
              ) -> torch.Tensor:
    """Dispatcher: Triton on CUDA, numba for few float32 tokens on the CPU, else the reference."""
    _check(x, packed, scales)
    if use_kernel is not False and x.is_cuda and sparse_ffn._triton_available():
        return sparse_ffn._triton().int4_gemv(x, packed, scales)
    if (use_kernel is not False and _cpu_kernels is not None and x.device.type == "cpu"
            and x.dtype == torch.float32 and scales.dtype == torch.float32
            and x.shape[0] <= CPU_KERNEL_MAX_TOKENS):
        return _cpu_kernels.int4_gemv(x, packed, scales)
    if use_kernel:
        raise RuntimeError(f"no fast int4 GEMV for {x.device.type} {x.dtype} inputs of {x.shape[0]} tokens")
    return int4_gemv_reference(x, packed, scales)


__all__ = ["quantize_int4", "dequantize_int4", "int4_gemv", "int4_gemv_reference"]
