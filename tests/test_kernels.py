"""Sparse FFN kernels against their plain-PyTorch references (odd sizes, odd active sets)."""

import math

import pytest
import torch

from powerinfer.kernels import sparse_ffn
from powerinfer.kernels.activations import ACTIVATIONS
from powerinfer.kernels.quantized import dequantize_int4, int4_gemv, int4_gemv_reference, quantize_int4
from powerinfer.kernels.sparse_ffn import (
    compact_active,
    dequantize_rows_int8,
    masked_ffn,
    masked_ffn_reference,
    quantize_rows_int8,
    select_backend,
    should_use_dense,
    sparse_down,
    sparse_down_reference,
    sparse_gate_up,
    sparse_gate_up_reference,
)

D, N_FF = 37, 101
# float32 results of the kernels differ from torch's only in summation order.
F32_TOL = dict(rtol=1e-5, atol=1e-5)
# Norm-relative error bounds on the GPU, by weight dtype (METHOD: fp32 ~1e-6, 16-bit
# operands and outputs 1e-3..1e-2).
GPU_REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

needs_numba = pytest.mark.skipif(sparse_ffn._cpu_kernels is None, reason="numba not installed")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")


def active_sets(n_ff: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    subset = torch.randperm(n_ff, generator=generator)[: n_ff // 3]
    return {
        "empty": torch.empty(0, dtype=torch.long),
        "one": torch.tensor([n_ff - 1]),
        "all_permuted": torch.randperm(n_ff, generator=generator),
        "unsorted": subset,
        "sorted_int32": subset.sort().values.to(torch.int32),
    }


SET_NAMES = list(active_sets(N_FF, torch.Generator().manual_seed(0)))


def make_ffn(d, n_ff, n_tokens, seed, dtype=torch.float32, device="cpu"):
    """Random x [T, d] and weights scaled so that dot products are O(1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tokens, d, generator=g)
    weights = [torch.randn(n_ff, d, generator=g) / math.sqrt(d) for _ in range(3)]
    return x.to(device), [w.to(dtype=dtype, device=device) for w in weights]


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------- CPU (numba) kernels


@pytest.fixture(params=["serial", "threads"])
def cpu_path(request, monkeypatch):
    """Run a CPU kernel test through the single-thread kernels and through numba's thread pool."""
    from powerinfer.kernels import cpu

    for name in ("SERIAL_MAX_BYTES", "SERIAL_MAX_BYTES_MANY_THREADS"):
        monkeypatch.setattr(cpu, name, 1 << 40 if request.param == "serial" else -1)
    if request.param == "serial":
        yield
        return
    if cpu.numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has one thread: every call is serial")
    before = cpu.numba.get_num_threads()
    cpu.set_num_threads(2)  # an earlier test (e.g. a CLI run with --threads 1) may have set one
    yield
    cpu.set_num_threads(before)


@needs_numba
@pytest.mark.usefixtures("cpu_path")
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("set_name", SET_NAMES)
@pytest.mark.parametrize("n_tokens", [1, 3])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_cpu_gate_up_matches_reference(activation, n_tokens, set_name, weight_dtype):
    x, (w_gate, w_up, _) = make_ffn(D, N_FF, n_tokens, seed=n_tokens, dtype=weight_dtype)
    idx = active_sets(N_FF, torch.Generator().manual_seed(7))[set_name]
    out = torch.full((n_tokens, idx.shape[0]), float("nan"))
    h = sparse_gate_up(x, w_gate, w_up, idx, activation, out=out, use_kernel=True)
    assert h is out
    torch.testing.assert_close(h, sparse_gate_up_reference(x, w_gate, w_up, idx, activation), **F32_TOL)


@needs_numba
@pytest.mark.usefixtures("cpu_path")
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("set_name", SET_NAMES)
@pytest.mark.parametrize("n_tokens", [1, 3])
def test_cpu_down_matches_reference(n_tokens, set_name, weight_dtype):
    _, (_, _, w_down_t) = make_ffn(D, N_FF, n_tokens, seed=11, dtype=weight_dtype)
    idx = active_sets(N_FF, torch.Generator().manual_seed(3))[set_name]
    h = torch.randn(n_tokens, idx.shape[0], generator=torch.Generator().manual_seed(5))
    out = torch.full((n_tokens, D), float("nan"))
    y = sparse_down(h, w_down_t, idx, out=out, use_kernel=True)
    assert y is out
    torch.testing.assert_close(y, sparse_down_reference(h, w_down_t, idx), **F32_TOL)


@needs_numba
@pytest.mark.usefixtures("cpu_path")
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("set_name", SET_NAMES)
@pytest.mark.parametrize("n_tokens", [1, 3])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_cpu_masked_ffn_matches_reference(activation, n_tokens, set_name, weight_dtype):
    x, (w_gate, w_up, w_down_t) = make_ffn(D, N_FF, n_tokens, seed=n_tokens, dtype=weight_dtype)
    mask = torch.zeros(N_FF, dtype=torch.bool)
    mask[active_sets(N_FF, torch.Generator().manual_seed(2))[set_name].long()] = True
    y, k = masked_ffn(x, w_gate, w_up, w_down_t, mask, activation, use_kernel=True)
    want, want_k = masked_ffn_reference(x, w_gate, w_up, w_down_t, mask, activation)
    assert k == want_k == int(mask.sum())
    torch.testing.assert_close(y, want, **F32_TOL)


@needs_numba
@pytest.mark.usefixtures("cpu_path")
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_tokens", [1, 3])
@pytest.mark.parametrize("activation", ["relu", "drelu"])
def test_cpu_kernels_apply_a_fatrelu_threshold(activation, n_tokens, weight_dtype):
    """FATReLU: gate values at or below the threshold count as zero, in both CPU kernels as in the reference;
    the reference itself against the formula, and the threshold must change the result."""
    x, (w_gate, w_up, w_down_t) = make_ffn(D, N_FF, n_tokens, seed=5, dtype=weight_dtype)
    idx = torch.arange(N_FF)  # in order: the formula below computes every neuron
    threshold = 0.05
    want = sparse_gate_up_reference(x, w_gate, w_up, idx, activation, threshold=threshold)
    gate, up = x @ w_gate.float().T, x @ w_up.float().T
    by_formula = gate * (gate > threshold) * (up if activation == "relu" else up.clamp_min(0))
    torch.testing.assert_close(want, by_formula, **F32_TOL)
    assert (want == 0).sum() > (sparse_gate_up_reference(x, w_gate, w_up, idx, activation) == 0).sum()
    h = sparse_gate_up(x, w_gate, w_up, idx, activation, threshold=threshold, use_kernel=True)
    torch.testing.assert_close(h, want, **F32_TOL)
    mask = torch.rand(N_FF, generator=torch.Generator().manual_seed(4)) < 0.5
    y, _ = masked_ffn(x, w_gate, w_up, w_down_t, mask, activation, threshold=threshold, use_kernel=True)
    torch.testing.assert_close(y, masked_ffn_reference(x, w_gate, w_up, w_down_t, mask, activation, threshold)[0],
                               **F32_TOL)


@needs_numba
@pytest.mark.usefixtures("cpu_path")
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_bound_masked_ffn_reads_what_its_buffers_hold_at_each_call(weight_dtype):
    """`bind` fixes the buffers (as the executor's pinned ones): new contents written into them between calls,
    as every decode step does, must be what the next call reads."""
    from powerinfer.kernels import bind_masked_ffn

    x, (w_gate, w_up, w_down_t) = make_ffn(D, N_FF, 2, seed=9, dtype=weight_dtype)
    op = bind_masked_ffn(w_gate, w_up, w_down_t, "relu")
    x_buf, mask_buf, out_buf = torch.empty_like(x), torch.zeros(N_FF, dtype=torch.bool), torch.empty(2, D)
    run = op.bind(x_buf, mask_buf, out_buf)
    for step in range(3):
        x_buf.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(step)))
        mask_buf.copy_(torch.rand(N_FF, generator=torch.Generator().manual_seed(10 + step)) < 0.3 * step)
        want, want_k = masked_ffn_reference(x_buf, w_gate, w_up, w_down_t, mask_buf, "relu")
        assert op.count(mask_buf) == want_k
        assert run() == want_k
        torch.testing.assert_close(out_buf, want, **F32_TOL)
        y, k = op(x_buf, mask_buf)
        assert k == want_k
        torch.testing.assert_close(y, want, **F32_TOL)
    with pytest.raises(ValueError, match="out has shape"):
        op(x_buf[:1], mask_buf, out_buf)


