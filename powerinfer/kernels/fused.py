"""The small elementwise steps of a decoder layer, fused: RMSNorm (with the residual add before it) and the
rotary embedding of q and k (with the KV-cache write), a decode token's whole attention (numba on the CPU,
flash-decoding on CUDA); and the GPU's wait for the CPU's part of a hybrid layer. Plain-PyTorch references,
Triton kernels (``triton_fused.py``) and dispatchers.

At batch 1 these steps move a few KB each, but written as PyTorch ops they are ~30 kernels per layer
(RMSNorm alone: cast, square, mean, add, rsqrt, two multiplies, cast), each a launch of a few microseconds
even inside a CUDA graph: on an H100 they were about half of the ~128 us the GPU spent per layer on
attention in a synthetic-7B hybrid step, whose weights take ~45 us to stream. Fused, they are three
kernels. On the CPU the same holds in a smaller way (the norms and rotations of SmolLM2's decode step took ~14%
of it as separate torch ops on the 2-core VM): the rotation is a numba kernel (``cpu.py``), the norm torch's
own fused `rms_norm`, which beat a numba kernel there at every token count (benchmarks/bench_cpu_step_ops.py:
add + norm at d=576, one token 18 vs 25-50 us, 512 tokens 1.1 vs 1.8 ms). The references are the model's
definitions (RMSNorm: Zhang & Sennrich 2019; rotary embedding in the rotate-half layout of Hugging
Face `transformers`) and what runs under autograd.
"""

import torch
import torch.nn.functional as F

from powerinfer.kernels.sparse_ffn import _cpu_kernels, _triton_available


def _triton():
    from powerinfer.kernels import triton_fused  # imports triton: only once a CUDA tensor comes

    return triton_fused


def _use_triton(x: torch.Tensor) -> bool:
    # no backward in the kernels: training (relufy, predictors) keeps the reference
    return x.is_cuda and not torch.is_grad_enabled() and _triton_available()


def _use_cpu_kernel(*tensors: torch.Tensor) -> bool:
    """Float32 CPU tensors outside autograd: the fast CPU path (torch's fused norm, the numba rotation)."""
    return not torch.is_grad_enabled() and all(t.is_cpu and t.dtype == torch.float32 for t in tensors)


