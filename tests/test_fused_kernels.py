"""Fused residual-add + RMSNorm and rotary embedding: references against the definitions, Triton against the
references (odd widths, float16/bfloat16/float32, several tokens and heads)."""

import math

import pytest
import torch

from powerinfer.kernels import fused

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")


def test_rms_norm_reference_is_the_definition():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 5, 37, generator=g), torch.randn(37, generator=g)
    x64, w64 = x.double(), w.double()
    expected = w64 * x64 / (x64.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(fused.rms_norm(x, w, 1e-6).double(), expected, rtol=1e-5, atol=1e-6)


def test_add_rms_norm_adds_every_delta_before_the_norm():
    g = torch.Generator().manual_seed(1)
    x, a, b, w = (torch.randn(2, 37, generator=g) for _ in range(4))
    total, normed = fused.add_rms_norm(x, (a, b.reshape(1, 2, 37)), w[0], 1e-5)
    torch.testing.assert_close(total, x + a + b)
    torch.testing.assert_close(normed, fused.rms_norm(x + a + b, w[0], 1e-5))
    same, normed_x = fused.add_rms_norm(x, (), w[0], 1e-5)
    assert same is x and torch.equal(normed_x, fused.rms_norm(x, w[0], 1e-5))


def test_add_rms_norm_copies_the_normed_rows_as_float32():
    g = torch.Generator().manual_seed(3)
    x, delta, w = torch.randn(2, 37, generator=g), torch.randn(2, 37, generator=g), torch.rand(37, generator=g)
    copy = torch.full((2, 37), float("nan"))
    _, normed = fused.add_rms_norm(x, (delta,), w, 1e-5, copy_to=copy)
    assert torch.equal(copy, normed)
    with pytest.raises(ValueError, match="float32"):
        fused.add_rms_norm(x, (delta,), w, 1e-5, copy_to=copy.double())


def test_add_rms_norm_rejects_bad_deltas():
    x = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="at most two"):
        fused.add_rms_norm(x, (x, x, x), torch.ones(8), 1e-5)
    with pytest.raises(ValueError, match="does not match"):
        fused.add_rms_norm(x, (torch.zeros(3, 8),), torch.ones(8), 1e-5)


def test_add_rms_norm_relu_project_adds_the_predictors_hidden_layer():
    """The sum and norm of add_rms_norm, and relu(normed @ project.T) as float32; a projection of another width or
    dtype than the normed rows is refused."""
    g = torch.Generator().manual_seed(5)
    x, delta, w = torch.randn(2, 37, generator=g), torch.randn(2, 37, generator=g), torch.rand(37, generator=g)
    project = torch.randn(6, 37, generator=g)
    total, normed, hidden = fused.add_rms_norm_relu_project(x, (delta,), w, 1e-5, project)
    want_total, want_normed = fused.add_rms_norm(x, (delta,), w, 1e-5)
    torch.testing.assert_close(total, want_total)
    torch.testing.assert_close(normed, want_normed)
    torch.testing.assert_close(hidden, torch.relu(want_normed @ project.T))
    assert hidden.dtype == torch.float32 and (hidden == 0).any() and (hidden > 0).any()
    with pytest.raises(ValueError, match=r"\[r, 37\]"):
        fused.add_rms_norm_relu_project(x, (delta,), w, 1e-5, torch.randn(6, 36))
    with pytest.raises(ValueError, match="dtype"):
        fused.add_rms_norm_relu_project(x, (delta,), w, 1e-5, project.double())


