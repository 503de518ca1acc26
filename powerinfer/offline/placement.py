"""Placement solver: which weights live on the GPU for a VRAM budget (PowerInfer §6, "neuron placement").

PowerInfer keeps the dense part on the GPU and splits each FFN into hot neurons (GPU) and cold ones (CPU),
choosing the split by an integer program that maximizes the activations the GPU serves, with a per-layer
minimum GPU share (below it, the CPU–GPU synchronization costs more than the GPU saves). Here the same
program also decides the dense tensors: each layer's attention (with its KV cache) and the embeddings /
LM head are items touched on every token, so the objective becomes the expected bytes of weights the CPU
must read per token, and a budget smaller than the dense part still uses the GPU fully (some layers'
attention on the CPU) instead of failing or leaving it idle.

Items and their per-token CPU cost if left on the CPU (d: hidden size, c: CPU dtype bytes):
- FFN neuron j (batches of `neuron_batch` in hot-first order, a layer's GPU part a prefix): d·c·(a + b·p_j),
  where p_j is its activation frequency (1 for always-active neurons) and (a, b) = `STRATEGY_ROWS`: the
  rows of gate/up/down read on every token and only when the neuron is active;
- attention of a layer: its weights plus reading its KV cache (half the context on average);
- LM head: V·d·c; embeddings: one row, d·c (one item when tied).
What must be on the GPU (the minimum working set): norms, the predictors when the strategy uses them,
the workspace (`workspace_bytes`) and the allocator's rounding (`allocator_bytes`). The KV cache of a layer lives with its attention.
Solved with `scipy.optimize.milp` (HiGHS); a greedy baseline (dense first, then the globally hottest
neuron batches, PowerInfer-style) is reported for comparison.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

import numpy as np
import torch

from powerinfer.errors import PowerInferError

# per neuron: (rows of gate/up/down read on every token, rows read only when the neuron is active)
STRATEGY_ROWS = {"dense": (3, 0), "exact-sparse-down": (2, 1), "predictor": (0, 3)}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
GiB = 1 << 30
MiB = 1 << 20
KiB = 1 << 10


def relative_ffn_bytes(strategy: str, sparsity: float, predictor_fraction: float = 0.0) -> float:
    """FFN weight bytes read per token relative to the dense FFN, for a measured skipped fraction."""
    every_token, when_active = STRATEGY_ROWS[strategy]
    cost = (every_token + when_active * (1.0 - sparsity)) / 3.0
    return cost + (predictor_fraction if strategy == "predictor" else 0.0)


@dataclass
class _Shapes:
    d: int
    n_ff: int
    layers: int
    vocab: int
    heads: int
    q: int  # query width (heads * head_dim)
    kv: int  # key/value width
    attention_parameters: int
    tied: bool

    @classmethod
    def from_config(cls, config: dict) -> "_Shapes":
        from powerinfer.models.llama import ModelArgs

        a = ModelArgs.from_config(config)
        q, kv = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
        params = a.hidden_size * (q + 2 * kv) + q * a.hidden_size
        params += (q + 2 * kv) * a.qkv_bias + a.hidden_size * a.o_bias
        return cls(a.hidden_size, a.intermediate_size, a.num_hidden_layers, a.vocab_size, a.num_attention_heads,
                   q, kv, params, a.tie_word_embeddings)


def workspace_bytes(config: dict, ctx: int, prefill_chunk: int, gpu_dtype: str, with_predictor: bool) -> int:
    """GPU buffers of one prefill chunk of T tokens (the sum of every step's buffers, an upper bound on the
    peak): residual and normed hidden states, q/k/v and attention output, attention probabilities over the
    context, gate/up and h, predictor masks; plus the last token's float32 logits and a float32 hidden
    state for CPU<->GPU staging."""
    s, g, t = _Shapes.from_config(config), DTYPE_BYTES[gpu_dtype], prefill_chunk
    elements = t * (2 * s.d + 2 * s.q + 2 * s.kv) + s.heads * t * ctx + t * 3 * s.n_ff
    return g * elements + (t * s.n_ff if with_predictor else 0) + 4 * s.vocab + 4 * t * s.d


CUBLAS_STREAMS = 3  # streams that run matmuls in a CUDA-graph decode: default, warm-up, capture


def cublas_workspace_bytes() -> int:
    """The allocator segments holding cuBLAS's and cuBLASLt's workspaces on every matmul stream, as the
    environment sizes them (powerinfer's import sets 1 MiB each unless the user chose; see
    powerinfer/__init__.py): up to 1 MiB each they share one 2 MiB small-block segment, up to 20 MiB together
    one 20 MiB segment, beyond that their own."""
    config = os.environ.get("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # unset: PyTorch's Hopper default
    cublas = sum(int(size) * int(count) for size, count in re.findall(r":(\d+):(\d+)", config)) * KiB
    cublaslt = int(os.environ.get("CUBLASLT_WORKSPACE_SIZE", "32768")) * KiB
    if max(cublas, cublaslt) <= MiB:
        per_stream = 2 * MiB
    elif cublas + cublaslt <= 20 * MiB:
        per_stream = 20 * MiB
    else:
        per_stream = -(-(cublas + cublaslt) // (2 * MiB)) * 2 * MiB
    return CUBLAS_STREAMS * per_stream


def _own_segment_rounding(sizes: list[int]) -> int:
    """Bytes the allocator's segments add past these tensors: those of 10 MiB or more are rounded up to 2 MiB."""
    return sum(-n % (2 * MiB) for n in sizes if n >= 10 * MiB)


