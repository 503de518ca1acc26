"""The low-rank activation predictor's decision, `relu(x @ w1.T) @ w2.T + b > threshold` (PowerInfer §5.1; Deja
Vu, arXiv 2310.17157), as a mask with its logits never stored.

As every kernel here: a plain-PyTorch reference, fast kernels and dispatchers. On the CPU the numba kernel
(`cpu.LowRankMask`) pays off only over fixed weights and buffers, as a decode loop calls it, once per layer
and step: bound, 5 us for the tiny ReLU model's predictor on one thread of the 2-core VM, where the
reference's three torch calls and comparison take 9 and an unbound numba call 10 (most of it converting
arguments); that is `bind_lowrank_mask` (numba for float32 CPU weights, else the reference). On CUDA, for a
decode step's few tokens, two Triton kernels (`triton_gpu.lowrank_mask`) replace the reference's four or five
(two cuBLAS products, ReLU, comparison): `lowrank_mask`, which the predictor's `predict` calls. Where the
norm before the FFN has computed the hidden layer already (kernels.fused `add_rms_norm_relu_project`, a hybrid
decode step), `lowrank_decide` finishes the mask from it in the second kernel alone.
"""

import torch
import torch.nn.functional as F

from powerinfer.kernels.dense import GEMV_MAX_TOKENS
from powerinfer.kernels.sparse_ffn import _triton, _triton_available

try:
    from powerinfer.kernels import cpu as _cpu_kernels
except ImportError:  # numba not installed
    _cpu_kernels = None


def lowrank_mask_reference(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                           threshold: float | torch.Tensor, always_active: int = 0,
                           tail: torch.Tensor | None = None) -> torch.Tensor:
    """bool [T, n]: relu(x @ w1.T) @ w2.T + b2 > threshold, in x's dtype, or column < `always_active`; `tail`
    (one token only) also gets the mask's last len(tail) entries."""
    mask = F.linear(torch.relu(F.linear(x, w1)), w2, b2) > threshold
    if always_active:
        mask[:, :always_active] = True
    return _copy_tail(mask, tail)


def lowrank_decide_reference(hidden: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                             threshold: float | torch.Tensor, always_active: int = 0,
                             tail: torch.Tensor | None = None) -> torch.Tensor:
    """`lowrank_mask_reference` from the hidden layer relu(x @ w1.T) [T, r] (float32 holding w2's dtype's values)."""
    mask = F.linear(hidden.to(w2.dtype), w2, b2) > threshold
    if always_active:
        mask[:, :always_active] = True
    return _copy_tail(mask, tail)


def _copy_tail(mask: torch.Tensor, tail: torch.Tensor | None) -> torch.Tensor:
    """`mask`, after copying its last len(tail) entries (one token) into `tail`."""
    if tail is not None:
        tail.copy_(mask[0, mask.shape[1] - tail.numel():], non_blocking=True)
    return mask


def _check_always_active(n: int, always_active: int) -> None:
    if not 0 <= always_active <= n:
        raise ValueError(f"always_active={always_active} outside [0, {n}]")


def _check_epilogue(x: torch.Tensor, n: int, always_active: int, tail: torch.Tensor | None) -> None:
    _check_always_active(n, always_active)
    if tail is None:
        return
    if x.shape[0] != 1:
        raise ValueError(f"a mask tail is written for one token, got {x.shape[0]}")
    if tail.dtype != torch.bool or tail.dim() != 1 or not tail.is_contiguous() or tail.numel() > n:
        raise ValueError(f"tail must be a contiguous 1-D bool tensor of at most {n} entries")
    if x.is_cuda and not tail.is_cuda and not tail.is_pinned():
        raise ValueError("with x on CUDA, a host tail must be in pinned memory")


def _use_kernel(*weights: torch.Tensor) -> bool:
    return _cpu_kernels is not None and all(w.device.type == "cpu" and w.dtype == torch.float32 for w in weights)


