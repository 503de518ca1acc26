"""The Triton kernels against their references under Triton's interpreter (NumPy on the CPU).

Run by tests/test_triton_interpreter.py in a subprocess with TRITON_INTERPRET=1 (set before triton is
imported, and kept out of the main test process, whose CUDA tests need compiled kernels). Not collected by
the main run (the file name has no `test_` prefix). This checks the kernels' logic — masks, device counts,
slot splits, persistent loops, layouts — on odd sizes in CI without a GPU; compiled code, 16-bit rounding
and speed are the cuda-marked tests' and the benchmarks' job.
"""

import math
import os

import pytest
import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_triton_interpreter.py"

from powerinfer.kernels import fused, triton_fused, triton_gpu  # noqa: E402
from powerinfer.kernels.activations import ACTIVATIONS  # noqa: E402
from powerinfer.kernels.quantized import int4_gemv_reference, quantize_int4  # noqa: E402
from powerinfer.kernels.sparse_ffn import (  # noqa: E402
    compact_active_reference,
    sparse_down_reference,
    sparse_gate_up_reference,
)

D, N_FF = 37, 101
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def four_sms(monkeypatch):
    # The launch grids are sized by the SM count (persistent programs, down's slot splits); a small count
    # keeps the interpreter fast and still gives several programs and splits.
    monkeypatch.setattr(triton_gpu, "_sm_count", lambda device_index: 4)


def ffn(n_tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tokens, D, generator=g)
    weights = [torch.randn(N_FF, D, generator=g) / math.sqrt(D) for _ in range(3)]
    return x, weights, g