@needs_numba
@pytest.mark.usefixtures("cpu_path")
@pytest.mark.parametrize("offset", [1, 3, 7])
def test_masked_ffn_reads_a_mask_at_any_offset(offset):
    """The kernel scans the mask eight entries at a time: a mask that is a view at an odd byte offset (a slice of
    a bigger mask, as the executor's CPU rows take theirs) and of a length that is not a multiple of eight
    gives the same rows."""
    x, (w_gate, w_up, w_down_t) = make_ffn(D, N_FF, 1, seed=14)
    big = torch.rand(N_FF + 16, generator=torch.Generator().manual_seed(offset)) < 0.3
    mask = big[offset:offset + N_FF]
    y, k = masked_ffn(x, w_gate, w_up, w_down_t, mask, "relu", use_kernel=True)
    want, want_k = masked_ffn_reference(x, w_gate, w_up, w_down_t, mask.clone(), "relu")
    assert k == want_k == int(mask.sum())
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)


def test_a_gate_threshold_needs_a_relu_family_activation():
    x, (w_gate, w_up, _) = make_ffn(D, N_FF, 1, seed=1)
    with pytest.raises(ValueError, match="relu or drelu"):
        sparse_gate_up(x, w_gate, w_up, torch.arange(4), "silu", threshold=0.1)


def test_bound_masked_ffn_falls_back_to_the_reference():
    """Without a kernel for the operands (use_kernel=False; float64 input) the bound operator is the reference,
    with the same interface: count, out, k."""
    from powerinfer.kernels import bind_masked_ffn

    x, (w_gate, w_up, w_down_t) = make_ffn(D, N_FF, 2, seed=3)
    mask = torch.rand(N_FF, generator=torch.Generator().manual_seed(1)) < 0.2
    want, want_k = masked_ffn_reference(x, w_gate, w_up, w_down_t, mask, "silu")
    op = bind_masked_ffn(w_gate, w_up, w_down_t, "silu", use_kernel=False)
    out = torch.empty(2, D)
    y, k = op(x, mask, out)
    assert y is out and k == want_k == op.count(mask)
    torch.testing.assert_close(y, want)
    out.zero_()
    assert op.bind(x, mask, out)() == want_k
    torch.testing.assert_close(out, want)
    w64 = [w.double() for w in (w_gate, w_up, w_down_t)]
    y64, _ = bind_masked_ffn(*w64, "silu", input_dtype=torch.float64)(x.double(), mask)
    torch.testing.assert_close(y64.float(), want, **F32_TOL)


