"""Numba CPU kernels for the neuron-aware sparse FFN operators.

Follows PowerInfer (Song et al. 2023, arXiv 2312.12456), §5 "Neuron-aware Sparse
Operators": the CPU operators touch only the rows of the active neurons, row by row,
instead of converting the sparse activation pattern to a dense format.

* gate/up: a gather-dot. Threads split the active rows; each row of ``w_gate`` and
  ``w_up`` is streamed from memory once and dotted with every token of ``x``, two neurons per pass.
* down: an AXPY over the active rows of ``w_down_t`` ([n_ff, d], row = neuron), eight per pass. The
  original PowerInfer lets threads add into the same output vector unsynchronised;
  here every thread owns a private partial sum and a second parallel pass adds the
  partials column block by column block, so no output element has two writers.
  (Partitioning over d instead was measured at half the bandwidth: each thread then
  reads short strided slices of every row.)
* masked FFN: both of the above in one call over a per-neuron mask (the predictor's output), so
  the executor's CPU part is one dispatch per layer; a neuron whose h stays 0 never has its down
  row read.
* dense GEMV: y = x @ W^T for a few tokens (decode), each row read once, long rows four per pass.
* decode attention: one token's rotary, KV-cache write and softmax attention over the cache (``fused``).
* row layouts: each weight is a contiguous [n_ff, d] matrix or a slice ``bundle[:, j]`` of a neuron bundle
  [n_ff, k, d] (`row_stride`), where a neuron's gate, up and down rows are adjacent, so an active neuron is one
  run of memory; the kernels step rows by k (the executor bundles its CPU rows for the predicted-sparse FFN).
* int4 GEMV: the same over a 4-bit matrix with group scales (the quantized-gate predictor, see
  ``quantized``). Compute-bound (unpacking, in groups of 32-64 columns): on the 2-core VM a 1536 x 576 matrix
  takes ~110 us against ~58 us for the float32 GEMV of the same shape; at 11008 x 4096 and 2 threads 2.1 ms
  against 2.5 ms for the bfloat16 one, reading a quarter of its bytes.

Threads get one task each: numba hands every thread one equal chunk of a prange (static schedule),
so more tasks than threads would only add partial sums; the tasks split the active rows evenly.
Every kernel also has a single-threaded build, used below ``SERIAL_MAX_BYTES`` of weights (less with
more than two threads), where waking the thread pool costs more than the work.

Weights may be float32 or bfloat16. numba has no 16-bit float arithmetic, so bfloat16
weights arrive as their raw int16 bit patterns (half the bytes to stream) and each element
is widened where it is used: a bfloat16 is the upper half of a float32, so a shift and a
bit cast (an LLVM intrinsic) that vectorise with the loop. The masked FFN also takes int8
rows with one float32 scale per row (``sparse_ffn.quantize_rows_int8``): a row's dot product
is summed over the widened integers and scaled once. Activations, accumulation and outputs
are float32.

Each kernel compiles one signature per weight dtype (C-contiguous float32 2-D
``x``/``h``/``out``, int64 indices) to keep JIT time low; the wrappers normalise their
inputs to it. Loops index slices that start at 0: numba cannot prove that
``range(lo, hi)`` indices are non-negative and then skips vectorisation because of
negative-index wraparound.

Threads: numba's OpenMP pool and torch's are separate libgomp instances. Spinning without
bound they steal each other's cores whenever calls alternate (measured 3-10x slower kernels
on 2 cores); sleeping at once, every kernel pays the wake-up. `import powerinfer` (before
torch) sets a bounded spin, GOMP_SPINCOUNT=100000 (see powerinfer/__init__.py).
"""

import functools
import math
import types

import numba
import numpy as np
import torch
from numba import njit, prange
from numba import types as nb_types
from llvmlite import ir
from numba.extending import intrinsic, overload

from powerinfer.kernels.activations import activation_code

# Reassociation lets LLVM vectorise the reductions; no nnan/ninf, so an overflowing
# exp in silu or tanh keeps IEEE semantics.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
_JIT = dict(parallel=True, fastmath=_FASTMATH, cache=True, nogil=True)

# Output columns reduced per task in the partial-sum pass (1 KiB of float32).
_REDUCE_COLUMNS = 256


def set_num_threads(n: int) -> None:
    """Threads used by the CPU kernels (numba's pool; n <= numba.config.NUMBA_NUM_THREADS)."""
    numba.set_num_threads(n)


@njit(fastmath=_FASTMATH, cache=True, inline="always")
def _gated(gate, up, code, threshold):
    # Codes follow activations.ACTIVATIONS: silu, relu, drelu, gelu_tanh; `threshold`: relu/drelu's gate
    # threshold (FATReLU; 0 is plain ReLU).
    if code == 0:
        return gate / (np.float32(1.0) + math.exp(-gate)) * up
    if code == 1:
        return (gate if gate > threshold else np.float32(0.0)) * up
    if code == 2:
        return (gate if gate > threshold else np.float32(0.0)) * max(up, np.float32(0.0))
    inner = np.float32(0.7978845608028654) * (gate + np.float32(0.044715) * gate * gate * gate)
    return np.float32(0.5) * gate * (np.float32(1.0) + math.tanh(inner)) * up


@intrinsic
def _bfloat16_to_float32(typingctx, bits):
    """The float32 value of a bfloat16 given as its 16 raw bits: widened into the upper half of a 32-bit
    word and bit-cast (zext, shl, bitcast in LLVM: they vectorise with the loop around them)."""
    if not (isinstance(bits, nb_types.Integer) and bits.bitwidth == 16):
        return None

    def codegen(context, builder, signature, args):
        word = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(word, ir.FloatType())

    return nb_types.float32(bits), codegen