def _use_numba(*tensors: torch.Tensor) -> bool:
    return _cpu_kernels is not None and _use_cpu_kernel(*tensors)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def add_rms_norm_reference(x: torch.Tensor, deltas: tuple[torch.Tensor, ...], weight: torch.Tensor, eps: float,
                           copy_to: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if deltas:
        delta = deltas[0].to(x.device, x.dtype).reshape_as(x)
        for more in deltas[1:]:
            delta = delta + more.to(x.device, x.dtype).reshape_as(x)
        x = x + delta
    normed = rms_norm_reference(x, weight, eps)
    if copy_to is not None:
        copy_to.copy_(normed.view(copy_to.shape))
    return x, normed


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / rms(x) over the last dimension, computed in float32 (one kernel on CUDA and CPU)."""
    if _use_triton(x):
        return _triton().add_rms_norm(x, (), weight, eps)[1]
    if _use_cpu_kernel(x, weight):
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return rms_norm_reference(x, weight, eps)


def add_rms_norm(x: torch.Tensor, deltas: tuple[torch.Tensor, ...], weight: torch.Tensor, eps: float,
                 copy_to: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + the deltas, its RMSNorm): a residual add and the next norm, in one kernel on CUDA.

    At most two deltas, of x's numel and any float dtype. `copy_to`: a float32 buffer that also gets the
    normed rows. With x on CUDA, a delta or `copy_to` may be in pinned host memory: the kernel then reads or
    writes it across PCIe itself (zero-copy), which inside a CUDA graph costs less than a copy node (a hybrid
    step's CPU output comes in, and its FFN input goes out, this way)."""
    _check_add_rms_norm(x, deltas, copy_to)
    if _use_triton(x):
        return _triton().add_rms_norm(x, deltas, weight, eps, copy_to)[:2]
    if copy_to is None and _use_cpu_kernel(x, weight, *deltas):
        for delta in deltas:
            x = x + (delta if delta.shape == x.shape else delta.reshape(x.shape))
        return x, F.rms_norm(x, (x.shape[-1],), weight, eps)
    return add_rms_norm_reference(x, deltas, weight, eps, copy_to)


def _check_add_rms_norm(x, deltas, copy_to) -> None:
    if len(deltas) > 2:
        raise ValueError("add_rms_norm takes at most two deltas")
    for t in (*deltas, *(() if copy_to is None else (copy_to,))):
        if t.numel() != x.numel():
            raise ValueError(f"a tensor of {t.numel()} elements does not match x {tuple(x.shape)}")
        if x.is_cuda and not t.is_cuda and not t.is_pinned():
            raise ValueError("with x on CUDA, host tensors must be in pinned memory")
    if copy_to is not None and (copy_to.dtype != torch.float32 or not copy_to.is_contiguous()):
        raise ValueError("copy_to must be a contiguous float32 tensor")


def add_rms_norm_relu_project_reference(x: torch.Tensor, deltas: tuple[torch.Tensor, ...], weight: torch.Tensor,
                                        eps: float, project: torch.Tensor, copy_to: torch.Tensor | None = None
                                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, normed = add_rms_norm_reference(x, deltas, weight, eps, copy_to)
    return x, normed, torch.relu(F.linear(normed.reshape(-1, normed.shape[-1]), project)).float()


def add_rms_norm_relu_project(x: torch.Tensor, deltas: tuple[torch.Tensor, ...], weight: torch.Tensor, eps: float,
                              project: torch.Tensor, copy_to: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`add_rms_norm`, and relu(normed @ project.T) as float32 [rows, r] holding values of normed's dtype: the
    hidden layer of the low-rank predictor that reads the normed rows (kernels.lowrank `lowrank_decide` finishes
    it). On CUDA the norm's own kernel computes it from the rows it holds, a kernel less on a hybrid layer's
    critical path (its predictor's first GEMV of ~3 us, H100)."""
    _check_add_rms_norm(x, deltas, copy_to)
    normed_dtype = torch.promote_types(x.dtype, weight.dtype)
    if project.dim() != 2 or project.shape[1] != x.shape[-1] or project.dtype != normed_dtype:
        raise ValueError(f"project must be [r, {x.shape[-1]}] of the normed rows' dtype {normed_dtype}")
    if _use_triton(x) and project.device == x.device:
        return _triton().add_rms_norm(x, deltas, weight, eps, copy_to, project)
    return add_rms_norm_relu_project_reference(x, deltas, weight, eps, project, copy_to)


def rotary_qkv_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv_heads: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, seq, width = qkv.shape
    head_dim = width // (n_heads + 2 * n_kv_heads)
    q, k, v = qkv.split([n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim], dim=-1)
    q = _rotate(q.view(batch, seq, n_heads, head_dim).transpose(1, 2), cos, sin)
    k = _rotate(k.view(batch, seq, n_kv_heads, head_dim).transpose(1, 2), cos, sin)
    return q, k, v.view(batch, seq, n_kv_heads, head_dim).transpose(1, 2)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, T, D]; cos/sin: [T, D/2]. Rotate-half layout: pairs are (i, i + D/2).
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def _head_dim(width: int, n_heads: int, n_kv_heads: int) -> int:
    """The head dimension of a fused q/k/v projection `width` wide; a width that cannot be one is an error."""
    if width % (n_heads + 2 * n_kv_heads) or (width // (n_heads + 2 * n_kv_heads)) % 2:
        raise ValueError(f"qkv width {width} is not (heads + 2 kv_heads) x an even head_dim")
    return width // (n_heads + 2 * n_kv_heads)


def rotary_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv_heads: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B, H, T, D] and k [B, KV, T, D] rotated, v [B, KV, T, D] (a view), from the fused projection
    qkv [B, T, (H + 2 KV) D]; cos/sin: float32 [T, D/2]. One kernel for q and k on CUDA."""
    _head_dim(qkv.shape[-1], n_heads, n_kv_heads)
    if _use_triton(qkv):
        return _triton().rotary_qkv(qkv, cos, sin, n_heads, n_kv_heads)
    if _use_numba(qkv, cos, sin):
        return _cpu_kernels.rotary_qkv(qkv, cos, sin, n_heads, n_kv_heads)
    return rotary_qkv_reference(qkv, cos, sin, n_heads, n_kv_heads)


def rotary_qkv_to_cache_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int,
                                  n_kv_heads: int, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor
                                  ) -> torch.Tensor:
    if not slots.is_cuda and len(slots) and (int(slots.min()) < 0 or int(slots.max()) >= keys.shape[2]):
        raise IndexError(f"cache slots must lie in [0, {keys.shape[2]})")  # before index_copy_ writes some
    q, k, v = rotary_qkv_reference(qkv, cos, sin, n_heads, n_kv_heads)
    keys.index_copy_(2, slots, k.to(keys.dtype))
    values.index_copy_(2, slots, v.to(values.dtype))
    return q


def rotary_qkv_to_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv_heads: int,
                        keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """`rotary_qkv` whose k and v go straight into a static KV cache: keys/values [B, KV, S, D] get token t's
    rows at slot slots[t]; returns q. One kernel on CUDA (instead of the rotation and two index copies: ~5 us
    of a synthetic 13B layer's ~120 us of attention on an H100). A slot outside [0, S) is an IndexError on the
    CPU (nothing written); on CUDA (checking would synchronise) its rows are dropped."""
    batch, seq, width = qkv.shape
    shape = (batch, n_kv_heads, keys.shape[2] if keys.dim() == 4 else -1, _head_dim(width, n_heads, n_kv_heads))
    for cache in (keys, values):
        if tuple(cache.shape) != shape or not cache.is_contiguous() or cache.device != qkv.device:
            raise ValueError(f"keys and values must be contiguous {list(shape)} tensors on {qkv.device}")
    if slots.shape != (seq,) or slots.dtype.is_floating_point or slots.dtype == torch.bool:
        raise ValueError(f"slots must be {seq} integer positions")
    slots = slots.to(qkv.device)
    if _use_triton(qkv):
        return _triton().rotary_qkv_to_cache(qkv, cos, sin, n_heads, n_kv_heads, keys, values, slots)
    if _use_numba(qkv, cos, sin, keys, values):
        return _cpu_kernels.rotary_qkv_to_cache(qkv, cos, sin, n_heads, n_kv_heads, keys, values, slots)
    return rotary_qkv_to_cache_reference(qkv, cos, sin, n_heads, n_kv_heads, keys, values, slots)


def decode_attention_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int,
                               n_kv_heads: int, keys: torch.Tensor, values: torch.Tensor, slot: int, first: int,
                               last: int) -> torch.Tensor:
    if not 0 <= first <= last < keys.shape[2]:
        raise IndexError(f"slot {slot}, attention over slots [{first}, {last}]: outside a cache of {keys.shape[2]}")
    q = rotary_qkv_to_cache_reference(qkv, cos, sin, n_heads, n_kv_heads, keys, values,
                                      torch.tensor([slot], device=keys.device))
    y = F.scaled_dot_product_attention(q, keys[:, :, first:last + 1], values[:, :, first:last + 1],
                                       enable_gqa=True)
    return y.transpose(1, 2).reshape(1, 1, -1)


def use_decode_attention_kernel(qkv: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> bool:
    """One float32 CPU token (batch 1) with numba: `decode_attention` is one kernel call."""
    return (qkv.shape[:2] == (1, 1) and keys.shape[0] == 1 and keys.is_contiguous() and values.is_contiguous()
            and _use_numba(qkv, keys, values))


def decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv_heads: int,
                     keys: torch.Tensor, values: torch.Tensor, slot: int, first: int, last: int) -> torch.Tensor:
    """One decode token's attention against a static KV cache: its fused projection qkv [1, 1, width] rotated
    (cos, sin: [1, D / 2]), k and v written into slot `slot` of keys / values [1, KV, S, D], and every query
    head's softmax attention over slots [first, last] (grouped-query heads share their KV head) -> [1, 1,
    n_heads * D], the o_proj input. On the CPU one numba call in place of the rotation, the cache writes and
    SDPA as torch ops (the 2-core VM spends ~25 us on any torch op at one token)."""
    _head_dim(qkv.shape[-1], n_heads, n_kv_heads)
    if use_decode_attention_kernel(qkv, keys, values):
        return _cpu_kernels.decode_attention(qkv, cos, sin, n_heads, n_kv_heads, keys, values, slot, first, last)
    return decode_attention_reference(qkv, cos, sin, n_heads, n_kv_heads, keys, values, slot, first, last)


def _attended_slots(position: torch.Tensor, window: int, sliding_window: int | None) -> tuple[int, int, int]:
    """(the token's slot, the first and the last slot it attends to)."""
    p = int(position.reshape(-1)[0])
    return p, max(0, p - sliding_window + 1) if sliding_window else 0, min(p, window - 1)


def decode_attention_at_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int,
                                  n_kv_heads: int, keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor,
                                  window: int, sliding_window: int | None) -> torch.Tensor:
    return decode_attention_reference(qkv, cos, sin, n_heads, n_kv_heads, keys, values,
                                      *_attended_slots(position, window, sliding_window))


def use_decode_attention_at(qkv: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> bool:
    """One token (batch 1) with a kernel for `decode_attention_at`: float32 on the CPU with numba
    (`use_decode_attention_kernel`), or CUDA with Triton and a power-of-two head_dim."""
    if qkv.is_cuda:
        dim = keys.shape[-1]
        return (qkv.shape[:2] == (1, 1) and keys.shape[0] == 1 and keys.is_contiguous() and values.is_contiguous()
                and dim >= 4 and dim & (dim - 1) == 0 and _use_triton(qkv) and keys.device == qkv.device)
    return use_decode_attention_kernel(qkv, keys, values)


def decode_attention_at(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv_heads: int,
                        keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor, window: int,
                        sliding_window: int | None) -> torch.Tensor:
    """`decode_attention` at the one-element `position` tensor: slot `position` written, attention over slots
    [max(0, position - sliding_window + 1), min(position, window - 1)]. On CUDA the position is read on the device
    (no synchronisation: a CUDA graph replays the call at every position) by flash-decoding (Dao et al. 2023):
    the slots split into chunks, one program per (KV head, chunk), then one merge of the chunks' partial
    softmaxes per query head. It replaces the rotary kernel and SDPA over the whole masked window, whose time
    grows with the cache rather than the position (a 7B layer on an H100: 9.0 -> 6.7 us at 150 of 192 slots,
    20.1 -> 8.1 at 100 of 2,048, 20.1 -> 19.4 at 2,000 of 2,048; decode_attention_flash_h100.json). A slot outside
    the cache is dropped on CUDA (checking would synchronise); the window's slots are still attended."""
    _head_dim(qkv.shape[-1], n_heads, n_kv_heads)
    if qkv.is_cuda and use_decode_attention_at(qkv, keys, values):
        return _triton().decode_attention(qkv.contiguous(), cos, sin, n_heads, n_kv_heads, keys, values, position,
                                          window, sliding_window)
    return decode_attention(qkv, cos, sin, n_heads, n_kv_heads, keys, values,
                            *_attended_slots(position, window, sliding_window))


def l2_prefetch(source: torch.Tensor, nbytes: int, sink: torch.Tensor) -> None:
    """Reads the first `nbytes` of the contiguous CUDA tensor `source` into the GPU's L2 cache, marked to be
    evicted last, so a kernel reading them next finds them there (`sink`: a one-element int32 tensor on the
    device the kernel may write). A hybrid step's GPU waits for the CPU's part of every layer; reading part of
    the next layer's attention weights then takes that much off the next layer's critical path
    (runtime.segments). No effect on any result; nothing to do off CUDA or without Triton."""
    if not source.is_cuda or nbytes <= 0:
        return
    if not source.is_contiguous() or sink.dtype != torch.int32 or sink.device != source.device:
        raise ValueError("l2_prefetch takes a contiguous CUDA tensor and an int32 sink on its device")
    if _triton_available():  # under autograd too: nothing here is differentiated
        _triton().l2_prefetch(source, nbytes, sink)


# host flags (wait_for_host_flag, notify_host) are kept one per this many int32s, 128 bytes (two cache lines: the
# adjacent-line prefetcher pairs them), so polling one never shares a line with a flag written meanwhile
FLAG_STRIDE = 32


def notify_host_reference(flag: torch.Tensor) -> None:
    flag[0] = 1


def notify_host(flag: torch.Tensor, device: torch.device) -> None:
    """Sets flag[0] (a pinned int32) to 1 once `device`'s current stream gets there, after everything queued
    before it, whose writes into host memory the host sees once it sees the flag: the other direction of
    `wait_for_host_flag`, for a host that spins on the flag (kernels.cold_step) instead of on a CUDA event. On
    the CPU, the reference (at once)."""
    _check_host_flag(flag)
    if device.type != "cuda":
        return notify_host_reference(flag)
    if not _triton_available():
        raise RuntimeError("a CUDA stream can set a host flag only with Triton installed")
    if not flag.is_pinned():
        raise ValueError("a CUDA stream can set only a flag in pinned memory")
    _triton().notify_host(flag)


def _check_host_flag(flag: torch.Tensor) -> None:
    if flag.dtype != torch.int32 or flag.numel() != 1 or flag.is_cuda:
        raise ValueError("flag must be a one-element int32 host tensor")


def wait_for_host_flag_reference(flag: torch.Tensor) -> None:
    """Returns once flag[0] is nonzero, and zeroes it."""
    while int(flag[0]) == 0:
        pass
    flag[0] = 0


def wait_for_host_flag(flag: torch.Tensor, device: torch.device) -> None:
    """Makes `device`'s current stream wait until the host sets flag[0] (a pinned int32), then zeroes it.

    A hybrid decode step queues each layer's CUDA graph before the CPU has finished its part of the layer
    before (runtime.segments); the graph's first kernel waits here, so the GPU starts the moment the CPU's
    output is ready instead of after the host's launch. The stream stalls until the host sets the flag:
    the caller must set it (or release it when a step fails). On the CPU, the reference (the host waits)."""
    _check_host_flag(flag)
    if device.type != "cuda":
        return wait_for_host_flag_reference(flag)
    if not _triton_available():  # the reference would block the host, not the stream
        raise RuntimeError("a CUDA stream can wait on a host flag only with Triton installed")
    if not flag.is_pinned():
        raise ValueError("a CUDA stream can wait only on a flag in pinned memory")
    _triton().wait_for_host_flag(flag)