def test_masked_ffn_rejects_a_bad_mask():
    x, (w_gate, w_up, w_down_t) = make_ffn(D, N_FF, 1, seed=0)
    for mask in (torch.zeros(N_FF), torch.zeros(N_FF + 1, dtype=torch.bool)):
        with pytest.raises(ValueError, match="bool"):
            masked_ffn(x, w_gate, w_up, w_down_t, mask, "relu")


@needs_numba
@pytest.mark.usefixtures("cpu_path")
def test_cpu_down_many_threads_worth_of_rows():
    # More rows than tasks, so several partial sums are reduced.
    _, (_, _, w_down_t) = make_ffn(257, 1001, 2, seed=2)
    idx = torch.randperm(1001)[:700]
    h = torch.randn(2, 700)
    torch.testing.assert_close(sparse_down(h, w_down_t, idx), sparse_down_reference(h, w_down_t, idx), **F32_TOL)


@needs_numba
@pytest.mark.usefixtures("cpu_path")
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_tokens", [1, 3])
def test_cpu_kernels_read_a_neuron_bundle_as_separate_rows(n_tokens, weight_dtype):
    """Rows bundled per neuron ([n_ff, 3, d], as the executor keeps CPU rows): every CPU kernel given the
    bundle's slices computes what it computes over the same rows as separate contiguous matrices."""
    from powerinfer.kernels import cpu

    x, weights = make_ffn(D, N_FF, n_tokens, seed=5, dtype=weight_dtype)
    bundled = torch.stack(weights, dim=1).unbind(1)
    assert [cpu.row_stride(w) for w in bundled] == [3, 3, 3] and cpu.row_stride(weights[0]) == 1
    idx = active_sets(N_FF, torch.Generator().manual_seed(6))["unsorted"]
    mask = torch.zeros(N_FF, dtype=torch.bool)
    mask[idx.long()] = True
    h = torch.randn(n_tokens, idx.shape[0], generator=torch.Generator().manual_seed(8))
    for run in (lambda w: sparse_gate_up(x, w[0], w[1], idx, "relu", use_kernel=True),
                lambda w: sparse_down(h, w[2], idx, use_kernel=True),
                lambda w: masked_ffn(x, *w, mask, "relu", use_kernel=True)[0],
                lambda w: cpu.dense_gemv(x, w[1])):
        torch.testing.assert_close(run(bundled), run(weights), **F32_TOL)


def test_int8_rows_round_trip_within_half_a_step():
    w = torch.randn(53, 41) * torch.logspace(-3, 2, 53)[:, None]
    w[7] = 0
    original = w.clone()
    q, scales = quantize_rows_int8(w, chunk_rows=10)
    assert torch.equal(w, original)  # the input is left as it was
    assert q.dtype == torch.int8 and scales.shape == (53,) and scales[7] == 0
    assert torch.all((dequantize_rows_int8(q, scales) - w).abs() <= scales[:, None] / 2 * (1 + 1e-5))
    assert torch.all(q.abs().amax(dim=1)[scales > 0] == 127)


@needs_numba
@pytest.mark.usefixtures("cpu_path")
@pytest.mark.parametrize("bundled", [False, True])
@pytest.mark.parametrize("n_tokens", [1, 3])
@pytest.mark.parametrize("set_name", SET_NAMES)
def test_cpu_masked_ffn_of_int8_rows_equals_the_reference(set_name, n_tokens, bundled):
    """int8 rows with one scale per row (`--cpu-dtype int8`), contiguous or bundled per neuron: the kernel equals
    the reference over the dequantized rows, for every activation."""
    x, weights = make_ffn(D, N_FF, n_tokens, seed=11)
    quantized = [quantize_rows_int8(w) for w in weights]
    rows, scales = [q for q, _ in quantized], [s for _, s in quantized]
    if bundled:
        rows, scales = torch.stack(rows, dim=1).unbind(1), torch.stack(scales, dim=1).unbind(1)
    mask = torch.zeros(N_FF, dtype=torch.bool)
    mask[active_sets(N_FF, torch.Generator().manual_seed(12))[set_name].long()] = True
    for activation in ACTIVATIONS:
        y, k = masked_ffn(x, *rows, mask, activation, scales=scales, use_kernel=True)
        want, k_want = masked_ffn_reference(x, *rows, mask, activation, scales=scales)
        assert k == k_want == int(mask.sum())
        torch.testing.assert_close(y, want, **F32_TOL)


def test_int8_rows_need_their_scales():
    x, weights = make_ffn(D, N_FF, 1, seed=0)
    rows = [quantize_rows_int8(w)[0] for w in weights]
    mask = torch.ones(N_FF, dtype=torch.bool)
    with pytest.raises(ValueError, match="row scales"):
        masked_ffn(x, *rows, mask, "relu")
    with pytest.raises(ValueError, match="row scales"):
        masked_ffn(x, *weights, mask, "relu", scales=[torch.ones(N_FF)] * 3)
    with pytest.raises(ValueError, match=f"\\[{N_FF}\\] float32"):
        masked_ffn(x, *rows, mask, "relu", scales=[torch.ones(N_FF + 1)] * 3)