def _weight(row, i):
    """Element i of a weight row as float32."""


@overload(_weight, inline="always")
def _weight_impl(row, i):
    # Chosen at compile time from the weight dtype: float32 rows are read as they are; int16 rows hold
    # bfloat16 bits; int8 rows are quantized, their row's scale applied by the caller (`_scale`).
    if row.dtype == nb_types.float32:
        return lambda row, i: row[i]
    if row.dtype == nb_types.int8:
        return lambda row, i: np.float32(row[i])
    return lambda row, i: _bfloat16_to_float32(row[i])


def _scale(scales, row):
    """The scale of weight row `row` (int8 rows), 1 without scales."""


@overload(_scale, inline="always")
def _scale_impl(scales, row):
    # None (float rows) at compile time: a constant 1 that folds into the products
    if isinstance(scales, nb_types.NoneType):
        return lambda scales, row: np.float32(1.0)
    return lambda scales, row: scales[row]


@njit(fastmath=_FASTMATH, cache=True, inline="always")
def _gated_dot(x_t, gate_row, up_row, gate_scale, up_scale, code, threshold):
    """act(x_t . gate_row) * (x_t . up_row): one token, one neuron, both rows streamed once."""
    gate = np.float32(0.0)
    up = np.float32(0.0)
    for i in range(x_t.shape[0]):
        gate += x_t[i] * _weight(gate_row, i)
        up += x_t[i] * _weight(up_row, i)
    return _gated(gate * gate_scale, up * up_scale, code, threshold)


@njit(fastmath=_FASTMATH, cache=True, inline="always")
def _gated_dot_pair(x_t, gate0, up0, gate1, up1, scales, code, threshold):
    """`_gated_dot` of two neurons in one pass: four row streams in flight instead of two (`scales`: of the
    gate and up rows of both)."""
    g0 = np.float32(0.0)
    u0 = np.float32(0.0)
    g1 = np.float32(0.0)
    u1 = np.float32(0.0)
    for i in range(x_t.shape[0]):
        xi = x_t[i]
        g0 += xi * _weight(gate0, i)
        u0 += xi * _weight(up0, i)
        g1 += xi * _weight(gate1, i)
        u1 += xi * _weight(up1, i)
    sg0, su0, sg1, su1 = scales
    return _gated(g0 * sg0, u0 * su0, code, threshold), _gated(g1 * sg1, u1 * su1, code, threshold)


@njit(fastmath=_FASTMATH, cache=True, inline="always")
def _gated_rows(x, w_gate, w_up, s_gate, s_up, ids, code, threshold, h):
    """h[t, j] = the activation of neuron ids[j] for token t, two neurons per pass (a core's reads of
    scattered rows are latency-bound; the masked FFN over 107 of 6600 bfloat16 rows: 116 -> 98 us on the
    2-core VM, 62-66 -> 49-65 us on the 16-thread H100 host). `s_gate`, `s_up`: row scales of int8 weights
    (None for float rows)."""
    n_tokens, n = x.shape[0], ids.shape[0]
    j = 0
    while j + 2 <= n:
        r0, r1 = ids[j], ids[j + 1]
        gate0, up0, gate1, up1 = w_gate[r0], w_up[r0], w_gate[r1], w_up[r1]
        scales = (_scale(s_gate, r0), _scale(s_up, r0), _scale(s_gate, r1), _scale(s_up, r1))
        for t in range(n_tokens):
            h[t, j], h[t, j + 1] = _gated_dot_pair(x[t], gate0, up0, gate1, up1, scales, code, threshold)
        j += 2
    if j < n:
        r = ids[j]
        for t in range(n_tokens):
            h[t, j] = _gated_dot(x[t], w_gate[r], w_up[r], _scale(s_gate, r), _scale(s_up, r), code, threshold)


@njit(**_JIT)
def _gate_up_kernel(x, w_gate, w_up, idx, code, threshold, n_tasks, out):
    k = idx.shape[0]
    for task in prange(n_tasks):
        lo, hi = task * k // n_tasks, (task + 1) * k // n_tasks
        _gated_rows(x, w_gate, w_up, None, None, idx[lo:hi], code, threshold, out[:, lo:hi])


@njit(fastmath=_FASTMATH, cache=True, inline="always")
def _row(w, i, first_column):
    """Row i of w from column first_column on (a contiguous view)."""
    return w[i][first_column:]


