"""Does programmatic dependent launch (PDL, Hopper's `griddepcontrol`) shorten a decode step's chain of kernels?

In a CUDA graph each kernel still starts only after the one before has finished and its launch has gone
through (~1-3 us per kernel at a hybrid 7B layer's ~14 kernels). With PDL a kernel is launched while its
predecessor runs and waits at `griddepcontrol.wait` until the predecessor's grid has completed and its writes
are visible, so the launch latency hides behind the predecessor. This times one graph of 32 "layers", each the
same chain as a hybrid decode step's attention part (norm, q/k/v GEMV, two small kernels, o_proj GEMV, norm, the
predictor's two kernels, a one-program flag kernel), with and without PDL, replays alternated in one process;
and the same for a chain of tiny one-program kernels alone (the pure per-kernel cost). Kernels here are
stand-ins of the engine's shapes, not the engine's kernels.

    python benchmarks/bench_pdl.py --json out.json
"""

import argparse
import json
import statistics

import torch
import triton
import triton.language as tl

from powerinfer.bench import environment

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # a Triton without PDL
    gdc_wait = gdc_launch_dependents = None


@triton.jit
def _prologue(PDL: tl.constexpr, EARLY: tl.constexpr):
    if PDL:
        if EARLY:
            gdc_launch_dependents()
        gdc_wait()
        if not EARLY:
            gdc_launch_dependents()


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, n, k, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
                 EARLY: tl.constexpr):
    _prologue(PDL, EARLY)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for start in range(0, k, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + rows[:, None] * k + cols[None, :], mask=(rows < n)[:, None], other=0.0)
        acc += w.to(tl.float32) * tl.load(x_ptr + cols).to(tl.float32)[None, :]
    tl.store(y_ptr + rows, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=rows < n)


@triton.jit
def _norm_kernel(x_ptr, y_ptr, d, BLOCK: tl.constexpr, PDL: tl.constexpr, EARLY: tl.constexpr):
    _prologue(PDL, EARLY)
    cols = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + cols, mask=cols < d, other=0.0).to(tl.float32)
    y = x / tl.sqrt(tl.sum(x * x) / d + 1e-5)
    tl.store(y_ptr + cols, y.to(y_ptr.dtype.element_ty), mask=cols < d)


@triton.jit
def _scale_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr, PDL: tl.constexpr, EARLY: tl.constexpr):
    _prologue(PDL, EARLY)
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + cols, mask=cols < n, other=0.0)
    tl.store(y_ptr + cols, x * 0.5, mask=cols < n)


def _layer(w_qkv, w_o, w_p1, w_p2, bufs, pdl: bool, early: bool):
    x, normed, qkv, att, o, hidden, logits = bufs
    d = x.numel()
    flags = dict(PDL=pdl, EARLY=early, launch_pdl=pdl)

    def gemv(inp, w, out):
        n, k = w.shape
        _gemv_kernel[(triton.cdiv(n, 2),)](inp, w, out, n, k, BLOCK_N=2, BLOCK_K=min(1024, k), num_warps=4, **flags)
    _norm_kernel[(1,)](x, normed, d, BLOCK=triton.next_power_of_2(d), num_warps=8, **flags)
    gemv(normed, w_qkv, qkv)
    _scale_kernel[(triton.cdiv(qkv.numel(), 1024),)](qkv, qkv, qkv.numel(), BLOCK=1024, num_warps=4, **flags)
    _scale_kernel[(triton.cdiv(d, 128),)](qkv, att, d, BLOCK=128, num_warps=4, **flags)
    gemv(att, w_o, o)
    _norm_kernel[(1,)](o, x, d, BLOCK=triton.next_power_of_2(d), num_warps=8, **flags)
    gemv(x, w_p1, hidden)
    gemv(hidden, w_p2, logits)
    _scale_kernel[(1,)](x, normed, 1, BLOCK=32, num_warps=1, **flags)
    return 9


def _tiny_chain(buf, n_kernels: int, pdl: bool, early: bool):
    for _ in range(n_kernels):
        _scale_kernel[(1,)](buf, buf, 32, BLOCK=32, num_warps=1, PDL=pdl, EARLY=early, launch_pdl=pdl)
    return n_kernels


def _capture(fn):
    fn()  # compile and warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        count = fn()
    return graph, count


def _time(graph, replays: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / replays  # us per replay


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--replays", type=int, default=50)
    parser.add_argument("--json")
    args = parser.parse_args()
    if gdc_wait is None or torch.cuda.get_device_capability() < (9, 0):
        raise SystemExit("needs a Triton with griddepcontrol and a Hopper GPU")
    d, dev = args.d, "cuda"
    torch.manual_seed(0)
    # every layer its own weights, so the q/k/v reads come from HBM as in a decode step
    layers = [(torch.randn(3 * d, d, device=dev, dtype=torch.float16) / d ** 0.5,
               torch.randn(d, d, device=dev, dtype=torch.float16) / d ** 0.5,
               torch.randn(32, d, device=dev, dtype=torch.float16) / d ** 0.5,
               torch.randn(11008, 32, device=dev, dtype=torch.float16) / 32 ** 0.5) for _ in range(args.layers)]
    bufs = [torch.randn(n, device=dev, dtype=torch.float16) for n in (d, d, 3 * d, d, d, 32, 11008)]
    tiny = torch.zeros(32, device=dev)
    variants = {}
    for name, pdl, early in (("off", False, False), ("pdl", True, False), ("pdl_early", True, True)):
        variants[f"layers_{name}"] = _capture(lambda: sum(_layer(*w, bufs, pdl, early) for w in layers))
        variants[f"tiny_{name}"] = _capture(lambda: _tiny_chain(tiny, 32 * 9, pdl, early))
    outputs = {}
    for name, (graph, _) in variants.items():  # the variants compute the same thing
        if name.startswith("layers"):
            for b in bufs:
                b.copy_(torch.linspace(-1, 1, b.numel(), device=dev).half())
            graph.replay()
            torch.cuda.synchronize()
            outputs[name] = bufs[-1].clone()
    same = all(torch.equal(outputs["layers_off"], v) for v in outputs.values())
    us = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            us[name].append(_time(variants[name][0], args.replays))
    median = {name: statistics.median(v) for name, v in us.items()}
    per_kernel = {name: median[name] / variants[name][1] for name in names}
    result = {**environment(), "what": "PDL A/B: one CUDA graph of stand-in decode-step kernels, us per replay",
              "layers": args.layers, "kernels_per_layer": 9, "replays": args.replays, "rounds": args.rounds,
              "us_per_replay": us, "median_us": median, "us_per_kernel": per_kernel,
              "layers_outputs_equal": same}
    print(json.dumps({k: result[k] for k in ("median_us", "us_per_kernel", "layers_outputs_equal")}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
