"""A hybrid decode step as CUDA-graph segments around the CPU's work (PowerInfer §5, §7: the GPU and CPU
halves of every layer run at once and merge on the GPU).

Every layer waits for the CPU's cold neurons, yet launched op by op from Python a step spends about 1 ms per
layer on launches (measured on an H100 host: 31 of a synthetic 7B token's 70 ms, scripts/profile_hybrid.py).
So the step is captured in CUDA graphs whose kernels wait for the CPU's parts through flags in pinned memory.
Per layer:
- graph A: the previous layer's FFN outputs added and this layer's first norm (one kernel, reading the CPU
  part from its pinned buffer in place), attention, the residual add and the post-attention norm (one
  kernel, which also writes the FFN input into a pinned buffer for the CPU and computes a low-rank predictor's
  hidden layer) and the predictor's decision (whose kernel also writes the cold rows' slice of the mask into
  pinned memory);
- graph B: the hot FFN, then a read of the first `l2_prefetch_bytes` of the next layer's q/k/v weight into
  the GPU's L2 cache: the GPU would otherwise idle until the CPU's part is in, and the next graph A then reads
  that much of its largest matrix from L2.
By default (`cold_step`) all of a step's A and B graphs are captured as one graph, with a host flag raised after
each A (kernels.fused `notify_host`), and the host's CPU threads compute every layer's cold FFN in one parallel
region (kernels.cold_step `ColdStep`): per layer they wait for the GPU's flag, compute, and set the flag the next
A's first kernel waits for (kernels.fused `wait_for_host_flag`), so the GPU starts the next layer the moment the
CPU's output is ready, with no Python, CUDA-event wait or thread fork and join between layers (alternated in one
process: a synthetic 7B token 5.29 against 5.87 ms, 13B 11.16 against 11.80 on an H100 host, 5.29 against 6.12
and 10.10 against 11.76 on an H200 host; hybrid_cold_step_ab.json). Each layer's A reads the CPU's output from
its pinned buffer in its first kernel (zero-copy instead of copy nodes: an H100 graph replays a 16 KB
host-to-device copy and an add in 11.2 us, one kernel reading pinned memory in 5.3 us). A last graph adds the
last layer's outputs (and runs norm and lm_head).
The per-layer graphs are also kept: `bench`'s time split replays them one layer at a time (its stream marks
can tell the wait for the CPU from GPU work only outside a graph), and they serve where a layer cannot join a
ColdStep (a predictor in host memory, no numba OpenMP team) or the thread count changed since capture. Queued
ahead there, the host launches layer i + 1's graphs (whose first kernel waits for layer i's flag), waits for an
event after layer i's A, computes the cold FFN bound to the layer's buffers and sets the flag (a synthetic 7B
token 6.3-6.9 ms against 6.6-7.5 launching layer by layer; hybrid_queue_ahead_h100.json).
Layers whose attention stays in CPU memory (offload's CPU layers, after its GPU layers) then run eagerly.
Without graphs, offload's 20 GPU layers of a synthetic 7B took 16 ms per token on an H100 host (bench),
where dense-gpu runs all 32 in 8 ms.
Each layer has its own pinned buffers, so no buffer is rewritten before the GPU has read it; the graphs
keep the buffers they were captured with (the cold calls in `layers` hold views of them, which keep them
alive), whatever the eager path allocates later.
"""

from __future__ import annotations

import contextlib

import torch

from powerinfer.kernels.fused import (FLAG_STRIDE, add_rms_norm_relu_project, l2_prefetch, notify_host,
                                      wait_for_host_flag)
from powerinfer.kernels.sparse_ffn import _triton_available
from powerinfer.models.llama import additive_mask
from powerinfer.runtime.executor import HybridTransformer, _cpu_time

try:  # numba: a step's cold FFNs in one parallel region
    import numba

    from powerinfer.kernels.cold_step import ColdStep, threading_layer
except ImportError:
    ColdStep = None


def supports_segments(model) -> bool:
    """Hybrid executors with the hot device on CUDA holding the attention of a first run of layers (all of
    them, or offload's GPU layers); the layers after it must keep their attention in CPU memory."""
    if not isinstance(model, HybridTransformer):
        return False
    plan = model.plan
    on_gpu = [layer.attention_device == plan.hot_device for layer in plan.layers]
    return plan.hot_device.type == "cuda" and bool(on_gpu) and on_gpu[0] and on_gpu == sorted(on_gpu, reverse=True)