@needs_numba
def test_cpu_rejects_out_of_range_ids_and_strided_weights():
    x, (w_gate, w_up, _) = make_ffn(D, N_FF, 1, seed=0)
    with pytest.raises(IndexError):
        sparse_gate_up(x, w_gate, w_up, torch.tensor([0, N_FF]), "relu", use_kernel=True)
    column_major = torch.randn(D, N_FF).T
    with pytest.raises(ValueError, match="one row per neuron"):
        sparse_gate_up(x, column_major, w_up, torch.tensor([0]), "relu", use_kernel=True)
    bundled = torch.stack([w_gate, w_up], dim=1).unbind(1)
    with pytest.raises(ValueError, match="one layout"):  # gate from a bundle, up contiguous
        sparse_gate_up(x, bundled[0], w_up, torch.tensor([0]), "relu", use_kernel=True)


@pytest.mark.parametrize("use_kernel", [None, False])
def test_count_form_on_cpu(use_kernel):
    x, (w_gate, w_up, w_down_t) = make_ffn(D, N_FF, 3, seed=4)
    buffer = torch.randperm(N_FF).to(torch.int32)
    count = torch.tensor([17], dtype=torch.int32)
    h_out = torch.full((3, N_FF), float("nan"))
    h = sparse_gate_up(x, w_gate, w_up, buffer, "silu", count=count, out=h_out, use_kernel=use_kernel)
    torch.testing.assert_close(h[:, :17], sparse_gate_up_reference(x, w_gate, w_up, buffer[:17], "silu"), **F32_TOL)
    assert torch.all(h[:, 17:] == 0)
    y = sparse_down(h, w_down_t, buffer, count=count, use_kernel=use_kernel)
    torch.testing.assert_close(y, sparse_down_reference(h[:, :17], w_down_t, buffer[:17]), **F32_TOL)


def test_compact_active_on_cpu():
    mask = torch.rand(N_FF, generator=torch.Generator().manual_seed(2)) < 0.3
    buffer = torch.full((N_FF,), -1, dtype=torch.int32)
    count = torch.full((1,), -1, dtype=torch.int32)
    compact_active(mask, buffer, count)
    assert int(count) == int(mask.sum())
    assert torch.equal(buffer[: int(count)].long(), mask.nonzero().flatten())


def test_reference_equals_dense_ffn_when_all_inactive_neurons_are_zero():
    x, (w_gate, w_up, w_down_t) = make_ffn(D, N_FF, 3, seed=9)
    dense_h = torch.relu(x @ w_gate.T) * (x @ w_up.T)
    idx = (dense_h != 0).any(dim=0).nonzero().flatten()
    h = sparse_gate_up_reference(x, w_gate, w_up, idx, "relu")
    torch.testing.assert_close(sparse_down_reference(h, w_down_t, idx), dense_h @ w_down_t, **F32_TOL)


# ---------------------------------------------------------------- dispatcher


@needs_numba
def test_backend_selection_on_cpu(monkeypatch):
    f32 = torch.zeros(2, 3)
    assert select_backend(f32, f32) == "numba"
    assert select_backend(f32, f32.bfloat16()) == "numba"  # bfloat16 weights: widened in-kernel
    assert select_backend(f32.half(), f32.half()) == "reference"
    assert select_backend(f32.bfloat16(), f32.bfloat16()) == "reference"
    assert select_backend(f32, f32, use_kernel=False) == "reference"
    with pytest.raises(RuntimeError):
        select_backend(f32.half(), f32.half(), use_kernel=True)
    monkeypatch.setattr(sparse_ffn, "_cpu_kernels", None)
    assert select_backend(f32, f32) == "reference"


@needs_numba
def test_dispatcher_calls_the_selected_implementation(monkeypatch):
    x, (w_gate, w_up, w_down_t) = make_ffn(D, N_FF, 1, seed=1)
    idx = torch.arange(5)
    calls = []
    monkeypatch.setattr(sparse_ffn._cpu_kernels, "sparse_gate_up", lambda *a, **k: calls.append("numba"))
    monkeypatch.setattr(sparse_ffn, "sparse_gate_up_reference", lambda *a, **k: calls.append("reference"))
    sparse_gate_up(x, w_gate, w_up, idx, "relu")
    sparse_gate_up(x, w_gate, w_up, idx, "relu", use_kernel=False)
    sparse_gate_up(x.half(), w_gate.half(), w_up.half(), idx, "relu")
    assert calls == ["numba", "reference", "reference"]


def test_reference_fallback_for_half_precision_on_cpu():
    x, (w_gate, w_up, w_down_t) = make_ffn(D, N_FF, 2, seed=3, dtype=torch.float16)
    idx = torch.tensor([4, 0, 99])
    h = sparse_gate_up(x.half(), w_gate, w_up, idx, "gelu_tanh")
    assert h.dtype == torch.float16 and h.shape == (2, 3)
    assert sparse_down(h, w_down_t, idx).shape == (2, D)


def test_invalid_arguments():
    x, (w_gate, w_up, _) = make_ffn(D, N_FF, 1, seed=0)
    with pytest.raises(ValueError):
        sparse_gate_up(x, w_gate, w_up, torch.arange(3), "swish")
    with pytest.raises(ValueError):
        sparse_gate_up(x[0], w_gate, w_up, torch.arange(3), "relu")
    with pytest.raises(ValueError):
        sparse_gate_up(x, w_gate, w_up, torch.ones(3, dtype=torch.bool), "relu")