def test_rotary_reference_rotates_each_pair_by_its_angle():
    """Pair (i, i + D/2) of a head at position p turns by p * inv_freq[i], as a complex number."""
    g = torch.Generator().manual_seed(2)
    heads, kv_heads, head_dim, seq = 3, 1, 8, 4
    qkv = torch.randn(2, seq, (heads + 2 * kv_heads) * head_dim, generator=g, dtype=torch.float64)
    angles = torch.arange(seq, dtype=torch.float64)[:, None] * torch.rand(head_dim // 2, generator=g, dtype=torch.float64)
    q, k, v = fused.rotary_qkv(qkv, angles.cos(), angles.sin(), heads, kv_heads)
    per_head = qkv.view(2, seq, heads + 2 * kv_heads, head_dim).transpose(1, 2)
    for got, source in ((q, per_head[:, :heads]), (k, per_head[:, heads:heads + kv_heads])):
        z = torch.complex(source[..., :head_dim // 2], source[..., head_dim // 2:]) * torch.polar(
            torch.ones_like(angles), angles)
        torch.testing.assert_close(got.double(), torch.cat([z.real, z.imag], dim=-1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(v, per_head[:, heads + kv_heads:])


def test_rotary_rejects_a_width_that_is_not_heads_times_an_even_head_dim():
    with pytest.raises(ValueError, match="head_dim"):
        fused.rotary_qkv(torch.zeros(1, 1, 30), torch.zeros(1, 2), torch.zeros(1, 2), 2, 1)


needs_numba = pytest.mark.skipif(fused._cpu_kernels is None, reason="numba not installed")


@pytest.mark.parametrize("width", [1, 37, 576])
@torch.inference_mode()
def test_cpu_add_rms_norm_equals_the_reference(width):
    """The CPU path (torch's fused rms_norm after the adds) against the definition."""
    g = torch.Generator().manual_seed(width)
    x, a, b = (torch.randn(3, 2, width, generator=g) for _ in range(3))
    w = 1 + torch.randn(width, generator=g) / 4
    assert fused._use_cpu_kernel(x, w)
    for deltas in ((), (a,), (a, b.view(6, width))):
        total, normed = fused.add_rms_norm(x, deltas, w, 1e-5)
        ref_total, ref_normed = fused.add_rms_norm_reference(x, deltas, w, 1e-5)
        assert total.shape == ref_total.shape and normed.shape == ref_normed.shape
        torch.testing.assert_close(total, ref_total, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(normed, ref_normed, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.rms_norm(x, w, 1e-5), fused.rms_norm_reference(x, w, 1e-5), rtol=1e-5, atol=1e-5)


@needs_numba
@pytest.mark.parametrize("heads,kv_heads,head_dim,seq", [(9, 3, 64, 1), (5, 1, 6, 7)])
@torch.inference_mode()
def test_numba_rotary_equals_the_reference(heads, kv_heads, head_dim, seq):
    g = torch.Generator().manual_seed(seq)
    qkv = torch.randn(2, seq, (heads + 2 * kv_heads) * head_dim, generator=g)
    angles = (torch.arange(seq)[:, None] + 5) * torch.rand(head_dim // 2, generator=g)
    assert fused._use_numba(qkv, angles.cos(), angles.sin())
    for got, want in zip(fused.rotary_qkv(qkv, angles.cos(), angles.sin(), heads, kv_heads),
                         fused.rotary_qkv_reference(qkv, angles.cos(), angles.sin(), heads, kv_heads)):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _cache_case(heads, kv_heads, head_dim, seq, slots_total, dtype=torch.float32, device="cpu"):
    """A fused projection, angles, a KV cache with every slot already filled, and the slots to write (not in
    order, not from 0)."""
    g = torch.Generator().manual_seed(heads + seq)
    qkv = torch.randn(2, seq, (heads + 2 * kv_heads) * head_dim, generator=g)
    angles = (torch.arange(seq)[:, None] + 3) * torch.rand(head_dim // 2, generator=g)
    keys, values = (torch.randn(2, kv_heads, slots_total, head_dim, generator=g) for _ in range(2))
    slots = torch.randperm(slots_total, generator=g)[:seq]
    return [t.to(device, dtype) for t in (qkv, keys, values)], angles.cos().to(device), angles.sin().to(device), \
        slots.to(device)


@needs_numba
@pytest.mark.parametrize("heads,kv_heads,head_dim,seq", [(9, 3, 64, 1), (5, 1, 6, 7)])
@torch.inference_mode()
def test_numba_rotary_into_the_cache_equals_the_reference(heads, kv_heads, head_dim, seq):
    (qkv, keys, values), cos, sin, slots = _cache_case(heads, kv_heads, head_dim, seq, 11)
    want_keys, want_values = keys.clone(), values.clone()
    want_q = fused.rotary_qkv_to_cache_reference(qkv, cos, sin, heads, kv_heads, want_keys, want_values, slots)
    assert fused._use_numba(qkv, cos, sin, keys, values)
    q = fused.rotary_qkv_to_cache(qkv, cos, sin, heads, kv_heads, keys, values, slots)
    torch.testing.assert_close(q, want_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(keys, want_keys, rtol=1e-6, atol=1e-6)  # other slots untouched
    assert torch.equal(values, want_values)
    # the reference is the separate steps: rotation, then the cache rows written at the slots
    q_alone, k_alone, v_alone = fused.rotary_qkv_reference(qkv, cos, sin, heads, kv_heads)
    assert torch.equal(want_q, q_alone) and torch.equal(want_keys[:, :, slots], k_alone)
    assert torch.equal(want_values[:, :, slots], v_alone)


def test_rotary_into_the_cache_checks_its_operands():
    (qkv, keys, values), cos, sin, slots = _cache_case(5, 1, 6, 3, 4)
    before = keys.clone()
    for grad in (False, True):  # numba, the reference
        with torch.set_grad_enabled(grad), pytest.raises(IndexError):
            fused.rotary_qkv_to_cache(qkv, cos, sin, 5, 1, keys, values, torch.tensor([0, 1, 4]))
    assert torch.equal(keys, before)
    with pytest.raises(ValueError, match="contiguous"):
        fused.rotary_qkv_to_cache(qkv, cos, sin, 5, 1, keys.transpose(2, 3), values, slots)
    with pytest.raises(ValueError, match="contiguous"):
        fused.rotary_qkv_to_cache(qkv, cos, sin, 5, 1, keys[:1], values, slots)
    with pytest.raises(ValueError, match="3 integer positions"):
        fused.rotary_qkv_to_cache(qkv, cos, sin, 5, 1, keys, values, slots[:2])


def _decode_case(heads, kv_heads, head_dim, slots_total, seed=0):
    """One token's fused projection and angles, and a KV cache with every slot already filled."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(1, 1, (heads + 2 * kv_heads) * head_dim, generator=g)
    angles = 5 * torch.rand(1, head_dim // 2, generator=g)
    keys, values = (torch.randn(1, kv_heads, slots_total, head_dim, generator=g) for _ in range(2))
    return qkv, angles.cos(), angles.sin(), keys, values


@torch.inference_mode()
def test_decode_attention_reference_is_softmax_attention_over_the_range():
    heads, kv_heads, head_dim, slot, first, last = 4, 2, 6, 9, 3, 9
    qkv, cos, sin, keys, values = _decode_case(heads, kv_heads, head_dim, 12)
    written_keys, written_values = keys.clone(), values.clone()
    y = fused.decode_attention_reference(qkv, cos, sin, heads, kv_heads, written_keys, written_values, slot, first,
                                         last)
    q, k, v = fused.rotary_qkv_reference(qkv, cos, sin, heads, kv_heads)
    keys[:, :, slot], values[:, :, slot] = k[:, :, 0], v[:, :, 0]
    assert torch.equal(written_keys, keys) and torch.equal(written_values, values)
    for head in range(heads):
        kv = head // (heads // kv_heads)
        scores = keys[0, kv, first:last + 1].double() @ q[0, head, 0].double() / math.sqrt(head_dim)
        want = torch.softmax(scores, 0) @ values[0, kv, first:last + 1].double()
        torch.testing.assert_close(y[0, 0, head * head_dim:(head + 1) * head_dim].double(), want,
                                   rtol=1e-5, atol=1e-6)


@needs_numba
@pytest.mark.parametrize("heads,kv_heads,head_dim,slots_total,slot,first,last", [
    (9, 3, 64, 40, 17, 0, 17),   # SmolLM2's heads: the token attends to every slot up to its own
    (5, 1, 6, 13, 12, 6, 12),    # a sliding window
    (3, 3, 4, 7, 0, 0, 0),       # the first token
    (2, 1, 10, 9, 8, 2, 5),      # the token's slot past the attended range (a window shorter than the cache)
])
@torch.inference_mode()
def test_numba_decode_attention_equals_the_reference(heads, kv_heads, head_dim, slots_total, slot, first, last):
    qkv, cos, sin, keys, values = _decode_case(heads, kv_heads, head_dim, slots_total, seed=heads + slot)
    want_keys, want_values = keys.clone(), values.clone()
    want = fused.decode_attention_reference(qkv, cos, sin, heads, kv_heads, want_keys, want_values, slot, first,
                                            last)
    assert fused.use_decode_attention_kernel(qkv, keys, values)
    got = fused.decode_attention(qkv, cos, sin, heads, kv_heads, keys, values, slot, first, last)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(keys, want_keys, rtol=1e-6, atol=1e-6)  # the token's slot; others untouched
    assert torch.equal(values, want_values)


def test_l2_prefetch_does_nothing_off_cuda():
    w, sink = torch.randn(5, 7), torch.zeros(1, dtype=torch.int32)
    before = w.clone()
    fused.l2_prefetch(w.T, 1 << 20, sink.float())  # no checks either: there is nothing to prefetch into
    assert torch.equal(w, before) and int(sink) == 0


@pytest.mark.cuda
@requires_cuda
def test_l2_prefetch_reads_without_writing():
    """The prefetch kernel leaves its source alone, takes any byte count (odd, past the end), and refuses a
    non-contiguous source or a sink of another dtype."""
    w = torch.randn(1001, 37, device="cuda", dtype=torch.float16)
    before = w.clone()
    sink = torch.zeros(1, dtype=torch.int32, device="cuda")
    for nbytes in (0, 3, 4097, 1 << 30):
        fused.l2_prefetch(w, nbytes, sink)
    torch.cuda.synchronize()
    assert torch.equal(w, before)
    with pytest.raises(ValueError, match="contiguous"):
        fused.l2_prefetch(w.T, 4096, sink)
    with pytest.raises(ValueError, match="int32 sink"):
        fused.l2_prefetch(w, 4096, sink.float())


def test_decode_attention_checks_its_range():
    qkv, cos, sin, keys, values = _decode_case(5, 1, 6, 8)
    before = keys.clone(), values.clone()
    for grad in (False, True):  # numba, the reference
        for slot, first, last in [(8, 0, 7), (3, 4, 3), (3, 0, 8), (-1, 0, 3)]:
            with torch.set_grad_enabled(grad), pytest.raises(IndexError, match="slot"):
                fused.decode_attention(qkv, cos, sin, 5, 1, keys, values, slot, first, last)
    assert torch.equal(keys, before[0]) and torch.equal(values, before[1])
    with pytest.raises(ValueError, match="qkv width"):
        fused.decode_attention(qkv[..., :-2], cos, sin, 5, 1, keys, values, 3, 0, 3)


def test_the_kernels_are_not_used_under_autograd():
    x = torch.randn(2, 8, requires_grad=True)
    w = torch.ones(8, requires_grad=True)
    assert not fused._use_numba(x, w)
    fused.rms_norm(x, w, 1e-5).sum().backward()
    assert x.grad is not None and w.grad is not None


TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
             torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("width, rank", [(37, 5), (4096, 32), (5120, 97)])
@torch.inference_mode()
def test_triton_add_rms_norm_relu_project_equals_the_reference(dtype, width, rank):
    """The norm's kernel with the low-rank predictor's first layer (a hybrid layer's post-attention norm),
    writing the FFN input into pinned memory as well, against the reference; the decision from its hidden layer
    equals the whole predictor's away from the threshold."""
    from powerinfer.kernels.lowrank import lowrank_decide, lowrank_mask

    g = torch.Generator().manual_seed(width + rank)
    x = torch.randn(1, 1, width, generator=g).to("cuda", dtype)
    w = (1 + torch.randn(width, generator=g) / 4).to("cuda", dtype)
    attention = torch.randn(1, width, generator=g).to("cuda", dtype)
    project = (torch.randn(rank, width, generator=g) / math.sqrt(width)).to("cuda", dtype)
    copy = torch.full((1, width), float("nan")).pin_memory()
    total, normed, hidden = fused.add_rms_norm_relu_project(x, (attention,), w, 1e-5, project, copy_to=copy)
    torch.cuda.synchronize()
    want = fused.add_rms_norm_relu_project_reference(x, (attention,), w, 1e-5, project)
    for got_part, want_part in zip((total, normed), want):
        torch.testing.assert_close(got_part, want_part, **TOLERANCE[dtype])
    torch.testing.assert_close(hidden, want[2], rtol=2e-2, atol=2e-2)  # one 16-bit rounding of a long sum
    torch.testing.assert_close(copy, normed.float().cpu().view(1, width))
    w2 = torch.randn(1001, rank, generator=g).to("cuda", dtype)
    b2, threshold = torch.randn(1001, generator=g).to("cuda", dtype), torch.tensor(0.2, device="cuda")
    flat = normed.view(1, width)
    logits = (torch.relu(flat.float() @ project.float().T) @ w2.float().T + b2.float())
    clear = (logits - 0.2).abs() > 0.1
    assert clear.float().mean() > 0.8
    got, whole = lowrank_decide(hidden, w2, b2, threshold), lowrank_mask(flat, project, w2, b2, threshold)
    assert torch.equal(got[clear], whole[clear])


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("width", [37, 576, 4096, 5120])
@torch.inference_mode()
def test_triton_add_rms_norm_equals_the_reference(dtype, width):
    g = torch.Generator().manual_seed(width)
    x = torch.randn(3, 1, width, generator=g).to("cuda", dtype)
    w = (1 + torch.randn(width, generator=g) / 4).to("cuda", dtype)
    hot = torch.randn(3, width, generator=g).to("cuda", dtype)
    cold = torch.randn(3, width, generator=g).cuda()  # the CPU part arrives as float32
    for deltas in ((), (hot,), (hot, cold)):
        total, normed = fused.add_rms_norm(x, deltas, w, 1e-5)
        ref_total, ref_normed = fused.add_rms_norm_reference(x, deltas, w, 1e-5)
        assert total.dtype == ref_total.dtype and normed.dtype == ref_normed.dtype
        torch.testing.assert_close(total, ref_total, **TOLERANCE[dtype])
        torch.testing.assert_close(normed, ref_normed, **TOLERANCE[dtype])
    # the CPU's part read from pinned memory, the FFN input written to it (zero-copy)
    pinned_cold, copy = cold.cpu().pin_memory(), torch.full((3, width), float("nan")).pin_memory()
    total, normed = fused.add_rms_norm(x, (hot, pinned_cold), w, 1e-5, copy_to=copy)
    torch.cuda.synchronize()
    ref_total, ref_normed = fused.add_rms_norm_reference(x, (hot, cold), w, 1e-5)
    torch.testing.assert_close(total, ref_total, **TOLERANCE[dtype])
    torch.testing.assert_close(copy, normed.float().cpu().view(3, width))
    with pytest.raises(ValueError, match="pinned"):
        fused.add_rms_norm(x, (cold.cpu(),), w, 1e-5)
    # float32 weight with 16-bit activations promotes, as the reference's multiply does
    normed32 = fused.rms_norm(x, w.float(), 1e-5)
    assert normed32.dtype == torch.float32
    torch.testing.assert_close(normed32, fused.rms_norm_reference(x, w.float(), 1e-5), **TOLERANCE[dtype])


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads,kv_heads,head_dim,seq", [(32, 32, 128, 1), (9, 3, 64, 7), (5, 1, 6, 3)])
@torch.inference_mode()
def test_triton_rotary_equals_the_reference(dtype, heads, kv_heads, head_dim, seq):
    g = torch.Generator().manual_seed(heads * seq)
    qkv = torch.randn(2, seq, (heads + 2 * kv_heads) * head_dim, generator=g).to("cuda", dtype)
    angles = (torch.arange(seq)[:, None] + 100) * (1e4 ** -(torch.arange(head_dim // 2) / (head_dim // 2)))
    cos, sin = angles.cos().cuda(), angles.sin().cuda()
    for got, want in zip(fused.rotary_qkv(qkv, cos, sin, heads, kv_heads),
                         fused.rotary_qkv_reference(qkv, cos, sin, heads, kv_heads)):
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, **TOLERANCE[dtype])


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads,kv_heads,head_dim,seq", [(32, 32, 128, 1), (5, 1, 6, 7)])
@torch.inference_mode()
def test_triton_rotary_into_the_cache_equals_the_reference(dtype, heads, kv_heads, head_dim, seq):
    (qkv, keys, values), cos, sin, slots = _cache_case(heads, kv_heads, head_dim, seq, 13, dtype, "cuda")
    want_keys, want_values = keys.clone(), values.clone()
    want_q = fused.rotary_qkv_to_cache_reference(qkv, cos, sin, heads, kv_heads, want_keys, want_values, slots)
    q = fused.rotary_qkv_to_cache(qkv, cos, sin, heads, kv_heads, keys, values, slots)
    torch.testing.assert_close(q, want_q, **TOLERANCE[dtype])
    torch.testing.assert_close(keys, want_keys, **TOLERANCE[dtype])
    assert torch.equal(values, want_values)
    before = keys.clone()  # a slot outside the cache: its rows are dropped, nothing else changes
    fused.rotary_qkv_to_cache(qkv[:, :1], cos[:1], sin[:1], heads, kv_heads, keys, values, torch.tensor([13]))
    assert torch.equal(keys, before)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads,kv_heads,head_dim,n_slots,window,sliding", [
    (32, 32, 128, 192, 192, None),   # LLaMA-2-7B's heads, the headline's cache
    (9, 3, 64, 2100, 2048, None),    # SmolLM2's grouped-query heads, 32 chunks, a window shorter than the cache
    (8, 2, 16, 300, 300, 37),        # a sliding window
])
@torch.inference_mode()
def test_flash_decoding_equals_the_reference_and_replays_at_every_position(dtype, heads, kv_heads, head_dim, n_slots,
                                                                            window, sliding):
    """The split-KV kernels against the reference at positions across the chunks, replayed in one CUDA graph
    whose position tensor changes between replays (as a decode step's)."""
    g = torch.Generator().manual_seed(heads)
    qkv = torch.zeros(1, 1, (heads + 2 * kv_heads) * head_dim, device="cuda", dtype=dtype)
    angles = torch.zeros(1, head_dim // 2, device="cuda")
    keys, values = (torch.randn(1, kv_heads, n_slots, head_dim, generator=g).to("cuda", dtype) for _ in range(2))
    position = torch.zeros(1, dtype=torch.long, device="cuda")

    def step():
        return fused.decode_attention_at(qkv, angles.cos(), angles.sin(), heads, kv_heads, keys, values, position,
                                         window, sliding)

    assert fused.use_decode_attention_at(qkv, keys, values)
    step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for p in (0, 1, 63, 64, 65, window // 2, window - 1, n_slots - 1):
        qkv.copy_(torch.randn(qkv.shape, generator=g).to(qkv))
        angles.copy_(p * torch.rand(angles.shape, generator=g).to(angles))
        position.fill_(p)
        want_keys, want_values = keys.clone(), values.clone()
        want = fused.decode_attention_at_reference(qkv, angles.cos(), angles.sin(), heads, kv_heads, want_keys,
                                                   want_values, position, window, sliding)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, want, **TOLERANCE[dtype])
        torch.testing.assert_close(keys, want_keys, **TOLERANCE[dtype])
        assert torch.equal(values, want_values)


@pytest.mark.cuda
@requires_cuda
@torch.inference_mode()
def test_fused_kernels_replay_in_a_cuda_graph():
    width, heads = 4096, 32
    x = torch.randn(1, 1, width, device="cuda", dtype=torch.float16)
    delta = torch.randn(1, width, device="cuda")
    w = torch.rand(width, device="cuda", dtype=torch.float16)
    qkv = torch.randn(1, 1, 3 * width, device="cuda", dtype=torch.float16)
    angle = torch.zeros(1, 64, device="cuda")

    def step():
        total, normed = fused.add_rms_norm(x, (delta,), w, 1e-5)
        q, k, _ = fused.rotary_qkv(qkv * normed[..., :1], angle.cos(), angle.sin(), heads, heads)
        return total, q

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    x.copy_(torch.randn_like(x))
    angle.fill_(math.pi / 3)
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(out, step()):
        torch.testing.assert_close(got, want)
