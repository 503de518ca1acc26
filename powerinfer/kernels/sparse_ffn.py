"""Neuron-aware sparse FFN operators: plain-PyTorch references and dispatchers.

Follows PowerInfer (Song et al. 2023, arXiv 2312.12456), §5 "Neuron-aware Sparse
Operators": with ReLU-family FFNs most neurons are inactive for a token, so the
operators compute only the rows of the active neurons, given as a list of neuron ids,
instead of multiplying by the full weight matrices.

For one LLaMA FFN with weights laid out one contiguous row per neuron
(``w_gate``, ``w_up``, ``w_down_t``: [n_ff, d], ``w_down_t`` = Wd transposed):

    h = sparse_gate_up(x, w_gate, w_up, idx, activation)   # [T, k]
    y = sparse_down(h, w_down_t, idx)                       # [T, d]

equals the dense FFN whenever every neuron outside ``idx`` has h = 0.

Each operator comes as a reference (``*_reference``), fast kernels
(``cpu.py``: numba; ``triton_gpu.py``: Triton, imported only for CUDA tensors) and a
dispatcher choosing by device and dtype (see ``select_backend``); ``use_kernel=False``
forces the reference, ``True`` demands a kernel.

Fixed-capacity form (``count=``): ``idx`` is then a buffer of capacity ``cap`` of which
only the first ``count`` entries (a 1-element integer tensor, on the device for CUDA)
are active; ``h`` is [T, cap] with zeros past ``count``. On CUDA nothing in it depends
on ``count`` at launch time, so a decode step using it can be captured in a CUDA graph.
"""

import functools
import importlib.util
from types import ModuleType

import torch

from powerinfer.kernels.activations import ACTIVATIONS, activation_code, check_gate_threshold, gated_activation

try:
    from powerinfer.kernels import cpu as _cpu_kernels
except ImportError:  # numba not installed
    _cpu_kernels = None

# Dense-vs-sparse crossover on the CPU, as the active fraction k / n_ff at which the dense
# FFN (three torch matmuls over all rows) becomes as fast as sparse_gate_up + sparse_down.
# Measured with benchmarks/bench_kernels.py --crossover: LLaMA-7B FFN shapes, float32,
# silu, sorted random active sets, densities 0.05..1.0, medians of 7 runs (3 at T=1..64).
# On this 2-core AMD EPYC VM (numba 0.68, torch 2.13, other jobs sharing the cores, so
# +-0.1): T=1: 0.8, T=4 and T=16: sparse faster even at 1.0 (torch's small-batch
# matmuls are slow here), T=64: 0.6. On a quiet 16-core Xeon (H100 host): T=1 and T=4:
# about 1.0, T=16: 0.8, T=64: 0.3-0.4. Up to DECODE_LIKE_MAX_TOKENS tokens the sparse
# kernels stay bandwidth-bound; beyond, dense matmuls gain arithmetic efficiency.
DENSE_CROSSOVER_FRACTION_DECODE = 0.8
DENSE_CROSSOVER_FRACTION_PREFILL = 0.6
DECODE_LIKE_MAX_TOKENS = 16

_CPU_WEIGHT_DTYPES = (torch.float32, torch.bfloat16)
_triton_kernels: ModuleType | None = None


def should_use_dense(k: int, n_ff: int, n_tokens: int) -> bool:
    """Whether a dense FFN beats the sparse operators for k active of n_ff neurons."""
    if n_tokens <= DECODE_LIKE_MAX_TOKENS:
        return k >= DENSE_CROSSOVER_FRACTION_DECODE * n_ff
    return k >= DENSE_CROSSOVER_FRACTION_PREFILL * n_ff


@functools.cache
def _triton_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


def _triton() -> ModuleType:
    global _triton_kernels
    if _triton_kernels is None:
        from powerinfer.kernels import triton_gpu

        _triton_kernels = triton_gpu
    return _triton_kernels


def select_backend(
    activations: torch.Tensor, *weights: torch.Tensor, use_kernel: bool | None = None
) -> str:
    """'triton', 'numba' or 'reference' for these operands.

    CUDA tensors go to Triton; CPU float32 activations with float32 or bfloat16 weights
    go to numba; anything else (float16 on the CPU, numba or Triton missing) to the
    reference. ``use_kernel=False`` forces the reference; ``True`` raises instead of
    falling back.
    """
    if use_kernel is False:
        return "reference"
    device = activations.device
    if device.type == "cuda" and _triton_available():
        return "triton"
    if (
        device.type == "cpu"
        and _cpu_kernels is not None
        and activations.dtype == torch.float32
        and all(w.device.type == "cpu" and w.dtype in _CPU_WEIGHT_DTYPES for w in weights)
    ):
        return "numba"
    if use_kernel:
        dtypes = [activations.dtype, *(w.dtype for w in weights)]
        raise RuntimeError(f"no fast kernel for {device.type} tensors of dtypes {dtypes}")
    return "reference"


