"""A decode step's cold FFNs as one parallel region (`kernels.cold_step.ColdStep`) against one bound call per layer
(`kernels.cpu.MaskedFFN.bind`, as `runtime.segments` calls them), CPU only: the GPU's flags are set before the
step, so this times the CPU's part of every layer without the waits for the GPU.

Per round, over --layers synthetic layers (rows bundled per neuron in huge pages, as the executor keeps cold
rows; active sets drawn hot-first, a new one per round): `per_layer` calls each layer's bound operator in turn;
`step` runs them all in one call; `step_rows_only` too, never splitting a layer's down product by columns
(`column_split_max=0`). They take turns, and all write the same outputs (checked).

    python benchmarks/bench_cold_step.py --threads 16 --active 107 --json results/cold_step.json
"""

import powerinfer  # noqa: F401  (before torch: the OpenMP wait policy)

import argparse
import functools
import statistics
import time

import torch

from common import active_sets, add_cold_ffn_arguments, write_json
from powerinfer.bench import environment
from powerinfer.kernels import cpu
from powerinfer.kernels.cold_step import LINE, ColdStep
from powerinfer.runtime.host_memory import huge_page_copy


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cold_ffn_arguments(p)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--json")
    args = p.parse_args()
    cpu.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    pin = torch.cuda.is_available()
    g = torch.Generator().manual_seed(0)

    def buffer(*shape, dtype=torch.float32):
        t = torch.zeros(*shape, dtype=dtype)
        return t.pin_memory() if pin else t

    ops, xs, masks, outs, sets = [], [], [], [], []
    for _ in range(args.layers):
        bundle = huge_page_copy(torch.randn(args.cold_rows, 3, args.d, generator=g).mul_(0.02), torch.bfloat16)
        ops.append(cpu.MaskedFFN(*bundle.unbind(1), "relu"))
        xs.append(buffer(1, args.d).normal_(generator=g))
        masks.append(buffer(args.cold_rows, dtype=torch.bool))
        outs.append(buffer(1, args.d))
        sets.append(active_sets(args.cold_rows, args.active, 8, g))
    gpu_ready, cpu_ready = buffer(args.layers, LINE, dtype=torch.int32), buffer(args.layers, LINE, dtype=torch.int32)
    bound = [op.bind(x, m, y) for op, x, m, y in zip(ops, xs, masks, outs)]
    steps = {name: ColdStep(ops, xs, masks, outs, range(args.layers), gpu_ready, cpu_ready, column_split_max=split)
             for name, split in (("step", None), ("step_rows_only", 0))}
    ready = cpu_ready[:, 0].numpy()

    def per_layer():
        n = 0
        for i, run in enumerate(bound):
            n += run()
            ready[i] = 1
        return n

    def whole_step(step):
        gpu_ready[:, 0] = 1
        return step()

    cases = [("per_layer", per_layer)] + [(name, functools.partial(whole_step, step)) for name, step in steps.items()]
    results, checks = {name: [] for name, _ in cases}, []
    for r in range(args.rounds):
        for mask, layer_sets in zip(masks, sets):
            mask.copy_(layer_sets[r % len(layer_sets)])
        outputs = {}
        for name, run in cases[r % len(cases):] + cases[:r % len(cases)]:
            start = time.perf_counter()
            run()
            results[name].append((time.perf_counter() - start) / args.layers * 1e6)
            outputs[name] = torch.cat(outs).clone()
        checks.append(max(float((outputs[name] - outputs["per_layer"]).abs().max()) for name in steps))
    skip = min(4, args.rounds // 4)  # warm-up rounds
    summary = {name: {"median_us_per_layer": round(statistics.median(v[skip:]), 1),
                      "min": round(min(v[skip:]), 1), "max": round(max(v[skip:]), 1)} for name, v in results.items()}

    def faster(a, b):
        return f"{sum(x < y for x, y in zip(results[a][skip:], results[b][skip:]))} of {args.rounds - skip}"

    report = {"benchmark": "cold_step", **environment(), "threads": args.threads, "layers": args.layers,
              "d": args.d, "cold_rows": args.cold_rows, "active": args.active, "rows_dtype": "bfloat16",
              "column_split_max": steps["step"].column_split_max, "results": summary,
              "step_faster_than_per_layer_rounds": faster("step", "per_layer"),
              "step_faster_than_rows_only_rounds": faster("step", "step_rows_only"),
              "max_abs_difference": max(checks)}
    print(report)
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