def _use_triton(x: torch.Tensor) -> bool:
    # decode-sized inputs only: for many tokens the reference's GEMMs are the better kernels
    return (x.is_cuda and x.dim() == 2 and x.shape[0] <= GEMV_MAX_TOKENS and not torch.is_grad_enabled()
            and _triton_available())


def lowrank_mask(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                 threshold: float | torch.Tensor, *, always_active: int = 0, tail: torch.Tensor | None = None,
                 use_kernel: bool | None = None) -> torch.Tensor:
    """One unbound call: on CUDA, the Triton kernels for a few tokens of x [T, d] (threshold: a tensor on x's
    device); on the CPU the numba kernel for float32 operands only when `use_kernel` is True (tests; unbound it
    is no faster than the reference); else the reference.

    The first `always_active` columns are set whatever the predictor says (a layer's massive neurons). `tail`
    (one token): a buffer that also gets the mask's last len(tail) entries, the CPU rows' part of a hybrid
    layer; on CUDA pinned host memory the decision kernel writes in place (a copy node less per layer)."""
    _check_epilogue(x, w2.shape[0], always_active, tail)
    if use_kernel is not False and isinstance(threshold, torch.Tensor) and _use_triton(x):
        return _triton().lowrank_mask(x, w1, w2, b2, threshold, always_active=always_active, tail=tail)
    if use_kernel and _use_kernel(x, w1, w2, b2):
        mask = _cpu_kernels.LowRankMask(w1, w2, b2, float(threshold), always_active)(x.contiguous())
        return _copy_tail(mask, tail)
    if use_kernel:
        raise RuntimeError(f"no fast low-rank mask kernel for {x.device.type} {x.dtype} inputs")
    return lowrank_mask_reference(x, w1, w2, b2, threshold, always_active, tail)


def lowrank_decide(hidden: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, threshold: float | torch.Tensor, *,
                   always_active: int = 0, tail: torch.Tensor | None = None) -> torch.Tensor:
    """`lowrank_mask` from its hidden layer [T, r] (float32, as `add_rms_norm_relu_project` returns it): on CUDA
    the decision kernel alone for a few tokens (threshold a tensor on hidden's device), else the reference."""
    if hidden.dim() != 2 or hidden.shape[1] != w2.shape[1] or hidden.dtype != torch.float32:
        raise ValueError(f"hidden must be float32 [T, {w2.shape[1]}], got {hidden.dtype} {tuple(hidden.shape)}")
    _check_epilogue(hidden, w2.shape[0], always_active, tail)
    if isinstance(threshold, torch.Tensor) and _use_triton(hidden):
        return _triton().lowrank_decide(hidden, w2, b2, threshold, always_active=always_active, tail=tail)
    return lowrank_decide_reference(hidden, w2, b2, threshold, always_active, tail)


class _ReferenceLowRankMask:
    def __init__(self, w1, w2, b2, threshold, always_active):
        self._operands = (w1, w2, b2, threshold, always_active)

    def __call__(self, x, out=None):
        mask = lowrank_mask_reference(x, *self._operands)
        return mask if out is None else out.copy_(mask)

    def bind(self, x, mask):
        return lambda: self(x, mask)


def bind_lowrank_mask(w1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, threshold: float | torch.Tensor,
                      always_active: int = 0):
    """`lowrank_mask` with its weights (and `always_active`) fixed: a callable (x, out=None) -> mask, and
    `bind(x, mask)` -> a call without arguments that fills `mask` from what `x` holds then (x float32 [T, d],
    mask bool [T, n])."""
    _check_always_active(w2.shape[0], always_active)
    if _use_kernel(w1, w2, b2):
        return _cpu_kernels.LowRankMask(w1, w2, b2, float(threshold), always_active)
    return _ReferenceLowRankMask(w1, w2, b2, threshold, always_active)


__all__ = ["lowrank_mask", "lowrank_mask_reference", "lowrank_decide", "lowrank_decide_reference",
           "bind_lowrank_mask"]