def active_sets(g: torch.Generator) -> dict[str, torch.Tensor]:
    subset = torch.randperm(N_FF, generator=g)[: N_FF // 3]
    return {"one": torch.tensor([N_FF - 1], dtype=torch.int32), "all": torch.randperm(N_FF, generator=g),
            "third": subset.sort().values.to(torch.int32)}


def id_buffer(idx: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The graph-safe form: capacity N_FF, the first `count` slots valid, stale ids after them."""
    buffer = torch.randint(0, N_FF, (N_FF,), dtype=torch.int32)
    buffer[:count] = idx[:count]
    return buffer, torch.tensor([count], dtype=torch.int32)


@pytest.mark.parametrize("n_tokens", [1, 3])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gate_up(activation, n_tokens):
    x, (w_gate, w_up, _), g = ffn(n_tokens, seed=n_tokens)
    threshold = 0.1 if activation in ("relu", "drelu") else 0.0
    for idx in active_sets(g).values():
        got = triton_gpu.sparse_gate_up(x, w_gate, w_up, idx, activation, threshold=threshold)
        want = sparse_gate_up_reference(x, w_gate, w_up, idx, activation, threshold=threshold)
        torch.testing.assert_close(got, want, **TOL)
        buffer, count = id_buffer(idx, max(0, idx.numel() - 2))
        got = triton_gpu.sparse_gate_up(x, w_gate, w_up, buffer, activation, threshold=threshold, count=count)
        want = sparse_gate_up_reference(x, w_gate, w_up, buffer, activation, threshold=threshold, count=count)
        torch.testing.assert_close(got, want, **TOL)  # zeros past the count


@pytest.mark.parametrize("n_tokens", [1, 3])
def test_down(n_tokens):
    _, (_, _, w_down_t), g = ffn(n_tokens, seed=10 + n_tokens)
    for idx in active_sets(g).values():
        h = torch.randn(n_tokens, idx.numel(), generator=g)
        torch.testing.assert_close(triton_gpu.sparse_down(h, w_down_t, idx), sparse_down_reference(h, w_down_t, idx),
                                   **TOL)
        buffer, count = id_buffer(idx, max(1, idx.numel() // 2))
        h_full = torch.randn(n_tokens, N_FF, generator=g)
        got = triton_gpu.sparse_down(h_full, w_down_t, buffer, count=count)
        torch.testing.assert_close(got, sparse_down_reference(h_full, w_down_t, buffer, count=count), **TOL)


def test_compact_active():
    g = torch.Generator().manual_seed(3)
    for mask in (torch.zeros(600, dtype=torch.bool), torch.ones(600, dtype=torch.bool),
                 torch.rand(600, generator=g) < 0.1):
        idx, count = torch.full((600,), -1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
        want_idx, want_count = idx.clone(), count.clone()
        triton_gpu.compact_active(mask, idx, count)
        compact_active_reference(mask, want_idx, want_count)
        assert torch.equal(count, want_count)
        assert torch.equal(idx[:int(count)], want_idx[:int(count)])


@pytest.mark.parametrize(("d", "group", "n_tokens"), [(96, 32, 1), (576, 64, 2), (90, 6, 3)])
def test_int4_gemv(d, group, n_tokens):
    g = torch.Generator().manual_seed(d)
    packed, scales = quantize_int4(torch.randn(37, d, generator=g) / math.sqrt(d), group)
    x = torch.randn(n_tokens, d, generator=g)
    torch.testing.assert_close(triton_gpu.int4_gemv(x, packed, scales), int4_gemv_reference(x, packed, scales),
                               **TOL)


@pytest.mark.parametrize("k", [101, 2500])  # one block of columns, and a loop over three (the last partial)
@pytest.mark.parametrize("with_bias", [False, True])
def test_dense_gemv(k, with_bias):
    g = torch.Generator().manual_seed(k)
    w = torch.randn(37, k, generator=g) / math.sqrt(k)  # 37 rows: the last program's second row is masked off
    x, bias = torch.randn(k, generator=g), torch.randn(37, generator=g) if with_bias else None
    torch.testing.assert_close(triton_gpu.dense_gemv(x, w, bias), torch.nn.functional.linear(x, w, bias), **TOL)


def test_add_rms_norm():
    g = torch.Generator().manual_seed(4)
    x, a, b = (torch.randn(3, 1, 37, generator=g) for _ in range(3))
    w = 1 + torch.randn(37, generator=g) / 4
    for deltas in ((), (a,), (a, b)):
        copy = torch.full((3, 37), float("nan"))
        got = triton_fused.add_rms_norm(x, deltas, w, 1e-5, copy)
        want = fused.add_rms_norm_reference(x, deltas, w, 1e-5)
        for got_part, want_part in zip(got, want):
            torch.testing.assert_close(got_part, want_part, **TOL)
        torch.testing.assert_close(copy, want[1].view(3, 37), **TOL)


@pytest.mark.parametrize("rank", [5, 70])  # 70: more outputs than the kernel's programs per row
def test_add_rms_norm_relu_project(rank):
    """The norm's kernel with the predictor's first layer: the same sum, norm and copy as without it, and each
    program's share of relu(normed @ project.T); the decision kernel finishes the mask from that."""
    from powerinfer.kernels.lowrank import lowrank_mask_reference

    g = torch.Generator().manual_seed(rank)
    x, a = (torch.randn(3, 1, 37, generator=g) for _ in range(2))
    w, project = 1 + torch.randn(37, generator=g) / 4, torch.randn(rank, 37, generator=g) / math.sqrt(37)
    copy = torch.full((3, 37), float("nan"))
    total, normed, hidden = triton_fused.add_rms_norm(x, (a,), w, 1e-5, copy, project)
    want = fused.add_rms_norm_relu_project_reference(x, (a,), w, 1e-5, project)
    for got_part, want_part in zip((total, normed, hidden), want):
        torch.testing.assert_close(got_part, want_part, **TOL)
    torch.testing.assert_close(copy, want[1].view(3, 37), **TOL)
    assert hidden.shape == (3, rank) and (hidden >= 0).all() and (hidden > 0).any()
    w2, b2 = torch.randn(N_FF, rank, generator=g), torch.randn(N_FF, generator=g)
    tail = torch.zeros(N_FF - 60, dtype=torch.bool)
    got = triton_gpu.lowrank_decide(hidden[:1], w2, b2, torch.tensor(0.3), always_active=4, tail=tail)
    token = normed.view(3, 37)[:1]
    want_mask = lowrank_mask_reference(token, project, w2, b2, 0.3, always_active=4)
    clear = ((torch.relu(token @ project.T) @ w2.T + b2 - 0.3).abs() > 1e-4) | (torch.arange(N_FF) < 4)
    assert clear.float().mean() > 0.98
    assert torch.equal(got[clear], want_mask[clear]) and torch.equal(tail, got[0, 60:])


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "seq"), [(9, 3, 64, 2), (5, 1, 6, 3)])
def test_rotary_qkv(heads, kv_heads, head_dim, seq):
    g = torch.Generator().manual_seed(heads)
    qkv = torch.randn(2, seq, (heads + 2 * kv_heads) * head_dim, generator=g)
    angles = torch.arange(seq)[:, None] * torch.rand(head_dim // 2, generator=g)[None, :]
    got = triton_fused.rotary_qkv(qkv, angles.cos(), angles.sin(), heads, kv_heads)
    want = fused.rotary_qkv_reference(qkv, angles.cos(), angles.sin(), heads, kv_heads)
    for got_part, want_part in zip(got, want):
        torch.testing.assert_close(got_part, want_part, **TOL)


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "seq"), [(9, 3, 64, 2), (5, 1, 6, 3)])
def test_rotary_qkv_to_cache(heads, kv_heads, head_dim, seq):
    g = torch.Generator().manual_seed(heads)
    qkv = torch.randn(2, seq, (heads + 2 * kv_heads) * head_dim, generator=g)
    angles = (torch.arange(seq)[:, None] + 3) * torch.rand(head_dim // 2, generator=g)[None, :]
    keys, values = (torch.randn(2, kv_heads, 7, head_dim, generator=g) for _ in range(2))
    slots = torch.randperm(7, generator=g)[:seq]
    want_keys, want_values = keys.clone(), values.clone()
    want = fused.rotary_qkv_to_cache_reference(qkv, angles.cos(), angles.sin(), heads, kv_heads, want_keys,
                                               want_values, slots)
    got = triton_fused.rotary_qkv_to_cache(qkv, angles.cos(), angles.sin(), heads, kv_heads, keys, values, slots)
    for got_part, want_part in zip((got, keys, values), (want, want_keys, want_values)):
        torch.testing.assert_close(got_part, want_part, **TOL)
    # a slot outside the cache: dropped, nothing written
    slots[-1] = 7
    triton_fused.rotary_qkv_to_cache(qkv, angles.cos(), angles.sin(), heads, kv_heads, keys, values, slots)
    torch.testing.assert_close(keys[:, :, slots[:-1]], want_keys[:, :, slots[:-1]], **TOL)
    assert torch.equal(values[:, :, slots[:-1]], want_values[:, :, slots[:-1]])


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "n_slots", "window", "position", "sliding"), [
    (4, 2, 8, 150, 150, 137, None),   # three chunks of 64 slots, grouped-query heads
    (3, 3, 4, 40, 40, 0, None),       # the first token
    (6, 1, 16, 90, 90, 70, 9),        # a sliding window inside one chunk
    (2, 1, 8, 300, 200, 230, None),   # the token past the attended window: its slot written, not attended
    (2, 2, 8, 50, 50, 50, None),      # a slot outside the cache: dropped, the window attended
])
def test_decode_attention(heads, kv_heads, head_dim, n_slots, window, position, sliding):
    g = torch.Generator().manual_seed(n_slots + position)
    qkv = torch.randn(1, 1, (heads + 2 * kv_heads) * head_dim, generator=g)
    angles = position * torch.rand(1, head_dim // 2, generator=g)
    keys, values = (torch.randn(1, kv_heads, n_slots, head_dim, generator=g) for _ in range(2))
    at = torch.tensor([position])
    want_keys, want_values = keys.clone(), values.clone()
    if position < n_slots:
        want = fused.decode_attention_at_reference(qkv, angles.cos(), angles.sin(), heads, kv_heads, want_keys,
                                                   want_values, at, window, sliding)
    else:  # (the reference refuses the slot) the window's slots attended, nothing written
        q = fused.rotary_qkv_reference(qkv, angles.cos(), angles.sin(), heads, kv_heads)[0]
        group = heads // kv_heads
        scores = torch.einsum("hd,hsd->hs", q[0, :, 0], keys[0].repeat_interleave(group, 0)) / head_dim ** 0.5
        want = (scores.softmax(-1)[:, None, :] @ values[0].repeat_interleave(group, 0))[:, 0].reshape(1, 1, -1)
    got = triton_fused.decode_attention(qkv, angles.cos(), angles.sin(), heads, kv_heads, keys, values, at, window,
                                        sliding)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(keys, want_keys, **TOL)
    torch.testing.assert_close(values, want_values, **TOL)


def test_l2_prefetch():
    """Reads a prefix of any byte length, past the end too, and writes nothing but (rarely) its sink."""
    w = torch.randn(101, 37).half()
    before = w.clone()
    sink = torch.zeros(1, dtype=torch.int32)
    for nbytes in (4, 4097, w.numel() * 2):
        triton_fused.l2_prefetch(w, nbytes, sink)
    assert torch.equal(w, before)


def test_wait_for_host_flag():
    """A set flag lets the kernel through and is zeroed (re-armed); a wait on a clear one would spin, which the
    CUDA tests cover with the host setting it later."""
    flag = torch.ones(1, dtype=torch.int32)
    triton_fused.wait_for_host_flag(flag)
    assert int(flag[0]) == 0


@pytest.mark.parametrize("n_tokens", [1, 3])
def test_lowrank_mask(n_tokens):
    from powerinfer.kernels.lowrank import lowrank_mask_reference

    g = torch.Generator().manual_seed(n_tokens)
    rank = 5
    w1, w2 = torch.randn(rank, D, generator=g) / math.sqrt(D), torch.randn(N_FF, rank, generator=g)
    b2, x = torch.randn(N_FF, generator=g), torch.randn(n_tokens, D, generator=g)
    logits = torch.relu(x @ w1.T) @ w2.T + b2
    for threshold in (0.0, 0.7):
        want = lowrank_mask_reference(x, w1, w2, b2, threshold)
        got = triton_gpu.lowrank_mask(x, w1, w2, b2, torch.tensor(threshold))
        clear = (logits - threshold).abs() > 1e-4  # summation order may flip a logit at the threshold
        assert clear.float().mean() > 0.98
        assert got.dtype == torch.bool and torch.equal(got[clear], want[clear])


def test_lowrank_mask_epilogue():
    """The always-active columns are set and the tail gets the mask's last entries, as in the reference."""
    from powerinfer.kernels.lowrank import lowrank_mask_reference

    g = torch.Generator().manual_seed(7)
    w1, w2 = torch.randn(5, D, generator=g) / math.sqrt(D), torch.randn(N_FF, 5, generator=g)
    b2, x = torch.randn(N_FF, generator=g) - 2, torch.randn(1, D, generator=g)
    for always, n_tail in ((0, 40), (3, N_FF), (9, 1)):
        tail, want_tail = torch.zeros(n_tail, dtype=torch.bool), torch.ones(n_tail, dtype=torch.bool)
        want = lowrank_mask_reference(x, w1, w2, b2, 0.0, always, want_tail)
        got = triton_gpu.lowrank_mask(x, w1, w2, b2, torch.tensor(0.0), always_active=always, tail=tail)
        assert got[0, :always].all() and torch.equal(got, want) and torch.equal(tail, want_tail)
        assert torch.equal(tail, got[0, N_FF - n_tail:])
