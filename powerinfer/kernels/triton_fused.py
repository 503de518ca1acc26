"""Triton kernels for ``fused.py``: residual add + RMSNorm (optionally with a low-rank predictor's first layer),
the rotary embedding of q and k, a decode token's attention (flash-decoding: Dao et al. 2023, "Flash-Decoding for
long-context inference"), and a stream's wait for a flag the host sets.

Pinned host tensors (a delta, the norm's float32 copy, the flag) are read and written in place through their
device-mapped addresses; host deltas are read with volatile loads, past any cached copy, since the host may
have written them after the kernel was queued (``wait_for_host_flag``). One program per row (token) for the
norm (with a projection, up to 64 per row, each norming the row and taking its share of the projection's
outputs), one per (token, head) for the rotation, one per (KV head, chunk of slots) and then one per query head
for the attention; every launch shape depends on the tensor shapes alone, so all run inside the CUDA graphs of a
decode step. Arithmetic is float32 and rounds where the references round: the sum to x's dtype before it is
normed, the normed row to x's dtype before the weight multiplies it."""

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(x_ptr, delta1_ptr, delta2_ptr, weight_ptr, sum_ptr, normed_ptr, copy_ptr, project_ptr,
                         hidden_ptr, width, rank, eps, N_DELTAS: tl.constexpr, COPY: tl.constexpr,
                         PROJECT: tl.constexpr, BLOCK: tl.constexpr, VOLATILE1: tl.constexpr,
                         VOLATILE2: tl.constexpr):
    # grid (rows, programs per row): every program of a row norms it (a few KB from L2), the first one stores
    # it, and with PROJECT each takes its share of relu(normed . project[j]) over j < rank
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < width
    first = cols + tl.program_id(1) * BLOCK < width  # `inside` in the row's first program, else none
    offsets = row * width + cols
    x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    if N_DELTAS > 0:
        delta = tl.load(delta1_ptr + offsets, mask=inside, other=0.0, volatile=VOLATILE1)
        delta = delta.to(x_ptr.dtype.element_ty).to(tl.float32)
        if N_DELTAS > 1:
            more = tl.load(delta2_ptr + offsets, mask=inside, other=0.0, volatile=VOLATILE2).to(x_ptr.dtype.element_ty)
            delta = (delta + more.to(tl.float32)).to(x_ptr.dtype.element_ty).to(tl.float32)
        x = (x + delta).to(x_ptr.dtype.element_ty)
        tl.store(sum_ptr + offsets, x, mask=first)
        x = x.to(tl.float32)
    inverse_rms = tl.rsqrt(tl.sum(x * x, axis=0) / width + eps)
    normed = (x * inverse_rms).to(x_ptr.dtype.element_ty).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    normed = (weight * normed).to(normed_ptr.dtype.element_ty)
    tl.store(normed_ptr + offsets, normed, mask=first)
    if COPY:
        tl.store(copy_ptr + offsets, normed.to(tl.float32), mask=first)
    if PROJECT:  # rounded to normed's dtype, as the reference's 16-bit product is
        for j in range(tl.program_id(1), rank, tl.num_programs(1)):
            w = tl.load(project_ptr + j * width + cols, mask=inside, other=0.0).to(tl.float32)
            dot = tl.sum(normed.to(tl.float32) * w, axis=0).to(normed_ptr.dtype.element_ty).to(tl.float32)
            tl.store(hidden_ptr + row * rank + j, tl.maximum(dot, 0.0))


# programs per row that share the projection of `add_rms_norm(..., project=)`: one per output up to this many
_PROJECT_PROGRAMS = 64


