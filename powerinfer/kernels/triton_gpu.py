"""Triton GPU kernels for the neuron-aware sparse FFN operators.

Follows PowerInfer (Song et al. 2023, arXiv 2312.12456), §5 "Neuron-aware Sparse
Operators": on the GPU, each program handles a few active neurons (gate/up: rows of
``w_gate``/``w_up``; down: rows of ``w_down_t``) and never touches inactive ones, so
memory traffic is proportional to the number of active neurons. Weights may be
float16, bfloat16 or float32; accumulation is float32.

Active-set forms:

* id list: ``idx`` [k], all active. Convenient eagerly; the grid depends on k.
* id buffer + count: ``idx`` [cap] int32 and ``count`` [1] int32 on the device; only
  ``idx[:count]`` is read and ``h`` gets zeros past ``count``. Every launch shape depends
  on ``cap`` alone, so this is the form for a CUDA-graph decode step. ``compact_active``
  turns a per-neuron predictor mask into the buffer and count inside the graph.

A per-neuron mask form (h over all n_ff, inactive rows masked off inside the kernels)
was measured too and dropped: at 10% density on H100 it ran the gate/up projection
3x slower than the id form, because most lanes of every row block sat idle.

Gate/up is a GEMV for one token (whole rows per program, fp32 elementwise products
reduced once) and a tensor-core ``tl.dot`` for 2+ tokens, on a persistent grid of a
few programs per SM. Down splits the active slots into a fixed number of ranges
(grid: splits x column blocks); each program writes its own fp32 partial and a second
kernel sums them, so no output element has two writers and results are deterministic.

Also the dense one-token GEMV of the attention projections and the LM head (kernels.dense): a few whole rows per
program; cuBLAS splits K for the square output projection and adds a reduction kernel.
"""

import functools

import torch
import triton
import triton.language as tl

from powerinfer.kernels.activations import activation_code

# Launch parameters, from CUDA-graph replays of 8 layers back to back (benchmarks/bench_kernels.py --sweep; H200,
# float16, 10% density; benchmarks/results/kernels_tuning_h200.json, kernels_h200_llama2-*.json). One-token
# gate/up (BLOCK_N, BLOCK_D, warps): (4, 1024, 4) 8.8 us at LLaMA-7B shapes, 11.7 us at 13B; the earlier
# (2, 2048, 4) 9.1 / 12.6 us. Down (BLOCK_K, BLOCK_D, warps, programs per SM): (128, 64, 4, 4) 9.1 / 10.4 us; the
# earlier (64, 128, 4, 8) 13.9 / 16.4 us (only 18 of its 33 slot splits had rows: a split of 64 rows read 256
# bytes per row). Software pipelining (num_stages 1-4) changed nothing. int4 GEMV (BLOCK_N, bytes of a row per
# step, warps): (8, 256, 4) 22.8 us at 7B, within 5% of the best of 9 shapes.
_PROGRAMS_PER_SM, _DOWN_PROGRAMS_PER_SM = 8, 4
_GEMV_BLOCK_N, _GEMV_MAX_BLOCK_D, _GEMV_WARPS = 4, 1024, 4
_GEMM_BLOCK_N, _GEMM_BLOCK_D, _GEMM_WARPS = 16, 256, 4
_DOWN_GEMV_BLOCK_K, _DOWN_GEMV_BLOCK_D, _DOWN_GEMV_WARPS = 128, 64, 4
_DOWN_GEMM_BLOCK_K, _DOWN_GEMM_BLOCK_D, _DOWN_GEMM_WARPS = 64, 64, 4
_MAX_TOKEN_BLOCK = 64
_ZERO_BLOCK = 256
_SUM_BLOCK_SPLITS, _SUM_BLOCK = 64, 64
_COMPACT_CHUNK, _COMPACT_MAX_PREFIX_BLOCK, _COMPACT_WARPS = 256, 16384, 8
_INT4_BLOCK_N, _INT4_BYTES_PER_ROW, _INT4_WARPS = 8, 256, 4
# Dense one-token GEMV (BLOCK_N, largest BLOCK_K, warps): swept over 43 launch shapes against F.linear (cuBLAS) on
# an H100, 24 distinct weights per shape in one CUDA graph (benchmarks/results/dense_gemv_h100.json): (2, 1024, 4)
# 34.5 / 13.8 / 52.5 / 19.6 / 85.3 us at the 7B q/k/v, 7B output, 13B q/k/v, 13B output and 7B lm_head shapes
# against cuBLAS's 36.8 / 16.8 / 57.4 / 21.0 / 98.2 (whose output GEMV splits K and adds a reduction kernel).
_DENSE_BLOCK_N, _DENSE_MAX_BLOCK_K, _DENSE_WARPS = 2, 1024, 4