def allocator_bytes(config: dict, ctx: int, gpu_dtype: str, prefill_chunk: int = 512) -> int:
    """What PyTorch's CUDA caching allocator may reserve beyond the tensors: each tensor of 10 MiB or more
    gets its own segment rounded up to 2 MiB (exactly known for the attention weights, KV caches, embeddings and
    LM head; up to 2 MiB for a layer's GPU rows of gate, up and down, whose count the placement decides, and for
    a prefill chunk's largest buffers); weights of 1-10 MiB are cut from 20 MiB segments, smaller ones from 2 MiB
    blocks (one partly used segment of each). Bounded with every tensor at its full size. Plus the cuBLAS
    workspaces (`cublas_workspace_bytes`). (A flat 2 MiB per large tensor over-counted: a synthetic 7B hybrid
    peaked ~300 MiB under its 8 GiB budget, whose q/k/v, output and LM-head matrices are whole multiples of 2 MiB.)"""
    s, g, t = _Shapes.from_config(config), DTYPE_BYTES[gpu_dtype], prefill_chunk
    fixed = [g * n for n in (s.d * (s.q + 2 * s.kv), s.q * s.d, ctx * s.kv, ctx * s.kv)]  # qkv, o, K and V caches
    ends = [g * s.vocab * s.d] * 2  # embeddings, LM head
    rows = [g * s.d * s.n_ff] * 3  # gate, up, down in full
    transient = [g * t * n for n in (s.d, s.q + 2 * s.kv, 2 * s.n_ff, s.heads * ctx)]  # hidden, qkv, gate/up, scores
    rounding = s.layers * (_own_segment_rounding(fixed) + 2 * MiB * sum(n >= 10 * MiB for n in rows))
    rounding += _own_segment_rounding(ends) + 2 * MiB * sum(n >= 10 * MiB for n in transient)
    mid_segment = 20 * MiB if any(MiB <= n < 10 * MiB for n in fixed + ends + rows) else 0
    return rounding + mid_segment + 2 * MiB + cublas_workspace_bytes()


def required_gpu_bytes(config: dict, ctx: int, gpu_dtype: str = "float16", prefill_chunk: int = 512,
                       predictor_bytes: list[int] | None = None) -> dict:
    """The minimum working set by category: norms, predictors (None: not used), workspace, allocator."""
    s, g = _Shapes.from_config(config), DTYPE_BYTES[gpu_dtype]
    return {"norms": g * s.d * (2 * s.layers + 1),
            "predictors": sum(predictor_bytes) if predictor_bytes is not None else 0,
            "workspace": workspace_bytes(config, ctx, prefill_chunk, gpu_dtype, predictor_bytes is not None),
            "allocator": allocator_bytes(config, ctx, gpu_dtype, prefill_chunk)}