def test_should_use_dense():
    assert not should_use_dense(100, 10_000, 1)
    assert should_use_dense(10_000, 10_000, 1)
    assert should_use_dense(10_000, 10_000, 512)
    # Prefill batches switch to dense at a lower active fraction than single tokens.
    k = int(0.5 * (sparse_ffn.DENSE_CROSSOVER_FRACTION_DECODE + sparse_ffn.DENSE_CROSSOVER_FRACTION_PREFILL) * 10_000)
    assert should_use_dense(k, 10_000, 512) and not should_use_dense(k, 10_000, 1)


@needs_numba
@pytest.mark.usefixtures("cpu_path")
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_tokens", [1, 3])
@pytest.mark.parametrize("shape", [(1, 1), (N_FF, D), (2003, 577)])
def test_cpu_gemv_matches_reference(shape, n_tokens, weight_dtype):
    from powerinfer.kernels import cpu

    torch.manual_seed(n_tokens)
    w = torch.randn(shape).to(weight_dtype)
    x = torch.randn(n_tokens, shape[1])
    torch.testing.assert_close(cpu.dense_gemv(x, w), x @ w.float().T, atol=1e-4, rtol=1e-4)


@needs_numba
def test_linear_dispatcher():
    from powerinfer.kernels import dense, linear

    torch.manual_seed(0)
    w, b = torch.randn(301, 577), torch.randn(301)
    few, many = torch.randn(1, 3, 577), torch.randn(1, dense.GEMV_MAX_TOKENS + 1, 577)
    with torch.inference_mode():
        assert dense.use_gemv_kernel(few, w) and not dense.use_gemv_kernel(many, w)
        assert not dense.use_gemv_kernel(few.half(), w.half())
        for x in (few, many):
            torch.testing.assert_close(linear(x, w, b), torch.nn.functional.linear(x, w, b), atol=1e-4, rtol=1e-4)
    assert not dense.use_gemv_kernel(few, w)  # autograd on: torch keeps the graph


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("n", "k"), [(1, 1), (301, 577), (4099, 2500)])
def test_cuda_gemv_matches_reference(n, k, dtype):
    from powerinfer.kernels import dense, linear

    g = torch.Generator().manual_seed(n)
    w = (torch.randn(n, k, generator=g) / math.sqrt(k)).to("cuda", dtype)
    b = torch.randn(n, generator=g).to("cuda", dtype)
    one, two = torch.randn(1, 1, k, generator=g).to("cuda", dtype), torch.randn(1, 2, k, generator=g).to("cuda", dtype)
    with torch.inference_mode():
        assert dense.use_gpu_gemv_kernel(one, w, b) and not dense.use_gpu_gemv_kernel(two, w)
        assert not dense.use_gpu_gemv_kernel(one, w.float())
        assert not dense.use_gpu_gemv_kernel(torch.ones(1, 1, 3, device="cuda", dtype=dtype),
                                              torch.ones(3, 5, device="cuda", dtype=dtype).t())  # column-major
        for bias in (None, b):
            want = torch.nn.functional.linear(one.float(), w.float(), None if bias is None else bias.float())
            got = linear(one, w, bias)
            assert got.shape == (1, 1, n) and got.dtype == dtype
            torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=1e-2)
    assert not dense.use_gpu_gemv_kernel(one, w)  # autograd on: torch keeps the graph


# ---------------------------------------------------------------- CUDA (Triton) kernels

GPU_SHAPES = [(D, N_FF), (1031, 2003)]  # the second spans several d blocks and down splits
GPU_CASES = [  # (activation, dtype, n_tokens): every activation once, every dtype and token path
    *((act, torch.bfloat16, t) for act in ACTIVATIONS for t in (1, 3)),
    *(("silu", dtype, t) for dtype in (torch.float16, torch.float32) for t in (1, 3)),
    ("silu", torch.bfloat16, 70),
]


def gpu_ffn(d, n_ff, n_tokens, dtype, seed):
    x, weights = make_ffn(d, n_ff, n_tokens, seed, dtype=dtype, device="cuda")
    return x.to(dtype), weights


