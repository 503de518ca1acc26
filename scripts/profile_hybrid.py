"""Where a hybrid decode step's wall time goes, without the synchronising PhaseTimer of `bench`.

Builds a SYNTHETIC model in memory (powerinfer.bench.synthetic_artifact), loads it in hybrid mode at a VRAM
budget and decodes greedily. It reports the plain decode rate (the default: the step as one CUDA graph and the
cold FFNs in one parallel region, runtime.segments), then, over the per-layer graphs, both of their schedules
(queued ahead of the CPU, and launched layer by layer), then wraps three executor phases with
perf_counter (host waiting for the GPU's attention + predictor + copies; the CPU's cold FFN; staging its
output) and prints per-token milliseconds of each and of the rest (Python and kernel launches), then a
torch.profiler table of a few decode steps and where the GPU time of those goes. Without a GPU it is a dry
run with the hot half on the CPU.

With --cold-study it also times every cold-FFN call inside decode steps and replays their recorded inputs
under controlled conditions (`cold_study`; hybrid_13b_cold_ffn_study_h200.json).

    python scripts/profile_hybrid.py [--shape llama2-7b] [--vram-budget 8] [--threads 16] [--cold-study] [--json FILE]
"""

import powerinfer  # noqa: F401  (before torch: sets the OpenMP wait policy)

import argparse
import gc
import os
import json
import time
import traceback
from collections import defaultdict

import numba
import numpy as np
import torch

from powerinfer.bench import environment, random_prompt, synthetic_artifact
from powerinfer.commands._common import set_threads
from powerinfer.runtime import Generator, SamplingParams
from powerinfer.runtime.executor import SplitFFN


def decode(gen, prompt, steps, after_prefill=None):
    token = gen.prefill(prompt).argmax(-1)
    position = len(prompt)
    if after_prefill is not None:
        after_prefill()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        token = gen.decode_step(token, position).argmax(-1)
        int(token)
        position += 1
    return (time.perf_counter() - start) / steps