class DecodeSegments:
    """Captured once per KV cache (its buffers are baked into the graphs); `step` decodes one token.

    Capture runs nothing: the caller warms the model up first (eager forward passes), as CUDA graph
    capture requires, and restores the cache slots the warm-up wrote."""

    queue_ahead = True  # False: launch each layer's graphs after the CPU part before them (same results)
    # True: the step as one graph and every layer's cold FFN in one parallel region (kernels.cold_step), where
    # every layer can (else, and under bench's timer, the per-layer graphs)
    cold_step = True
    # bytes of the next layer's fused q/k/v weight read into L2 at the end of a layer with CPU rows, while the GPU
    # would wait for the CPU's part (kernels.fused.l2_prefetch; read when capturing). H100 host, synthetic 13B,
    # 0 / 16 / 32 MB alternated in one process: median 12.59 / 12.62 / 12.19 ms per token, 32 MB faster than
    # none in 5 of 6 rounds; 7B within noise (hybrid_l2_prefetch_ab_h100.json)
    l2_prefetch_bytes = 32 << 20
    # the post-attention norm's kernel also computes the low-rank predictor's hidden layer (a kernel less per layer
    # between the attention and the CPU's start; read when capturing)
    fuse_predictor_hidden = True

    def __init__(self, model: HybridTransformer, cache):
        self.model, self.cache = model, cache
        plan = model.plan
        hot, dtype, d = plan.hot_device, plan.hot_dtype, model.args.hidden_size
        self.tokens = torch.zeros((1, 1), dtype=torch.long, device=plan.embed_device)
        self.position = torch.zeros(1, dtype=torch.long, device=hot)
        self.x0 = torch.zeros((1, 1, d), dtype=dtype, device=hot)
        self._pool = torch.cuda.graph_pool_handle()
        self._rope = None
        # without Triton there is no wait kernel: each layer's graphs launch after the CPU part before them
        self._waits_in_graphs = _triton_available()
        self.n_gpu_layers = sum(layer.attention_device == hot for layer in plan.layers)
        # one flag per layer, set by the host when the layer's CPU part is in its pinned buffer
        self._ready = torch.zeros((self.n_gpu_layers, FLAG_STRIDE), dtype=torch.int32, pin_memory=True)
        self._ready_np = self._ready[:, 0].numpy()
        # and the other way (whole-step graph): set by the GPU when a layer's cold FFN input and mask are in
        self._gpu_ready = torch.zeros((self.n_gpu_layers, FLAG_STRIDE), dtype=torch.int32, pin_memory=True)
        self._gpu_ready_np = self._gpu_ready[:, 0].numpy()
        self._sink = torch.zeros(1, dtype=torch.int32, device=hot)
        self.layers, self.final, self.out = self._capture_parts(whole=False)
        self._whole = None  # (the step's graph, its output, the ColdStep of its cold FFNs or None)
        if self.cold_step and self._whole_step_possible():
            parts, graph, out = self._capture_parts(whole=True)
            colds = [(i, ffn, host_in, staged) for i, (ffn, host_in, staged) in enumerate(parts) if host_in]
            step = None
            if colds:
                step = ColdStep([ffn._cold_ffn for _, ffn, _, _ in colds], [h[0] for _, _, h, _ in colds],
                                [h[1] for _, _, h, _ in colds], [staged for *_, staged in colds],
                                [i for i, *_ in colds], self._gpu_ready, self._ready)
            self._whole = (graph, out, step)

    def _whole_step_possible(self) -> bool:
        """Every layer's cold FFN can join a ColdStep: a mask predicted on the GPU and numba's masked FFN, all
        alike (and numba's threads an OpenMP team, which its barriers need)."""
        if ColdStep is None or not self._waits_in_graphs or threading_layer() != "omp":
            return False
        ffns = [f for f in self.model.ffns[:self.n_gpu_layers] if f.cold is not None]
        return all(f.predictor is not None and f.n_hot for f in ffns) and \
            ColdStep.compatible([f._cold_ffn for f in ffns])

    def _capture_parts(self, whole: bool):
        """Graph A and B of each layer and the last graph, as separate graphs: per layer (A, B, the bound cold
        FFN, the event after A), then the last graph and its output. `whole`: all of them in one graph, with a
        host flag raised after each layer's A (`_gpu_ready`) for a ColdStep; then per layer (ffn, its cold
        part's input buffers or None, its output buffer), the graph and its output."""
        self._rope = None  # each capture computes its own rotary tables in its first graph
        step_graph = torch.cuda.CUDAGraph() if whole else None
        plan, parts = self.model.plan, []
        x, pending = self.x0, None
        blocks = self.model.attention_layers[:self.n_gpu_layers]
        with torch.cuda.graph(step_graph, pool=self._pool) if whole else contextlib.nullcontext():
            for i, (block, ffn) in enumerate(zip(blocks, self.model.ffns[:self.n_gpu_layers])):
                graph_a, (x, flat, active, host_in) = self._part(whole, self._attention_part, block, ffn, x,
                                                                 pending)
                if whole and host_in is not None:
                    notify_host(self._gpu_ready[i, :1], plan.hot_device)
                following = blocks[i + 1].self_attn.qkv_proj.weight if i + 1 < len(blocks) else None
                prefetch = following if ffn.cold is not None and self.l2_prefetch_bytes else None
                graph_b, y_hot = None, None
                if ffn.hot is not None or prefetch is not None:
                    graph_b, y_hot = self._part(whole, self._hot_part, ffn, flat, active, prefetch)
                # owned here: a longer prompt may make the layer reallocate its own buffers after capture
                staged = None
                if host_in is not None:
                    staged = torch.zeros(flat.shape, dtype=torch.float32, pin_memory=True)
                if whole:
                    parts.append((ffn, host_in, staged))
                else:
                    cold = ffn.bind_cold(*host_in, staged) if host_in is not None else None
                    parts.append((graph_a, graph_b, cold, torch.cuda.Event()))
                pending = (y_hot, staged, self._ready[i, :1])
            final, out = self._part(whole, self._final_part, x, pending)
        return parts, step_graph if whole else final, out

    def _part(self, whole: bool, fn, *args):
        """(its graph, fn's outputs); inside the whole step's capture, (None, fn's outputs)."""
        return (None, fn(*args)) if whole else self._capture(fn, *args)

    def _capture(self, fn, *args):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = fn(*args)
        return graph, out

    def _outputs(self, pending) -> tuple:
        """The previous layer's FFN outputs: its hot part on the GPU and its CPU part in pinned memory (once
        the host has flagged it ready)."""
        if pending is None:
            return ()
        y_hot, staged, ready = pending
        if staged is not None and self._waits_in_graphs:
            wait_for_host_flag(ready, self.model.plan.hot_device)
        return tuple(y for y in (y_hot, staged) if y is not None)  # staged: read in place by the kernel

    def _attention_part(self, block, ffn, x, pending):
        if self._rope is None:  # the first graph computes the rotary tables and mask for all layers
            hot = self.model.plan.hot_device
            angles = self.position.float()[:, None] * self.model.inv_freq[hot][None, :]
            mask = additive_mask(self.cache.attention_mask(self.position), self.model.plan.device_dtype(hot))
            self._rope = (angles.cos(), angles.sin(), mask)
        cos, sin, mask = self._rope
        # the previous layer's residual add fused with this layer's first norm
        x, normed = block.input_layernorm.add_then_norm(x, *self._outputs(pending))
        attention = block.self_attn(normed, cos, sin, self.position, self.cache, mask)
        # the norm's kernel also writes the CPU part's input straight into its pinned buffer, and computes the
        # low-rank predictor's hidden layer (`fuse_predictor_hidden`)
        x_host = ffn.pinned_input((x.numel() // x.shape[-1], x.shape[-1])) if ffn.cold is not None else None
        norm = block.post_attention_layernorm
        project = ffn.predictor_projection(x.device, torch.promote_types(x.dtype, norm.weight.dtype)) \
            if self.fuse_predictor_hidden else None
        if project is None:
            (x, normed), hidden = norm.add_then_norm(x, attention, copy_to=x_host), None
        else:
            x, normed, hidden = add_rms_norm_relu_project(x, (attention,), norm.weight, norm.eps, project, x_host)
        flat = normed.reshape(-1, x.shape[-1])
        active = None
        if ffn.predictor is not None and ffn.n_hot:
            active = ffn.predict(flat, to_host=ffn.cold is not None, hidden=hidden)
        host_in = ffn.copy_to_host(flat, active, x_written=True) if ffn.cold is not None else None
        return x, flat, active, host_in

    def _hot_part(self, ffn, flat, active, prefetch):
        y_hot = ffn.hot_forward(flat, active) if ffn.hot is not None else None
        if prefetch is not None:
            l2_prefetch(prefetch, self.l2_prefetch_bytes, self._sink)
        return y_hot

    @property
    def _logits_in_graph(self) -> bool:
        return self.n_gpu_layers == len(self.model.ffns) and self.model.plan.head_device.type == "cuda"

    def _final_part(self, x, pending):
        outputs = self._outputs(pending)
        if self._logits_in_graph:
            x, normed = self.model.norm.add_then_norm(x, *outputs)
            return self.model.lm_head(normed).float()
        for y in outputs:  # the norm is in CPU memory, with the layers that follow
            x = x + y.to(x.device, x.dtype, non_blocking=True).view_as(x)
        return x

    def _queue(self, i: int) -> None:
        """Launch layer i's graphs (i == the number of layers: the last graph)."""
        if i == len(self.layers):
            self.final.replay()
            return
        graph_a, graph_b, _, after_a = self.layers[i]
        graph_a.replay()
        after_a.record()
        if graph_b is not None:
            graph_b.replay()

    def _run_layers(self) -> None:
        """Every layer's graphs queued one layer ahead of the CPU (see the module docstring)."""
        try:
            self._queue(0)
            for i, (_, _, cold, after_a) in enumerate(self.layers):
                self._queue(i + 1)  # its first kernel waits for this layer's CPU part
                if cold is not None:
                    after_a.synchronize()
                    cold()
                    self._ready_np[i] = 1
        except BaseException:
            self._ready_np[:] = 1  # release the queued waits, so the stream drains
            torch.cuda.current_stream().synchronize()
            self._ready_np[:] = 0  # those never queued
            raise

    def _whole_step_usable(self) -> bool:
        step = self._whole[2]
        return step is None or numba.get_num_threads() == step.threads  # its barriers count its threads

    def _run_whole_step(self) -> torch.Tensor:
        """The step's one graph; meanwhile the host's threads compute every layer's cold FFN as the GPU hands
        each over (flags both ways: `_gpu_ready` set by the GPU, `_ready` by the host)."""
        graph, out, cold_step = self._whole
        self._gpu_ready_np[:] = 0  # a failed step may have left some set
        graph.replay()
        if cold_step is not None:
            try:
                self.model.counts.cold += cold_step()
            except BaseException:
                self._ready_np[:] = 1  # release the graph's waits, so the stream drains
                torch.cuda.current_stream().synchronize()
                self._ready_np[:] = 0
                raise
        return out

    def _run_layers_in_turn(self, t) -> None:
        """One layer at a time, each flag set before the graph that waits for it is launched: for `bench`'s
        time split (its stream marks can tell the stream's wait for the CPU from GPU work only outside a
        graph), and to measure what queueing ahead gains (`queue_ahead`)."""
        for i, (graph_a, graph_b, cold, after_a) in enumerate(self.layers):
            graph_a.replay()
            if cold is None:  # every row of this layer on the GPU
                if graph_b is not None:
                    graph_b.replay()
                continue
            if t is not None:
                t.mark("gpu")
            after_a.record()
            if graph_b is not None:
                graph_b.replay()  # runs on the GPU while the CPU computes its part
                if t is not None:
                    t.mark("gpu")
            after_a.synchronize()
            with _cpu_time(t):
                cold()
            self._ready_np[i] = 1
            if t is not None:
                t.mark("idle")  # the stream waited for the CPU's part
        self.final.replay()
        if t is not None:
            t.mark("gpu")

    @torch.inference_mode()
    def step(self, token: torch.Tensor, position: int) -> torch.Tensor:
        """Logits [1, 1, V] of `token` at `position` (written into the cache); a fresh tensor."""
        model, t = self.model, self.model.timer
        self.tokens.copy_(token.view(1, 1))
        self.position.fill_(position)
        self.x0.copy_(model.embed_tokens(self.tokens).to(self.x0.device, self.x0.dtype))
        out = self.out
        if t is None and self.queue_ahead and self._whole is not None and self._whole_step_usable():
            out = self._run_whole_step()
        elif t is None and self.queue_ahead and self._waits_in_graphs:
            self._run_layers()
        else:
            self._run_layers_in_turn(t)
        if self._logits_in_graph:
            return out.clone()  # the graph's output buffer is overwritten by the next replay
        x = out
        if self.n_gpu_layers < len(model.ffns):  # the layers in CPU memory, eagerly
            self.cache.set_window(position + 1)  # they read the filled slots only (the graphs keep theirs)
            x = model.layers_from(self.n_gpu_layers, x, torch.tensor([position]), self.cache)
        return model.head(x)
