"""Hybrid CPU-GPU executor (PowerInfer, arXiv 2312.12456, §5 and §7).

Each layer's FFN is split by rows in the artifact's hot-first neuron order: rows [0, n_hot) live on the hot
device (the GPU), rows [n_hot, n_ff) in CPU memory. Per token the layer's predictor picks the active
neurons; the hot device computes its active rows while the CPU computes the active cold rows with the
neuron-aware operators of `powerinfer.kernels`, and the two partial outputs are summed on the hot device.
Only activation vectors cross PCIe (through pinned buffers); weights move once, at load.

One code path serves every mode, set by an `ExecutionPlan`:
- `hybrid`: the artifact's placement (hot rows on the GPU, cold rows on the CPU);
- `gpu`: every FFN row on the hot device, sparse; `cpu`: every row on the CPU, sparse;
- `dense`: the plain model (see `build_executor`); `offload`: llama.cpp `-ngl` style, the first layers
  whole and dense on the GPU, the rest dense on the CPU.
The hot device is a parameter, so the split logic also runs (and is tested) with both halves on the CPU.
A decode step's layer with every row in CPU memory runs over fixed buffers with its predictor and masked FFN
bound to them once (`SplitFFN._bind_cpu_decode`); a hybrid step binds its cold parts the same way
(`runtime.segments`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from itertools import islice

import torch
from torch import nn

from powerinfer import kernels
from powerinfer.kernels.dense import GEMV_MAX_TOKENS
from powerinfer.models.llama import Linear, additive_mask, ffn_activation
from powerinfer.models.predictor import ActivationPredictor
from powerinfer.runtime.host_memory import huge_page_copy

MODES = ("hybrid", "gpu", "cpu", "dense", "offload")
CPU = torch.device("cpu")


STRATEGIES = ("predictor", "exact-sparse-down", "dense")


@dataclass
class LayerPlan:
    """Where one layer runs and how its FFN picks neurons (the artifact's `strategy`, docs/ARTIFACT.md):
    `predictor` computes the predicted-active rows; `exact-sparse-down` computes gate/up densely and only
    the down rows with |h| > `h_threshold`; `dense` computes every row. The first `n_always_active`
    (hot-first order) rows are always computed."""

    attention_device: torch.device
    n_hot: int  # FFN rows (hot-first order) on the hot device; the rest stay on the CPU
    strategy: str = "predictor"
    h_threshold: float = 0.0
    n_always_active: int = 0


@dataclass
class ExecutionPlan:
    mode: str
    hot_device: torch.device
    hot_dtype: torch.dtype
    layers: list[LayerPlan]
    embed_device: torch.device
    head_device: torch.device
    # weight matrices in CPU memory (cold FFN rows; attention and LM head kept off the hot device): float32, bfloat16
    # (half the bytes to stream; the numba kernels widen each element), or int8: the predicted-sparse FFN's rows
    # quantized with one scale per row (a quarter of float32's bytes), every other matrix bfloat16
    cold_dtype: torch.dtype = torch.float32

    def device_dtype(self, device: torch.device) -> torch.dtype:
        # other CPU tensors stay float32: torch's CPU float16 kernels are slow, numba has no float16
        return self.hot_dtype if device == self.hot_device else torch.float32

    def matrix_dtype(self, device: torch.device) -> torch.dtype:
        """Of attention and LM-head weight matrices on `device`: the CPU weight dtype off the hot device, and in
        `cpu` mode, where every matrix is in CPU memory."""
        return self.hot_dtype if device == self.hot_device and self.mode != "cpu" else self.cold_float_dtype

    @property
    def cold_float_dtype(self) -> torch.dtype:
        """Of CPU matrices without an int8 kernel: bfloat16 where the FFN rows are int8."""
        return torch.bfloat16 if self.cold_dtype == torch.int8 else self.cold_dtype


class NeuronCounts:
    """Active neurons computed on each side, summed over layers and tokens (for the summary line).

    The hot count accumulates in place on the hot device, so it costs no synchronisation and keeps
    counting inside CUDA graph replays."""

    def __init__(self, hot_device: torch.device):
        self.hot = torch.zeros((), dtype=torch.int64, device=hot_device)
        self.cold = 0

    def save(self) -> tuple[torch.Tensor, int]:
        return self.hot.clone(), self.cold

    def restore(self, saved: tuple[torch.Tensor, int]) -> None:
        self.hot.copy_(saved[0])
        self.cold = saved[1]

    def shares(self) -> tuple[float, float]:
        hot = int(self.hot)
        total = hot + self.cold
        return (hot / total, self.cold / total) if total else (0.0, 0.0)


class OraclePredictor(nn.Module):
    """The exact active set (h != 0) from the FFN's own gate/up rows: for tests and quality bounds."""

    def __init__(self, gate_up: torch.Tensor, activation: str, threshold: float = 0.0):
        super().__init__()
        self.register_buffer("gate_up", gate_up)
        self.activation, self.threshold = activation, threshold

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = (x @ self.gate_up.T).chunk(2, dim=-1)
        return ffn_activation(gate, up, self.activation, self.threshold) != 0


class SplitFFN(nn.Module):
    """One layer's FFN with rows split between the hot device and the CPU."""

    timer = None  # a `runtime.timing.PhaseTimer` while `bench` measures where decode time goes

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, activation: str, layer: LayerPlan,
                 plan: ExecutionPlan, predictor: nn.Module | None, counts: NeuronCounts, threshold: float = 0.0):
        super().__init__()
        n_ff = down.shape[1]
        if layer.strategy not in STRATEGIES:
            raise ValueError(f"unknown FFN strategy {layer.strategy!r}")
        self.activation, self.n_hot, self.n_ff, self.layer = activation, layer.n_hot, n_ff, layer
        self.threshold = threshold  # FATReLU gate threshold (relu/drelu), 0: plain
        self._act = (activation, threshold)  # as ffn_activation takes them
        self.hot_device, self.counts = plan.hot_device, counts
        # the sparse operators read down transposed (a neuron's weights in one row); a dense FFN keeps the model's
        # [d, n_ff] layout for the GEMV, which beats the all-rows AXPY on the CPU (SmolLM2's 576-wide rows on the
        # 2-core VM: 5.4 vs 8.0 ms per token; LLaMA-2-7B/13B shapes, 16-thread H100 host: ~10%)
        gate, up, strategy = gate_up[:n_ff], gate_up[n_ff:], layer.strategy
        self.hot = self._rows(gate, up, down, 0, self.n_hot, plan.hot_device, plan.hot_dtype, strategy)
        self.cold_scales = None  # of int8 cold rows: the gate, up and down rows' [rows] scales
        if plan.cold_dtype == torch.int8 and strategy == "predictor" and self.n_hot < n_ff:
            self.cold, self.cold_scales = self._int8_rows(gate, up, down, self.n_hot, n_ff)
        else:  # (int8 only reaches here for a layer without CPU rows: build_executor refuses it elsewhere)
            self.cold = self._rows(gate, up, down, self.n_hot, n_ff, CPU, plan.cold_float_dtype, strategy)
        self.predictor, self._cold_ffn = None, None
        if layer.strategy == "predictor" and self.cold is not None:
            self._cold_ffn = kernels.bind_masked_ffn(*self.cold, activation, threshold=threshold,
                                                     scales=self.cold_scales)
        if layer.strategy == "predictor":
            if predictor is None:
                raise ValueError("the predictor strategy needs a predictor")
            device = self.hot_device if self.n_hot else CPU
            self._predictor_dtype = plan.device_dtype(device)
            self.predictor = predictor.to(device, self._predictor_dtype)
        self._cpu_decode = self._bind_cpu_decode() if self.hot is None and self._cold_ffn is not None else None
        self._hot_idx = self._hot_count = None
        if layer.strategy != "dense" and self.n_hot and plan.hot_device.type == "cuda":
            # static index/count buffers: the hot path has fixed shapes and can be captured in a CUDA graph
            self._hot_idx = torch.zeros(self.n_hot, dtype=torch.int32, device=plan.hot_device)
            self._hot_count = torch.zeros(1, dtype=torch.int32, device=plan.hot_device)
        self._pinned: dict[str, torch.Tensor] = {}

    @staticmethod
    def _rows(gate, up, down, start, stop, device, dtype, strategy: str):
        """Neurons [start, stop) on `device`: their gate and up rows, and their down weights as rows of down.T
        ([stop - start, d]) or, for a dense FFN, as the model's [d, stop - start] columns."""
        if stop <= start:
            return None
        down = down[:, start:stop] if strategy == "dense" else down.T[start:stop]
        if device.type == "cpu":
            # In CPU memory, read in scattered rows: huge pages spare a TLB miss per row (host_memory).
            if strategy == "predictor":
                # each neuron's gate, up and down rows adjacent ([rows, 3, d]): an active neuron is one run of
                # memory (the masked FFN of a synthetic 13B's cold layer: 161 -> 148 us, 16-thread H100 host,
                # cold_ffn_bundled_h100.json)
                bundle = huge_page_copy(torch.stack([gate[start:stop], up[start:stop], down], dim=1), dtype)
                return list(bundle.unbind(1))
            # gate and up rows in one allocation, gate first: where both are needed densely (every token, for
            # exact-sparse-down) they are one GEMV (`_gate_up`; two calls over the halves took 10.9 instead of
            # 7.6 ms per SmolLM2 token on the 2-core VM), each half a contiguous [rows, d] matrix
            n = stop - start
            gate_up = huge_page_copy(torch.cat([gate[start:stop], up[start:stop]]), dtype)
            return [gate_up[:n], gate_up[n:], huge_page_copy(down, dtype)]
        # contiguous on the host first: a strided copy on the GPU would briefly hold the rows twice
        return [t.contiguous().to(device=device, dtype=dtype) for t in (gate[start:stop], up[start:stop], down)]

    @staticmethod
    def _int8_rows(gate, up, down, start, stop):
        """Neurons [start, stop) as a CPU bundle of int8 rows ([rows, 3, d], like `_rows`' predictor bundle) and
        the rows' scales (kernels.quantize_rows_int8)."""
        quantized = [kernels.quantize_rows_int8(w[start:stop]) for w in (gate, up, down.T)]
        bundle = huge_page_copy(torch.stack([q for q, _ in quantized], dim=1))
        scales = torch.stack([s for _, s in quantized], dim=1)
        return list(bundle.unbind(1)), list(scales.unbind(1))

    def _bind_cpu_decode(self):
        """One token through a layer whose rows are all in CPU memory, over fixed buffers: the predictor and
        the masked FFN bound to them once (a decode step's per-call conversions and checks cost several times
        the tiny ReLU model's kernels)."""
        d = self.cold[2].shape[1]
        x, y = torch.zeros(1, d), torch.zeros(1, d)
        mask = torch.zeros(1, self.n_ff, dtype=torch.bool)
        run, n_always, counts = self._cold_ffn.bind(x, mask[0], y), self.layer.n_always_active, self.counts
        if isinstance(self.predictor, ActivationPredictor):  # sets the always-active rows in its own kernel
            predict, n_always = self.predictor.bind(x, mask, always_active=n_always), 0
        elif hasattr(self.predictor, "bind"):
            predict = self.predictor.bind(x, mask)
        else:  # predictors without one (tests' oracles): predict + copy
            predict = lambda: mask.copy_(self.predictor.predict(x))  # noqa: E731

        def step(flat: torch.Tensor) -> torch.Tensor:
            x.copy_(flat)
            predict()
            if n_always:
                mask[0, :n_always] = True
            counts.cold += run()
            return y.clone()  # the buffer is rewritten by the next call
        return step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, flat, t = x.shape, x.reshape(-1, x.shape[-1]), self.timer
        if self.hot is None:  # all rows on the CPU: one copy there (if needed), then everything on the CPU
            flat = _move(flat, CPU, torch.float32, t)
            with _cpu_time(t):
                y = self._cpu_decode(flat) if self._cpu_decode is not None and flat.shape[0] == 1 else \
                    self.cold_part(flat, None)
            y = flat.new_zeros(flat.shape) if y is None else y
            return _move(y, x.device, x.dtype, t).reshape(shape)
        to_host = self.cold is not None and flat.is_cuda
        active = self.predict(flat, to_host) if self.predictor is not None else None
        host_in, done = None, None
        if self.cold is not None:  # queued before the hot work, so the CPU can start early
            if t is not None and flat.is_cuda:
                t.mark("gpu")  # attention and predictor
            host_in = self.copy_to_host(flat, active)
            if flat.is_cuda:
                if t is not None:
                    t.mark("transfer")
                done = torch.cuda.Event()
                done.record()
        y = self.hot_forward(flat, active)
        if t is not None:
            t.mark("gpu")
        if host_in is not None:
            if done is not None:
                done.synchronize()  # waits for the predictor and the copies only, not the hot FFN
            with _cpu_time(t):
                y_cold = self.cold_part(*host_in)
            y = self._add_cold(y, y_cold)
        return y.to(device=x.device, dtype=x.dtype).reshape(shape)

    # -- the phases of one layer, shared by `forward` and the CUDA-graph segments (runtime.segments) ---------
    def predict(self, flat: torch.Tensor, to_host: bool = False, hidden: torch.Tensor | None = None
                ) -> torch.Tensor:
        """[n_ff] bool on the predictor's device: the union of the tokens' predicted active sets. `to_host` (hot
        device on CUDA): the cold rows' slice also goes to the pinned buffer `copy_to_host` hands the CPU part,
        for one token written there by the low-rank predictor's own kernel (no fill and copy nodes). `hidden`:
        the low-rank predictor's hidden layer, computed by the norm before (with `predictor_projection`)."""
        device, n_always = self.hot_device if self.n_hot else CPU, self.layer.n_always_active
        x = flat.to(device, self._predictor_dtype)
        if to_host and x.shape[0] == 1 and isinstance(self.predictor, ActivationPredictor):
            return self.predictor.predict(x, always_active=n_always, tail=self._pinned_mask(), hidden=hidden)[0]
        mask = self.predictor.predict(x) if hidden is None else self.predictor.predict(x, hidden=hidden)
        mask = mask.any(dim=0) if mask.shape[0] > 1 else mask[0]
        if n_always:
            mask[:n_always] = True
        if to_host:
            self._pinned_mask().copy_(mask[self.n_hot:], non_blocking=True)
        return mask

    def predictor_projection(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """The low-rank predictor's first matrix, where the norm that makes this FFN's input (on `device`, of
        `dtype`) can also compute the predictor's hidden layer (kernels.fused `add_rms_norm_relu_project`: a
        kernel less per layer on CUDA): the predictor runs there and takes that dtype; else None."""
        if not isinstance(self.predictor, ActivationPredictor) or not self.n_hot:
            return None
        weight = self.predictor.fc1.weight
        return weight if weight.device == device and weight.dtype == dtype else None

    def _keep(self, h: torch.Tensor, first_row: int) -> torch.Tensor:
        """exact-sparse-down: the rows (of a side starting at `first_row`) whose |h| passes the threshold."""
        keep = (h.abs() > self.layer.h_threshold).any(dim=0)
        keep[:max(0, self.layer.n_always_active - first_row)] = True
        return keep

    def pinned_input(self, shape) -> torch.Tensor:
        """The pinned float32 buffer that receives the cold part's input x from the GPU."""
        return self._pinned_buffer("x", shape, torch.float32)

    def _pinned_mask(self) -> torch.Tensor:
        return self._pinned_buffer("mask", (self.n_ff - self.n_hot,), torch.bool)

    def copy_to_host(self, flat, active, x_written: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The cold part's inputs (x float32, its slice of the predicted mask) in host memory; from the GPU
        through pinned buffers, without waiting (the caller synchronises before reading them). `x_written`:
        the kernel that computed x has already written it into `pinned_input`; the mask must have come from
        `predict(..., to_host=True)`."""
        if not flat.is_cuda:
            return flat.float(), None if active is None else active[self.n_hot:]
        x_host = self.pinned_input(flat.shape)
        if not x_written:
            x_host.copy_(flat, non_blocking=True)
        return x_host, None if active is None else self._pinned_mask()

    def cold_part(self, x_host: torch.Tensor, mask_host: torch.Tensor | None, out: torch.Tensor | None = None
                  ) -> torch.Tensor | None:
        """The CPU rows' output [T, d] float32 (in `out` where the sparse kernel can write it there), None
        when none of them is active (host work only)."""
        if self.predictor is not None and mask_host is None:  # predictor in host memory (no hot rows)
            mask_host = self.predict(x_host)[self.n_hot:]
        return self._cold_forward(x_host, mask_host, out)

    def stage(self, x_host: torch.Tensor, mask_host: torch.Tensor | None, staged: torch.Tensor) -> torch.Tensor:
        """The cold output in the pinned buffer `staged` (zeros when none is active)."""
        y_cold = self.cold_part(x_host, mask_host, staged)
        if y_cold is None:
            staged.zero_()
        elif y_cold is not staged:
            staged.copy_(y_cold)
        return staged

    def bind_cold(self, x_host: torch.Tensor, mask_host: torch.Tensor | None, staged: torch.Tensor):
        """`stage` as a call without arguments over these fixed buffers (a decode step's pinned ones), with the
        least work per call: for the predictor strategy, the masked kernel bound to them, whatever the number
        of active rows (at one token it is as fast as the dense rows up to about all of them, kernels/sparse_ffn)."""
        if self._cold_ffn is None or mask_host is None:
            return lambda: self.stage(x_host, mask_host, staged)
        run, counts = self._cold_ffn.bind(x_host, mask_host, staged), self.counts

        def cold() -> None:
            counts.cold += run()
        return cold

    def _pinned_buffer(self, name, shape, dtype):
        buf = self._pinned.get(name)
        if buf is None or buf.numel() < torch.Size(shape).numel():
            buf = self._pinned[name] = torch.empty(torch.Size(shape).numel(), dtype=dtype, pin_memory=True)
        return buf[:torch.Size(shape).numel()].view(shape)

    def hot_forward(self, flat, active):
        """The hot rows' output on the hot device (launches only: no synchronisation)."""
        x = flat.to(device=self.hot_device, dtype=self.hot[0].dtype)
        strategy = self.layer.strategy
        if strategy == "dense":
            return _dense_ffn(x, *self.hot, self._act)
        gate, up, down_t = self.hot
        h = None
        if strategy == "exact-sparse-down":
            h = _gate_up(x, gate, up, self._act)
            mask = self._keep(h, 0)
        else:
            mask = active[:self.n_hot]
        if self._hot_idx is None:
            idx = mask.nonzero()[:, 0]
            self.counts.hot.add_(idx.numel())
            return self._rows_forward(x, h, gate, up, down_t, idx, mask)
        idx, count = self._hot_idx, self._hot_count
        kernels.compact_active(mask, idx, count)
        self.counts.hot.add_(count[0])  # stays on the GPU: no sync
        if h is None:
            h = kernels.sparse_gate_up(x, gate, up, idx, self.activation, threshold=self.threshold, count=count)
        else:
            h = h.index_select(1, idx)  # slots past `count` hold stale ids; sparse_down ignores them
        return kernels.sparse_down(h, down_t, idx, count=count)

    def _add_cold(self, y, y_cold):
        if y_cold is None:  # nothing active on the CPU: the hot device never waits for it
            return y
        if not y.is_cuda:
            return y + y_cold.to(y.dtype)
        t = self.timer
        with _cpu_time(t):
            staged = self._pinned_buffer("y", y_cold.shape, torch.float32)
            staged.copy_(y_cold)
        if t is not None:
            t.mark("idle")  # the stream waited for the CPU's part
        y_cold = staged.to(y.device, non_blocking=True)
        if t is not None:
            t.mark("transfer")
        return y + y_cold.to(y.dtype)

    def _cold_forward(self, x_host, mask_host, out=None):
        """The CPU rows' output (None when none of them is active; in `out` if given, when sparse)."""
        if self.layer.strategy == "dense":
            return _dense_ffn(x_host, *self.cold, self._act)
        gate, up, down_t = self.cold
        if self.layer.strategy == "predictor":
            mask_host = mask_host.contiguous()
            k = self._cold_ffn.count(mask_host)
            self.counts.cold += k
            if k == 0:
                return None
            if self.cold_scales is None and kernels.should_use_dense(k, gate.shape[0], x_host.shape[0]):
                return _dense_rows(x_host, gate, up, down_t, self._act, mask_host)
            return self._cold_ffn(x_host, mask_host, out)[0]
        # exact-sparse-down: exact gate/up over every row, down over those that pass the threshold
        h = _gate_up(x_host, gate, up, self._act)
        keep = self._keep(h, self.n_hot)
        idx = keep.nonzero()[:, 0]
        self.counts.cold += idx.numel()
        if idx.numel() == 0:
            return None
        return self._rows_forward(x_host, h, gate, up, down_t, idx, keep)

    def _rows_forward(self, x, h, gate, up, down_t, idx, mask):
        """The FFN over the rows in `idx` (`h`: precomputed activations of every row, or None)."""
        if kernels.should_use_dense(idx.numel(), gate.shape[0], x.shape[0]):
            if h is None:
                return _dense_rows(x, gate, up, down_t, self._act, mask)
            return _times(h * mask.to(h.dtype), down_t)
        idx32 = idx.to(torch.int32)
        if h is None:
            h = kernels.sparse_gate_up(x, gate, up, idx32, self.activation, threshold=self.threshold)
        else:
            h = h[:, idx].contiguous()
        return kernels.sparse_down(h, down_t, idx32)


def _cpu_time(timer):
    return timer.cpu() if timer is not None else contextlib.nullcontext()


def _move(x, device, dtype, timer):
    return timer.move(x, device, dtype) if timer is not None else x.to(device, dtype)


def _gate_up(x, gate, up, act):
    """act(x @ gate.T, x @ up.T) (`act`: activation name and gate threshold), as one product when gate and up
    are the two halves of one allocation (CPU rows: `SplitFFN._rows`)."""
    n = gate.shape[0]
    if (gate.shape == up.shape and gate.is_contiguous() and up.is_contiguous()
            and up.untyped_storage().data_ptr() == gate.untyped_storage().data_ptr()  # not just adjacent
            and up.data_ptr() == gate.data_ptr() + gate.numel() * gate.element_size()):
        both = torch.as_strided(gate, (2 * n, gate.shape[1]), (gate.shape[1], 1))  # not gate.stride(): one row's is any
        gate_out, up_out = kernels.linear(x, both).split(n, -1)
    else:
        gate_out, up_out = kernels.linear(x, gate), kernels.linear(x, up)
    return ffn_activation(gate_out, up_out, *act)


def _dense_ffn(x, gate, up, down, act):
    """A dense FFN over these rows, down in the model's [d, rows] layout: GEMVs for a few tokens on the CPU."""
    return kernels.linear(_gate_up(x, gate, up, act), down)


def _dense_rows(x, gate, up, down_t, act, mask):
    """The FFN over every row (`act`: activation name and gate threshold) with h zeroed outside `mask`: the
    sparse operators' result over that active set, from dense products (where most rows are active)."""
    h = _gate_up(x, gate, up, act)  # GEMV on the CPU
    return _times(h * mask.to(h.dtype), down_t)


def _times(h, down_t):
    """h @ down_t (a masked h over every row). In CPU memory, for a few tokens: the AXPY kernel over every row,
    each read once (2-core VM, LLaMA-7B down: 5.8 ms vs 10.0 ms for torch's float32 matmul; bfloat16 rows
    widened in registers); else a GEMM, bfloat16 rows widened first."""
    if h.device.type == "cpu" and h.shape[0] <= GEMV_MAX_TOKENS:
        all_rows = torch.arange(down_t.shape[0], dtype=torch.int32)
        return kernels.sparse_down(h.contiguous(), down_t, all_rows)
    return h @ (down_t if down_t.dtype == h.dtype else down_t.to(h.dtype))


class HybridTransformer(nn.Module):
    """Runs a loaded `Transformer`'s modules under an `ExecutionPlan`; same `forward` as the model."""

    def __init__(self, model: nn.Module, plan: ExecutionPlan, predictors: list | None = None):
        super().__init__()
        self.args, self.plan = model.args, plan
        self.counts = NeuronCounts(plan.hot_device)
        self.embed_tokens = model.embed_tokens.to(plan.embed_device, plan.device_dtype(plan.embed_device))
        self.norm = model.norm.to(plan.head_device, plan.device_dtype(plan.head_device))
        self.lm_head = Linear(self.args.hidden_size, self.args.vocab_size, bias=False)
        self.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().to(
            plan.head_device, plan.matrix_dtype(plan.head_device)), requires_grad=False)
        self.attention_layers = nn.ModuleList()
        self.ffns = nn.ModuleList()
        for i, (block, layer) in enumerate(zip(model.layers, plan.layers)):
            dtype = plan.device_dtype(layer.attention_device)
            for name in ("input_layernorm", "self_attn", "post_attention_layernorm"):
                getattr(block, name).to(layer.attention_device, dtype)
            for linear in (block.self_attn.qkv_proj, block.self_attn.o_proj):  # in CPU memory: like FFN rows
                linear.weight.data = linear.weight.data.to(plan.matrix_dtype(layer.attention_device))
            mlp = block.mlp
            self.ffns.append(SplitFFN(mlp.gate_up_proj.weight.detach(), mlp.down_proj.weight.detach(),
                                      mlp.activation, layer, plan,
                                      predictors[i] if predictors else None, self.counts, mlp.threshold))
            block.mlp = nn.Identity()  # the split FFN replaces it; drop the dense copy
            self.attention_layers.append(block)
        # one copy per device: a host-to-device copy inside a captured CUDA graph is not allowed
        self.inv_freq = {d: model.inv_freq.to(d) for d in {layer.attention_device for layer in plan.layers}}
        hot = plan.hot_device
        # a step can be captured in a CUDA graph only if it never leaves the GPU
        self.supports_cuda_graphs = hot.type == "cuda" and plan.embed_device == hot == plan.head_device and all(
            layer.attention_device == hot and layer.n_hot == self.args.intermediate_size
            for layer in plan.layers)

    @property
    def timer(self):
        return self.ffns[0].timer if len(self.ffns) else None

    @timer.setter
    def timer(self, value) -> None:
        """Attach a `runtime.timing.PhaseTimer` (None: detach); never while a CUDA graph is captured."""
        for ffn in self.ffns:
            ffn.timer = value

    def make_cache(self, batch_size: int, max_seq_len: int):
        from powerinfer.runtime.kv_cache import KVCache

        devices = [layer.attention_device for layer in self.plan.layers]
        return KVCache.for_model(self.args, batch_size, max_seq_len,
                                 [self.plan.device_dtype(d) for d in devices], devices)

    def forward(self, tokens, positions, cache=None, last_logits_only: bool = False):
        x = self.layers_from(0, self.embed_tokens(tokens.to(self.plan.embed_device)), positions, cache)
        return self.head(x[:, -1:] if last_logits_only else x)

    def layers_from(self, start: int, x, positions, cache):
        """The hidden states after layers [start, n) (each on its own device), from x before layer `start`."""
        t = self.timer
        per_device = {}
        # islice, not [start:]: slicing a ModuleList builds a new one (2-core VM: 33 us for 4 layers, 87 for 30)
        for block, ffn, layer in islice(zip(self.attention_layers, self.ffns, self.plan.layers), start, None):
            device = layer.attention_device
            if device not in per_device:
                pos = positions.to(device)
                angles = pos.float()[:, None] * self.inv_freq[device][None, :]
                dtype = self.plan.device_dtype(device)
                mask = None if cache is None else additive_mask(cache.attention_mask(pos), dtype)
                per_device[device] = (angles.cos(), angles.sin(), pos, mask)
            cos, sin, pos, mask = per_device[device]
            x = _move(x, device, self.plan.device_dtype(device), t)
            with _cpu_time(t if device.type == "cpu" else None):
                attention = block.self_attn(block.input_layernorm(x), cos, sin, pos, cache, mask)
                x, normed = block.post_attention_layernorm.add_then_norm(x, attention)
                x = x + ffn(normed)
        return x

    def head(self, x):
        """float32 logits of the last hidden states x."""
        t, head = self.timer, self.plan.head_device
        x = _move(x, head, self.plan.device_dtype(head), t)
        with _cpu_time(t if head.type == "cpu" else None):
            logits = self.lm_head(self.norm(x)).float()
        if t is not None:
            t.mark("gpu" if head.type == "cuda" else "idle")
        return logits


def plan_for_mode(mode: str, args, hot_device, hot_dtype, placement: dict | None = None,
                  offload_layers: int | None = None, strategy: str = "predictor",
                  layer_params: list[dict] | None = None, cold_dtype=torch.float32) -> ExecutionPlan:
    """The `ExecutionPlan` of a mode. `hybrid` follows `placement` (the artifact's placement.json);
    `strategy` and `layer_params` (per layer `h_threshold`, `n_always_active`) come from its manifest."""
    hot_device = torch.device(hot_device)
    n_layers, n_ff = args.num_hidden_layers, args.intermediate_size
    params = layer_params or [{}] * n_layers

    def layer(i, device, n_hot, layer_strategy=strategy):
        p = params[i]
        return LayerPlan(device, n_hot, layer_strategy, float(p.get("h_threshold") or 0.0),
                         int(p.get("n_always_active") or 0))

    if mode == "gpu":
        layers = [layer(i, hot_device, n_ff) for i in range(n_layers)]
        embed = head = hot_device
    elif mode == "cpu":
        layers = [layer(i, CPU, 0) for i in range(n_layers)]
        embed = head = CPU
    elif mode == "hybrid":
        if placement is None:
            raise ValueError("hybrid mode needs a placement")
        layers = [layer(i, hot_device if p.get("attention_on_gpu", True) else CPU, int(p["n_gpu_neurons"]))
                  for i, p in enumerate(placement["layers"])]
        embed = hot_device if placement.get("embeddings_on_gpu", True) else CPU
        head = hot_device if placement.get("lm_head_on_gpu", True) else CPU
    elif mode == "offload":
        k = n_layers if offload_layers is None else offload_layers
        layers = [layer(i, hot_device if i < k else CPU, n_ff if i < k else 0, "dense") for i in range(n_layers)]
        embed, head = CPU, (hot_device if k == n_layers else CPU)
    else:
        raise ValueError(f"unknown executor mode {mode!r} (choose from {', '.join(MODES)})")
    return ExecutionPlan(mode, hot_device, hot_dtype, layers, embed, head, cold_dtype)


def offload_layers_for_budget(args, budget_bytes: int, context: int, dtype_bytes: int = 2) -> int:
    """llama.cpp `-ngl` style: how many whole layers (weights + KV cache) fit the GPU budget after a workspace
    reserve. As in llama.cpp the output head joins them only with every layer (`plan_for_mode`), so it is
    counted only then; with fewer layers its bytes buy one more layer instead."""
    d, n_ff, hd = args.hidden_size, args.intermediate_size, args.head_dim
    attention = d * (args.num_attention_heads + 2 * args.num_key_value_heads) * hd + args.num_attention_heads * hd * d
    per_layer = (attention + 3 * d * n_ff) * dtype_bytes + 2 * context * args.num_key_value_heads * hd * dtype_bytes
    per_layer += 7 * 2 * 2**20  # the caching allocator rounds each large tensor up to 2 MiB
    room = budget_bytes - 64 * 2**20  # activations/allocator slack
    layers = min(args.num_hidden_layers, max(0, room) // per_layer)
    if layers == args.num_hidden_layers and layers * per_layer + args.vocab_size * d * dtype_bytes > room:
        layers -= 1  # all layers but no room for the head: one layer stays on the CPU with it
    return layers


def _linear_weights_to(model: nn.Module, dtype: torch.dtype) -> None:
    """The weight matrices of the model's linear layers in `dtype`, activations unchanged: on the CPU, bfloat16
    halves the bytes a decode step streams (the GEMV widens each element; SmolLM2 on the 2-core VM: 32.8 ->
    48.5 tok/s). Each gets its own parameter, so a tied LM head leaves the embedding table as it was."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.weight = nn.Parameter(module.weight.detach().to(dtype), requires_grad=False)


def build_executor(loaded, mode: str, hot_device="cuda", predictors: list | None = None,
                   placement: dict | None = None, offload_layers: int | None = None, hot_dtype=None,
                   strategy: str = "predictor", layer_params: list[dict] | None = None, cold_dtype=None):
    """A copy of `loaded` (a `LoadedModel`) whose model runs under `mode` (its model is consumed).

    cold_dtype: of the weight matrices in CPU memory; None: bfloat16 when a GPU holds the rest (the hot device is
    a GPU and the mode is not `cpu`: 16-bit weights already, half the bytes for the CPU to stream), else
    float32. In `dense` mode on the CPU it sets the linear layers' weights (None: the model's dtype)."""
    import dataclasses

    if cold_dtype == torch.int8 and (mode in ("dense", "offload") or strategy != "predictor"):
        raise ValueError("int8 CPU weights are for the predicted-sparse FFN's rows (hybrid, gpu and cpu modes of a "
                         "predictor-strategy artifact); use float32 or bfloat16")
    if mode == "dense":
        device = torch.device(hot_device)
        dtype = hot_dtype or loaded.dtype
        model = loaded.model.to(device, dtype)
        if device.type == "cpu" and cold_dtype not in (None, dtype):
            _linear_weights_to(model, cold_dtype)
        return dataclasses.replace(loaded, model=model, device=device, dtype=dtype)
    hot_device = torch.device(hot_device)
    hot_dtype = hot_dtype or (torch.float16 if hot_device.type == "cuda" else torch.float32)
    if cold_dtype is None:
        cold_dtype = torch.bfloat16 if hot_device.type == "cuda" and mode != "cpu" else torch.float32
    if cold_dtype not in (torch.float32, torch.bfloat16, torch.int8):
        raise ValueError(f"CPU FFN rows must be float32, bfloat16 or int8, got {cold_dtype}")
    plan = plan_for_mode(mode, loaded.args, hot_device, hot_dtype, placement, offload_layers, strategy,
                         layer_params, cold_dtype)
    if mode != "offload" and strategy == "predictor" and predictors is None:
        raise ValueError(f"{mode} mode needs predictors (build an artifact with `powerinfer build`)")
    model = HybridTransformer(loaded.model, plan, predictors if strategy == "predictor" else None)
    return dataclasses.replace(loaded, model=model, device=plan.head_device, dtype=hot_dtype)
