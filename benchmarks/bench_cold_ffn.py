"""Where the time of a hybrid decode step's CPU half goes: the cold FFN of one layer, called as the
executor calls it, layer after layer (PowerInfer, arXiv 2312.12456, §5: the CPU computes the active cold
neurons of every layer while the GPU computes the hot ones).

A synthetic 7B hybrid step spends ~200 us per layer in the cold FFN for ~7.5 MB of active bfloat16 rows
(benchmarks/results/hybrid_decode_cold_ffn_h100.json), where streaming them would take ~65 us. This times,
per call, over --layers layers' own weights (so no call finds its rows in the cache):
- `operator`: `kernels.cpu.MaskedFFN` with pinned x, mask and output, as the executor calls it;
- `kernel`: the numba kernel on prepared arrays (what the operator adds is Python);
- `operator_after_gap`: the operator after --gap-us of the host spinning, as it waits for the GPU's part
  of the layer (the numba threads may have gone to sleep by then);
- `fork_join`: an empty parallel region over the threads (the floor of any parallel call);
and reports each as GB/s of active-row bytes and % of the CPU streaming bandwidth measured in the same run.

    python benchmarks/bench_cold_ffn.py --threads 16 --json results/cold_ffn.json
"""

import powerinfer  # noqa: F401  (before torch: the OpenMP wait policy)

import argparse
import json
import os
import statistics
import time

import numba
import numpy as np
import torch
from numba import njit, prange

from powerinfer.bench import environment, measure_bandwidths
from powerinfer.kernels import cpu


@njit(parallel=True, cache=True)
def _fork_join(n_tasks, out):
    for task in prange(n_tasks):
        out[task] += 1.0


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def per_call_us(calls, repeats: int, gap_s: float = 0.0) -> float:
    """Median over `repeats` sweeps of the mean time of one call (each call timed alone when gap_s > 0)."""
    sweeps = []
    for _ in range(repeats + 1):
        spent = 0.0
        for call in calls:
            if gap_s:
                spin(gap_s)
            start = time.perf_counter()
            call()
            spent += time.perf_counter() - start
        sweeps.append(spent / len(calls))
    return statistics.median(sweeps[1:]) * 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--cold-rows", type=int, default=8800, help="CPU rows per layer (synthetic 7B at 8 GiB)")
    p.add_argument("--active", type=int, default=310, help="active cold neurons per layer and token")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--gap-us", type=float, default=130.0)
    p.add_argument("--json")
    args = p.parse_args()
    cpu.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    bandwidth = measure_bandwidths(cuda=False)["cpu_read"]

    pin = torch.cuda.is_available()  # pinned, as the executor's buffers (MaskedFFN keeps their views)
    g = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(args.layers):
        weights = [torch.randn(args.cold_rows, args.d, generator=g).to(torch.bfloat16) * 0.02 for _ in range(3)]
        mask = torch.zeros(args.cold_rows, dtype=torch.bool, pin_memory=pin)
        mask[torch.randperm(args.cold_rows, generator=g)[:args.active]] = True
        x = torch.randn(1, args.d, generator=g).pin_memory() if pin else torch.randn(1, args.d, generator=g)
        out = torch.zeros(1, args.d, pin_memory=pin)
        layers.append((cpu.MaskedFFN(*weights, "relu"), x, mask, out))
    active_bytes = args.active * layers[0][0].neuron_bytes

    def operator(layer):
        op, x, mask, out = layer
        return lambda: op(x, mask, out)

    def kernel(layer):
        op, x, mask, out = layer
        partial = np.zeros((args.threads, 1, args.d), np.float32)
        arrays = (x.numpy(), *op.weights, mask.numpy(), op.code, op.threshold, partial, out.numpy())
        return lambda: cpu._masked_ffn_kernel(*arrays)

    scratch = np.zeros(args.threads)
    cases = {
        "operator": (lambda: [operator(layer) for layer in layers], 0.0),
        "kernel": (lambda: [kernel(layer) for layer in layers], 0.0),
        "operator_after_gap": (lambda: [operator(layer) for layer in layers], args.gap_us / 1e6),
        "fork_join": (lambda: [lambda: _fork_join(args.threads, scratch)] * args.layers, 0.0),
        "fork_join_after_gap": (lambda: [lambda: _fork_join(args.threads, scratch)] * args.layers,
                                args.gap_us / 1e6),
    }
    results = {}
    for name, (make, gap) in cases.items():
        us = per_call_us(make(), args.repeats, gap)
        row = {"us_per_call": round(us, 1)}
        if not name.startswith("fork_join"):
            row["gb_s"] = round(active_bytes / us / 1e3, 1)
            row["pct_of_stream"] = round(100 * active_bytes / us / 1e3 / bandwidth, 1)
        results[name] = row
        print(f"{name:>22}: {row}")
    ideal_us = active_bytes / bandwidth / 1e3
    print(f"active bytes per call {active_bytes / 1e6:.2f} MB; at the {bandwidth:.0f} GB/s stream: {ideal_us:.0f} us")
    if args.json:
        report = {**environment(cuda=False), "benchmark": "cold_ffn", "numba_threads": args.threads,
                  "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
                  "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                  "numba_threading_layer": numba.threading_layer(),
                  "shape": {"d": args.d, "cold_rows": args.cold_rows, "active": args.active,
                            "layers": args.layers, "dtype": "bfloat16"},
                  "active_bytes_per_call": active_bytes, "cpu_stream_gb_s": bandwidth,
                  "ideal_us_per_call": round(ideal_us, 1), "results": results}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
