"""Every layer's cold FFN of one hybrid decode step in one parallel region (PowerInfer §5: the CPU computes the
active cold neurons of each layer while the GPU computes the hot ones; the C++ original keeps its CPU threads
in one pool that meets at spin barriers instead of forking and joining per operator).

Called once per layer from Python (`kernels.cpu.MaskedFFN`), a cold FFN pays, besides its rows, the call
into numba, the fork and join of two parallel regions (its products, then the sum of the threads' partial
outputs) and the host's wake-up on a CUDA event: a synthetic 7B's call fits ~38 us plus its rows at 71 GB/s
on a 16-thread H100 host (benchmarks/results/hybrid_7b_cold_ffn_study_h100.json). Here the threads enter
once per step and go through the layers in order (the cold FFNs of 32 synthetic 7B layers on that host, flags
preset: 52.6 against 67.7 us per layer with 107 active rows, 33.0 against 47.4 with 20; cold_step_cpu_h100.json).
Per layer each thread
1. waits until the layer's `gpu_ready` flag (pinned memory the GPU writes once the FFN input and the mask are
   there) is set;
2. scans the mask and takes its equal share of the active neurons: gate/up products, then the down AXPY of
   those with a nonzero activation into its own partial output (`kernels.cpu._masked_rows`, as MaskedFFN);
3. meets the others at a spin barrier, then sums its block of output columns over the partials into the
   layer's output buffer;
4. counts itself done; the last thread sets the layer's `cpu_ready` flag (which the GPU's next kernel
   waits for, `kernels.fused.wait_for_host_flag`) and re-arms `gpu_ready`.
A layer with few active neurons (up to `column_split_max`, by default 8 per thread) skips the partial outputs:
in step 2 the threads write their neurons' activations to a shared vector, meet, and each computes the down
product for its own block of output columns over all of them. Summing 16 partial outputs read from the caches
of the cores that wrote them dominates a small layer (16-thread H100 host, 32 synthetic 7B layers, flags preset:
12 active rows 25.4 -> 19.0 us per layer, 48 rows 37.1 -> 28.0, 128 rows 53.4 -> 52.4), while from ~200 rows
the short column runs of the down rows cost more than the sum saves (66.4 -> 74.2 us);
benchmarks/results/cold_step_column_split_h100.json.
Activations and partials alternate between two buffers by layer parity, so a thread still reading layer i's
never has them overwritten by a faster thread's layer i + 1; layer i + 2 starts after a barrier of i + 1,
which every thread reaches only after it is done with layer i (every layer has at least one barrier).

The barriers spin on atomics (LLVM atomic loads, stores and read-modify-writes emitted from numba), so every
iteration of the region's prange must run on its own thread at once: `ColdStep` refuses unless numba's
threading layer is OpenMP (a static team) with as many threads as tasks. Every wait gives up after
`spin_limit` polls (the GPU may have failed): the region then returns early and `ColdStep.__call__` raises.
"""

from __future__ import annotations

import platform

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange
from numba import types as nb_types
from numba.core import cgutils
from numba.extending import intrinsic, overload
from numba.typed import List

from powerinfer.kernels.cpu import (_FASTMATH, MaskedFFN, _accumulate_rows, _active_rows, _gated_rows, _kept_neurons,
                                   _masked_rows)

from powerinfer.kernels.fused import FLAG_STRIDE as LINE  # int32 entries per flag

# counters one per 128 bytes, as the flags, so threads polling one never share a line another thread writes
_SYNC_LINE = 16  # int64 entries
_ARRIVED, _GENERATION, _DONE, _FAILED = 0, 1, 2, 3  # counters, at index * _SYNC_LINE of `sync`
# polls before a wait gives up: with a pause per poll (a few to ~140 cycles by CPU) seconds to minutes, far past any
# layer's wait for the GPU (~0.1 ms) or a thread's preemption
DEFAULT_SPIN_LIMIT = 1_000_000_000
# layers with at most this many active neurons per thread split their down product by output columns
COLUMN_SPLIT_ROWS_PER_THREAD = 8