def wrap(spent, name, fn):
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - start
    return timed


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama2-7b")
    p.add_argument("--vram-budget", type=float, default=8.0)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--calib-tokens", type=int, default=4096)
    p.add_argument("--sweep-threads", default="", help="also time decode at these thread counts, e.g. 4,8")
    p.add_argument("--no-profile", action="store_true", help="skip the torch.profiler table")
    p.add_argument("--cold-study", action="store_true",
                   help="also time the cold FFN calls in isolation under decode-like conditions (see cold_study)")
    p.add_argument("--compare", default="",
                   help="also time these MODE:CPU_DTYPE executors of the same artifact, e.g. "
                        "hybrid:float32,offload:bfloat16,offload:float32")
    p.add_argument("--whole-step-trace", action="store_true",
                   help="after the plain decode, trace a few whole-step graphs' kernels (where a step's time goes "
                        "between the GPU's parts and the CPU's, whole_step_timeline) and stop")
    p.add_argument("--json")
    args = p.parse_args()
    set_threads(args.threads)
    context = 64 + 2 * args.steps + 16
    cuda = torch.cuda.is_available()  # without one: a dry run of the script, both halves on the CPU
    dtype = torch.float16 if cuda else torch.float32
    artifact, summary = synthetic_artifact(args.shape, 0.9, 0.8, 0, args.calib_tokens, context, dtype, cuda, None)
    device = "cuda" if cuda else "cpu"
    gen = powerinfer.load(artifact, device=device, dtype=dtype, context=context, mode="hybrid",
                          vram_budget=args.vram_budget)
    prompt = random_prompt(gen.loaded.args.vocab_size, 64)
    gen.generate(prompt, max_tokens=4, sampling=SamplingParams(temperature=0), ignore_eos=True)
    report = {**environment(cuda), "what": f"SYNTHETIC {args.shape} hybrid decode, wall-time split",
              "vram_budget_gib": args.vram_budget, "threads": args.threads,
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
              "cpu_ffn_dtype": str(gen.model.plan.cold_dtype).removeprefix("torch."), "synthetic_build": summary}
    with torch.inference_mode():
        report["decode_ms"] = round(1e3 * decode(gen, prompt, args.steps), 3)
        report["decode_uses_graph_segments"] = gen.use_segments
        if args.whole_step_trace:
            if gen._segments is None or gen._segments._whole is None:
                raise SystemExit("--whole-step-trace: this decode does not run as one whole-step graph")
            report["whole_step_timeline_us"] = whole_step_timeline(gen, prompt, 8)
            print("whole-step timeline (us)", json.dumps(report["whole_step_timeline_us"]), flush=True)
            return _write(report, args.json)
        if gen._segments is not None:
            # the step as one graph with every cold FFN in one parallel region (default where it can run); what
            # follows wraps and times the per-layer graphs and bound cold calls, so it turns that off
            report["decode_uses_one_graph_and_cold_step"] = gen._segments._whole is not None
            gen._segments._whole = None
            # each layer's graphs queued ahead of the CPU's part or not
            for queue_ahead in (False, True) * 4:
                gen._segments.queue_ahead = queue_ahead
                key = "decode_ms_queued_ahead" if queue_ahead else "decode_ms_layer_by_layer"
                report.setdefault(key, []).append(round(1e3 * decode(gen, prompt, args.steps), 3))
        eager = Generator(gen.loaded, context=context, cuda_graphs=False)
        report["eager_decode_ms"] = round(1e3 * decode(eager, prompt, args.steps), 3)
        del eager
        spent = defaultdict(float)
        cold_forward, sync = SplitFFN._cold_forward, torch.cuda.Event.synchronize
        segments = gen._segments.layers if gen._segments is not None else []
        SplitFFN._cold_forward = wrap(spent, "cpu_cold_ffn", cold_forward)  # eager steps
        if segments:  # bound calls that bypass _cold_forward
            gen._segments.layers = [(a, b, cold and wrap(spent, "cpu_cold_ffn", cold), e) for a, b, cold, e in segments]
        torch.cuda.Event.synchronize = wrap(spent, "host_waits_for_gpu", sync)
        try:
            wall = decode(gen, prompt, args.steps, after_prefill=spent.clear)
        finally:
            SplitFFN._cold_forward = cold_forward
            torch.cuda.Event.synchronize = sync
            if segments:
                gen._segments.layers = segments
        split = {k: round(1e3 * v / args.steps, 3) for k, v in spent.items()}
        split["rest_python_launch_staging"] = round(1e3 * wall - sum(split.values()), 3)
        report["wrapped_decode_ms"] = round(1e3 * wall, 3)
        report["split_ms_per_token"] = split
        if segments:  # the same cold calls (last token's inputs) back to back, without the GPU in between
            colds = [cold for _, _, cold, _ in segments if cold is not None]
            start = time.perf_counter()
            for _ in range(args.steps):
                for cold in colds:
                    cold()
            report["cold_ffn_alone_ms_per_token"] = round(1e3 * (time.perf_counter() - start) / args.steps, 3)
        print(json.dumps({k: v for k, v in report.items() if "_ms" in k or k.startswith("split")}), flush=True)
        if args.cold_study and segments:
            try:
                report["cold_study_us_per_call"] = cold_study(gen, prompt, args.steps)
                print("cold study (us per call)", report["cold_study_us_per_call"], flush=True)
            except Exception:  # a diagnostic: the rest of the report still counts
                traceback.print_exc()
        sweep = defaultdict(list)  # a thread count may be listed twice: both times are kept
        for threads in [int(n) for n in args.sweep_threads.split(",") if n]:
            set_threads(threads)
            sweep[threads].append(round(1e3 * decode(gen, prompt, args.steps), 3))
        if sweep:
            report["decode_ms_by_threads"] = dict(sweep)
            print("decode ms by threads", dict(sweep), flush=True)
            set_threads(args.threads)
        compared = {}
        for item in [c for c in args.compare.split(",") if c]:
            mode, cpu_dtype = item.split(":")
            other = powerinfer.load(artifact, device=device, dtype=dtype, context=context, mode=mode,
                                    vram_budget=args.vram_budget, cpu_dtype=cpu_dtype)
            other.generate(prompt, max_tokens=4, sampling=SamplingParams(temperature=0), ignore_eos=True)
            compared[item] = round(1e3 * decode(other, prompt, args.steps), 3)
            print(f"{item}: {compared[item]} ms per token", flush=True)
            del other
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        if compared:
            report["decode_ms_compared"] = compared
        if args.no_profile:
            return _write(report, args.json)
        from torch.profiler import ProfilerActivity, profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        prof = profile(activities=activities)
        try:  # the decode steps only: the prefill before them runs eagerly
            profiled_s = decode(gen, prompt, 4, after_prefill=prof.start)
        finally:
            prof.stop()
        events = prof.key_averages()
        print(events.table(sort_by="self_cpu_time_total", row_limit=25))
        if cuda:
            print(events.table(sort_by="self_cuda_time_total", row_limit=30))
            report["gpu_timeline_ms_per_token"] = _gpu_timeline(events, profiled_s, 4)
            print("GPU timeline (ms per token, under the profiler)", report["gpu_timeline_ms_per_token"])
        report["profile_top_self_cpu_us_per_step"] = {
            e.key: round(e.self_cpu_time_total / 4, 1)
            for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:25]}
    _write(report, args.json)


