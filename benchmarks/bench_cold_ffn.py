"""Where the time of a hybrid decode step's CPU half goes: the cold FFN of one layer, called as the
executor calls it, layer after layer (PowerInfer, arXiv 2312.12456, §5: the CPU computes the active cold
neurons of every layer while the GPU computes the hot ones).

A synthetic 7B hybrid step spends ~175-200 us per layer in the cold FFN for ~7.6 MB of active bfloat16 rows
(scripts/profile_hybrid.py), where streaming them would take ~65 us. This times, per call, over --layers
layers' own weights, each call with the next of --masks active sets of its layer written into the bound
buffers first (as every decode step does; a fixed set would leave its rows in the 300 MB L3 of the H100
host):
- `bound`: `kernels.cpu.MaskedFFN.bind` over pinned buffers, as the executor calls it;
- `kernel`: the numba kernel alone on the same arrays (what `bound` adds is Python);
- `bound_after_gap`: `bound` after --gap-us of the host spinning, as it waits for the GPU's part of the
  layer (the numba threads may have gone to sleep by then);
- `bound_fixed_mask`: `bound` with one active set per layer (cache-warm, for comparison);
- `bound_hugepages`: `bound` over a copy of the weights in memory advised for 2 MB transparent huge pages
  (`runtime.host_memory`; the executor's own cold rows are), `bound_again` and `bound_hugepages_again`:
  both once more, for drift;
- `fork_join`: an empty parallel region over the threads (the floor of any parallel call), and
  `flatnonzero`: the kernel's serial scan of the mask;
- `gather_read`: the same three rows of every active neuron only read (summed as integers), split over the
  threads as the kernel splits them: the memory system's rate for this access pattern, without the
  arithmetic, the reduction or the mask scan;
- `bundle_read`, `bound_bundled`, `kernel_bundled`: the same over the rows bundled per neuron ([rows, 3, d]: a
  neuron's gate, up and down rows adjacent, as the executor keeps CPU rows);
and reports each as GB/s of active-row bytes and % of the CPU streaming bandwidth measured in the same run.
The active sets are drawn hot-first (neuron i active with probability falling as a power of i), as the
artifact orders cold rows, or uniformly with --uniform.

    python benchmarks/bench_cold_ffn.py --threads 16 --json results/cold_ffn.json
"""

import powerinfer  # noqa: F401  (before torch: the OpenMP wait policy)

import argparse
import os
import statistics
import time
from collections import namedtuple

import numba
import numpy as np
import torch
from numba import njit, prange

from common import active_sets, add_cold_ffn_arguments, write_json
from powerinfer.bench import environment, measure_bandwidths
from powerinfer.kernels import cpu
from powerinfer.runtime.host_memory import huge_page_copy


# one layer: its operator, the calls bound to its buffers (weights as allocated, and a huge-page copy), the
# buffers, and the active sets written into `mask` in turn
# `bundle`: the operator over the same rows bundled per neuron
Layer = namedtuple("Layer", "op bound bound_hugepages bundle x mask out masks")


@njit(parallel=True, cache=True)
def _fork_join(n_tasks, out):
    for task in prange(n_tasks):
        out[task] += 1.0