def add_rms_norm(x: torch.Tensor, deltas: tuple[torch.Tensor, ...], weight: torch.Tensor, eps: float,
                 copy_to: torch.Tensor | None = None, project: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(x + deltas, its norm, relu(normed @ project.T) as float32 [rows, r] or None without `project`)."""
    width = x.shape[-1]
    x = x.contiguous()
    deltas = tuple(d.contiguous() for d in deltas)
    total = torch.empty_like(x) if deltas else x
    normed = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rows = x.numel() // width
    rank = 0 if project is None else project.shape[0]
    hidden = None if project is None else torch.empty((rows, rank), dtype=torch.float32, device=x.device)
    if rows:
        block = triton.next_power_of_2(width)
        _add_rms_norm_kernel[(rows, max(1, min(rank, _PROJECT_PROGRAMS)))](
            x, deltas[0] if deltas else x, deltas[1] if len(deltas) > 1 else x, weight, total, normed,
            normed if copy_to is None else copy_to, x if project is None else project.contiguous(),
            normed if hidden is None else hidden, width, rank, eps,
            N_DELTAS=len(deltas), COPY=copy_to is not None, PROJECT=project is not None, BLOCK=block,
            num_warps=min(16, max(1, block // 256)),
            VOLATILE1=bool(deltas) and not deltas[0].is_cuda, VOLATILE2=len(deltas) > 1 and not deltas[1].is_cuda)
    return total, normed, hidden


@triton.jit
def _rotary_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, slots_ptr, seq, n_heads, n_kv_heads, k_seq,
                   HALF: tl.constexpr, BLOCK: tl.constexpr, TO_CACHE: tl.constexpr):
    token = tl.program_id(0)  # batch * seq + position in the chunk
    head = tl.program_id(1)  # q heads, then k heads, then (TO_CACHE) v heads
    batch, t = token // seq, token % seq
    i = tl.arange(0, BLOCK)
    inside = i < HALF
    width = (n_heads + 2 * n_kv_heads) * 2 * HALF
    source = qkv_ptr + token * width + head * 2 * HALF
    x1 = tl.load(source + i, mask=inside, other=0.0)
    x2 = tl.load(source + HALF + i, mask=inside, other=0.0)
    # k and v go to slot `slots[t]` of a [B, KV, k_seq, D] cache, or to position t of a fresh k
    slot = t
    if TO_CACHE:
        slot = tl.load(slots_ptr + t).to(tl.int32)
    slot_i = slot + 0 * i  # as a block: a scalar mask in `&` trips Triton's interpreter
    inside_kv = inside & (slot_i >= 0) & (slot_i < k_seq)  # a slot outside the cache is dropped, never written
    kv_row = (batch * n_kv_heads + head - n_heads) * k_seq + slot
    if head >= n_heads + n_kv_heads:  # v: copied as it is
        v_target = v_ptr + (kv_row - n_kv_heads * k_seq) * 2 * HALF
        tl.store(v_target + i, x1.to(v_ptr.dtype.element_ty), mask=inside_kv)
        tl.store(v_target + HALF + i, x2.to(v_ptr.dtype.element_ty), mask=inside_kv)
    else:
        cos = tl.load(cos_ptr + t * HALF + i, mask=inside, other=0.0)
        sin = tl.load(sin_ptr + t * HALF + i, mask=inside, other=0.0)
        y1 = x1.to(tl.float32) * cos - x2.to(tl.float32) * sin
        y2 = x2.to(tl.float32) * cos + x1.to(tl.float32) * sin
        if head < n_heads:
            q_target = q_ptr + ((batch * n_heads + head) * seq + t) * 2 * HALF
            tl.store(q_target + i, y1.to(q_ptr.dtype.element_ty), mask=inside)
            tl.store(q_target + HALF + i, y2.to(q_ptr.dtype.element_ty), mask=inside)
        else:
            k_target = k_ptr + kv_row * 2 * HALF
            tl.store(k_target + i, y1.to(k_ptr.dtype.element_ty), mask=inside_kv)
            tl.store(k_target + HALF + i, y2.to(k_ptr.dtype.element_ty), mask=inside_kv)


def _launch_rotary(qkv, cos, sin, n_heads, n_kv_heads, q, k, v, slots, to_cache: bool) -> None:
    batch, seq, width = qkv.shape
    if batch * seq:
        half = width // (n_heads + 2 * n_kv_heads) // 2
        heads = n_heads + (2 if to_cache else 1) * n_kv_heads
        _rotary_kernel[(batch * seq, heads)](
            qkv, cos.float().contiguous(), sin.float().contiguous(), q, k, v, slots, seq, n_heads, n_kv_heads,
            k.shape[2], HALF=half, BLOCK=triton.next_power_of_2(half), TO_CACHE=to_cache, num_warps=1)


def rotary_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv_heads: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, seq, width = qkv.shape
    head_dim = width // (n_heads + 2 * n_kv_heads)
    qkv = qkv.contiguous()
    q = torch.empty((batch, n_heads, seq, head_dim), dtype=qkv.dtype, device=qkv.device)
    k = torch.empty((batch, n_kv_heads, seq, head_dim), dtype=qkv.dtype, device=qkv.device)
    _launch_rotary(qkv, cos, sin, n_heads, n_kv_heads, q, k, k, k, to_cache=False)
    v = qkv[..., (n_heads + n_kv_heads) * head_dim:].view(batch, seq, n_kv_heads, head_dim).transpose(1, 2)
    return q, k, v


def rotary_qkv_to_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv_heads: int,
                        keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    batch, seq, width = qkv.shape
    qkv = qkv.contiguous()
    q = torch.empty((batch, n_heads, seq, width // (n_heads + 2 * n_kv_heads)), dtype=qkv.dtype, device=qkv.device)
    _launch_rotary(qkv, cos, sin, n_heads, n_kv_heads, q, keys, values, slots, to_cache=True)
    return q


@triton.jit
def _wait_for_host_flag_kernel(flag_ptr):
    # .cv: a cached copy of a host-memory line is stale, fetch it again
    ready = tl.load(flag_ptr, volatile=True, cache_modifier=".cv")
    while ready == 0:
        ready = tl.load(flag_ptr, volatile=True, cache_modifier=".cv")
    tl.store(flag_ptr, 0)  # re-armed for the next wait


def wait_for_host_flag(flag: torch.Tensor) -> None:
    _wait_for_host_flag_kernel[(1,)](flag, num_warps=1)


@triton.jit
def _notify_host_kernel(flag_ptr):
    # a release at system scope: a host that sees the flag also sees what the kernels before this one wrote
    # into its memory (an exchange, as Triton has no release store; the host never writes the flag meanwhile)
    tl.atomic_xchg(flag_ptr, 1, sem="release", scope="sys")


def notify_host(flag: torch.Tensor) -> None:
    _notify_host_kernel[(1,)](flag, num_warps=1)


@triton.jit
def _l2_prefetch_kernel(source_ptr, sink_ptr, n_words, BLOCK: tl.constexpr):
    words = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    total = tl.sum(tl.load(source_ptr + words, mask=words < n_words, other=0, eviction_policy="evict_last"), axis=0)
    tl.store(sink_ptr, total, mask=total == 0x5EED)  # a store the loads feed, so they are not optimised away


_L2_PREFETCH_BLOCK = 2048


def l2_prefetch(source: torch.Tensor, nbytes: int, sink: torch.Tensor) -> None:
    nbytes = min(nbytes, source.numel() * source.element_size()) // 4 * 4  # whole words of the source
    words = source.view(-1).view(torch.uint8)[:nbytes].view(torch.int32)
    if words.numel():
        _l2_prefetch_kernel[(triton.cdiv(words.numel(), _L2_PREFETCH_BLOCK),)](
            words, sink, words.numel(), BLOCK=_L2_PREFETCH_BLOCK, num_warps=4)


@triton.jit
def _rotated(source, d, partner, cos, sin):
    """A head's vector (float32) in the rotate-half layout, rotated: d's pair is `partner`, the first half's sin
    negated."""
    x = tl.load(source + d).to(tl.float32)
    return x * cos + tl.load(source + partner).to(tl.float32) * sin


@triton.jit
def _decode_attention_split_kernel(qkv_ptr, cos_ptr, sin_ptr, keys_ptr, values_ptr, position_ptr, max_ptr, sum_ptr,
                                   acc_ptr, n_heads, n_kv_heads, group, n_slots, window, sliding_window, chunk,
                                   scale, DIM: tl.constexpr, GROUP: tl.constexpr, BLOCK_S: tl.constexpr,
                                   SLIDING: tl.constexpr):
    """One KV head's query heads over one chunk of slots: the softmax's running max, sum and weighted values
    (float32) of the chunk, for `_decode_attention_combine_kernel`. The token's own k and v come from registers
    (rotated and rounded to the cache's dtype here), since the program of chunk 0 writes them into the cache
    meanwhile."""
    kv, split = tl.program_id(0), tl.program_id(1)
    n_splits = tl.num_programs(1)
    position = tl.load(position_ptr).to(tl.int32)
    last = tl.minimum(position, window - 1)
    first = 0
    if SLIDING:
        first = tl.maximum(position - sliding_window + 1, 0)
    d = tl.arange(0, DIM)
    half = DIM // 2
    partner = (d + half) % DIM
    cos = tl.load(cos_ptr + d % half)
    sin = tl.where(d < half, -1.0, 1.0) * tl.load(sin_ptr + d % half)
    key = _rotated(qkv_ptr + (n_heads + kv) * DIM, d, partner, cos, sin).to(keys_ptr.dtype.element_ty)
    value = tl.load(qkv_ptr + (n_heads + n_kv_heads + kv) * DIM + d).to(values_ptr.dtype.element_ty)
    row = kv * n_slots
    if split == 0:
        slot_d = position + 0 * d  # a block: a scalar mask trips Triton's interpreter
        inside = (slot_d >= 0) & (slot_d < n_slots)  # a slot outside the cache is dropped
        tl.store(keys_ptr + (row + position) * DIM + d, key, mask=inside)
        tl.store(values_ptr + (row + position) * DIM + d, value, mask=inside)
    heads = tl.arange(0, GROUP)
    head_ok = heads < group
    q_at = qkv_ptr + (kv * group + heads)[:, None] * DIM
    q = tl.load(q_at + d[None, :], mask=head_ok[:, None], other=0.0).to(tl.float32) * cos[None, :] + \
        tl.load(q_at + partner[None, :], mask=head_ok[:, None], other=0.0).to(tl.float32) * sin[None, :]
    q = q.to(qkv_ptr.dtype.element_ty).to(tl.float32)  # rounded as the rotary kernel's q is
    running_max = tl.full([GROUP], float("-inf"), tl.float32)
    running_sum = tl.zeros([GROUP], tl.float32)
    acc = tl.zeros([GROUP, DIM], tl.float32)
    start = tl.maximum(split * chunk, first)
    stop = tl.minimum((split + 1) * chunk, last + 1)
    for block in range(start, stop, BLOCK_S):
        slots = block + tl.arange(0, BLOCK_S)
        ok = slots < stop
        own = (slots == position)[:, None]
        at = (row + slots)[:, None] * DIM + d[None, :]
        keys = tl.where(own, key[None, :], tl.load(keys_ptr + at, mask=ok[:, None], other=0.0)).to(tl.float32)
        values = tl.where(own, value[None, :], tl.load(values_ptr + at, mask=ok[:, None], other=0.0)).to(tl.float32)
        scores = tl.sum(q[:, None, :] * keys[None, :, :], axis=2) * scale
        scores = tl.where(ok[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        weights = tl.exp(scores - new_max[:, None])
        rescale = tl.exp(running_max - new_max)
        acc = acc * rescale[:, None] + tl.sum(weights[:, :, None] * values[None, :, :], axis=1)
        running_sum = running_sum * rescale + tl.sum(weights, axis=1)
        running_max = new_max
    out = (kv * group + heads) * n_splits + split  # [head, split]
    tl.store(max_ptr + out, running_max, mask=head_ok)
    tl.store(sum_ptr + out, running_sum, mask=head_ok)
    tl.store(acc_ptr + out[:, None] * DIM + d[None, :], acc, mask=head_ok[:, None])


@triton.jit
def _decode_attention_combine_kernel(max_ptr, sum_ptr, acc_ptr, out_ptr, n_splits, DIM: tl.constexpr,
                                     SPLITS: tl.constexpr):
    """One query head: its chunks' partial softmaxes merged (each rescaled to the largest max)."""
    head = tl.program_id(0)
    splits = tl.arange(0, SPLITS)
    split_ok = splits < n_splits
    maxima = tl.load(max_ptr + head * n_splits + splits, mask=split_ok, other=float("-inf"))
    top = tl.max(maxima, axis=0)
    scale = tl.where(split_ok & (maxima > float("-inf")), tl.exp(maxima - top), 0.0)
    total = tl.sum(tl.load(sum_ptr + head * n_splits + splits, mask=split_ok, other=0.0) * scale, axis=0)
    d = tl.arange(0, DIM)
    acc = tl.load(acc_ptr + (head * n_splits + splits)[:, None] * DIM + d[None, :], mask=split_ok[:, None],
                  other=0.0)
    y = tl.sum(acc * scale[:, None], axis=0) / total
    tl.store(out_ptr + head * DIM + d, y.to(out_ptr.dtype.element_ty))


# swept on an H100 (BLOCK_S 16-64, up to 32-128 chunks, 1-4 warps; 192- to 4096-slot caches, positions early and
# late, 32 and 8 KV heads): many small one-warp programs were best overall and never slower than rotary + SDPA
# (decode_attention_flash_h100.json)
_DECODE_BLOCK_S = 16
_DECODE_MAX_SPLITS = 128
_DECODE_WARPS = 1


def decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv_heads: int,
                     keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor, window: int,
                     sliding_window: int | None) -> torch.Tensor:
    """Flash-decoding (split-KV) attention of one token: the cache's slots split into up to 128 chunks, one
    program per (KV head, chunk), then one per query head merging the chunks. Launch shapes depend on the cache
    shape alone; the position is read on the device."""
    dim = qkv.shape[-1] // (n_heads + 2 * n_kv_heads)
    n_slots = keys.shape[2]
    n_splits = min(triton.cdiv(window, _DECODE_BLOCK_S), _DECODE_MAX_SPLITS)
    chunk = triton.cdiv(triton.cdiv(window, n_splits), _DECODE_BLOCK_S) * _DECODE_BLOCK_S
    group = n_heads // n_kv_heads
    maxima = torch.empty((n_heads, n_splits), dtype=torch.float32, device=qkv.device)
    sums = torch.empty_like(maxima)
    acc = torch.empty((n_heads, n_splits, dim), dtype=torch.float32, device=qkv.device)
    _decode_attention_split_kernel[(n_kv_heads, n_splits)](
        qkv, cos.float().contiguous(), sin.float().contiguous(), keys, values, position, maxima, sums, acc, n_heads,
        n_kv_heads, group, n_slots, window, sliding_window or 0, chunk, dim ** -0.5, DIM=dim,
        GROUP=triton.next_power_of_2(group), BLOCK_S=_DECODE_BLOCK_S, SLIDING=bool(sliding_window),
        num_warps=_DECODE_WARPS)
    out = torch.empty((1, 1, n_heads * dim), dtype=qkv.dtype, device=qkv.device)
    _decode_attention_combine_kernel[(n_heads,)](maxima, sums, acc, out, n_splits, DIM=dim,
                                                 SPLITS=triton.next_power_of_2(n_splits), num_warps=4)
    return out