def cold_study(gen, prompt, steps) -> dict:
    """Why a layer's cold FFN takes longer inside a decode step than alone: the same bound calls timed one by
    one (perf_counter around each call only) under conditions that differ in one thing each.
    - decode_queued / decode_in_turn: inside decode steps, graphs queued ahead (the GPU polls the host flag
      meanwhile) or launched layer by layer;
    - replay_bound: each step's recorded inputs (x and mask of every layer) put back and the calls run back to
      back, so the rows touched follow decode's order of masks;
    - replay_after_gpu_wait: the same, each call after the host waited on an event behind a ~100 us GPU
      kernel (as in decode, where it waits for the layer's attention);
    - replay_after_spin: the same, each call after a 100 us busy wait on the host instead;
    - replay_same_step: one step's inputs replayed every time (rows cached in the LLC as far as they fit);
    - replay_threads_N: the same as replay_bound on N threads.
    Medians, means, and per kind a least-squares fit seconds = fixed + rows * bytes per row / marginal rate."""
    segments = gen._segments
    model = gen.model
    layers = [(i, cold) for i, (_, _, cold, _) in enumerate(segments.layers) if cold is not None]
    d = model.args.hidden_size
    # the pinned views the graphs write and the bound calls read (the prompt is the one they were captured after)
    buffers = {i: (model.ffns[i].pinned_input((1, d)),
                   model.ffns[i]._pinned_buffer("mask", (model.ffns[i].n_ff - model.ffns[i].n_hot,), torch.bool))
               for i, _ in layers}
    recorded, times = [], defaultdict(list)
    calls = defaultdict(list)  # name: [(active rows, seconds)]

    def timed(name, i, cold, record=False):
        def call():
            x, mask = buffers[i]
            if record:
                recorded[-1].append((i, x.clone(), mask.clone()))
            k = int(mask.sum())
            start = time.perf_counter()
            cold()
            elapsed = time.perf_counter() - start
            times[name].append(elapsed)
            calls[name].append((k, elapsed))
        return call

    original = segments.layers
    try:
        for queue_ahead, name in ((True, "decode_queued"), (False, "decode_in_turn")):
            segments.queue_ahead = queue_ahead
            segments.layers = [(a, b, cold and timed(name, i, cold, record=queue_ahead), e)
                               for i, (a, b, cold, e) in enumerate(original)]
            token = gen.prefill(prompt).argmax(-1)
            times[name].clear()  # the prefill's calls
            calls[name].clear()
            for position in range(len(prompt), len(prompt) + steps):
                if queue_ahead:
                    recorded.append([])
                token = gen.decode_step(token, position).argmax(-1)
                int(token)
    finally:
        segments.layers, segments.queue_ahead = original, True
    colds = dict(layers)
    event = torch.cuda.Event()

    def replay(name, steps_inputs, before=None):
        for step in steps_inputs:
            for i, x, mask in step:
                buffers[i][0].copy_(x)
                buffers[i][1].copy_(mask)
                if before is not None:
                    before()
                start = time.perf_counter()
                colds[i]()
                elapsed = time.perf_counter() - start
                times[name].append(elapsed)
                calls[name].append((int(mask.sum()), elapsed))

    def gpu_wait():
        torch.cuda._sleep(100_000)  # ~50-100 us of GPU clock cycles
        event.record()
        event.synchronize()

    def spin():
        end = time.perf_counter() + 100e-6
        while time.perf_counter() < end:
            pass

    threads_before = numba.get_num_threads()
    for _ in range(2):  # alternated, twice
        replay("replay_after_gpu_wait", recorded, before=gpu_wait)
        replay("replay_after_spin", recorded, before=spin)
        replay("replay_same_step", [recorded[-1]] * len(recorded))
        for threads in (threads_before, 12, 14):
            set_threads(threads)
            try:
                replay("replay_bound" if threads == threads_before else f"replay_threads_{threads}", recorded)
            finally:
                set_threads(threads_before)
    out = {name: round(1e6 * sorted(v)[len(v) // 2], 1) for name, v in times.items()}
    out.update({f"{name}_mean": round(1e6 * sum(v) / len(v), 1) for name, v in times.items()})
    n_active = [int(mask.sum()) for step in recorded for _, _, mask in step]
    out["predicted_cold_rows_mean"] = round(sum(n_active) / len(n_active), 1)
    out["predicted_cold_rows_quartiles"] = [int(q) for q in np.percentile(n_active, [0, 25, 50, 75, 100])]
    out["decode_queued_calls_rows_us"] = [[k, round(1e6 * sec, 1)] for k, sec in calls["decode_queued"]]
    neuron_bytes = model.ffns[layers[0][0]]._cold_ffn.neuron_bytes
    for name, pairs in calls.items():  # seconds = fixed + per_row * rows, least squares
        k, sec = np.array(pairs, dtype=np.float64).T
        (per_row, fixed), *_ = np.linalg.lstsq(np.stack([k, np.ones_like(k)], 1), sec, rcond=None)
        residual = sec - (per_row * k + fixed)
        out[f"{name}_fit"] = {"fixed_us": round(1e6 * float(fixed), 1),
                              "marginal_GBps": round(neuron_bytes / float(per_row) / 1e9, 1),
                              "residual_us_p50_p90_p99": [round(1e6 * float(q), 1)
                                                          for q in np.percentile(residual, [50, 90, 99])]}
    return out


def whole_step_timeline(gen, prompt, steps: int) -> dict:
    """Where a whole-step graph's time goes, from a trace of its kernels. Per step (the graph's kernels: a run
    without host gaps over 20 us), means over steps in us: `span`, first kernel to last; `attention_parts`, per
    layer from the GPU seeing the previous layer's CPU part (the end of the wait kernel; the step's start for
    the first layer) to the end of the kernel that raises this layer's host flag, which the CPU waits for;
    `cpu_turnarounds`, from that flag to the end of the next wait (the CPU's cold FFN and both handoffs), while
    the GPU runs `gpu_during_cpu` (hot FFN, L2 prefetch); `tail`, the rest (the last layer, final norm, LM
    head); `between_steps`, the host's gap to the next step's graph. Also the attention parts' kernel time
    by kernel per layer, and the turnarounds' percentiles over layers."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decode(gen, prompt, steps)
    kernels = sorted(((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                      if e.device_type == DeviceType.CUDA))
    runs, run, run_end = [], [], float("-inf")
    for k in kernels:
        if run and k[0] - run_end > 20:
            runs.append(run)
            run, run_end = [], float("-inf")
        run.append(k)
        run_end = max(run_end, k[1])
    runs.append(run)
    graphs = [r for r in runs if sum("notify_host" in n for _, _, n in r) > 1]
    totals, by_kernel, turnarounds = defaultdict(float), defaultdict(float), []
    for run, following in zip(graphs, graphs[1:]):  # the last graph has no next step to measure the gap to
        start, notified = run[0][0], None
        for begin, end, name in run:
            if "wait_for_host_flag" in name:
                if notified is not None:
                    totals["cpu_turnarounds"] += end - notified
                    turnarounds.append(end - notified)
                start, notified = end, None
            elif notified is not None:
                totals["gpu_during_cpu"] += end - begin
            else:
                by_kernel[name[:48]] += end - begin
                if "notify_host" in name:
                    totals["attention_parts"] += end - start
                    notified = end
        totals["span"] += run[-1][1] - run[0][0]
        totals["between_steps"] += following[0][0] - run[-1][1]
        totals["layers"] += sum("notify_host" in n for _, _, n in run)
    n = max(1, len(graphs) - 1)
    out = {k: round(v / n, 1) for k, v in totals.items()}
    out["tail"] = round(out["span"] - out["attention_parts"] - out["cpu_turnarounds"], 1)
    out["steps_counted"] = len(graphs) - 1
    layers = max(1, totals["layers"])
    out["attention_part_kernels_us_per_layer"] = {k: round(v / layers, 2) for k, v in
                                                  sorted(by_kernel.items(), key=lambda kv: -kv[1])}
    out["cpu_turnaround_us_p10_p50_p90"] = [round(float(q), 1) for q in np.percentile(turnarounds, [10, 50, 90])]
    return out


def _gpu_timeline(events, step_s: float, steps: int) -> dict:
    """Where the GPU's time per token goes: kernels at work, the wait kernel spinning until the host's cold
    FFN is in (queued segments), copies, and the rest of the wall time (the GPU idle: launch and host
    latencies between graphs)."""
    def device_us(e):
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
    split = defaultdict(float)
    for e in events:
        kind = ("waits_for_host" if "wait_for_host_flag" in e.key else "copies" if "memcpy" in e.key.lower()
                else "kernels")
        split[kind] += device_us(e) / 1e3 / steps
    split = {k: round(v, 3) for k, v in split.items()}
    split["wall"] = round(1e3 * step_s, 3)
    split["idle_between"] = round(split["wall"] - sum(v for k, v in split.items() if k != "wall"), 3)
    return split


def _write(report, path):
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