@njit(fastmath=_FASTMATH, cache=True, inline="always")
def _accumulate_rows(acc, h, ids, start, stop, w_down_t, s_down, first_column):
    """acc[t] += h[t, j] * w_down_t[ids[j], first_column:first_column + d] for j in [start, stop), d the width of
    acc (all of a row, or one block of output columns): eight rows per pass over acc (one load and store of the
    accumulator per eight FMAs; 1,100 bfloat16 rows of 4,096 at one thread on the 2-core VM: 0.95 -> 0.69-0.77 ms
    against four per pass, float32 3% faster), then four, then one. `s_down`: row scales of int8 weights (None
    for float)."""
    n_tokens, d = acc.shape
    j = start
    while j + 8 <= stop:
        r0, r1 = _row(w_down_t, ids[j], first_column), _row(w_down_t, ids[j + 1], first_column)
        r2, r3 = _row(w_down_t, ids[j + 2], first_column), _row(w_down_t, ids[j + 3], first_column)
        r4, r5 = _row(w_down_t, ids[j + 4], first_column), _row(w_down_t, ids[j + 5], first_column)
        r6, r7 = _row(w_down_t, ids[j + 6], first_column), _row(w_down_t, ids[j + 7], first_column)
        s0, s1, s2, s3 = (_scale(s_down, ids[j]), _scale(s_down, ids[j + 1]), _scale(s_down, ids[j + 2]),
                          _scale(s_down, ids[j + 3]))
        s4, s5, s6, s7 = (_scale(s_down, ids[j + 4]), _scale(s_down, ids[j + 5]), _scale(s_down, ids[j + 6]),
                          _scale(s_down, ids[j + 7]))
        for t in range(n_tokens):
            c0, c1, c2, c3 = h[t, j] * s0, h[t, j + 1] * s1, h[t, j + 2] * s2, h[t, j + 3] * s3
            c4, c5, c6, c7 = h[t, j + 4] * s4, h[t, j + 5] * s5, h[t, j + 6] * s6, h[t, j + 7] * s7
            acc_t = acc[t]
            for c in range(d):
                acc_t[c] += ((c0 * _weight(r0, c) + c1 * _weight(r1, c)) + (c2 * _weight(r2, c)
                             + c3 * _weight(r3, c)) + (c4 * _weight(r4, c) + c5 * _weight(r5, c))
                             + (c6 * _weight(r6, c) + c7 * _weight(r7, c)))
        j += 8
    while j + 4 <= stop:
        r0, r1 = _row(w_down_t, ids[j], first_column), _row(w_down_t, ids[j + 1], first_column)
        r2, r3 = _row(w_down_t, ids[j + 2], first_column), _row(w_down_t, ids[j + 3], first_column)
        s0, s1 = _scale(s_down, ids[j]), _scale(s_down, ids[j + 1])
        s2, s3 = _scale(s_down, ids[j + 2]), _scale(s_down, ids[j + 3])
        for t in range(n_tokens):
            c0, c1, c2, c3 = h[t, j] * s0, h[t, j + 1] * s1, h[t, j + 2] * s2, h[t, j + 3] * s3
            acc_t = acc[t]
            for c in range(d):
                acc_t[c] += (c0 * _weight(r0, c) + c1 * _weight(r1, c) + c2 * _weight(r2, c)
                             + c3 * _weight(r3, c))
        j += 4
    while j < stop:
        row = _row(w_down_t, ids[j], first_column)
        scale = _scale(s_down, ids[j])
        for t in range(n_tokens):
            coeff = h[t, j] * scale
            acc_t = acc[t]
            for c in range(d):
                acc_t[c] += coeff * _weight(row, c)
        j += 1


@njit(fastmath=_FASTMATH, cache=True, inline="always")
def _sum_partials(partial, out):
    """out = the sum of the tasks' partial outputs; race-free: each block of output columns has one owner."""
    n_tasks, _, d = partial.shape
    n_blocks = (d + _REDUCE_COLUMNS - 1) // _REDUCE_COLUMNS
    for block in prange(n_blocks):
        lo = block * _REDUCE_COLUMNS
        hi = min(lo + _REDUCE_COLUMNS, d)
        out_block = out[:, lo:hi]
        out_block[:] = partial[0, :, lo:hi]
        for task in range(1, n_tasks):
            out_block += partial[task, :, lo:hi]


@njit(**_JIT)
def _down_kernel(h, w_down_t, idx, n_tasks, out):
    n_tokens, k = h.shape
    d = w_down_t.shape[1]
    partial = np.zeros((n_tasks, n_tokens, d), np.float32)
    for task in prange(n_tasks):
        _accumulate_rows(partial[task], h, idx, task * k // n_tasks, (task + 1) * k // n_tasks, w_down_t, None,
                         0)
    _sum_partials(partial, out)


# Calls reading at most this many weight bytes run on the calling thread: waking numba's pool costs more.
# With two threads the pool gains little (2-core VM, float32 GEMV: serial ~21 GB/s at every size; parallel
# 13 GB/s at 1.3 MB, 25 GB/s at 7 MB, 29 GB/s at 113 MB; tiny ReLU model decode: 2 threads slower than 1
# with every call parallel). With many it gains most of the machine's bandwidth for ~8 us per parallel region
# (16-core H100 host, cold_ffn_h100.json), so one thread pays off only for a few hundred KB: a synthetic 7B
# layer's cold FFN with ~150 active rows (3.7 MB) ran on one thread under the two-thread limit.
SERIAL_MAX_BYTES = 4 << 20  # up to 2 threads
SERIAL_MAX_BYTES_MANY_THREADS = 256 << 10


def _serial_variant(kernel):
    """`kernel` compiled without threads, under its own name: numba's on-disk cache is keyed by the Python
    function's name and line, so compiling the same function twice would load the parallel build for both
    (measured: the "serial" down kernel then ran 4x slower than a fresh serial compile)."""
    f = kernel.py_func
    serial = types.FunctionType(f.__code__, f.__globals__, f.__name__ + "_serial", f.__defaults__, f.__closure__)
    serial.__qualname__ = f.__qualname__ + "_serial"
    return njit(fastmath=_FASTMATH, cache=True, nogil=True)(serial)


_gate_up_kernel_serial = _serial_variant(_gate_up_kernel)
_down_kernel_serial = _serial_variant(_down_kernel)


def _threads_for(weight_bytes: int) -> int:
    """Threads for a call reading `weight_bytes` of weights: 1 below the limits above, else numba's count
    (asked only then: `numba.get_num_threads` costs ~2 us, a tenth of a small decode call on the 2-core VM)."""
    if weight_bytes <= SERIAL_MAX_BYTES_MANY_THREADS:
        return 1
    threads = numba.get_num_threads()
    return 1 if threads <= 2 and weight_bytes <= SERIAL_MAX_BYTES else threads


def _serial(weight_bytes: int) -> bool:
    return _threads_for(weight_bytes) == 1