def _check_operands(acts: torch.Tensor, weights: tuple[torch.Tensor, ...], idx: torch.Tensor | None, width: int):
    """acts must be [T, width]; weights share one [n_ff, d] shape; idx is 1-D integer."""
    if acts.dim() != 2 or acts.shape[1] != width:
        raise ValueError(f"expected a [T, {width}] input, got shape {tuple(acts.shape)}")
    if idx is not None and (idx.dim() != 1 or idx.dtype.is_floating_point or idx.dtype == torch.bool):
        raise ValueError("idx must be a 1-D integer tensor of neuron ids")
    for w in weights:
        if w.dim() != 2 or w.shape != weights[0].shape:
            raise ValueError("weights must share one [n_ff, d] shape")


def _count_value(count: torch.Tensor | int, capacity: int) -> int:
    # int() of a CUDA tensor synchronises; only the reference and CPU paths call this.
    return max(0, min(int(count), capacity))


def sparse_gate_up_reference(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    idx: torch.Tensor,
    activation: str,
    *,
    threshold: float = 0.0,
    count: torch.Tensor | int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """h[T, k] = act(x @ w_gate[idx]^T) * (x @ w_up[idx]^T), computed in x's dtype (`threshold`: FATReLU's
    gate threshold for relu/drelu)."""
    activation_code(activation)
    capacity = idx.shape[0]
    active = capacity if count is None else _count_value(count, capacity)
    rows = idx[:active].to(device=w_gate.device, dtype=torch.long)
    gate = x @ w_gate.index_select(0, rows).to(x.dtype).T
    up = x @ w_up.index_select(0, rows).to(x.dtype).T
    h = gated_activation(gate, up, activation, threshold)
    if active < capacity:
        h = torch.cat([h, h.new_zeros(x.shape[0], capacity - active)], dim=1)
    if out is None:
        return h
    return out.copy_(h)


def sparse_down_reference(
    h: torch.Tensor,
    w_down_t: torch.Tensor,
    idx: torch.Tensor,
    *,
    count: torch.Tensor | int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y[T, d] = h @ w_down_t[idx] (only the first ``count`` ids when given), in h's dtype."""
    active = idx.shape[0] if count is None else _count_value(count, idx.shape[0])
    rows = idx[:active].to(device=w_down_t.device, dtype=torch.long)
    y = h[:, :active] @ w_down_t.index_select(0, rows).to(h.dtype)
    if out is None:
        return y
    return out.copy_(y)


def sparse_gate_up(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    idx: torch.Tensor,
    activation: str,
    *,
    threshold: float = 0.0,
    count: torch.Tensor | int | None = None,
    out: torch.Tensor | None = None,
    use_kernel: bool | None = None,
) -> torch.Tensor:
    """Fused act(x @ w_gate[idx]^T) * (x @ w_up[idx]^T) -> [T, len(idx)] (`threshold`: FATReLU's gate threshold).

    Each active row is read once and used for all T tokens. ``count`` selects the
    fixed-capacity form (module docstring); ``out`` is an optional preallocated result.
    """
    _check_operands(x, (w_gate, w_up), idx, w_gate.shape[1])
    check_gate_threshold(activation, threshold)
    backend = select_backend(x, w_gate, w_up, use_kernel=use_kernel)
    if backend == "triton":
        return _triton().sparse_gate_up(x, w_gate, w_up, idx, activation, threshold=threshold, count=count, out=out)
    if backend == "reference":
        return sparse_gate_up_reference(x, w_gate, w_up, idx, activation, threshold=threshold, count=count, out=out)
    if count is None:
        return _cpu_kernels.sparse_gate_up(x, w_gate, w_up, idx, activation, threshold=threshold, out=out)
    active = _count_value(count, idx.shape[0])
    h = _cpu_kernels.sparse_gate_up(x, w_gate, w_up, idx[:active], activation, threshold=threshold)
    out = h.new_empty(x.shape[0], idx.shape[0]) if out is None else out
    out[:, :active] = h
    out[:, active:] = 0
    return out


def sparse_down(
    h: torch.Tensor,
    w_down_t: torch.Tensor,
    idx: torch.Tensor,
    *,
    count: torch.Tensor | int | None = None,
    out: torch.Tensor | None = None,
    use_kernel: bool | None = None,
) -> torch.Tensor:
    """y[T, d] = sum_j h[:, j] * w_down_t[idx[j]]: an AXPY over the active rows.

    Race-free: the CPU kernel sums per-thread partials, the GPU kernel per-program partials.
    """
    _check_operands(h, (w_down_t,), idx, idx.shape[0])
    backend = select_backend(h, w_down_t, use_kernel=use_kernel)
    if backend == "triton":
        return _triton().sparse_down(h, w_down_t, idx, count=count, out=out)
    if backend == "reference":
        return sparse_down_reference(h, w_down_t, idx, count=count, out=out)
    if count is None:
        return _cpu_kernels.sparse_down(h, w_down_t, idx, out=out)
    active = _count_value(count, idx.shape[0])
    return _cpu_kernels.sparse_down(h[:, :active], w_down_t, idx[:active], out=out)


def quantize_rows_int8(w: torch.Tensor, chunk_rows: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [n, d], scales float32 [n]) with w ~ q * scales[:, None]: symmetric, one scale per row, so
    a neuron's row is its own run of bytes plus one float (rows of zeros get scale 0). Done `chunk_rows` rows
    at a time, in place: the float32 temporaries stay in cache (a 13B layer's cold matrix on the 2-core VM:
    0.65 s as whole-matrix ops)."""
    w = w.detach()
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scales = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for start in range(0, w.shape[0], chunk_rows):
        block = w[start:start + chunk_rows].to(torch.float32, copy=True)  # a float32 w must not be changed
        block_scales = block.abs().amax(dim=1) / 127
        block.div_(block_scales.clamp_min(1e-30)[:, None]).round_().clamp_(-127, 127)
        q[start:start + chunk_rows] = block
        scales[start:start + chunk_rows] = block_scales
    return q, scales


def dequantize_rows_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 [n, d] matrix that `q` and `scales` encode."""
    return q.float() * scales.float()[:, None]


def masked_ffn_reference(x, w_gate, w_up, w_down_t, mask, activation, threshold: float = 0.0, scales=None
                         ) -> tuple[torch.Tensor, int]:
    """(y, k): the FFN over the k neurons whose bool `mask` entry is set (the two operators composed);
    int8 weights with their `scales` (gate, up, down: [n_ff] each) are dequantized first."""
    if scales is not None:
        w_gate, w_up, w_down_t = (dequantize_rows_int8(w, s) for w, s in zip((w_gate, w_up, w_down_t), scales))
    idx = mask.nonzero()[:, 0]
    h = sparse_gate_up_reference(x, w_gate, w_up, idx, activation, threshold=threshold)
    return sparse_down_reference(h, w_down_t, idx), idx.numel()


def masked_ffn(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor,
               mask: torch.Tensor, activation: str, *, threshold: float = 0.0, scales=None,
               use_kernel: bool | None = None) -> tuple[torch.Tensor, int]:
    """(y[T, d], k): gate/up and down over the neurons set in `mask` ([n_ff] bool), k of them.

    On the CPU one numba pass streams each active neuron's three rows once (its down row only when its h
    is nonzero); this saves the id list and two dispatches per layer, which dominate small models.
    Elsewhere: the reference. For the same weights on every call, `bind_masked_ffn`. Weights: float, or int8
    rows (`quantize_rows_int8`) with `scales`, the gate, up and down rows' scales ([n_ff] each).
    """
    _check_operands(x, (w_gate, w_up, w_down_t), None, w_gate.shape[1])
    if mask.dtype != torch.bool or mask.shape != (w_gate.shape[0],):
        raise ValueError(f"mask must be a [{w_gate.shape[0]}] bool tensor")
    return bind_masked_ffn(w_gate, w_up, w_down_t, activation, threshold=threshold, scales=scales,
                           use_kernel=use_kernel, input_dtype=x.dtype)(x, mask.contiguous())


def bind_masked_ffn(w_gate: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor, activation: str, *,
                    threshold: float = 0.0, scales=None, use_kernel: bool | None = None,
                    input_dtype: torch.dtype = torch.float32):
    """`masked_ffn` with its weights fixed, for a decode step's every layer: a callable
    (x, mask, out=None) -> (y, k) whose checks and weight views are made once, `count(mask)` -> k, and
    `bind(x, mask, out)` -> a call without arguments computing y into `out` from what x and mask hold then,
    returning k (for buffers refilled every step: their checks are made once too).
    `mask` must be a contiguous [n_ff] bool tensor, `x` of `input_dtype` (the CPU kernel takes float32)."""
    _check_operands(w_gate.new_empty(0, w_gate.shape[1]), (w_gate, w_up, w_down_t), None, w_gate.shape[1])
    check_gate_threshold(activation, threshold)
    probe = torch.empty(0, device=w_gate.device, dtype=input_dtype)
    if scales is not None or w_gate.dtype == torch.int8:
        _check_row_scales((w_gate, w_up, w_down_t), scales)
        if (use_kernel is not False and _cpu_kernels is not None and w_gate.device.type == "cpu"
                and input_dtype == torch.float32):
            return _cpu_kernels.MaskedFFN(w_gate, w_up, w_down_t, activation, threshold, scales)
        if use_kernel:
            raise RuntimeError(f"no fast int8 kernel for {w_gate.device.type} weights and {input_dtype} inputs")
        weights = (dequantize_rows_int8(w, s).to(input_dtype) for w, s in zip((w_gate, w_up, w_down_t), scales))
        return _ReferenceMaskedFFN(*weights, activation, threshold)
    if select_backend(probe, w_gate, w_up, w_down_t, use_kernel=use_kernel) == "numba":
        return _cpu_kernels.MaskedFFN(w_gate, w_up, w_down_t, activation, threshold)
    return _ReferenceMaskedFFN(w_gate, w_up, w_down_t, activation, threshold)


def _check_row_scales(weights: tuple[torch.Tensor, ...], scales) -> None:
    if any(w.dtype != torch.int8 for w in weights) or scales is None or len(scales) != 3:
        raise ValueError("int8 weights go with their row scales (gate, up, down), and scales with int8 weights")
    for s in scales:
        if s.dtype != torch.float32 or s.shape != (weights[0].shape[0],):
            raise ValueError(f"row scales must be [{weights[0].shape[0]}] float32 tensors")


class _ReferenceMaskedFFN:
    def __init__(self, *weights_activation_threshold):
        self._operands = weights_activation_threshold

    @staticmethod
    def count(mask: torch.Tensor) -> int:
        return int(mask.sum())

    def __call__(self, x, mask, out=None):
        w_gate, w_up, w_down_t, activation, threshold = self._operands
        y, k = masked_ffn_reference(x, w_gate, w_up, w_down_t, mask, activation, threshold)
        return (y if out is None else out.copy_(y)), k

    def bind(self, x, mask, out):
        return lambda: self(x, mask, out)[1]


def compact_active_reference(mask: torch.Tensor, idx_out: torch.Tensor, count_out: torch.Tensor) -> None:
    """idx_out[:count] = ids of the nonzero mask entries (ascending); count_out[0] = count."""
    ids = mask.nonzero().flatten()
    idx_out[: ids.numel()] = ids.to(idx_out.dtype)
    count_out.fill_(ids.numel())


def compact_active(
    mask: torch.Tensor, idx_out: torch.Tensor, count_out: torch.Tensor, *, use_kernel: bool | None = None
) -> None:
    """Fill a fixed-capacity id buffer and its count from a per-neuron mask (predictor output).

    On CUDA a single Triton kernel with a static launch shape, so a decode step can go from
    the predictor's mask to sparse_gate_up/sparse_down(count=...) inside one CUDA graph
    (idx_out and count_out int32 there).
    """
    if mask.dim() != 1 or idx_out.dim() != 1 or idx_out.numel() < mask.numel():
        raise ValueError("mask must be 1-D and idx_out at least as long")
    if select_backend(mask, use_kernel=use_kernel) == "triton":
        _triton().compact_active(mask, idx_out, count_out)
    else:
        compact_active_reference(mask, idx_out, count_out)


def set_num_threads(n: int) -> None:
    """Threads for the CPU kernels (the runtime's --threads); no-op without numba."""
    if _cpu_kernels is not None:
        _cpu_kernels.set_num_threads(n)


__all__ = [
    "ACTIVATIONS",
    "bind_masked_ffn",
    "dequantize_rows_int8",
    "quantize_rows_int8",
    "compact_active",
    "compact_active_reference",
    "masked_ffn",
    "masked_ffn_reference",
    "DENSE_CROSSOVER_FRACTION_DECODE",
    "DENSE_CROSSOVER_FRACTION_PREFILL",
    "select_backend",
    "set_num_threads",
    "should_use_dense",
    "sparse_down",
    "sparse_down_reference",
    "sparse_gate_up",
    "sparse_gate_up_reference",
]