def check_gpu_ffn(x, w_gate, w_up, w_down_t, idx, activation, h, y, count=None):
    """h and y (kernel outputs for the first `count` ids of idx) against the fp32 reference."""
    tol = GPU_REL_TOL[w_gate.dtype]
    active = idx.shape[0] if count is None else int(count)
    if active == 0:
        assert torch.all(h == 0) and torch.all(y == 0)
        return
    ids = idx[:active]
    h_ref = sparse_gate_up_reference(x.float(), w_gate.float(), w_up.float(), ids, activation)
    assert rel_error(h[:, :active], h_ref) < tol
    assert torch.all(h[:, active:] == 0)
    assert rel_error(y, sparse_down_reference(h[:, :active].float(), w_down_t.float(), ids)) < tol


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("n_tokens", [1, 5])
@pytest.mark.parametrize("activation", ["relu", "drelu"])
def test_triton_gate_up_applies_a_fatrelu_threshold(activation, n_tokens):
    x, (w_gate, w_up, _) = gpu_ffn(D, N_FF, n_tokens, torch.float32, seed=3)
    idx = torch.arange(N_FF, device="cuda")
    h = sparse_gate_up(x, w_gate, w_up, idx, activation, threshold=0.05, use_kernel=True)
    want = sparse_gate_up_reference(x, w_gate, w_up, idx, activation, threshold=0.05)
    assert rel_error(h, want) < 1e-3
    assert (h == 0).sum() > (sparse_gate_up(x, w_gate, w_up, idx, activation, use_kernel=True) == 0).sum()


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize(("activation", "dtype", "n_tokens"), GPU_CASES)
def test_triton_id_list_matches_reference(activation, dtype, n_tokens, shape):
    d, n_ff = shape
    x, (w_gate, w_up, w_down_t) = gpu_ffn(d, n_ff, n_tokens, dtype, seed=d + n_tokens)
    for idx in active_sets(n_ff, torch.Generator().manual_seed(n_tokens)).values():
        idx = idx.cuda()
        h_out = torch.full((n_tokens, idx.shape[0]), float("nan"), dtype=dtype, device="cuda")
        y_out = torch.full((n_tokens, d), float("nan"), dtype=dtype, device="cuda")
        h = sparse_gate_up(x, w_gate, w_up, idx, activation, out=h_out, use_kernel=True)
        y = sparse_down(h, w_down_t, idx, out=y_out, use_kernel=True)
        assert h is h_out and y is y_out
        check_gpu_ffn(x, w_gate, w_up, w_down_t, idx, activation, h, y)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("n_tokens", [1, 3])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_triton_id_buffer_with_device_count(shape, n_tokens):
    d, n_ff = shape
    x, (w_gate, w_up, w_down_t) = gpu_ffn(d, n_ff, n_tokens, torch.bfloat16, seed=5)
    g = torch.Generator().manual_seed(n_tokens)
    for density in (0.0, 1 / n_ff, 0.1, 1.0):
        mask = (torch.rand(n_ff, generator=g) < density).cuda()
        buffer = torch.full((n_ff,), -1, dtype=torch.int32, device="cuda")  # garbage past count
        count = torch.full((1,), -1, dtype=torch.int32, device="cuda")
        compact_active(mask, buffer, count, use_kernel=True)
        h = torch.full((n_tokens, n_ff), float("nan"), dtype=torch.bfloat16, device="cuda")
        y = torch.full((n_tokens, d), float("nan"), dtype=torch.bfloat16, device="cuda")
        sparse_gate_up(x, w_gate, w_up, buffer, "relu", count=count, out=h)
        sparse_down(h, w_down_t, buffer, count=count, out=y)
        check_gpu_ffn(x, w_gate, w_up, w_down_t, buffer, "relu", h, y, count=count)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("n", [1, 101, 2003, 40_000])  # 40_000: the prefix count loops
def test_triton_compact_active_matches_nonzero(n):
    for density in (0.0, 0.07, 1.0):
        mask = torch.rand(n, device="cuda") < density
        buffer = torch.full((n,), -1, dtype=torch.int32, device="cuda")
        count = torch.full((1,), -1, dtype=torch.int32, device="cuda")
        compact_active(mask, buffer, count, use_kernel=True)
        assert int(count) == int(mask.sum())
        assert torch.equal(buffer[: int(count)].long(), mask.nonzero().flatten())


@pytest.mark.cuda
@requires_cuda
def test_triton_decode_step_replays_in_a_cuda_graph():
    d, n_ff = 1031, 2003
    x, (w_gate, w_up, w_down_t) = gpu_ffn(d, n_ff, 1, torch.float16, seed=8)
    mask = torch.zeros(n_ff, dtype=torch.bool, device="cuda")
    buffer = torch.zeros(n_ff, dtype=torch.int32, device="cuda")
    count = torch.zeros(1, dtype=torch.int32, device="cuda")
    h = torch.empty((1, n_ff), dtype=torch.float16, device="cuda")
    y = torch.empty((1, d), dtype=torch.float16, device="cuda")

    def step():
        compact_active(mask, buffer, count)
        sparse_gate_up(x, w_gate, w_up, buffer, "silu", count=count, out=h)
        sparse_down(h, w_down_t, buffer, count=count, out=y)

    mask.copy_(torch.rand(n_ff, device="cuda") < 0.5)
    step()  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for density in (0.02, 0.3, 0.0, 0.9):
        mask.copy_(torch.rand(n_ff, device="cuda") < density)
        graph.replay()
        torch.cuda.synchronize()
        check_gpu_ffn(x, w_gate, w_up, w_down_t, buffer, "silu", h, y, count=count)


@pytest.mark.cuda
@requires_cuda
def test_backend_selection_on_cuda():
    t = torch.zeros(2, 3, device="cuda", dtype=torch.bfloat16)
    assert select_backend(t, t) == "triton"
    assert select_backend(t, t, use_kernel=False) == "reference"


# -- int4 GEMV (the quantized-gate predictor's product) -----------------------------------------------------

def test_int4_quantization_round_trips_within_half_a_step():
    w = torch.randn(53, 96, generator=torch.Generator().manual_seed(0))
    packed, scales = quantize_int4(w, 32)
    assert packed.dtype == torch.uint8 and packed.shape == (53, 48) and scales.shape == (53, 3)
    step = scales.repeat_interleave(32, dim=1)
    assert ((dequantize_int4(packed, scales) - w).abs() <= step / 2 + 1e-6).all()
    exact = torch.randint(-7, 8, (5, 64)).float() * 0.25  # on the grid: exact (scale = max|w| / 7)
    exact[:, 0] = 7 * 0.25
    assert torch.equal(dequantize_int4(*quantize_int4(exact, 64)), exact)
    with pytest.raises(ValueError, match="group"):
        quantize_int4(w, 36)