def row_stride(w: torch.Tensor) -> int | None:
    """k where row i of the [n, d] matrix `w` is row i * k of a contiguous [*, d] array: 1 for a contiguous
    matrix, k for one slice `bundle[:, j]` of a neuron bundle [n, k, d] (a neuron's rows adjacent); None for
    any other layout."""
    if w.dim() != 2 or w.stride(1) != 1 and w.shape[1] > 1:
        return None
    if w.shape[0] <= 1:
        return 1
    stride, d = w.stride(0), max(w.shape[1], 1)
    return stride // d if stride >= d and stride % d == 0 else None


def _weight_array(w: torch.Tensor) -> tuple[np.ndarray, int]:
    """(array, k): the numba view of `w` whose row i * k is row i of `w` (`row_stride`)."""
    w = w.detach()
    k = 1
    if not w.is_contiguous():  # (checked first: a decode step calls this dozens of times)
        # A silent .contiguous() here would copy the whole matrix on every call.
        k = row_stride(w)
        if k is None:
            raise ValueError("weights must be [n_ff, d] tensors with one row per neuron: contiguous, or the "
                             "slices of a [n_ff, k, d] neuron bundle")
        if k > 1:  # every row from the first to the last of w, those of the bundle's other slices included
            w = torch.as_strided(w, ((w.shape[0] - 1) * k + 1, w.shape[1]), (w.shape[1], 1))
        else:
            w = w.contiguous()  # one row
    return (w.view(torch.int16) if w.dtype == torch.bfloat16 else w).numpy(), k


def _scale_array(scales: torch.Tensor, n_rows: int, k: int) -> np.ndarray:
    """The numba view of int8 rows' scales ([n_rows] float32), indexed as their weights' array (`_weight_array`
    with row stride k): for a bundle, a column of its [n_rows, k] scales."""
    if scales.dtype != torch.float32 or scales.shape != (n_rows,) or n_rows > 1 and scales.stride(0) != k:
        raise ValueError(f"row scales must be [{n_rows}] float32 with the weights' layout (row stride {k})")
    return torch.as_strided(scales.detach(), ((n_rows - 1) * k + 1 if n_rows else 0,), (1,)).numpy()


def _float32_array(t: torch.Tensor) -> np.ndarray:
    """t as a float32 numpy array: a view when t is contiguous float32 already (the common case, checked first:
    each torch call costs ~1 us at one token)."""
    t = t.detach()
    return t.numpy() if t.dtype == torch.float32 and t.is_contiguous() else t.to(torch.float32).contiguous().numpy()


def _index_array(idx: torch.Tensor, n_rows: int) -> np.ndarray:
    idx_np = idx.detach().to(torch.int64).contiguous().numpy()
    # The kernels do no bounds checks; a bad index would read arbitrary memory.
    if idx_np.size and (idx_np.min() < 0 or idx_np.max() >= n_rows):
        raise IndexError(f"active neuron ids must lie in [0, {n_rows})")
    return idx_np


def _output(out: torch.Tensor | None, shape: tuple[int, int]) -> torch.Tensor:
    if out is None:
        return torch.from_numpy(np.empty(shape, np.float32))  # half the cost of torch.empty here
    if out.dtype != torch.float32 or out.device.type != "cpu" or not out.is_contiguous():
        raise ValueError("out must be a contiguous float32 CPU tensor")
    if tuple(out.shape) != shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {shape}")
    return out