def check_vram_budget(vram_budget_bytes: float, required: dict, ctx: int) -> None:
    if not vram_budget_bytes > 0:
        raise PowerInferError(f"the VRAM budget must be positive, got {vram_budget_bytes / GiB:g} GiB")
    minimum = sum(required.values())
    if vram_budget_bytes < minimum:
        raise PowerInferError(
            f"a VRAM budget of {vram_budget_bytes / GiB:.3f} GiB is below the minimum working set of "
            f"{minimum / MiB:.1f} MiB ({', '.join(f'{k} {v / MiB:.1f} MiB' for k, v in required.items())}) "
            f"for --ctx {ctx}; give at least {minimum / GiB:.3f} GiB")


def plan_placement(config: dict, frequencies: list[torch.Tensor], *, vram_budget_bytes: int, strategy: str,
                   n_always_active: int = 0, predictor_bytes: list[int] | None = None, ctx: int = 2048,
                   gpu_dtype: str = "float16", cpu_dtype: str = "bfloat16", neuron_batch: int = 64,
                   min_layer_fraction: float = 0.125, prefill_chunk: int = 512,
                   time_limit_s: float = 60.0) -> dict:
    """The placement for one VRAM budget; `frequencies[i]` is layer i's activation frequency in hot-first
    order. Returns the placement.json dict (docs/ARTIFACT.md)."""
    if strategy not in STRATEGY_ROWS:
        raise PowerInferError(f"unknown strategy {strategy!r} (choose from {', '.join(STRATEGY_ROWS)})")
    if ctx < 1:
        raise PowerInferError(f"--ctx must be positive, got {ctx}")
    s = _Shapes.from_config(config)
    g, c = DTYPE_BYTES[gpu_dtype], DTYPE_BYTES[cpu_dtype]
    uses_predictor = strategy == "predictor"
    required = required_gpu_bytes(config, ctx, gpu_dtype, prefill_chunk,
                                  predictor_bytes if uses_predictor else None)
    check_vram_budget(vram_budget_bytes, required, ctx)
    minimum = sum(required.values())

    every_token, when_active = STRATEGY_ROWS[strategy]
    neuron_batch = max(1, min(neuron_batch, s.n_ff))
    min_neurons = max(1, round(min_layer_fraction * s.n_ff))
    min_batches = -(-min_neurons // neuron_batch)
    # items: (kind, layer, batch) with GPU size and CPU bytes saved per token, in bytes
    kinds, sizes, values = [], [], []
    batch_ranges = []
    for layer, freq in enumerate(frequencies):
        p = freq.double().clone()
        p[:n_always_active] = 1.0  # computed on every token
        ranges = [(lo, min(lo + neuron_batch, s.n_ff)) for lo in range(0, s.n_ff, neuron_batch)]
        batch_ranges.append(ranges)
        for b, (lo, hi) in enumerate(ranges):
            kinds.append(("ffn", layer, b))
            sizes.append(3 * s.d * g * (hi - lo))
            values.append(s.d * c * (every_token * (hi - lo) + when_active * p[lo:hi].sum().item()))
    kv_bytes = 2 * ctx * s.kv
    for layer in range(s.layers):
        kinds.append(("attention", layer, 0))
        sizes.append(g * (s.attention_parameters + kv_bytes))
        values.append(c * (s.attention_parameters + kv_bytes / 2))
    if s.tied:
        kinds.append(("embeddings+lm_head", -1, 0))
        sizes.append(g * s.vocab * s.d)
        values.append(c * (s.vocab * s.d + s.d))
    else:
        kinds += [("embeddings", -1, 0), ("lm_head", -1, 0)]
        sizes += [g * s.vocab * s.d, g * s.vocab * s.d]
        values += [c * s.d, c * s.vocab * s.d]
    sizes, values = np.array(sizes, dtype=np.float64), np.array(values, dtype=np.float64)
    free = vram_budget_bytes - minimum

    start = time.perf_counter()
    chosen, status, gap = _solve(kinds, sizes, values, free, batch_ranges, min_batches, time_limit_s)
    seconds = time.perf_counter() - start
    greedy = _greedy(kinds, sizes, values, free, min_batches)

    placement = _describe(kinds, sizes, values, chosen, frequencies, batch_ranges, s, g)
    greedy_summary = _describe(kinds, sizes, values, greedy, frequencies, batch_ranges, s, g)
    placement.update(
        vram_budget_bytes=int(vram_budget_bytes), ctx=ctx, strategy=strategy, gpu_dtype=gpu_dtype,
        cpu_dtype=cpu_dtype, neuron_batch=neuron_batch, min_layer_neurons=min_batches * neuron_batch,
        n_always_active=n_always_active, prefill_chunk=prefill_chunk,
        bytes_by_category={**required, **placement.pop("placed_bytes")},
        minimum_bytes=minimum,
        all_cpu_bytes_per_token=float(values.sum()),
        greedy={"expected_gpu_activation_share": greedy_summary["expected_gpu_activation_share"],
                "expected_cpu_bytes_per_token": greedy_summary["expected_cpu_bytes_per_token"]},
        solver={"status": status, "seconds": round(seconds, 3), "mip_gap": gap})
    placement["gpu_bytes"] = sum(placement["bytes_by_category"].values())
    return placement


def _solve(kinds, sizes, values, free, batch_ranges, min_batches, time_limit_s):
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    n = len(kinds)
    first = {}
    for idx, (kind, layer, b) in enumerate(kinds):
        if kind == "ffn":
            first.setdefault(layer, idx)
    prefix, minimum = [], []
    for layer, start in first.items():
        count = len(batch_ranges[layer])
        for b in range(count - 1):  # a layer's GPU neurons are a prefix of the hot-first order
            prefix.append((start + b, start + b + 1))
        minimum.append((start, count, min(min_batches, count)))
    a = lil_matrix((1 + len(prefix) + len(minimum), n))
    a[0, :] = sizes / MiB
    lower, upper = [-np.inf], [(free - 2) / MiB]  # 2 bytes of slack for the solver's feasibility tolerance
    for r, (i, j) in enumerate(prefix, start=1):
        a[r, i], a[r, j] = 1, -1
        lower.append(0)
        upper.append(np.inf)
    for r, (start, count, least) in enumerate(minimum, start=1 + len(prefix)):
        # either no GPU neurons (batch 0 off) or at least `least` batches of them
        a[r, start:start + count] = 1
        a[r, start] = 1 - least
        lower.append(0)
        upper.append(np.inf)
    result = milp(-values / MiB, integrality=np.ones(n), bounds=Bounds(0, 1),
                  constraints=LinearConstraint(a.tocsr(), lower, upper),
                  options={"time_limit": time_limit_s, "mip_rel_gap": 1e-6})
    if result.x is None:
        raise PowerInferError(f"the placement solver found no solution ({result.message})")
    gap = getattr(result, "mip_gap", None)
    return np.round(result.x).astype(bool), result.message, None if gap is None else float(gap)


def _greedy(kinds, sizes, values, free, min_batches):
    """PowerInfer-style baseline: dense items first, then neuron batches by expected CPU bytes saved."""
    chosen = np.zeros(len(kinds), dtype=bool)
    dense = [i for i, k in enumerate(kinds) if k[0] != "ffn"]
    ffn = sorted((i for i, k in enumerate(kinds) if k[0] == "ffn"), key=lambda i: (-values[i], kinds[i][1:]))
    for i in dense + ffn:
        if sizes[i] <= free:
            chosen[i] = True
            free -= sizes[i]
    for layer in {k[1] for k in kinds if k[0] == "ffn"}:  # drop layers below the minimum share
        members = [i for i, k in enumerate(kinds) if k[0] == "ffn" and k[1] == layer]
        if 0 < chosen[members].sum() < min(min_batches, len(members)):
            chosen[members] = False
    return chosen


def _describe(kinds, sizes, values, chosen, frequencies, batch_ranges, s: _Shapes, g: int) -> dict:
    layers = [{"n_gpu_neurons": 0, "attention_on_gpu": False, "gpu_activation_share": 0.0}
              for _ in range(s.layers)]
    placed = {"embeddings": 0, "lm_head": 0, "attention": 0, "kv_cache": 0, "ffn": 0}
    embeddings_on_gpu = lm_head_on_gpu = False
    for idx, (kind, layer, b) in enumerate(kinds):
        if not chosen[idx]:
            continue
        if kind == "ffn":
            lo, hi = batch_ranges[layer][b]
            layers[layer]["n_gpu_neurons"] = max(layers[layer]["n_gpu_neurons"], hi)
            placed["ffn"] += int(sizes[idx])
        elif kind == "attention":
            layers[layer]["attention_on_gpu"] = True
            placed["attention"] += g * s.attention_parameters
            placed["kv_cache"] += int(sizes[idx]) - g * s.attention_parameters
        elif kind == "embeddings+lm_head":
            embeddings_on_gpu = lm_head_on_gpu = True
            placed["embeddings"] += int(sizes[idx])
        elif kind == "embeddings":
            embeddings_on_gpu = True
            placed["embeddings"] += int(sizes[idx])
        else:
            lm_head_on_gpu = True
            placed["lm_head"] += int(sizes[idx])
    served = total = 0.0
    for layer, freq in zip(layers, frequencies):
        share = freq[:layer["n_gpu_neurons"]].double().sum().item()
        layer_total = freq.double().sum().item()
        layer["gpu_activation_share"] = share / layer_total if layer_total else 0.0
        served, total = served + share, total + layer_total
    return {"embeddings_on_gpu": embeddings_on_gpu, "lm_head_on_gpu": lm_head_on_gpu, "layers": layers,
            "placed_bytes": placed,
            "expected_gpu_activation_share": served / total if total else 0.0,
            "expected_cpu_bytes_per_token": float(values[~chosen].sum())}


def format_placement(placement: dict) -> str:
    lines = [f"VRAM budget {placement['vram_budget_bytes'] / GiB:.3f} GiB, strategy {placement['strategy']}, "
             f"ctx {placement['ctx']}, GPU {placement['gpu_dtype']}, CPU {placement['cpu_dtype']}",
             "GPU bytes by category:"]
    for name, value in placement["bytes_by_category"].items():
        lines.append(f"  {name:<11} {value / MiB:>10.1f} MiB")
    lines.append(f"  {'total':<11} {placement['gpu_bytes'] / MiB:>10.1f} MiB")
    lines.append(f"embeddings on GPU: {'yes' if placement['embeddings_on_gpu'] else 'no'}, "
                 f"LM head on GPU: {'yes' if placement['lm_head_on_gpu'] else 'no'}")
    lines.append(f"{'layer':>5}  {'attention':>9}  {'GPU neurons':>11}  {'activation share':>16}")
    for i, layer in enumerate(placement["layers"]):
        lines.append(f"{i:>5}  {'GPU' if layer['attention_on_gpu'] else 'CPU':>9}  {layer['n_gpu_neurons']:>11}  "
                     f"{layer['gpu_activation_share']:>16.3f}")
    greedy = placement["greedy"]
    lines.append(f"expected share of activations served by the GPU: {placement['expected_gpu_activation_share']:.3f} "
                 f"(greedy top-K: {greedy['expected_gpu_activation_share']:.3f})")
    lines.append(f"expected CPU weight bytes per token: {placement['expected_cpu_bytes_per_token'] / MiB:.2f} MiB "
                 f"(greedy top-K: {greedy['expected_cpu_bytes_per_token'] / MiB:.2f} MiB, "
                 f"all on CPU: {placement['all_cpu_bytes_per_token'] / MiB:.2f} MiB)")
    return "\n".join(lines)


def plan_for_artifact(checkpoint, vram_budget_bytes: int, strategy: str | None = None, **overrides) -> dict:
    """Re-plan an artifact (`ArtifactCheckpoint`) for another budget from its stored profile, without
    re-profiling. `overrides` (ctx, gpu_dtype, cpu_dtype, neuron_batch, min_layer_fraction) default to
    the values the artifact was built with; None means the same."""
    from powerinfer.offline.predictors import predictor_nbytes

    manifest, build = checkpoint.manifest, checkpoint.manifest["build"]
    config = manifest["config"]
    settings = {name: overrides.get(name) if overrides.get(name) is not None else build[name]
                for name in ("ctx", "gpu_dtype", "cpu_dtype", "neuron_batch", "min_layer_fraction")}
    return plan_placement(
        config, [p["frequency"] for p in checkpoint.profile()], vram_budget_bytes=vram_budget_bytes,
        strategy=strategy or manifest["strategy"]["name"], n_always_active=manifest["layers"][0]["n_always_active"],
        predictor_bytes=[predictor_nbytes(layer.get("predictor_kind", "low-rank"), config["hidden_size"],
                                          config["intermediate_size"], layer["rank"], DTYPE_BYTES[settings["gpu_dtype"]])
                         for layer in manifest["layers"]], **settings)