def _element_pointer(context, builder, array_type, array, index, index_type):
    ary = context.make_array(array_type)(context, builder, array)
    index = context.cast(builder, index, index_type, nb_types.intp)
    return cgutils.get_item_pointer(context, builder, array_type, ary, [index], wraparound=False)


@intrinsic
def _load_acquire(typingctx, array, index):
    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature.args[0], args[0], args[1], signature.args[1])
        return builder.load_atomic(pointer, "acquire", align=array.dtype.bitwidth // 8)
    return array.dtype(array, index), codegen


@intrinsic
def _store_release(typingctx, array, index, value):
    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature.args[0], args[0], args[1], signature.args[1])
        value = context.cast(builder, args[2], signature.args[2], array.dtype)
        builder.store_atomic(value, pointer, "release", align=array.dtype.bitwidth // 8)
        return context.get_dummy_value()
    return nb_types.none(array, index, value), codegen


@intrinsic
def _fetch_add(typingctx, array, index, value):
    """The element's old value; the add is one atomic read-modify-write (acquire and release)."""
    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature.args[0], args[0], args[1], signature.args[1])
        value = context.cast(builder, args[2], signature.args[2], array.dtype)
        return builder.atomic_rmw("add", pointer, value, "acq_rel")
    return array.dtype(array, index, value), codegen


_X86 = platform.machine().lower() in ("x86_64", "amd64")


@intrinsic
def _pause(typingctx):
    """The spin-wait hint (x86 `pause`: frees the core's pipeline for its sibling hyperthread); none elsewhere."""
    def codegen(context, builder, signature, args):
        if _X86:
            function = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                      "llvm.x86.sse2.pause")
            builder.call(function, [])
        return context.get_dummy_value()
    return nb_types.none(), codegen


@njit(cache=True, inline="always")
def _spin_while(values, index, value, sync, spin_limit):
    """Spin while values[index] == value; False if the step failed (here, after `spin_limit` polls, or elsewhere)."""
    spins = 0
    while _load_acquire(values, index) == value:
        _pause()
        spins += 1
        if spins >= spin_limit or _load_acquire(sync, _FAILED * _SYNC_LINE) != 0:
            _store_release(sync, _FAILED * _SYNC_LINE, 1)
            return False
    return True


@njit(cache=True, inline="always")
def _barrier(sync, n_threads, spin_limit):
    """All n_threads meet here (a counter and a generation); False if the step failed meanwhile."""
    generation = _load_acquire(sync, _GENERATION * _SYNC_LINE)
    if _fetch_add(sync, _ARRIVED * _SYNC_LINE, 1) == n_threads - 1:
        _store_release(sync, _ARRIVED * _SYNC_LINE, 0)  # before the generation moves: the next barrier's count
        _fetch_add(sync, _GENERATION * _SYNC_LINE, 1)
        return True
    return _spin_while(sync, _GENERATION * _SYNC_LINE, generation, sync, spin_limit)


def _item(items, i):
    """items[i], or None for no items (float rows have no scales)."""


@overload(_item, inline="always")
def _item_impl(items, i):
    if isinstance(items, nb_types.NoneType):
        return lambda items, i: None
    return lambda items, i: items[i]


