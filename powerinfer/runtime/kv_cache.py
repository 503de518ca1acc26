"""Static key/value cache, allocated once (as in gpt-fast), so that decoding is shape-static.

Keys and values of every layer live in `[batch, kv_heads, max_seq_len, head_dim]` buffers written in
place at the token positions. Attention reads the first `window` slots: the generation loop shrinks the
window to the filled prefix in eager mode (less to read), and keeps it at `max_seq_len` when a decode step
is captured in a CUDA graph (shapes must not change between replays).
"""

from __future__ import annotations

import torch

from powerinfer.kernels.fused import decode_attention_at, rotary_qkv_to_cache, use_decode_attention_at


class KVCache:
    """`device` and `dtype` may be one value or one per layer (layers placed on different devices)."""

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int,
                 max_seq_len: int, dtype, device, sliding_window: int | None = None):
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)
        devices = device if isinstance(device, (list, tuple)) else [device] * num_layers
        dtypes = dtype if isinstance(dtype, (list, tuple)) else [dtype] * num_layers
        self.keys = [torch.zeros(shape, dtype=t, device=d) for t, d in zip(dtypes, devices)]
        self.values = [torch.zeros(shape, dtype=t, device=d) for t, d in zip(dtypes, devices)]
        self.max_seq_len = max_seq_len
        self.sliding_window = sliding_window
        self.window = max_seq_len
        self._slots = torch.arange(max_seq_len)
        self._slots_on: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def for_model(cls, args, batch_size: int, max_seq_len: int, dtype, device) -> "KVCache":
        return cls(args.num_hidden_layers, batch_size, args.num_key_value_heads, args.head_dim,
                   max_seq_len, dtype, device, args.sliding_window)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def set_window(self, length: int) -> None:
        """Attend over slots [0, length) only; `length` must cover every position written so far."""
        self.window = max(1, min(length, self.max_seq_len))

    def store_rotary(self, layer: int, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     positions: torch.Tensor, n_heads: int, n_kv_heads: int):
        """(q, keys, values) for attention: the fused projection's q rotated, its k rotated and v written into
        this layer's slots at `positions` (one kernel on CUDA), and the layer's keys and values in the window."""
        keys, values = self.keys[layer], self.values[layer]
        q = rotary_qkv_to_cache(qkv, cos, sin, n_heads, n_kv_heads, keys, values, positions)
        return q, keys[:, :, :self.window], values[:, :, :self.window]

    def decode_attention(self, layer: int, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         positions: torch.Tensor, n_heads: int, n_kv_heads: int) -> torch.Tensor | None:
        """One token's attention output [1, 1, n_heads * head_dim] as one fused call (kernels.fused
        `decode_attention_at`: k and v written into the token's slot, attention over the slots `attention_mask`
        allows it); None where there is no such call (`use_decode_attention_at`): use `store_rotary`."""
        keys, values = self.keys[layer], self.values[layer]
        if not use_decode_attention_at(qkv, keys, values):
            return None
        return decode_attention_at(qkv, cos, sin, n_heads, n_kv_heads, keys, values, positions, self.window,
                                   self.sliding_window)

    def attention_mask(self, positions: torch.Tensor) -> torch.Tensor | None:
        """[T, window] boolean mask: query at position p sees slots <= p (and > p - sliding_window).

        None when plain causal attention is the same thing, with a faster kernel: the T tokens fill the whole
        window (they are then positions 0..T-1: the window covers every written slot), or one token on the CPU
        is the window's last slot (an eager decode step; on a GPU reading its position would synchronise)."""
        whole = not self.sliding_window or self.sliding_window >= self.window
        if len(positions) == self.window > 1 and whole:
            return None
        if len(positions) == 1 and positions.device.type == "cpu" and whole and int(positions[0]) == self.window - 1:
            return None
        slots = self._slots_on.get(positions.device)
        if slots is None:
            slots = self._slots_on[positions.device] = self._slots.to(positions.device)
        slots = slots[:self.window]
        mask = slots[None, :] <= positions[:, None]
        if self.sliding_window:
            mask &= slots[None, :] > positions[:, None] - self.sliding_window
        return mask