@pytest.mark.usefixtures("cpu_path")
@needs_numba
@pytest.mark.parametrize("n_tokens", [1, 3])
@pytest.mark.parametrize(("d", "group"), [(96, 32), (576, 64), (38, 2)])
def test_int4_gemv_numba_matches_reference(d, group, n_tokens):
    g = torch.Generator().manual_seed(d + n_tokens)
    # unit-scale outputs: float32 sums in another order differ by ~1e-7 of their terms' size
    packed, scales = quantize_int4(torch.randn(101, d, generator=g) / math.sqrt(d), group)
    x = torch.randn(n_tokens, d, generator=g)
    y = int4_gemv(x, packed, scales, use_kernel=True)
    torch.testing.assert_close(y, int4_gemv_reference(x, packed, scales), **F32_TOL)


def test_int4_gemv_rejects_mismatched_operands():
    packed, scales = quantize_int4(torch.randn(7, 64), 32)
    with pytest.raises(ValueError, match=r"\[T, 64\]"):
        int4_gemv(torch.randn(1, 60), packed, scales)
    with pytest.raises(ValueError, match="uint8"):
        int4_gemv(torch.randn(1, 64), packed.to(torch.int16), scales)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n_tokens", [1, 5])
@pytest.mark.parametrize(("d", "group"), [(96, 32), (576, 64), (4096, 64), (90, 6)])
def test_triton_int4_gemv_matches_reference(d, group, n_tokens, dtype):
    g = torch.Generator().manual_seed(d + n_tokens)
    packed, scales = quantize_int4(torch.randn(1031, d, generator=g) / math.sqrt(d), group)
    x = torch.randn(n_tokens, d, generator=g)
    packed, scales, x = packed.cuda(), scales.to("cuda", dtype), x.to("cuda", dtype)
    y = int4_gemv(x, packed, scales, use_kernel=True)
    assert y.dtype == dtype and y.shape == (n_tokens, 1031)
    assert rel_error(y, int4_gemv_reference(x, packed, scales)) < GPU_REL_TOL[dtype]


# -- the low-rank predictor's mask (kernels.lowrank) --------------------------------------------------------