@njit(parallel=True, fastmath=_FASTMATH, cache=True, nogil=True)
def _cold_step_kernel(xs, gates, ups, downs, s_gates, s_ups, s_downs, masks, outs, flag_rows, stride, code, threshold,
                      gpu_ready, cpu_ready, partials, hs, kept_h, kept_rows, column_acc, column_split_max, sync,
                      counts, spin_limit):
    n_threads, d = partials.shape[1], partials.shape[3]
    columns = ((d + n_threads - 1) // n_threads + 15) // 16 * 16  # a thread's block of output columns
    for thread in prange(n_threads):
        for layer in range(len(masks)):
            flag = flag_rows[layer] * LINE
            if not _spin_while(gpu_ready, flag, 0, sync, spin_limit):  # the GPU's part of the layer
                break
            x, w_gate, w_up, w_down_t = xs[layer], gates[layer], ups[layer], downs[layer]
            s_gate, s_up, s_down = _item(s_gates, layer), _item(s_ups, layer), _item(s_downs, layer)
            ids = _active_rows(masks[layer], stride)  # every thread scans: no barrier before the products
            k = ids.shape[0]
            n_tasks = min(n_threads, k)
            lo, hi = thread * k // max(n_tasks, 1), (thread + 1) * k // max(n_tasks, 1)
            out = outs[layer]
            first, last = min(d, thread * columns), min(d, (thread + 1) * columns)
            if 0 < k <= column_split_max:  # products by neurons, then down by columns: no partial outputs
                h = hs[layer % 2]
                if thread < n_tasks:
                    _gated_rows(x, w_gate, w_up, s_gate, s_up, ids[lo:hi], code, threshold, h[:, lo:hi])
                if not _barrier(sync, n_threads, spin_limit):
                    break
                h_kept, rows = kept_h[thread], kept_rows[thread]
                m = _kept_neurons(h, ids, h_kept, rows)  # alike in every thread
                acc = column_acc[thread, :last - first].reshape((1, last - first))
                acc[:] = 0
                _accumulate_rows(acc, h_kept, rows, 0, m, w_down_t, s_down, first)
                out[:, first:last] = acc
            else:  # by neurons: each thread its rows' products into its partial output, then the sum
                partial = partials[layer % 2]
                if thread < n_tasks:
                    _masked_rows(x, w_gate, w_up, w_down_t, s_gate, s_up, s_down, ids[lo:hi], code, threshold,
                                 partial[thread])
                if not _barrier(sync, n_threads, spin_limit):
                    break
                if n_tasks == 0:
                    out[:, first:last] = 0
                else:
                    out[:, first:last] = partial[0, :, first:last]
                    for task in range(1, n_tasks):
                        out[:, first:last] += partial[task, :, first:last]
            if _fetch_add(sync, _DONE * _SYNC_LINE, 1) == n_threads - 1:  # the last one hands the layer over
                _store_release(sync, _DONE * _SYNC_LINE, 0)
                counts[layer] = k
                _store_release(gpu_ready, flag, 0)
                _store_release(cpu_ready, flag, 1)


class ColdStep:
    """The cold FFNs of a decode step's layers (one token each), bound to their fixed buffers, as one call.

    `ffns`: the layers' `MaskedFFN`s (float32, bfloat16 or int8 rows, all of one dtype and layout); per layer its
    pinned input x [1, d], mask and output [1, d], and the row of its flags in `gpu_ready` / `cpu_ready` ([rows,
    LINE] int32 pinned tensors: entry [row, 0] is the flag). `column_split_max`: the most active neurons of a layer
    whose down product is split by columns (default 8 per thread; 0: never). A call returns the active neurons
    summed over layers."""

    def __init__(self, ffns: list[MaskedFFN], xs, masks, outs, flag_rows, gpu_ready: torch.Tensor,
                 cpu_ready: torch.Tensor, threads: int | None = None, spin_limit: int = DEFAULT_SPIN_LIMIT,
                 column_split_max: int | None = None):
        if not ffns:
            raise ValueError("no layers")
        if not self.compatible(ffns):
            raise ValueError("the layers' rows must be numba MaskedFFNs of one layout, dtype, width and activation")
        if not len(ffns) == len(xs) == len(masks) == len(outs) == len(flag_rows):
            raise ValueError("one x, mask, output and flag row per layer")
        self.threads = numba.get_num_threads() if threads is None else threads
        d = ffns[0].weights[0].shape[1]
        self.xs, self.masks, self.outs = (List([_array(t) for t in ts]) for ts in (xs, masks, outs))
        for x, mask, out, ffn in zip(self.xs, self.masks, self.outs, ffns):
            if x.shape != (1, d) or out.shape != (1, d) or x.dtype != np.float32 or out.dtype != np.float32:
                raise ValueError(f"x and the outputs must be [1, {d}] float32")
            if mask.dtype != np.bool_ or mask.shape != (ffn.n_ff,):
                raise ValueError(f"a layer's mask must be [{ffn.n_ff}] bool")
        self.weights = tuple(List([f.weights[j] for f in ffns]) for j in range(3))
        self.scales = (None,) * 3 if ffns[0].scales[0] is None else tuple(List([f.scales[j] for f in ffns])
                                                                           for j in range(3))
        self.stride, self.code, self.threshold = ffns[0].stride, ffns[0].code, ffns[0].threshold
        self.flag_rows = np.asarray(flag_rows, np.int64)
        for flags in (gpu_ready, cpu_ready):
            if flags.dtype != torch.int32 or flags.dim() != 2 or flags.shape[1] != LINE or \
                    not flags.is_contiguous() or int(self.flag_rows.max()) >= flags.shape[0]:
                raise ValueError(f"flags must be contiguous [rows, {LINE}] int32 tensors with a row per layer")
        self.gpu_ready, self.cpu_ready = gpu_ready.view(-1).numpy(), cpu_ready.view(-1).numpy()
        if column_split_max is None:
            column_split_max = COLUMN_SPLIT_ROWS_PER_THREAD * self.threads
        self.column_split_max = column_split_max
        cap = max(f.n_ff for f in ffns)
        self.partials = np.zeros((2, self.threads, 1, d), np.float32)
        self.hs = np.zeros((2, 1, cap), np.float32)
        self.kept_h = np.zeros((self.threads, 1, cap), np.float32)
        self.kept_rows = np.zeros((self.threads, cap), np.int64)
        self.column_acc = np.zeros((self.threads, d), np.float32)
        self.sync = np.zeros(4 * _SYNC_LINE, np.int64)
        self.counts = np.zeros(len(ffns), np.int64)
        self.spin_limit = spin_limit

    @staticmethod
    def compatible(ffns) -> bool:
        """Whether these bound cold FFNs can run as one ColdStep."""
        return all(isinstance(f, MaskedFFN) for f in ffns) and len(
            {(f.stride, f.code, float(f.threshold), f.weights[0].dtype, f.weights[0].shape[1]) for f in ffns}) <= 1

    def __call__(self) -> int:
        layer = threading_layer()
        if numba.get_num_threads() != self.threads or layer != "omp":
            raise RuntimeError(f"ColdStep needs numba's OpenMP threading layer with {self.threads} threads, got "
                               f"{layer} with {numba.get_num_threads()}")
        self.sync[:] = 0
        _cold_step_kernel(self.xs, *self.weights, *self.scales, self.masks, self.outs, self.flag_rows, self.stride,
                          self.code, self.threshold, self.gpu_ready, self.cpu_ready, self.partials, self.hs,
                          self.kept_h, self.kept_rows, self.column_acc, self.column_split_max, self.sync, self.counts,
                          self.spin_limit)
        if self.sync[_FAILED * _SYNC_LINE]:
            raise RuntimeError("the cold FFN step gave up waiting (a GPU flag never came)")
        return int(self.counts.sum())


@njit(parallel=True, cache=True)
def _touch(out):
    for i in prange(out.shape[0]):
        out[i] = i


def threading_layer() -> str:
    """numba's threading layer (it is chosen when the first parallel region runs: one runs here if none has)."""
    try:
        return numba.threading_layer()
    except ValueError:
        _touch(np.zeros(1))
        return numba.threading_layer()


def _array(t: torch.Tensor) -> np.ndarray:
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("ColdStep buffers must be contiguous CPU tensors")
    return t.detach().numpy()
