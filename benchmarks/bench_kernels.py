"""Benchmark of the neuron-aware sparse FFN operators (PowerInfer, arXiv 2312.12456, §5).

On the CPU: streaming read bandwidth (numba prange sum), the numba sparse gate_up/down
at --density on LLaMA-2 FFN shapes (--shape; 7B: d=4096, n_ff=11008; float32 and bfloat16 weights)
in GB/s of active-row bytes and as % of streaming bandwidth, the torch
index_select+matmul baseline, and the dense FFN. --crossover sweeps the density to find
where the dense FFN wins (the source of sparse_ffn.DENSE_CROSSOVER_FRACTION_*).

On CUDA (when present): device copy bandwidth (bytes read + written), the Triton sparse
gate_up/down (id list; id buffer + device count) in GB/s of active-row bytes and % of
copy bandwidth, torch index_select+matmul, torch dense GEMV, the int4 GEMV of the int4-gate
predictor, the compaction kernel and a one-token FFN (sparse vs dense), in --gpu-dtype
(float16, as the executor runs). --sweep times the kernels' launch parameters. GPU times are
medians of CUDA-graph replays (triton.testing.do_bench, which flushes L2 before each), of one
call, and per call of --gpu-layers calls over as many copies of the weights back to back in one
graph (as a decode step runs its layers: the graph launch and each kernel's ramp-up and tail
overlap with the neighbours'); --sweep uses the latter.

On the CPU each call reads a different active set (disjoint sets, cycled) so that the
active rows are not still in the last-level cache from the previous call, as in real
decoding where every layer has its own weights.

    python benchmarks/bench_kernels.py --threads 16 --json benchmarks/results/kernels.json
"""

import argparse
import datetime
import functools
import itertools
import json
import os
import platform
import statistics
import time
from pathlib import Path

# torch and numba each bring their own libgomp: a bounded spin (or the user's OMP_WAIT_POLICY /
# GOMP_SPINCOUNT) must be set before torch loads its libgomp; powerinfer's import does it.
import powerinfer  # noqa: E402,F401

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from powerinfer.bench import git_commit  # noqa: E402
from powerinfer.kernels import sparse_ffn  # noqa: E402
from powerinfer.kernels.quantized import int4_gemv, quantize_int4  # noqa: E402
from powerinfer.kernels.sparse_ffn import compact_active, masked_ffn, sparse_down, sparse_gate_up  # noqa: E402

SHAPES = {"llama2-7b": (4096, 11008), "llama2-13b": (5120, 13824)}  # FFN (d, n_ff)
D, N_FF = SHAPES["llama2-7b"]  # --shape sets them
STREAM_BYTES = 1 << 30