@pytest.mark.usefixtures("cpu_path")
@needs_numba
@pytest.mark.parametrize("n_tokens", [1, 3])
@pytest.mark.parametrize(("d", "rank", "n_ff"), [(37, 5, 101), (96, 16, 300)])
def test_lowrank_mask_numba_matches_reference(d, rank, n_ff, n_tokens):
    from powerinfer.kernels.lowrank import bind_lowrank_mask, lowrank_mask, lowrank_mask_reference

    g = torch.Generator().manual_seed(d + n_tokens)
    w1, w2 = torch.randn(rank, d, generator=g) / math.sqrt(d), torch.randn(n_ff, rank, generator=g)
    b2, x = torch.randn(n_ff, generator=g), torch.randn(n_tokens, d, generator=g)
    logits = torch.relu(x @ w1.T) @ w2.T + b2
    for threshold in (0.0, 0.7):
        want = lowrank_mask_reference(x, w1, w2, b2, threshold)
        assert torch.equal(want, logits > threshold)
        # summation order may flip a logit within rounding of the threshold: compare away from it
        clear = (logits - threshold).abs() > 1e-4
        assert clear.float().mean() > 0.99
        got = lowrank_mask(x, w1, w2, b2, threshold, use_kernel=True)
        assert got.shape == want.shape and torch.equal(got[clear], want[clear])
        mask = torch.zeros(n_tokens, n_ff, dtype=torch.bool)
        bound = bind_lowrank_mask(w1, w2, b2, threshold).bind(x, mask)
        bound()
        assert torch.equal(mask, got)
        x.mul_(-1)  # a bound call reads what the buffer holds at call time
        bound()
        assert torch.equal(mask, lowrank_mask(x, w1, w2, b2, threshold, use_kernel=True))
        x.mul_(-1)
        # the first columns always set, in the kernel as in the reference
        for always in (1, 13, n_ff):
            want_always = lowrank_mask_reference(x, w1, w2, b2, threshold, always)
            assert want_always[:, :always].all() and torch.equal(want_always[:, always:], want[:, always:])
            got_always = lowrank_mask(x, w1, w2, b2, threshold, always_active=always, use_kernel=True)
            assert got_always[:, :always].all() and torch.equal(got_always[:, always:], got[:, always:])
            bind_lowrank_mask(w1, w2, b2, threshold, always).bind(x, mask)()
            assert torch.equal(mask, got_always)
        tail = torch.zeros(n_ff // 2, dtype=torch.bool)
        if n_tokens == 1:
            got = lowrank_mask(x, w1, w2, b2, threshold, tail=tail, use_kernel=True)
            assert torch.equal(tail, got[0, n_ff - n_ff // 2:])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n_tokens", [1, 3, 9])
def test_lowrank_mask_triton_matches_reference_float16(n_tokens):
    """The predictor's decision on CUDA: Triton for decode-sized inputs (fp16 rounding as the reference's
    products), the reference beyond; both agree away from the threshold."""
    from powerinfer.kernels.lowrank import lowrank_mask, lowrank_mask_reference
    from powerinfer.models.predictor import ActivationPredictor

    torch.manual_seed(n_tokens)
    predictor = ActivationPredictor(4099, 17, 11007).cuda().half()
    predictor.threshold.fill_(0.3)
    x = torch.randn(n_tokens, 4099, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        weights = predictor.fc1.weight, predictor.fc2.weight, predictor.fc2.bias
        want = lowrank_mask_reference(x, *weights, predictor.threshold)
        logits = predictor(x).float()
        got = lowrank_mask(x, *weights, predictor.threshold, use_kernel=n_tokens <= 4 or None)
        clear = (logits - 0.3).abs() > 4e-3  # a few fp16 steps: summation order may flip a logit there
        assert clear.float().mean() > 0.9
        assert got.dtype == torch.bool and torch.equal(got[clear], want[clear])
        assert torch.equal(predictor.predict(x), got)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("always, n_tail", [(0, 6000), (4, 11007), (13, 1)])
def test_lowrank_mask_epilogue_writes_pinned_tail_float16(always, n_tail):
    """The decision kernel sets the always-active columns and writes the mask's tail into pinned host memory
    itself, as the plain kernel's mask with those columns set."""
    from powerinfer.kernels.lowrank import lowrank_mask

    torch.manual_seed(always)
    w1 = torch.randn(17, 4099, device="cuda", dtype=torch.float16) / 64
    w2 = torch.randn(11007, 17, device="cuda", dtype=torch.float16)
    b2, x = torch.randn(11007, device="cuda", dtype=torch.float16) - 1, torch.randn(1, 4099, device="cuda").half()
    threshold = torch.tensor(0.0, device="cuda")
    tail = torch.zeros(n_tail, dtype=torch.bool, pin_memory=True)
    got = lowrank_mask(x, w1, w2, b2, threshold, always_active=always, tail=tail)
    torch.cuda.synchronize()
    plain = lowrank_mask(x, w1, w2, b2, threshold)
    want = plain.clone()
    want[:, :always] = True
    assert torch.equal(got, want) and torch.equal(tail, got[0, 11007 - n_tail:].cpu())


def test_lowrank_mask_epilogue_reference_and_refusals():
    """On the CPU the reference: the always-active columns set, the tail a copy of the mask's last entries;
    a tail for several tokens, of the wrong dtype, or too long, and always_active past the mask are errors."""
    from powerinfer.kernels.lowrank import bind_lowrank_mask, lowrank_mask

    torch.manual_seed(0)
    w1, w2, b2 = torch.randn(3, 11), torch.randn(29, 3), torch.randn(29) - 3
    x = torch.randn(1, 11)
    tail = torch.zeros(10, dtype=torch.bool)
    got = lowrank_mask(x, w1, w2, b2, 0.0, always_active=5, tail=tail)
    plain = lowrank_mask(x, w1, w2, b2, 0.0)
    assert got[0, :5].all() and torch.equal(got[0, 5:], plain[0, 5:]) and torch.equal(tail, got[0, 19:])
    with pytest.raises(ValueError, match="one token"):
        lowrank_mask(torch.randn(2, 11), w1, w2, b2, 0.0, tail=tail)
    with pytest.raises(ValueError, match="bool"):
        lowrank_mask(x, w1, w2, b2, 0.0, tail=torch.zeros(10))
    with pytest.raises(ValueError, match="at most 29"):
        lowrank_mask(x, w1, w2, b2, 0.0, tail=torch.zeros(30, dtype=torch.bool))
    with pytest.raises(ValueError, match="always_active"):
        lowrank_mask(x, w1, w2, b2, 0.0, always_active=30)
    with pytest.raises(ValueError, match="always_active"):
        bind_lowrank_mask(w1, w2, b2, 0.0, always_active=-1)


def test_lowrank_decide_finishes_the_mask_from_the_hidden_layer():
    """The decision from relu(x @ w1.T) equals the whole predictor's, with its epilogue; a hidden layer of another
    rank or dtype is refused."""
    from powerinfer.kernels.lowrank import lowrank_decide, lowrank_mask

    torch.manual_seed(1)
    w1, w2, b2, x = torch.randn(3, 11), torch.randn(29, 3), torch.randn(29) - 1, torch.randn(1, 11)
    tail, want_tail = torch.zeros(10, dtype=torch.bool), torch.zeros(10, dtype=torch.bool)
    want = lowrank_mask(x, w1, w2, b2, 0.0, always_active=2, tail=want_tail)
    got = lowrank_decide(torch.relu(x @ w1.T), w2, b2, 0.0, always_active=2, tail=tail)
    assert torch.equal(got, want) and torch.equal(tail, want_tail) and want.any() and not want.all()
    with pytest.raises(ValueError, match="float32"):
        lowrank_decide(torch.zeros(1, 4), w2, b2, 0.0)
    with pytest.raises(ValueError, match="float32"):
        lowrank_decide(torch.zeros(1, 3, dtype=torch.float64), w2, b2, 0.0)


@needs_numba
def test_lowrank_mask_rejects_mismatched_buffers():
    from powerinfer.kernels.lowrank import bind_lowrank_mask

    bound = bind_lowrank_mask(torch.randn(4, 8), torch.randn(10, 4), torch.randn(10), 0.0)
    with pytest.raises(ValueError, match="mask"):
        bound.bind(torch.zeros(1, 8), torch.zeros(1, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="x must be"):
        bound.bind(torch.zeros(1, 7), torch.zeros(1, 10, dtype=torch.bool))