def sparse_gate_up(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    idx: torch.Tensor,
    activation: str,
    *,
    threshold: float = 0.0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """h[T, k] = act(x @ w_gate[idx]^T) * (x @ w_up[idx]^T); float32 or bfloat16 weights."""
    code, threshold = activation_code(activation), np.float32(threshold)
    idx_np = _index_array(idx, w_gate.shape[0])
    out = _output(out, (x.shape[0], idx_np.shape[0]))
    (w_gate, k), (w_up, k_up) = _weight_array(w_gate), _weight_array(w_up)
    if k != k_up:
        raise ValueError("gate and up rows must share one layout")
    idx_np = idx_np * k if k > 1 else idx_np
    if _serial(2 * idx_np.shape[0] * w_gate.shape[1] * w_gate.itemsize):
        _gate_up_kernel_serial(_float32_array(x), w_gate, w_up, idx_np, code, threshold, 1, out.numpy())
        return out
    n_tasks = max(1, min(idx_np.shape[0], numba.get_num_threads()))
    _gate_up_kernel(_float32_array(x), w_gate, w_up, idx_np, code, threshold, n_tasks, out.numpy())
    return out


def sparse_down(
    h: torch.Tensor,
    w_down_t: torch.Tensor,
    idx: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y[T, d] = h @ w_down_t[idx]; float32 or bfloat16 weights."""
    idx_np = _index_array(idx, w_down_t.shape[0])
    n_tokens, d = h.shape[0], w_down_t.shape[1]
    out = _output(out, (n_tokens, d))
    w_down_t, k = _weight_array(w_down_t)
    idx_np = idx_np * k if k > 1 else idx_np
    if _serial(idx_np.shape[0] * d * w_down_t.itemsize):
        _down_kernel_serial(_float32_array(h), w_down_t, idx_np, 1, out.numpy())
        return out
    n_tasks = max(1, min(idx_np.shape[0], numba.get_num_threads()))
    _down_kernel(_float32_array(h), w_down_t, idx_np, n_tasks, out.numpy())
    return out


# Rows of at least this many elements go four per pass through the GEMV: four memory streams per core and
# x_t read once for the four. Measured, 7B matrices (d 4096/11008, bfloat16): H100 host's Xeon (AVX-512), 16
# threads 63-71 -> 84-101 GB/s (cpu_dense_gemv_rows_h100.json); 2-core EPYC VM (AVX2) equal at d=4096, 23 ->
# 31 GB/s at d=11008. SmolLM2's short rows (d=576) went 1.1-1.9x slower four at a time on the VM.
GEMV_FOUR_ROWS_MIN_D = 2048


@njit(**_JIT)
def _gemv_kernel(x, w, stride, n_tasks, four_rows, out):
    """out[t, j] = x[t] . w[j * stride]."""
    n_tokens, d = x.shape
    rows = out.shape[1]
    for task in prange(n_tasks):
        lo = task * rows // n_tasks
        hi = (task + 1) * rows // n_tasks
        for t in range(n_tokens):
            x_t = x[t]
            j = lo
            while four_rows and j + 4 <= hi:
                r0, r1, r2, r3 = w[j * stride], w[(j + 1) * stride], w[(j + 2) * stride], w[(j + 3) * stride]
                a0 = np.float32(0.0)
                a1 = np.float32(0.0)
                a2 = np.float32(0.0)
                a3 = np.float32(0.0)
                for i in range(d):
                    xi = x_t[i]
                    a0 += xi * _weight(r0, i)
                    a1 += xi * _weight(r1, i)
                    a2 += xi * _weight(r2, i)
                    a3 += xi * _weight(r3, i)
                out[t, j] = a0
                out[t, j + 1] = a1
                out[t, j + 2] = a2
                out[t, j + 3] = a3
                j += 4
            while j < hi:
                row = w[j * stride]
                acc = np.float32(0.0)
                for i in range(d):
                    acc += x_t[i] * _weight(row, i)
                out[t, j] = acc
                j += 1


_gemv_kernel_serial = _serial_variant(_gemv_kernel)


def dense_gemv(x: torch.Tensor, w: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """y[T, n] = x @ w^T for a few tokens: each weight row streamed once (float32/bfloat16 weights; `w`
    contiguous or a neuron bundle's slice, `row_stride`)."""
    w_np, k = _weight_array(w)
    n = w.shape[0]
    out = _output(out, (x.shape[0], n))
    four_rows = w_np.shape[1] >= GEMV_FOUR_ROWS_MIN_D
    if _serial(n * w_np.shape[1] * w_np.itemsize):
        _gemv_kernel_serial(_float32_array(x), w_np, k, 1, four_rows, out.numpy())
        return out
    n_tasks = max(1, min(n, numba.get_num_threads()))
    _gemv_kernel(_float32_array(x), w_np, k, n_tasks, four_rows, out.numpy())
    return out


@njit(**_JIT)
def _int4_gemv_kernel(x_even, x_odd, x_group_sums, packed, scales, n_tasks, out):
    # Format: powerinfer.kernels.quantized. Byte i of a row holds columns 2i and 2i + 1, so the inputs come
    # split into their even and odd columns (contiguous loads that vectorise with the unpacking), and the
    # +8 storage offset is taken off once per group: sum((q - 8) x) = sum(q x) - 8 sum(x).
    n_tokens = x_even.shape[0]
    rows, n_groups = scales.shape
    half_group = packed.shape[1] // n_groups
    for task in prange(n_tasks):
        lo = task * rows // n_tasks
        hi = (task + 1) * rows // n_tasks
        for r in range(lo, hi):
            row, row_scales = packed[r], scales[r]
            for t in range(n_tokens):
                x_e, x_o, sums = x_even[t], x_odd[t], x_group_sums[t]
                acc = np.float32(0.0)
                for g in range(n_groups):
                    block = row[g * half_group:(g + 1) * half_group]
                    block_e = x_e[g * half_group:(g + 1) * half_group]
                    block_o = x_o[g * half_group:(g + 1) * half_group]
                    part = np.float32(0.0)
                    for i in range(half_group):
                        byte = np.uint32(block[i])  # 32-bit lanes (int64 ones would not vectorise)
                        part += (np.float32(np.int32(byte & np.uint32(15))) * block_e[i]
                                 + np.float32(np.int32(byte >> np.uint32(4))) * block_o[i])
                    acc += row_scales[g] * (part - np.float32(8.0) * sums[g])
                out[t, r] = acc


_int4_gemv_kernel_serial = _serial_variant(_int4_gemv_kernel)


@njit(**_JIT)
def _lowrank_mask_kernel(x, w1, w2, b2, threshold, n_always, n_tasks, mask):
    """mask[t, i] = (w2[i] . relu(w1 @ x[t]) + b2[i]) > threshold or i < n_always: the low-rank predictor's
    decision, its logits never stored."""
    n_tokens = x.shape[0]
    rank, n_out = w1.shape[0], w2.shape[0]
    hidden = np.empty((n_tokens, rank), np.float32)
    for t in range(n_tokens):  # rank x d: small next to the second product
        for j in range(rank):
            acc = np.float32(0.0)
            for k in range(x.shape[1]):
                acc += w1[j, k] * x[t, k]
            hidden[t, j] = max(acc, np.float32(0.0))
    for task in prange(n_tasks):
        lo = task * n_out // n_tasks
        hi = (task + 1) * n_out // n_tasks
        for i in range(lo, hi):
            row = w2[i]
            for t in range(n_tokens):
                acc = b2[i]
                for j in range(rank):
                    acc += row[j] * hidden[t, j]
                mask[t, i] = acc > threshold or i < n_always


_lowrank_mask_kernel_serial = _serial_variant(_lowrank_mask_kernel)


class LowRankMask:
    """The low-rank predictor's mask over fixed float32 weights (fc1 [r, d], fc2 [n, r], bias [n]), its first
    `always_active` columns always set; `bind` fixes the input and mask buffers too, so a decode step's call
    costs the kernel and little more (setting those columns afterwards with a torch slice took 9 us a layer on
    the 2-core VM)."""

    def __init__(self, w1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, threshold: float,
                 always_active: int = 0):
        self.w1, self.w2, self.b2 = (_float32_array(w) for w in (w1, w2, b2))
        self.threshold, self.always_active = np.float32(threshold), always_active

    def _run(self, x: np.ndarray, mask: np.ndarray) -> None:
        tasks = _threads_for(self.w1.nbytes + self.w2.nbytes)
        kernel = _lowrank_mask_kernel_serial if tasks == 1 else _lowrank_mask_kernel
        kernel(x, self.w1, self.w2, self.b2, self.threshold, self.always_active, min(self.w2.shape[0], tasks), mask)

    def _arrays(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != self.w1.shape[1] or not x.is_contiguous():
            raise ValueError(f"x must be a contiguous float32 [T, {self.w1.shape[1]}] tensor")
        if mask.dtype != torch.bool or tuple(mask.shape) != (x.shape[0], self.w2.shape[0]) or not mask.is_contiguous():
            raise ValueError(f"mask must be a contiguous bool [{x.shape[0]}, {self.w2.shape[0]}] tensor")
        return x.detach().numpy(), mask.numpy()

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.empty((x.shape[0], self.w2.shape[0]), dtype=torch.bool) if out is None else out
        self._run(*self._arrays(x, out))
        return out

    def bind(self, x: torch.Tensor, mask: torch.Tensor):
        """A call without arguments that fills `mask` from what `x` holds then."""
        return functools.partial(self._run, *self._arrays(x, mask))


def int4_gemv(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """y[T, n] = x @ dequantize_int4(packed, scales)^T for a few float32 tokens (float32 scales)."""
    packed_np = packed.detach().contiguous().numpy()
    out = _output(None, (x.shape[0], packed_np.shape[0]))
    x_np = _float32_array(x)
    x_even, x_odd = np.ascontiguousarray(x_np[:, 0::2]), np.ascontiguousarray(x_np[:, 1::2])
    sums = x_np.reshape(x_np.shape[0], scales.shape[1], -1).sum(axis=2)
    args = (x_even, x_odd, sums, packed_np, _float32_array(scales))
    if _serial(packed_np.nbytes):
        _int4_gemv_kernel_serial(*args, 1, out.numpy())
    else:
        _int4_gemv_kernel(*args, max(1, min(packed_np.shape[0], numba.get_num_threads())), out.numpy())
    return out


@njit(fastmath=_FASTMATH, cache=True, inline="always")
def _active_rows(mask, stride):
    """The rows (neuron i at row i * stride) of the neurons set in the bool `mask`, scanned eight entries at a
    time: a predicted mask is mostly zeros (2-core VM, 11,059 entries with 280 set: 5.9 us against 12.5 for
    `np.flatnonzero(mask) * stride`, whose multiply was also a parallel region of its own)."""
    n = mask.shape[0]
    n_words = n // 8
    words = mask[:n_words * 8].view(np.uint64)
    ids = np.empty(n, np.int64)
    k = 0
    for w in range(n_words):
        if words[w] != 0:
            for i in range(w * 8, w * 8 + 8):
                if mask[i]:
                    ids[k] = i * stride
                    k += 1
    for i in range(n_words * 8, n):
        if mask[i]:
            ids[k] = i * stride
            k += 1
    return ids[:k]


@njit(fastmath=_FASTMATH, cache=True, inline="always")
def _kept_neurons(h, ids, kept_h, kept_rows):
    """How many of the neurons ids[j] (activations h[:, j]) are nonzero for some token; their activations and
    ids are moved, in order, to the front of kept_h and kept_rows (kept_h may be h itself)."""
    n_tokens, n = h.shape[0], ids.shape[0]
    m = 0
    for j in range(n):
        nonzero = False
        for t in range(n_tokens):
            nonzero = nonzero or h[t, j] != 0
        if nonzero:  # kept: moved down to column m
            for t in range(n_tokens):
                kept_h[t, m] = h[t, j]
            kept_rows[m] = ids[j]
            m += 1
    return m


@njit(fastmath=_FASTMATH, cache=True, inline="always")
def _masked_rows(x, w_gate, w_up, w_down_t, s_gate, s_up, s_down, ids, code, threshold, acc):
    """acc = the FFN output over the neurons `ids` (one task's share): gate/up first, then the down AXPY over
    those with a nonzero h (a predicted neuron that stays at zero never has its down row read)."""
    n_tokens, n = x.shape[0], ids.shape[0]
    acc[:] = 0
    h = np.empty((n_tokens, n), np.float32)
    _gated_rows(x, w_gate, w_up, s_gate, s_up, ids, code, threshold, h)
    rows = np.empty(n, np.int64)
    m = _kept_neurons(h, ids, h, rows)
    _accumulate_rows(acc, h, rows, 0, m, w_down_t, s_down, 0)


@njit(**_JIT)
def _masked_ffn_kernel(x, w_gate, w_up, w_down_t, s_gate, s_up, s_down, mask, stride, code, threshold, partial,
                       out):
    """`s_gate`, `s_up`, `s_down`: None for float weights, else the row scales of int8 ones, indexed as the
    weights' rows. `partial`: [>= tasks, T, d] scratch for the tasks' partial outputs (one task per row of it,
    up to the number of active neurons), reused across calls: allocating and zeroing it per call cost ~10% of
    a 7B layer's cold FFN with 16 threads. (Software prefetch of the next neuron's rows was tried: 10-35%
    slower on the 2-core VM and on the H100 host.)"""
    # The tasks split the active neurons, not the mask: cold rows are sorted hot-first, so equal slices
    # of the mask would hand the first thread several times the work of the last.
    ids = _active_rows(mask, stride)
    k = ids.shape[0]
    if k == 0:
        out[:] = 0
        return
    n_tasks = min(partial.shape[0], k)
    for task in prange(n_tasks):
        lo = task * k // n_tasks
        hi = (task + 1) * k // n_tasks
        _masked_rows(x, w_gate, w_up, w_down_t, s_gate, s_up, s_down, ids[lo:hi], code, threshold, partial[task])
    _sum_partials(partial[:n_tasks], out)


_masked_ffn_kernel_serial = _serial_variant(_masked_ffn_kernel)


class MaskedFFN:
    """`masked_ffn` over fixed weights, for a decode step's every layer: the weights' array views, the
    activation code and the partial-sum scratch are made once. `bind` goes further for the executor's pinned
    buffers, refilled every step: their views and checks are made once too, so a call costs the kernel and
    little more (the per-call conversions and checks cost ~20 us on the H100 host's CPU, a seventh of a 7B
    layer's cold FFN)."""

    def __init__(self, w_gate, w_up, w_down_t, activation: str, threshold: float = 0.0, scales=None):
        arrays = [_weight_array(w) for w in (w_gate, w_up, w_down_t)]
        self.weights, strides = tuple(a for a, _ in arrays), {k for _, k in arrays}
        if len(strides) != 1:
            raise ValueError("gate, up and down rows must share one layout (contiguous, or one neuron bundle)")
        self.stride = strides.pop()  # 3 for a bundle [n_ff, 3, d]: an active neuron is one run of memory
        self.n_ff = w_gate.shape[0]
        if (scales is not None) != (w_gate.dtype == torch.int8):
            raise ValueError("int8 weights need their row scales (and only int8 weights take scales)")
        self.scales = (None,) * 3 if scales is None else tuple(_scale_array(s, self.n_ff, self.stride)
                                                              for s in scales)
        self.code, self.threshold = activation_code(activation), np.float32(threshold)
        self.neuron_bytes = 3 * self.weights[2].shape[1] * self.weights[2].itemsize
        # the one-thread limit is in bytes of 16-bit rows: an int8 element costs a core the same widening work
        # (2-core VM, 310 active int8 rows of d=4096 under the limit on one thread: 529 vs 464 us in bfloat16)
        self._serial_bytes = 3 * self.weights[2].shape[1] * max(self.weights[2].itemsize, 2)
        self._partial = np.zeros((0, 0, 0), np.float32)

    def _arrays(self, x: torch.Tensor, mask: torch.Tensor, out: torch.Tensor) -> tuple[np.ndarray, ...]:
        n_ff, d = self.n_ff, self.weights[2].shape[1]
        if x.dim() != 2 or x.shape[1] != d:
            raise ValueError(f"x must be [T, {d}], got {tuple(x.shape)}")
        mask_np = mask.detach().numpy()
        if mask_np.dtype != np.bool_ or mask_np.shape != (n_ff,) or not mask_np.flags.c_contiguous:
            raise ValueError(f"mask must be a contiguous [{n_ff}] bool tensor")
        x_np = _float32_array(x)
        return x_np, mask_np, _output(out, (x.shape[0], d)).numpy()

    def count(self, mask: torch.Tensor) -> int:
        """How many neurons `mask` sets."""
        return int(torch.count_nonzero(mask))

    def _run(self, x: np.ndarray, mask: np.ndarray, out: np.ndarray) -> int:
        k = int(np.count_nonzero(mask))
        if k == 0:  # no kernel call: a fifth of a synthetic 7B hybrid's cold calls have nothing active
            out.fill(0)
            return 0
        tasks = _threads_for(self._serial_bytes * k)
        if self._partial.shape[0] < tasks or self._partial.shape[1] != x.shape[0]:
            self._partial = np.zeros((numba.config.NUMBA_NUM_THREADS, *out.shape), np.float32)
        kernel = _masked_ffn_kernel_serial if tasks == 1 else _masked_ffn_kernel
        kernel(x, *self.weights, *self.scales, mask, self.stride, self.code, self.threshold,
               self._partial[:tasks], out)
        return k

    def __call__(self, x: torch.Tensor, mask: torch.Tensor, out: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, int]:
        """(y[T, d], k) for x [T, d] and a contiguous bool mask [n_ff] (`out`: where to write y)."""
        out = torch.empty((x.shape[0], self.weights[2].shape[1]), dtype=torch.float32) if out is None else out
        return out, self._run(*self._arrays(x, mask, out))

    def bind(self, x: torch.Tensor, mask: torch.Tensor, out: torch.Tensor):
        """A call without arguments that computes y into `out` from what x and mask hold then, and returns k."""
        return functools.partial(self._run, *self._arrays(x, mask, out))


def masked_ffn(x, w_gate, w_up, w_down_t, mask, activation, *, threshold: float = 0.0, scales=None,
               out: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(y[T, d], k): the FFN over the k neurons whose `mask` entry is set, one pass over their rows
    (float32 or bfloat16 weights, or int8 with `scales`: the gate, up and down rows' [n_ff] scales)."""
    return MaskedFFN(w_gate, w_up, w_down_t, activation, threshold, scales)(x, mask.detach().contiguous(), out)


# -- the small steps of a decoder layer (kernels/fused.py), float32 --------------------------------------------

@njit(fastmath=_FASTMATH, cache=True, inline="always")
def _rotate_half(source, cos, sin, target):
    """target = source rotated by the angles (rotate-half layout: element i pairs with i + D/2)."""
    half = source.shape[0] // 2
    for i in range(half):
        x1, x2 = source[i], source[half + i]
        target[i] = x1 * cos[i] - x2 * sin[i]
        target[half + i] = x2 * cos[i] + x1 * sin[i]


@njit(fastmath=_FASTMATH, cache=True, nogil=True)
def _rotary_kernel(qkv, cos, sin, n_heads, n_kv_heads, slots, to_cache, q, k, v):
    """q rotated; k rotated (and, `to_cache`, v) into slot slots[t] of k / v ([B, KV, S, D]). False, with
    nothing written, when a slot lies outside [0, S)."""
    batch, seq, width = qkv.shape
    head_dim = width // (n_heads + 2 * n_kv_heads)
    for t in range(seq):
        if slots[t] < 0 or slots[t] >= k.shape[2]:
            return False
    for b in range(batch):
        for t in range(seq):
            slot = slots[t]
            for head in range(n_heads + n_kv_heads):
                target = q[b, head, t] if head < n_heads else k[b, head - n_heads, slot]
                _rotate_half(qkv[b, t, head * head_dim:(head + 1) * head_dim], cos[t], sin[t], target)
            if to_cache:
                for head in range(n_kv_heads):
                    start = (n_heads + n_kv_heads + head) * head_dim
                    v[b, head, slot] = qkv[b, t, start:start + head_dim]
    return True


def rotary_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv_heads: int):
    """float32 CPU tensors; see fused.rotary_qkv."""
    batch, seq, width = qkv.shape
    head_dim = width // (n_heads + 2 * n_kv_heads)
    qkv = qkv.contiguous()
    q = torch.empty((batch, n_heads, seq, head_dim), dtype=torch.float32)
    k = torch.empty((batch, n_kv_heads, seq, head_dim), dtype=torch.float32)
    k_np = k.numpy()
    _rotary_kernel(qkv.numpy(), _float32_array(cos), _float32_array(sin), n_heads, n_kv_heads,
                   np.arange(seq, dtype=np.int64), False, q.numpy(), k_np, k_np)
    v = qkv[..., (n_heads + n_kv_heads) * head_dim:].view(batch, seq, n_kv_heads, head_dim).transpose(1, 2)
    return q, k, v


def rotary_qkv_to_cache(qkv, cos, sin, n_heads: int, n_kv_heads: int, keys, values, slots) -> torch.Tensor:
    """float32 CPU tensors; see fused.rotary_qkv_to_cache."""
    batch, seq, width = qkv.shape
    q = np.empty((batch, n_heads, seq, width // (n_heads + 2 * n_kv_heads)), np.float32)
    if not _rotary_kernel(_float32_array(qkv), _float32_array(cos), _float32_array(sin), n_heads, n_kv_heads,
                          slots.to(torch.int64).contiguous().numpy(), True, q, keys.numpy(), values.numpy()):
        raise IndexError(f"cache slots must lie in [0, {keys.shape[2]})")
    return torch.from_numpy(q)


@njit(**_JIT)
def _decode_attention_kernel(qkv, cos, sin, n_heads, n_kv_heads, keys, values, slot, first, last, q, out):
    """One token: q and k rotated, k and v written into `slot` of keys / values ([KV, S, D]), then each head's
    softmax attention over slots [first, last] into out [H * D]. False, with nothing written, for a bad range."""
    head_dim = q.shape[1]
    if slot < 0 or slot >= keys.shape[1] or first < 0 or first > last or last >= keys.shape[1]:
        return False
    for head in range(n_heads + n_kv_heads):
        target = q[head] if head < n_heads else keys[head - n_heads, slot]
        _rotate_half(qkv[head * head_dim:(head + 1) * head_dim], cos, sin, target)
    for head in range(n_kv_heads):
        start = (n_heads + n_kv_heads + head) * head_dim
        values[head, slot] = qkv[start:start + head_dim]
    scale = 1.0 / np.sqrt(np.float32(head_dim))
    group = n_heads // n_kv_heads
    n = last - first + 1
    for head in prange(n_heads):
        k, v, query = keys[head // group], values[head // group], q[head]
        scores = np.empty(n, np.float32)
        top = -np.inf
        for j in range(n):
            s = np.float32(0.0)
            for i in range(head_dim):
                s += query[i] * k[first + j, i]
            scores[j] = s * scale
            top = max(top, scores[j])
        total = np.float32(0.0)
        for j in range(n):
            scores[j] = np.exp(scores[j] - top)
            total += scores[j]
        y = out[head * head_dim:(head + 1) * head_dim]
        y[:] = 0.0
        for j in range(n):
            p = scores[j] / total
            for i in range(head_dim):
                y[i] += p * v[first + j, i]
    return True


def decode_attention(qkv, cos, sin, n_heads: int, n_kv_heads: int, keys, values, slot: int, first: int, last: int
                     ) -> torch.Tensor:
    """float32 CPU tensors, one token; see fused.decode_attention."""
    head_dim = qkv.shape[-1] // (n_heads + 2 * n_kv_heads)
    q = np.empty((n_heads, head_dim), np.float32)
    out = np.empty(n_heads * head_dim, np.float32)
    if not _decode_attention_kernel(_float32_array(qkv).reshape(-1), _float32_array(cos).reshape(-1),
                                    _float32_array(sin).reshape(-1), n_heads, n_kv_heads, keys.numpy()[0],
                                    values.numpy()[0], slot, first, last, q, out):
        raise IndexError(f"slot {slot}, attention over slots [{first}, {last}]: outside a cache of {keys.shape[2]}")
    return torch.from_numpy(out).view(1, 1, -1)