def median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def disjoint_active_sets(n_ff: int, density: float, generator: torch.Generator, limit: int = 16):
    """Sorted id sets (as a predictor's nonzero() gives), disjoint while density allows."""
    k = max(1, round(density * n_ff))
    n_sets = max(1, min(limit, n_ff // k))
    perm = torch.randperm(n_ff, generator=generator)
    if n_sets > 1:
        return [perm[i * k:(i + 1) * k].sort().values for i in range(n_sets)]
    return [torch.randperm(n_ff, generator=generator)[:k].sort().values for _ in range(4)]


def gbps(n_bytes: float, seconds: float) -> float:
    return n_bytes / seconds / 1e9


def dense_ffn(x, w_gate, w_up, w_down_t):
    return (F.silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down_t


def cpu_weights(generator):
    return [torch.randn(N_FF, D, generator=generator) / D**0.5 for _ in range(3)]


def bench_cpu_stream(repeats):
    """Read bandwidth of a numba prange sum over 1 GiB of float32 (the kernels mostly read)."""
    import numba
    from numba import njit, prange

    @njit(parallel=True, fastmath={"reassoc"})
    def parallel_sum(a, n_parts):
        n = a.shape[0]
        partial = np.zeros(n_parts, np.float32)
        for p in prange(n_parts):
            part = a[p * n // n_parts:(p + 1) * n // n_parts]  # a 0-based slice vectorises
            acc = np.float32(0.0)
            for i in range(part.shape[0]):
                acc += part[i]
            partial[p] = acc
        return partial.sum()

    data = np.ones(STREAM_BYTES // 4, np.float32)
    n_parts = 4 * numba.get_num_threads()
    seconds = median_seconds(lambda: parallel_sum(data, n_parts), repeats)
    return {"stream_read_GBps": gbps(data.nbytes, seconds)}


def bench_cpu_operators(density, repeats, stream_gbps, generator):
    w_gate, w_up, w_down_t = cpu_weights(generator)
    sets = disjoint_active_sets(N_FF, density, generator)
    masks = []
    for ids in sets:
        mask = torch.zeros(N_FF, dtype=torch.bool)
        mask[ids.long()] = True
        masks.append(mask)
    k = sets[0].numel()
    results = {"density": density, "k": k}
    for n_tokens in (1, 16):
        x = torch.randn(n_tokens, D, generator=generator)
        h = torch.randn(n_tokens, k, generator=generator)
        for dtype in (torch.float32, torch.bfloat16):
            wg, wu, wd = (w.to(dtype) for w in (w_gate, w_up, w_down_t))
            row_bytes = D * wg.element_size()
            for name, op, n_bytes in (
                ("gate_up", lambda ids: sparse_gate_up(x, wg, wu, ids, "silu"), 2 * k * row_bytes),
                ("down", lambda ids: sparse_down(h, wd, ids), k * row_bytes),
                ("gate_up_index_select_matmul",
                 lambda ids: F.silu(x @ wg.index_select(0, ids).float().T) * (x @ wu.index_select(0, ids).float().T),
                 2 * k * row_bytes),
                ("down_index_select_matmul", lambda ids: h @ wd.index_select(0, ids).float(), k * row_bytes),
                # the fused gate/up/down over a mask (the executor's CPU path for predicted sets)
                ("masked_ffn", lambda mask: masked_ffn(x, wg, wu, wd, mask, "silu"), 3 * k * row_bytes),
            ):
                active = itertools.cycle(masks if name == "masked_ffn" else sets)
                seconds = median_seconds(lambda: op(next(active)), repeats)
                key = f"T{n_tokens}_{str(dtype).removeprefix('torch.')}_{name}"
                results[key] = {
                    "ms": seconds * 1e3,
                    "active_GBps": gbps(n_bytes, seconds),
                    "pct_of_stream": 100 * gbps(n_bytes, seconds) / stream_gbps,
                }
        seconds = median_seconds(lambda: dense_ffn(x, w_gate, w_up, w_down_t), repeats)
        results[f"T{n_tokens}_float32_dense_ffn"] = {"ms": seconds * 1e3, "GBps": gbps(3 * N_FF * D * 4, seconds)}
    return results


def bench_cpu_crossover(repeats, generator):
    """Active fraction at which the dense FFN becomes faster than sparse gate_up + down."""
    w_gate, w_up, w_down_t = cpu_weights(generator)
    results = {}
    for n_tokens in (1, 4, 16, 64):
        x = torch.randn(n_tokens, D, generator=generator)
        dense = median_seconds(lambda: dense_ffn(x, w_gate, w_up, w_down_t), repeats)
        sweep = []
        for density in (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0):
            active = itertools.cycle(disjoint_active_sets(N_FF, density, generator))

            def sparse_ffn_step():
                ids = next(active)
                return sparse_down(sparse_gate_up(x, w_gate, w_up, ids, "silu"), w_down_t, ids)

            sweep.append({"density": density, "sparse_ms": median_seconds(sparse_ffn_step, repeats) * 1e3})
            if sweep[-1]["sparse_ms"] > 1.5 * dense * 1e3:
                break
        crossover = next((p["density"] for p in sweep if p["sparse_ms"] >= dense * 1e3), None)
        results[f"T{n_tokens}"] = {"dense_ms": dense * 1e3, "sweep": sweep, "crossover_density": crossover}
    return results


def gpu_copy_gbps(device, do_bench) -> float:
    """Device-to-device copy of 1 GiB, counting bytes read plus bytes written."""
    src = torch.empty(STREAM_BYTES, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return gbps(2 * STREAM_BYTES, do_bench(lambda: dst.copy_(src), return_mode="median") * 1e-3)


def bench_gpu(density, sweep_configs, layers=8, dtype=torch.float16):
    import triton
    from triton.testing import do_bench

    def graph_us(*fns):
        """Median GPU time per call of fns replayed from one CUDA graph: no Python launch overhead
        (which exceeds these kernels' run time), and do_bench flushes L2 before each replay. Several fns
        (one per layer's weights) run back to back as in a decode step, sharing the graph launch."""
        for fn in fns:
            fn()  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for fn in fns:
                fn()
        return do_bench(graph.replay, warmup=25, rep=200, return_mode="median") * 1e3 / len(fns)

    device = torch.device("cuda")
    copy_gbps = gpu_copy_gbps(device, do_bench)
    results = {"device": torch.cuda.get_device_name(), "triton": triton.__version__, "torch": torch.__version__,
               "copy_GBps": copy_gbps, "density": density, "dtype": str(dtype).removeprefix("torch.")}

    generator = torch.Generator().manual_seed(0)
    w_gate, w_up, w_down_t = (w.to(device=device, dtype=dtype) for w in cpu_weights(generator))
    ids = disjoint_active_sets(N_FF, density, generator)[0].to(device)
    k = ids.numel()
    mask = torch.zeros(N_FF, dtype=torch.bool, device=device)
    mask[ids] = True
    buffer = torch.zeros(N_FF, dtype=torch.int32, device=device)
    buffer[:k].copy_(ids)
    count = torch.tensor([k], dtype=torch.int32, device=device)
    row_bytes = D * w_gate.element_size()

    def record(key, us, n_bytes):
        rate = gbps(n_bytes, us * 1e-6)
        results[key] = {"us": us, "GBps": rate, "pct_of_copy": 100 * rate / copy_gbps}

    # Bandwidths count active-row bytes for the sparse operators, all rows for dense GEMV.
    for n_tokens in (1, 16):
        x = torch.randn(n_tokens, D, device=device, dtype=dtype)
        h = torch.randn(n_tokens, k, device=device, dtype=dtype)
        h_full = torch.randn(n_tokens, N_FF, device=device, dtype=dtype)
        for name, op, n_bytes in (
            ("gate_up_id_list", lambda: sparse_gate_up(x, w_gate, w_up, ids, "silu"), 2 * k * row_bytes),
            ("down_id_list", lambda: sparse_down(h, w_down_t, ids), k * row_bytes),
            ("gate_up_id_buffer", lambda: sparse_gate_up(x, w_gate, w_up, buffer, "silu", count=count),
             2 * k * row_bytes),
            ("down_id_buffer", lambda: sparse_down(h_full, w_down_t, buffer, count=count), k * row_bytes),
            ("gate_up_index_select_matmul",
             lambda: F.silu(x @ w_gate.index_select(0, ids).T) * (x @ w_up.index_select(0, ids).T), 2 * k * row_bytes),
            ("dense_gemv_torch", lambda: x @ w_gate.T, N_FF * row_bytes),
        ):
            record(f"T{n_tokens}_{name}", graph_us(op), n_bytes)
    results["compact_active_us"] = graph_us(lambda: compact_active(mask, buffer, count))

    # The same operators over `layers` copies of the weights in one graph, back to back as the layers of a
    # decode step run: the graph launch and the kernels' ramp-up and tail overlap as they do there.
    copies = [(w_gate, w_up, w_down_t)] + [tuple(w.clone() for w in (w_gate, w_up, w_down_t))
                                          for _ in range(layers - 1)]
    results["layers_in_graph"] = layers
    for n_tokens in (1, 16):
        x = torch.randn(n_tokens, D, device=device, dtype=dtype)
        h_full = torch.randn(n_tokens, N_FF, device=device, dtype=dtype)
        for name, make_op, n_bytes in (
            ("gate_up_id_buffer", lambda wg, wu, wd: lambda: sparse_gate_up(x, wg, wu, buffer, "silu", count=count),
             2 * k * row_bytes),
            ("down_id_buffer", lambda wg, wu, wd: lambda: sparse_down(h_full, wd, buffer, count=count), k * row_bytes),
            ("dense_gemv_torch", lambda wg, wu, wd: lambda: x @ wg.T, N_FF * row_bytes),
        ):
            record(f"T{n_tokens}_{name}_{layers}_layers", graph_us(*(make_op(*w) for w in copies)), n_bytes)
    # the int4-gate predictor's product: every row of a 4-bit gate copy (bytes: packed nibbles and scales)
    quantized = [quantize_int4(w_gate_copy, 64) for w_gate_copy, _, _ in copies]
    x = torch.randn(1, D, device=device, dtype=dtype)
    record(f"T1_int4_gemv_{layers}_layers", graph_us(*(functools.partial(int4_gemv, x, *q) for q in quantized)),
           sum(t.numel() * t.element_size() for t in quantized[0]))

    # One-token FFN: mask -> id buffer -> gate_up -> down, against the dense FFN.
    x = torch.randn(1, D, device=device, dtype=dtype)
    h = torch.empty(1, N_FF, device=device, dtype=dtype)
    y = torch.empty(1, D, device=device, dtype=dtype)

    def sparse_step():
        compact_active(mask, buffer, count)
        sparse_gate_up(x, w_gate, w_up, buffer, "silu", count=count, out=h)
        sparse_down(h, w_down_t, buffer, count=count, out=y)

    results["decode_ffn_graph"] = {
        "sparse_us": graph_us(sparse_step),
        "dense_us": graph_us(lambda: y.copy_(dense_ffn(x, w_gate, w_up, w_down_t))),
    }
    if sweep_configs:
        results["sweep"] = sweep_gpu_configs(copies, quantized, ids, graph_us, row_bytes, copy_gbps)
    return results


def sweep_gpu_configs(copies, quantized, ids, graph_us, row_bytes, copy_gbps):
    """Launch parameters of the kernels (module constants of triton_gpu), by % of copy bandwidth; each timed
    over the layers' weight copies back to back in one graph."""
    from powerinfer.kernels import triton_gpu

    w_gate = copies[0][0]
    k = ids.numel()
    candidates = (  # (op, tokens, constant names, values)
        ("gate_up", 1, ("_GEMV_BLOCK_N", "_GEMV_MAX_BLOCK_D", "_GEMV_WARPS", "_PROGRAMS_PER_SM"),
         ((2, 2048, 4, 8), (4, 1024, 4, 8), (4, 1024, 8, 8), (8, 1024, 8, 8), (4, 512, 4, 8), (8, 512, 8, 8),
          (16, 256, 8, 8))),
        ("down", 1, ("_DOWN_GEMV_BLOCK_K", "_DOWN_GEMV_BLOCK_D", "_DOWN_GEMV_WARPS", "_DOWN_PROGRAMS_PER_SM"),
         ((64, 128, 4, 8), (128, 64, 4, 8), (256, 32, 4, 8), (128, 64, 8, 8), (128, 64, 4, 16), (128, 32, 4, 8),
          (64, 64, 4, 8), (128, 64, 4, 4), (256, 32, 4, 4), (128, 32, 4, 4), (128, 64, 4, 2))),
        ("gate_up", 16, ("_GEMM_BLOCK_N", "_GEMM_BLOCK_D", "_GEMM_WARPS", "_PROGRAMS_PER_SM"),
         ((16, 128, 4, 8), (16, 256, 4, 8), (16, 256, 8, 8), (32, 64, 4, 8), (16, 64, 4, 8), (16, 256, 4, 4))),
        ("down", 16, ("_DOWN_GEMM_BLOCK_K", "_DOWN_GEMM_BLOCK_D", "_DOWN_GEMM_WARPS", "_PROGRAMS_PER_SM"),
         ((32, 64, 4, 8), (32, 128, 4, 8), (64, 128, 8, 8), (16, 128, 4, 8), (64, 64, 4, 8), (64, 64, 4, 4))),
        ("int4_gemv", 1, ("_INT4_BLOCK_N", "_INT4_BYTES_PER_ROW", "_INT4_WARPS"),
         ((8, 256, 4), (16, 256, 4), (8, 512, 4), (16, 512, 8), (32, 256, 8), (16, 128, 4), (4, 256, 2),
          (32, 128, 4), (8, 128, 2))),
    )
    rows = []
    for op, n_tokens, names, values in candidates:
        x = torch.randn(n_tokens, D, device=w_gate.device, dtype=w_gate.dtype)
        h = torch.randn(n_tokens, k, device=w_gate.device, dtype=w_gate.dtype)
        saved = [getattr(triton_gpu, name) for name in names]
        try:
            for value in values:
                for name, v in zip(names, value):
                    setattr(triton_gpu, name, v)
                if op == "gate_up":
                    fns = (functools.partial(sparse_gate_up, x, wg, wu, ids, "silu") for wg, wu, _ in copies)
                    n_bytes = 2 * k * row_bytes
                elif op == "down":
                    fns = (functools.partial(sparse_down, h, wd, ids) for _, _, wd in copies)
                    n_bytes = k * row_bytes
                else:
                    fns = (functools.partial(int4_gemv, x, *q) for q in quantized)
                    n_bytes = sum(t.numel() * t.element_size() for t in quantized[0])
                us = graph_us(*fns)
                rows.append({"op": op, "tokens": n_tokens, "params": dict(zip(names, value)), "us": us,
                             "pct_of_copy": 100 * gbps(n_bytes, us * 1e-6) / copy_gbps})
        finally:
            for name, v in zip(names, saved):
                setattr(triton_gpu, name, v)
    return rows


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--threads", type=int, help="CPU threads (numba kernels and torch); default: all")
    parser.add_argument("--density", type=float, default=0.1, help="active fraction of the n_ff neurons")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--crossover", action="store_true", help="sweep density for the dense crossover")
    parser.add_argument("--sweep", action="store_true", help="sweep GPU block shapes")
    parser.add_argument("--gpu-layers", type=int, default=8,
                        help="weight copies run back to back in one CUDA graph for the per-layer timings")
    parser.add_argument("--shape", choices=SHAPES, default="llama2-7b", help="FFN shape (default: %(default)s)")
    parser.add_argument("--gpu-dtype", choices=("float16", "bfloat16"), default="float16",
                        help="GPU weight dtype (default: %(default)s, the executor's)")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU part")
    parser.add_argument("--no-gpu", action="store_true", help="skip the CUDA part")
    args = parser.parse_args()
    global D, N_FF
    D, N_FF = SHAPES[args.shape]

    if args.threads:
        sparse_ffn.set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),  # POWERINFER_COMMIT when set
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT"),
        "shape": {"name": args.shape, "d": D, "n_ff": N_FF},
    }
    generator = torch.Generator().manual_seed(0)
    if not args.no_cpu and sparse_ffn.select_backend(torch.zeros(1), torch.zeros(1)) != "numba":
        print("numba not installed: skipping the CPU part")
    elif not args.no_cpu:
        report["cpu_stream"] = bench_cpu_stream(args.repeats)
        stream = report["cpu_stream"]["stream_read_GBps"]
        report["cpu_sparse"] = bench_cpu_operators(args.density, args.repeats, stream, generator)
        if args.crossover:
            report["cpu_crossover"] = bench_cpu_crossover(max(3, args.repeats // 2), generator)
    if torch.cuda.is_available() and not args.no_gpu:
        report["gpu"] = bench_gpu(args.density, args.sweep, args.gpu_layers, getattr(torch, args.gpu_dtype))

    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