@triton.jit
def _gated(gate, up, threshold, ACTIVATION: tl.constexpr):
    # Codes follow activations.ACTIVATIONS: silu, relu, drelu, gelu_tanh; `threshold`: relu/drelu's gate
    # threshold (FATReLU; 0 is plain ReLU).
    if ACTIVATION == 0:
        h = gate * tl.sigmoid(gate) * up
    elif ACTIVATION == 1:
        h = tl.where(gate > threshold, gate, 0.0) * up
    elif ACTIVATION == 2:
        h = tl.where(gate > threshold, gate, 0.0) * tl.maximum(up, 0.0)
    else:
        inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        h = 0.5 * gate * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0)) * up  # tanh via sigmoid
    return h


@triton.jit
def _active_slots(count_ptr, n_slots, HAS_COUNT: tl.constexpr):
    """How many leading slots of idx are active: all of them, or min(count, n_slots)."""
    if HAS_COUNT:
        n_active = tl.minimum(tl.load(count_ptr), n_slots)
    else:
        n_active = n_slots
    return n_active


@triton.jit
def _gate_up_kernel(
    x_ptr, w_gate_ptr, w_up_ptr, idx_ptr, count_ptr, h_ptr,
    n_tokens, d, n_slots, stride_x, stride_w, stride_h, threshold,
    HAS_COUNT: tl.constexpr, ACTIVATION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ZERO_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_ok = offs_t < n_tokens
    n_active = _active_slots(count_ptr, n_slots, HAS_COUNT)
    n_blocks = tl.cdiv(n_active, BLOCK_N)
    for block in range(tl.program_id(0), n_blocks, tl.num_programs(0)):
        offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        active = offs_n < n_active
        rows = tl.load(idx_ptr + offs_n, mask=active, other=0).to(tl.int64)
        if BLOCK_T == 1:
            # GEMV: elementwise fp32 products, reduced across d once at the end.
            acc_gate = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            acc_up = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            for k0 in range(0, d, BLOCK_D):
                offs_d = k0 + tl.arange(0, BLOCK_D)
                d_ok = offs_d < d
                x = tl.load(x_ptr + offs_t[:, None] * stride_x + offs_d[None, :],
                            mask=token_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
                w_offs = rows[:, None] * stride_w + offs_d[None, :]
                w_mask = active[:, None] & d_ok[None, :]
                acc_gate += tl.load(w_gate_ptr + w_offs, mask=w_mask, other=0.0).to(tl.float32) * x
                acc_up += tl.load(w_up_ptr + w_offs, mask=w_mask, other=0.0).to(tl.float32) * x
            gate = tl.sum(acc_gate, axis=1)[None, :]
            up = tl.sum(acc_up, axis=1)[None, :]
        else:
            gate = tl.zeros([BLOCK_T, BLOCK_N], tl.float32)
            up = tl.zeros([BLOCK_T, BLOCK_N], tl.float32)
            for k0 in range(0, d, BLOCK_D):
                offs_d = k0 + tl.arange(0, BLOCK_D)
                d_ok = offs_d < d
                w_offs = rows[:, None] * stride_w + offs_d[None, :]
                w_mask = active[:, None] & d_ok[None, :]
                w_gate = tl.load(w_gate_ptr + w_offs, mask=w_mask, other=0.0)
                w_up = tl.load(w_up_ptr + w_offs, mask=w_mask, other=0.0)
                x = tl.load(x_ptr + offs_t[:, None] * stride_x + offs_d[None, :],
                            mask=token_ok[:, None] & d_ok[None, :], other=0.0).to(w_gate.dtype)
                gate = tl.dot(x, tl.trans(w_gate), gate, input_precision=DOT_PRECISION)
                up = tl.dot(x, tl.trans(w_up), up, input_precision=DOT_PRECISION)
        h = tl.where(active[None, :], _gated(gate, up, threshold, ACTIVATION), 0.0)
        tl.store(h_ptr + offs_t[:, None] * stride_h + offs_n[None, :], h.to(h_ptr.dtype.element_ty),
                 mask=token_ok[:, None] & (offs_n < n_slots)[None, :])
    if HAS_COUNT:
        # Slots past the last active block hold zeros, so h is fully defined.
        zeros = tl.zeros([BLOCK_T, ZERO_BLOCK], h_ptr.dtype.element_ty)
        first = n_blocks * BLOCK_N + tl.program_id(0) * ZERO_BLOCK
        for start in range(first, n_slots, tl.num_programs(0) * ZERO_BLOCK):
            offs = start + tl.arange(0, ZERO_BLOCK)
            tl.store(h_ptr + offs_t[:, None] * stride_h + offs[None, :], zeros,
                     mask=token_ok[:, None] & (offs < n_slots)[None, :])


@triton.jit
def _down_kernel(
    h_ptr, w_ptr, idx_ptr, count_ptr, out_ptr,
    n_tokens, d, n_slots, stride_h, stride_w, stride_out_split, stride_out_t,
    HAS_COUNT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    split = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < d
    offs_t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_ok = offs_t < n_tokens
    n_active = _active_slots(count_ptr, n_slots, HAS_COUNT)
    # This program's slot range: an equal, BLOCK_K-aligned share of the active slots.
    per_split = tl.cdiv(tl.cdiv(n_active, tl.num_programs(0)), BLOCK_K) * BLOCK_K
    start = split * per_split
    stop = tl.minimum(start + per_split, n_active)
    if BLOCK_T == 1:
        acc = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
        for k0 in range(start, stop, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            active = offs_k < stop
            rows = tl.load(idx_ptr + offs_k, mask=active, other=0).to(tl.int64)
            coeff = tl.load(h_ptr + offs_t[None, :] * stride_h + offs_k[:, None],
                            mask=active[:, None] & token_ok[None, :], other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None] * stride_w + offs_d[None, :],
                        mask=active[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            acc += coeff * w
        y = tl.sum(acc, axis=0)[None, :]
    else:
        y = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        for k0 in range(start, stop, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            active = offs_k < stop
            rows = tl.load(idx_ptr + offs_k, mask=active, other=0).to(tl.int64)
            w = tl.load(w_ptr + rows[:, None] * stride_w + offs_d[None, :],
                        mask=active[:, None] & d_ok[None, :], other=0.0)
            coeff = tl.load(h_ptr + offs_t[:, None] * stride_h + offs_k[None, :],
                            mask=token_ok[:, None] & active[None, :], other=0.0).to(w.dtype)
            y = tl.dot(coeff, w, y, input_precision=DOT_PRECISION)
    tl.store(out_ptr + split * stride_out_split + offs_t[:, None] * stride_out_t + offs_d[None, :],
             y.to(out_ptr.dtype.element_ty), mask=token_ok[:, None] & d_ok[None, :])


@triton.jit
def _sum_splits_kernel(partial_ptr, out_ptr, n_splits, n_elements, BLOCK_S: tl.constexpr, BLOCK: tl.constexpr):
    # Loads BLOCK_S partials at once: a loop of single-row loads was latency-bound.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n_elements
    acc = tl.zeros([BLOCK], tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        tile = tl.load(partial_ptr + offs_s[:, None] * n_elements + offs[None, :],
                       mask=(offs_s < n_splits)[:, None] & ok[None, :], other=0.0)
        acc += tl.sum(tile, axis=0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _compact_kernel(mask_ptr, idx_ptr, count_ptr, n, CHUNK: tl.constexpr, PREFIX_BLOCK: tl.constexpr):
    # Program i writes the ids of mask chunk i. Its output offset, the number of active
    # neurons before the chunk, it counts itself: re-reading <= n mask bytes per program
    # is cheaper than a serial prefix sum (one program scanning n_ff took ~8 us).
    chunk_start = tl.program_id(0) * CHUNK
    before = tl.sum(tl.zeros([PREFIX_BLOCK], tl.int32), axis=0)
    for start in range(0, chunk_start, PREFIX_BLOCK):
        offs = start + tl.arange(0, PREFIX_BLOCK)
        before += tl.sum((tl.load(mask_ptr + offs, mask=offs < chunk_start, other=0) != 0).to(tl.int32), axis=0)
    offs = chunk_start + tl.arange(0, CHUNK)
    flags = (tl.load(mask_ptr + offs, mask=offs < n, other=0) != 0).to(tl.int32)
    tl.store(idx_ptr + before + tl.cumsum(flags, axis=0) - 1, offs, mask=flags != 0)
    if tl.program_id(0) == tl.num_programs(0) - 1:
        tl.store(count_ptr, before + tl.sum(flags, axis=0))



@triton.jit
def _int4_gemv_kernel(x_ptr, packed_ptr, scales_ptr, out_ptr, n_rows, n_groups, stride_x, stride_p, stride_s,
                      stride_out, GROUP_BYTES: tl.constexpr, GROUP_BLOCK: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    # Format: powerinfer.kernels.quantized; byte i of a row holds columns 2i (low nibble) and 2i + 1. A tile is
    # [rows, groups, bytes of a group]: each group's dot product is summed before its one scale multiplies it
    # (a scale gathered and multiplied per element: 44 -> 23 us at LLaMA-7B's gate on an H200). Still ALU-bound
    # at 26% of copy bandwidth, as fast as a float16 GEMV of the whole gate; unpacking nibbles by bit tricks
    # instead of int-to-float conversions changed nothing (kernels_tuning_h200.json).
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    token = tl.program_id(1)
    in_group = tl.arange(0, GROUP_BLOCK)
    acc = tl.zeros([BLOCK_N, BLOCK_G], tl.float32)
    for g0 in range(0, n_groups, BLOCK_G):
        groups = g0 + tl.arange(0, BLOCK_G)
        ok = (groups < n_groups)[:, None] & (in_group < GROUP_BYTES)[None, :]
        offs = groups[:, None] * GROUP_BYTES + in_group[None, :]  # [BLOCK_G, GROUP_BLOCK] byte columns
        byte = tl.load(packed_ptr + rows[:, None, None].to(tl.int64) * stride_p + offs[None, :, :],
                       mask=row_ok[:, None, None] & ok[None, :, :], other=0x88)
        x_even = tl.load(x_ptr + token * stride_x + 2 * offs, mask=ok, other=0.0).to(tl.float32)
        x_odd = tl.load(x_ptr + token * stride_x + 2 * offs + 1, mask=ok, other=0.0).to(tl.float32)
        low = (byte & 15).to(tl.float32) - 8.0
        high = (byte >> 4).to(tl.float32) - 8.0
        dots = tl.sum(low * x_even[None, :, :] + high * x_odd[None, :, :], axis=2)
        scale = tl.load(scales_ptr + rows[:, None].to(tl.int64) * stride_s + groups[None, :],
                        mask=row_ok[:, None] & (groups < n_groups)[None, :], other=0.0).to(tl.float32)
        acc += dots * scale
    tl.store(out_ptr + token * stride_out + rows, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _dense_gemv_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, n, k, stride_w, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """y = W x (+ bias) for one token: BLOCK_N rows of W per program, fp32 products reduced once at the end."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for start in range(0, k, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        col_ok = cols < k
        w = tl.load(w_ptr + rows.to(tl.int64)[:, None] * stride_w + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc += w.to(tl.float32) * tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _lowrank_hidden_kernel(x_ptr, w1_ptr, hidden_ptr, d, rank, BLOCK_D: tl.constexpr):
    """hidden[t, j] = relu(x[t] . w1[j]), rounded to x's dtype as the reference's product is."""
    j, token = tl.program_id(0), tl.program_id(1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, d, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        inside = cols < d
        x = tl.load(x_ptr + token * d + cols, mask=inside, other=0.0).to(tl.float32)
        acc += x * tl.load(w1_ptr + j * d + cols, mask=inside, other=0.0).to(tl.float32)
    hidden = tl.maximum(tl.sum(acc, axis=0).to(x_ptr.dtype.element_ty).to(tl.float32), 0.0)
    tl.store(hidden_ptr + token * rank + j, hidden)


@triton.jit
def _lowrank_decide_kernel(hidden_ptr, w2_ptr, b2_ptr, threshold_ptr, mask_ptr, tail_ptr, n, rank, n_always,
                           tail_from, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, TAIL: tl.constexpr):
    """mask[t, i] = w2[i] . hidden[t] + b2[i] > threshold (the logit rounded to w2's dtype first) or i <
    n_always; with TAIL (one token), also tail[i - tail_from] for i >= tail_from (pinned host memory: written
    across PCIe in place, no copy node)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    token = tl.program_id(1)
    ranks = tl.arange(0, BLOCK_R)
    row_ok, rank_ok = rows < n, ranks < rank
    hidden = tl.load(hidden_ptr + token * rank + ranks, mask=rank_ok, other=0.0)
    w = tl.load(w2_ptr + rows[:, None] * rank + ranks[None, :], mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
    logits = tl.sum(w.to(tl.float32) * hidden[None, :], axis=1)
    logits = (logits + tl.load(b2_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)).to(w2_ptr.dtype.element_ty)
    threshold = tl.load(threshold_ptr).to(tl.float32)
    active = (logits.to(tl.float32) > threshold) | (rows < n_always)
    tl.store(mask_ptr + token * n + rows, active, mask=row_ok)
    if TAIL:
        tl.store(tail_ptr + (rows - tail_from), active, mask=row_ok & (rows >= tail_from))


_LOWRANK_BLOCK_D = 1024
_LOWRANK_BLOCK_N = 128


def lowrank_mask(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, threshold: torch.Tensor,
                 out: torch.Tensor | None = None, always_active: int = 0, tail: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """bool [T, n]: relu(x @ w1.T) @ w2.T + b2 > threshold (a device tensor: no synchronisation) or column <
    `always_active`, in two kernels: the rank-r hidden vector, then `lowrank_decide`."""
    x, w1 = _row_major(x), _row_major(w1)
    n_tokens, d = x.shape
    rank = w1.shape[0]
    hidden = torch.empty((n_tokens, rank), dtype=torch.float32, device=x.device)
    if n_tokens:
        _lowrank_hidden_kernel[(rank, n_tokens)](x, w1, hidden, d, rank,
                                                 BLOCK_D=min(_LOWRANK_BLOCK_D, triton.next_power_of_2(d)), num_warps=4)
    return lowrank_decide(hidden, w2, b2, threshold, out, always_active, tail)


def lowrank_decide(hidden: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, threshold: torch.Tensor,
                   out: torch.Tensor | None = None, always_active: int = 0, tail: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """bool [T, n]: hidden @ w2.T + b2 > threshold or column < `always_active`, from the float32 hidden vectors
    [T, r]; also writes the mask's last len(tail) entries into `tail` (one token)."""
    hidden, w2 = _row_major(hidden), _row_major(w2)
    n_tokens, rank = hidden.shape
    n = w2.shape[0]
    mask = torch.empty((n_tokens, n), dtype=torch.bool, device=hidden.device) if out is None else out
    if n_tokens:
        _lowrank_decide_kernel[(triton.cdiv(n, _LOWRANK_BLOCK_N), n_tokens)](
            hidden, w2, b2, threshold, mask, mask if tail is None else tail, n, rank, always_active,
            n - (0 if tail is None else tail.numel()), BLOCK_N=_LOWRANK_BLOCK_N,
            BLOCK_R=max(16, triton.next_power_of_2(rank)), TAIL=tail is not None, num_warps=4)
    return mask


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _row_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_weights(*weights: torch.Tensor) -> None:
    # Copying a weight matrix to fix its layout would cost more than the operator itself.
    if any(w.stride(-1) != 1 or w.stride(0) != weights[0].stride(0) for w in weights):
        raise ValueError("weights must be row-major [n_ff, d] tensors with one row stride")


def _dot_precision(dtype: torch.dtype) -> str | None:
    # Exact fp32 products for fp32 weights (Triton would use tf32); 16-bit types ignore it.
    return "ieee" if dtype == torch.float32 else None


def _token_block(n_tokens: int) -> int:
    # tl.dot needs >= 16 rows; a single token takes the GEMV path instead.
    return 1 if n_tokens == 1 else min(_MAX_TOKEN_BLOCK, max(16, triton.next_power_of_2(n_tokens)))


def _output(out: torch.Tensor | None, shape: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if tuple(out.shape) != shape or not out.is_contiguous() or out.device != like.device:
        raise ValueError(f"out must be a contiguous {shape} tensor on {like.device}")
    return out


def _count_tensor(count, idx: torch.Tensor) -> torch.Tensor:
    if isinstance(count, torch.Tensor):
        return count
    return torch.tensor([count], dtype=torch.int32, device=idx.device)


def sparse_gate_up(x, w_gate, w_up, idx, activation, *, threshold=0.0, count=None, out=None):
    """h[T, len(idx)] for an id list, or an id buffer with a device ``count`` (graph-safe)."""
    _check_weights(w_gate, w_up)
    x = _row_major(x)
    n_tokens, d = x.shape
    n_slots = idx.shape[0]
    out = _output(out, (n_tokens, n_slots), x)
    if n_slots == 0:
        return out
    block_t = _token_block(n_tokens)
    if block_t == 1:
        block_n, block_d, warps = _GEMV_BLOCK_N, min(_GEMV_MAX_BLOCK_D, triton.next_power_of_2(d)), _GEMV_WARPS
    else:
        block_n, block_d, warps = _GEMM_BLOCK_N, _GEMM_BLOCK_D, _GEMM_WARPS
    token_blocks = triton.cdiv(n_tokens, block_t)
    # Persistent grid sized by the capacity, never by the device-side count.
    programs = max(1, min(triton.cdiv(n_slots, block_n),
                          _PROGRAMS_PER_SM * _sm_count(x.device.index or 0) // token_blocks))
    _gate_up_kernel[(programs, token_blocks)](
        x, w_gate, w_up, idx, idx if count is None else _count_tensor(count, idx), out,
        n_tokens, d, n_slots, x.stride(0), w_gate.stride(0), out.stride(0), float(threshold),
        HAS_COUNT=count is not None, ACTIVATION=activation_code(activation),
        BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_D=block_d, ZERO_BLOCK=_ZERO_BLOCK,
        DOT_PRECISION=_dot_precision(w_gate.dtype), num_warps=warps,
    )
    return out


def sparse_down(h, w_down_t, idx, *, count=None, out=None):
    """y[T, d] = h[:, :count] @ w_down_t[idx[:count]] (count = len(idx) when omitted)."""
    _check_weights(w_down_t)
    h = _row_major(h)
    n_tokens, d = h.shape[0], w_down_t.shape[1]
    n_slots = idx.shape[0]
    out = _output(out, (n_tokens, d), h)
    if n_slots == 0:
        return out.zero_()
    block_t = _token_block(n_tokens)
    if block_t == 1:
        block_k, block_d, warps = _DOWN_GEMV_BLOCK_K, _DOWN_GEMV_BLOCK_D, _DOWN_GEMV_WARPS
    else:
        block_k, block_d, warps = _DOWN_GEMM_BLOCK_K, _DOWN_GEMM_BLOCK_D, _DOWN_GEMM_WARPS
    tiles = triton.cdiv(d, block_d) * triton.cdiv(n_tokens, block_t)
    # Enough slot splits to fill the GPU; fixed by the capacity, not by the count.
    per_sm = _DOWN_PROGRAMS_PER_SM if block_t == 1 else _PROGRAMS_PER_SM
    splits = max(1, min(triton.cdiv(n_slots, block_k), per_sm * _sm_count(h.device.index or 0) // tiles))
    partial = out if splits == 1 else torch.empty((splits, n_tokens, d), dtype=torch.float32, device=h.device)
    _down_kernel[(splits, triton.cdiv(d, block_d), triton.cdiv(n_tokens, block_t))](
        h, w_down_t, idx, idx if count is None else _count_tensor(count, idx), partial,
        n_tokens, d, n_slots, h.stride(0), w_down_t.stride(0), partial.stride(0) if splits > 1 else 0,
        partial.stride(-2),
        HAS_COUNT=count is not None, BLOCK_T=block_t, BLOCK_K=block_k, BLOCK_D=block_d,
        DOT_PRECISION=_dot_precision(w_down_t.dtype), num_warps=warps,
    )
    if splits > 1:
        _sum_splits_kernel[(triton.cdiv(out.numel(), _SUM_BLOCK),)](
            partial, out, splits, out.numel(), BLOCK_S=_SUM_BLOCK_SPLITS, BLOCK=_SUM_BLOCK
        )
    return out


def compact_active(mask: torch.Tensor, idx_out: torch.Tensor, count_out: torch.Tensor) -> None:
    """Write the ids of the nonzero mask entries, ascending, into idx_out[:count] and the
    count into count_out[0] (both int32, on mask's device); graph-capturable."""
    if idx_out.dtype != torch.int32 or count_out.dtype != torch.int32 or idx_out.numel() < mask.numel():
        raise ValueError("idx_out needs int32 capacity >= mask.numel(); count_out must be int32")
    n = mask.numel()
    if n == 0:
        count_out.zero_()
        return
    _compact_kernel[(triton.cdiv(n, _COMPACT_CHUNK),)](
        mask, idx_out, count_out, n, CHUNK=_COMPACT_CHUNK,
        PREFIX_BLOCK=min(_COMPACT_MAX_PREFIX_BLOCK, triton.next_power_of_2(n)), num_warps=_COMPACT_WARPS,
    )


def dense_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y[n] = weight[n, k] @ x[k] (+ bias) for one token, in x's dtype (fp32 accumulation); graph-capturable."""
    if weight.stride(-1) != 1:
        raise ValueError("weight must be row-major")
    n, k = weight.shape
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    if n == 0:
        return out
    block_k = min(_DENSE_MAX_BLOCK_K, triton.next_power_of_2(k))
    _dense_gemv_kernel[(triton.cdiv(n, _DENSE_BLOCK_N),)](
        x.contiguous(), weight, weight if bias is None else bias, out, n, k, weight.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=_DENSE_BLOCK_N, BLOCK_K=block_k, num_warps=_DENSE_WARPS)
    return out


def int4_gemv(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """y[T, n] = x @ dequantize_int4(packed, scales)^T in x's dtype (kernels.quantized); graph-capturable."""
    x, packed, scales = _row_major(x), _row_major(packed), _row_major(scales)
    n_tokens, n_rows, half_d = x.shape[0], packed.shape[0], packed.shape[1]
    out = torch.empty((n_tokens, n_rows), dtype=x.dtype, device=x.device)
    if n_tokens == 0 or n_rows == 0:
        return out
    n_groups = scales.shape[1]
    group_bytes = half_d // n_groups
    group_block = triton.next_power_of_2(group_bytes)
    block_g = max(1, min(_INT4_BYTES_PER_ROW // group_block, triton.next_power_of_2(n_groups)))
    _int4_gemv_kernel[(triton.cdiv(n_rows, _INT4_BLOCK_N), n_tokens)](
        x, packed, scales, out, n_rows, n_groups, x.stride(0), packed.stride(0), scales.stride(0), out.stride(0),
        GROUP_BYTES=group_bytes, GROUP_BLOCK=group_block, BLOCK_N=_INT4_BLOCK_N, BLOCK_G=block_g,
        num_warps=_INT4_WARPS,
    )
    return out
