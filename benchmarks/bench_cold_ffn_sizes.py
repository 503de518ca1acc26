"""The cold FFN of one hybrid layer as a function of its number of active neurons (PowerInfer §5: the CPU
computes the active cold neurons while the GPU computes the hot ones).

In a synthetic 13B hybrid decode the CPU rows active per layer range from 0 to ~1,900 (quartiles 44 / 177 /
434; scripts/profile_hybrid.py --cold-study), and a least-squares fit of the calls' times gave ~60 us fixed
per call plus ~75 GB/s for the rows. This times, per number of active neurons k, over --layers layers' own
bundled bfloat16 rows (weights and input positive, so every predicted neuron is active, as with the
synthetic models' precise predictors), each call with the next of --masks hot-first active sets:
- `bound`: `kernels.cpu.MaskedFFN.bind`, as the executor calls it;
- `tasks_per_N`: the same kernel with one task (thread) per N active neurons, at most one per thread;
- `gather_read`: the active rows only read, split over the threads as the kernel splits them;
- `fork_join` and `sum_partials`: an empty parallel region, and the kernel's reduction of one partial output
  per thread, alone (the floor of any call).

    python benchmarks/bench_cold_ffn_sizes.py --threads 16 --d 5120 --cold-rows 11059 --json results/x.json
"""

import powerinfer  # noqa: F401  (before torch: the OpenMP wait policy)

import argparse
import statistics
import time

import numpy as np
import torch
from numba import njit

from bench_cold_ffn import _fork_join, _gather_read
from common import active_sets, add_cold_ffn_arguments, write_json
from powerinfer.bench import environment, measure_bandwidths
from powerinfer.kernels import cpu
from powerinfer.runtime.host_memory import huge_page_copy


@njit(parallel=True, cache=True)
def _sum_partials_alone(partial, out):
    cpu._sum_partials(partial, out)


def per_call_us(prepare, call, n_calls: int, repeats: int) -> float:
    """Median over `repeats` sweeps of the mean time of one call (each timed alone, after `prepare(i)`)."""
    sweeps = []
    for _ in range(repeats + 1):
        spent = 0.0
        for i in range(n_calls):
            prepare(i)
            start = time.perf_counter()
            call(i)
            spent += time.perf_counter() - start
        sweeps.append(spent / n_calls)
    return statistics.median(sweeps[1:]) * 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cold_ffn_arguments(p)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--masks", type=int, default=8, help="active sets per layer and size, used in turn")
    p.add_argument("--sizes", default="8,16,32,64,128,256,512,1024,2048")
    p.add_argument("--tasks-per", default="8,16,32", help="neurons per task of the tasks_per_N variants")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args()
    cpu.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    bandwidth = measure_bandwidths(cuda=False)["cpu_read"]
    sizes = [int(k) for k in args.sizes.split(",")]
    g = torch.Generator().manual_seed(0)
    first = torch.rand(args.cold_rows, 3, args.d, generator=g) * 0.02  # positive: every neuron's h > 0
    ops = [cpu.MaskedFFN(*huge_page_copy(first, torch.bfloat16).unbind(1), "relu") for _ in range(args.layers)]
    del first
    x, mask, out = torch.rand(1, args.d, generator=g), torch.zeros(args.cold_rows, dtype=torch.bool), torch.zeros(1, args.d)
    masks = {k: active_sets(args.cold_rows, k, args.masks, g) for k in sizes}
    bound = [op.bind(x, mask, out) for op in ops]
    x_np, mask_np, out_np = x.numpy(), mask.numpy(), out.numpy()
    n_calls = args.layers * args.masks
    sums = np.zeros(args.threads, np.int64)
    partial = np.zeros((args.threads, 1, args.d), np.float32)

    def tasks_per(n):
        def call(i):
            op = ops[i % args.layers]
            k = int(np.count_nonzero(mask_np))
            tasks = min(args.threads, max(1, -(-k // n)))
            cpu._masked_ffn_kernel(x_np, *op.weights, *op.scales, mask_np, op.stride, op.code, op.threshold,
                                   partial[:tasks], out_np)
        return call

    variants = {"bound": lambda i: bound[i % args.layers](),
                **{f"tasks_per_{n}": tasks_per(int(n)) for n in args.tasks_per.split(",")},
                "gather_read": lambda i: _gather_read(*ops[i % args.layers].weights,
                                                      np.flatnonzero(mask_np) * ops[0].stride, args.threads, sums)}
    results = {"fork_join_us": round(per_call_us(lambda i: None, lambda i: _fork_join(args.threads, sums.astype(np.float64)),
                                                 n_calls, args.repeats), 1),
               "sum_partials_us": round(per_call_us(lambda i: None, lambda i: _sum_partials_alone(partial, out_np),
                                                    n_calls, args.repeats), 1)}
    print(results, flush=True)
    for k in sizes:
        row = {}
        for name, call in variants.items():
            us = per_call_us(lambda i: mask.copy_(masks[k][i // args.layers % args.masks]), call, n_calls, args.repeats)
            row[name] = {"us": round(us, 1), "pct_of_stream": round(100 * k * ops[0].neuron_bytes / us / 1e3 / bandwidth, 1)}
        results[str(k)] = row
        print(k, {name: v["us"] for name, v in row.items()}, flush=True)
    if args.json:
        write_json(args.json, {**environment(cuda=False), "benchmark": "cold_ffn_sizes", "threads": args.threads,
                               "shape": {"d": args.d, "cold_rows": args.cold_rows, "layers": args.layers,
                                         "masks": args.masks, "dtype": "bfloat16", "distribution": "hot-first"},
                               "cpu_stream_gb_s": round(bandwidth, 1), "results": results})


if __name__ == "__main__":
    main()
