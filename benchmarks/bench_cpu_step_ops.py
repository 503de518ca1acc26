"""Per-call cost of the small operators of a one-token CPU decode step, wrappers included: at batch 1 a small
model's step is mostly these calls' Python and torch overhead, not their arithmetic (the tiny ReLU model: ~2 ms
per token on the 2-core VM, its kernels ~0.75 ms).

Each operator is timed as the model calls it (`kernels.fused` dispatchers, `kernels.cpu.dense_gemv`), with
torch's own op beside it where there is one. On a shared VM a call's wall time swings by 2x between runs, so
each figure is the minimum over --batches batches of --calls calls: the cost without other tenants' steal.

    python benchmarks/bench_cpu_step_ops.py --d 256 576 --json results/cpu_step_ops.json
"""

import powerinfer  # noqa: F401  (before torch: the OpenMP wait policy)

import argparse
import time

import torch
import torch.nn.functional as F

from common import write_json
from powerinfer.bench import environment
from powerinfer.kernels import cpu, fused


def min_us(fn, calls: int, batches: int) -> float:
    for _ in range(calls):
        fn()
    best = float("inf")
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return round(best * 1e6, 2)


def operators(d: int, qkv_rows: int) -> dict:
    """name -> a call, for a width-d model with a fused q/k/v projection of qkv_rows rows (heads of 64)."""
    x, delta = torch.randn(1, 1, d), torch.randn(1, 1, d)
    weight = torch.nn.Parameter(torch.randn(d))  # as the model holds it (requires grad)
    qkv_weight = torch.randn(qkv_rows, d).to(torch.bfloat16)
    n_kv = qkv_rows // 64 // 4  # q heads : kv heads = 2 : 1
    n_heads = qkv_rows // 64 - 2 * n_kv
    qkv, cos, sin = torch.randn(1, 1, qkv_rows), torch.randn(1, 32), torch.randn(1, 32)
    keys, values, slots = torch.zeros(1, n_kv, 128, 64), torch.zeros(1, n_kv, 128, 64), torch.tensor([3])
    return {
        "rms_norm": lambda: fused.rms_norm(x, weight, 1e-5),
        "torch_rms_norm": lambda: F.rms_norm(x, (d,), weight, 1e-5),
        "add_rms_norm": lambda: fused.add_rms_norm(x, (delta,), weight, 1e-5),
        "torch_add_then_rms_norm": lambda: F.rms_norm(x + delta, (d,), weight, 1e-5),
        "qkv_gemv_bfloat16": lambda: cpu.dense_gemv(x.view(1, d), qkv_weight),
        "rotary_qkv_to_cache": lambda: fused.rotary_qkv_to_cache(qkv, cos, sin, n_heads, n_kv, keys, values, slots),
        "torch_empty": lambda: torch.empty(1, d),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, nargs="+", default=[256, 576])
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--batches", type=int, default=150)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json")
    args = p.parse_args()
    cpu.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    results = {}
    with torch.inference_mode():
        for d in args.d:
            results[d] = {name: min_us(fn, args.calls, args.batches) for name, fn in operators(d, 2 * d).items()}
            print(f"d={d}: " + ", ".join(f"{k} {v} us" for k, v in results[d].items()), flush=True)
    if args.json:
        write_json(args.json, {**environment(cuda=False), "benchmark": "cpu_step_ops",
                               "unit": "us per call, min over batches", "calls": args.calls, "batches": args.batches,
                               "results": results})


if __name__ == "__main__":
    main()
