"""Triton kernels for ``fused.py``: residual add + RMSNorm, the rotary embedding of q and k, and a stream's
wait for a flag the host sets.

Pinned host tensors (a delta, the norm's float32 copy, the flag) are read and written in place through their
device-mapped addresses; host deltas are read with volatile loads, past any cached copy, since the host may
have written them after the kernel was queued (``wait_for_host_flag``). One program per row (token) for the
norm, one per (token, head) for the rotation; every launch shape depends on the tensor shapes alone, so
both run inside the CUDA graphs of a decode step. Arithmetic is
float32 and rounds where the references round: the sum to x's dtype before it is normed, the normed row to
x's dtype before the weight multiplies it.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(x_ptr, delta1_ptr, delta2_ptr, weight_ptr, sum_ptr, normed_ptr, copy_ptr, width, eps,
                         N_DELTAS: tl.constexpr, COPY: tl.constexpr, BLOCK: tl.constexpr,
                         VOLATILE1: tl.constexpr, VOLATILE2: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < width
    offsets = row * width + cols
    x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    if N_DELTAS > 0:
        delta = tl.load(delta1_ptr + offsets, mask=inside, other=0.0, volatile=VOLATILE1)
        delta = delta.to(x_ptr.dtype.element_ty).to(tl.float32)
        if N_DELTAS > 1:
            more = tl.load(delta2_ptr + offsets, mask=inside, other=0.0, volatile=VOLATILE2).to(x_ptr.dtype.element_ty)
            delta = (delta + more.to(tl.float32)).to(x_ptr.dtype.element_ty).to(tl.float32)
        x = (x + delta).to(x_ptr.dtype.element_ty)
        tl.store(sum_ptr + offsets, x, mask=inside)
        x = x.to(tl.float32)
    inverse_rms = tl.rsqrt(tl.sum(x * x, axis=0) / width + eps)
    normed = (x * inverse_rms).to(x_ptr.dtype.element_ty).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    normed = (weight * normed).to(normed_ptr.dtype.element_ty)
    tl.store(normed_ptr + offsets, normed, mask=inside)
    if COPY:
        tl.store(copy_ptr + offsets, normed.to(tl.float32), mask=inside)


def add_rms_norm(x: torch.Tensor, deltas: tuple[torch.Tensor, ...], weight: torch.Tensor, eps: float,
                 copy_to: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    width = x.shape[-1]
    x = x.contiguous()
    deltas = tuple(d.contiguous() for d in deltas)
    total = torch.empty_like(x) if deltas else x
    normed = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rows = x.numel() // width
    if rows:
        block = triton.next_power_of_2(width)
        _add_rms_norm_kernel[(rows,)](
            x, deltas[0] if deltas else x, deltas[1] if len(deltas) > 1 else x, weight, total, normed,
            normed if copy_to is None else copy_to, width, eps,
            N_DELTAS=len(deltas), COPY=copy_to is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)),
            VOLATILE1=bool(deltas) and not deltas[0].is_cuda, VOLATILE2=len(deltas) > 1 and not deltas[1].is_cuda)
    return total, normed


@triton.jit
def _rotary_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, seq, n_heads, n_kv_heads,
                   HALF: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0)  # batch * seq + position in the chunk
    head = tl.program_id(1)  # q heads, then k heads
    batch, t = token // seq, token % seq
    i = tl.arange(0, BLOCK)
    inside = i < HALF
    width = (n_heads + 2 * n_kv_heads) * 2 * HALF
    source = qkv_ptr + token * width + head * 2 * HALF
    x1 = tl.load(source + i, mask=inside, other=0.0).to(tl.float32)
    x2 = tl.load(source + HALF + i, mask=inside, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + t * HALF + i, mask=inside, other=0.0)
    sin = tl.load(sin_ptr + t * HALF + i, mask=inside, other=0.0)
    if head < n_heads:
        target = q_ptr + ((batch * n_heads + head) * seq + t) * 2 * HALF
    else:
        target = k_ptr + ((batch * n_kv_heads + head - n_heads) * seq + t) * 2 * HALF
    tl.store(target + i, (x1 * cos - x2 * sin).to(q_ptr.dtype.element_ty), mask=inside)
    tl.store(target + HALF + i, (x2 * cos + x1 * sin).to(q_ptr.dtype.element_ty), mask=inside)


def rotary_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv_heads: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, seq, width = qkv.shape
    head_dim = width // (n_heads + 2 * n_kv_heads)
    qkv = qkv.contiguous()
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    q = torch.empty((batch, n_heads, seq, head_dim), dtype=qkv.dtype, device=qkv.device)
    k = torch.empty((batch, n_kv_heads, seq, head_dim), dtype=qkv.dtype, device=qkv.device)
    if batch * seq:
        half = head_dim // 2
        _rotary_kernel[(batch * seq, n_heads + n_kv_heads)](
            qkv, cos, sin, q, k, seq, n_heads, n_kv_heads, HALF=half, BLOCK=triton.next_power_of_2(half),
            num_warps=1)
    v = qkv[..., (n_heads + n_kv_heads) * head_dim:].view(batch, seq, n_kv_heads, head_dim).transpose(1, 2)
    return q, k, v


@triton.jit
def _wait_for_host_flag_kernel(flag_ptr):
    # .cv: a cached copy of a host-memory line is stale, fetch it again
    ready = tl.load(flag_ptr, volatile=True, cache_modifier=".cv")
    while ready == 0:
        ready = tl.load(flag_ptr, volatile=True, cache_modifier=".cv")
    tl.store(flag_ptr, 0)  # re-armed for the next wait


def wait_for_host_flag(flag: torch.Tensor) -> None:
    _wait_for_host_flag_kernel[(1,)](flag, num_warps=1)