@njit(parallel=True, cache=True)
def _gather_read(w_gate, w_up, w_down_t, ids, n_tasks, out):
    k = ids.shape[0]
    for task in prange(n_tasks):
        total = 0
        for j in range(task * k // n_tasks, (task + 1) * k // n_tasks):
            gate, up, down = w_gate[ids[j]], w_up[ids[j]], w_down_t[ids[j]]
            for c in range(gate.shape[0]):
                total += gate[c] + up[c] + down[c]
        out[task] = total


def _thp_setting() -> str | None:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().strip()
    except OSError:
        return None


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def per_call_us(calls, repeats: int, gap_s: float = 0.0) -> float:
    """Median over `repeats` sweeps of the mean time of one call; each call is timed alone, after its
    preparation (and `gap_s` of spinning)."""
    sweeps = []
    for _ in range(repeats + 1):
        spent = 0.0
        for prepare, call in calls:
            prepare()
            if gap_s:
                spin(gap_s)
            start = time.perf_counter()
            call()
            spent += time.perf_counter() - start
        sweeps.append(spent / len(calls))
    return statistics.median(sweeps[1:]) * 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cold_ffn_arguments(p)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--gap-us", type=float, default=100.0)
    p.add_argument("--masks", type=int, default=8, help="active sets per layer, used in turn")
    p.add_argument("--uniform", action="store_true", help="active sets drawn uniformly, not hot-first")
    p.add_argument("--json")
    args = p.parse_args()
    cpu.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    bandwidth = measure_bandwidths(cuda=False)["cpu_read"]

    pin = torch.cuda.is_available()  # pinned, as the executor's buffers
    g = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(args.layers):
        weights = [torch.randn(args.cold_rows, args.d, generator=g).to(torch.bfloat16) * 0.02 for _ in range(3)]
        masks = active_sets(args.cold_rows, args.active, args.masks, g, args.uniform)
        x = torch.randn(1, args.d, generator=g)
        x, mask, out = (t.pin_memory() if pin else t for t in (x, masks[0].clone(), torch.zeros(1, args.d)))
        op = cpu.MaskedFFN(*weights, "relu")
        huge = cpu.MaskedFFN(*(huge_page_copy(w) for w in weights), "relu")  # same rows, 2 MB pages
        # each neuron's gate, up and down rows adjacent ([rows, 3, d], 2 MB pages), as the executor keeps them
        bundle = cpu.MaskedFFN(*huge_page_copy(torch.stack(weights, dim=1)).unbind(1), "relu")
        layers.append(Layer(op, op.bind(x, mask, out), huge.bind(x, mask, out), bundle, x, mask, out, masks))
    active_bytes = args.active * layers[0].op.neuron_bytes

    def calls(make, rotate=True):
        """One call per layer, each first writing the layer's next active set into its mask buffer."""
        made = []
        for layer in layers:
            run, mask, masks = make(layer), layer.mask, layer.masks
            state = {"i": 0}

            def prepare(mask=mask, masks=masks, state=state):
                if rotate:
                    state["i"] = (state["i"] + 1) % len(masks)
                    mask.copy_(masks[state["i"]])
            made.append((prepare, run))
        return made

    def kernel(layer, op=None):
        op = op or layer.op
        partial = np.zeros((args.threads, 1, args.d), np.float32)
        arrays = (layer.x.numpy(), *op.weights, *op.scales, layer.mask.numpy(), op.stride, op.code, op.threshold,
                  partial, layer.out.numpy())
        return lambda: cpu._masked_ffn_kernel(*arrays)

    def gather_read(layer, bundle=False):
        sums = np.zeros(args.threads, np.int64)
        op = layer.bundle if bundle else layer.op

        def run():  # the ids of the mask the preparation wrote, as the kernel's own scan finds them
            _gather_read(*op.weights, np.flatnonzero(layer.mask.numpy()) * op.stride, args.threads, sums)
        return run

    scratch = np.zeros(args.threads)
    mask_np = layers[0].mask.numpy()
    no_prepare = (lambda: None)
    gap = args.gap_us / 1e6
    cases = {
        "bound": (calls(lambda layer: layer.bound), 0.0),
        "kernel": (calls(kernel), 0.0),
        "bound_after_gap": (calls(lambda layer: layer.bound), gap),
        "bound_fixed_mask": (calls(lambda layer: layer.bound, rotate=False), 0.0),
        "fork_join": ([(no_prepare, lambda: _fork_join(args.threads, scratch))] * args.layers, 0.0),
        "fork_join_after_gap": ([(no_prepare, lambda: _fork_join(args.threads, scratch))] * args.layers, gap),
        "flatnonzero": ([(no_prepare, lambda: np.flatnonzero(mask_np))] * args.layers, 0.0),
        "gather_read": (calls(gather_read), 0.0),
        "bundle_read": (calls(lambda layer: gather_read(layer, bundle=True)), 0.0),
        "bound_bundled": (calls(lambda layer: layer.bundle.bind(layer.x, layer.mask, layer.out)), 0.0),
        "kernel_bundled": (calls(lambda layer: kernel(layer, layer.bundle)), 0.0),
        "kernel_again": (calls(kernel), 0.0),
        "bound_hugepages": (calls(lambda layer: layer.bound_hugepages), 0.0),
        "bound_again": (calls(lambda layer: layer.bound), 0.0),  # drift check
        "bound_hugepages_again": (calls(lambda layer: layer.bound_hugepages), 0.0),
    }
    results = {}
    for name, (made, gap) in cases.items():
        us = per_call_us(made, args.repeats, gap)
        row = {"us_per_call": round(us, 1)}
        if not name.startswith(("fork_join", "flatnonzero")):
            row["gb_s"] = round(active_bytes / us / 1e3, 1)
            row["pct_of_stream"] = round(100 * active_bytes / us / 1e3 / bandwidth, 1)
        results[name] = row
        print(f"{name:>22}: {row}")
    ideal_us = active_bytes / bandwidth / 1e3
    print(f"active bytes per call {active_bytes / 1e6:.2f} MB; at the {bandwidth:.0f} GB/s stream: {ideal_us:.0f} us")
    if args.json:
        report = {**environment(cuda=False), "benchmark": "cold_ffn", "numba_threads": args.threads,
                  "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"), "transparent_hugepage": _thp_setting(),
                  "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                  "numba_threading_layer": numba.threading_layer(),
                  "shape": {"d": args.d, "cold_rows": args.cold_rows, "active": args.active,
                            "layers": args.layers, "masks_per_layer": args.masks,
                            "distribution": "uniform" if args.uniform else "hot-first", "dtype": "bfloat16"},
                  "active_bytes_per_call": active_bytes, "cpu_stream_gb_s": bandwidth,
                  "ideal_us_per_call": round(ideal_us, 1), "results": results}
        write_json(args.json, report)


if __name__ == "__main__":
    main()
