"""`powerinfer bench`: decode/prefill speed of executor modes side by side, with where the time goes and the
roofline of each mode (powerinfer/bench.py); `--synth SHAPE` builds a synthetic model and its artifact
pieces in memory instead of reading `--model`."""

from __future__ import annotations

import json
import sys
import time

from powerinfer.commands._common import _number, add_cpu_dtype_argument, positive_float, positive_int, set_threads

HELP = "benchmark decode and prefill speed of executor modes on one model (or a synthetic one), side by side"
open_unit = _number(float, lambda v: 0 < v < 1, "a number in (0, 1)")
non_negative = _number(int, lambda v: v >= 0, "an integer >= 0")


def add_arguments(p) -> None:
    from powerinfer.offline.synth import SHAPES

    p.add_argument("--model", "-m", default=None, help="artifact, GGUF file or model directory (default model)")
    p.add_argument("--synth", choices=list(SHAPES), default=None, metavar="SHAPE",
                   help=f"instead of --model: a synthetic ReLU model built in memory ({', '.join(SHAPES)}); "
                        "its profile, predictors and placement too (weights drawn on the GPU when there is one)")
    p.add_argument("--sparsity", type=open_unit, default=0.9, help="--synth: planted FFN sparsity (default: 0.9)")
    p.add_argument("--skew", type=open_unit, default=0.8,
                   help="--synth: activation share of the hottest 20%% of neurons (default: 0.8)")
    p.add_argument("--seed", type=int, default=0, help="--synth: weights seed (default: 0)")
    p.add_argument("--calib-tokens", type=positive_int, default=None,
                   help="--synth: random calibration tokens for the profile and predictors (default: 8192 with "
                        "CUDA, 2048 without; on the tiny shape 2048 gave 0.87 predicted sparsity at recall 0.95, "
                        "4096 gave 0.89, planted 0.90)")
    p.add_argument("--modes", default=None,
                   help="comma-separated: hybrid,gpu,dense-gpu,offload,cpu,dense-cpu,hf-accelerate (default: what "
                        "fits the model and machine); a mode may name its own --cpu-dtype after a colon, to compare "
                        "dtypes in one run: hybrid,hybrid:int8")
    p.add_argument("--vram-budget", type=positive_float, default=None, metavar="GiB",
                   help="GPU memory for hybrid (re-plans the placement), offload and hf-accelerate")
    p.add_argument("--prompt-tokens", type=positive_int, default=64)
    p.add_argument("--prompt-file", default=None, metavar="TEXT",
                   help="take the prompt from the start of this text file (default: random token ids, which are "
                        "not language: a trained model's active neurons depend on the context)")
    p.add_argument("--gen-tokens", type=positive_int, default=128)
    p.add_argument("--temperature", type=_number(float, lambda v: v >= 0, "a number >= 0"), default=0.0,
                   help="sample the generated tokens at this temperature, seed 0 (default 0: greedy; a small "
                        "model's greedy output can loop over a few tokens whose activations are not typical)")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--interleave", action="store_true",
                   help="CPU modes only: load them all at once and time their repeats in turns, so a shared "
                        "machine's drift slows each alike (compare cpu,dense-cpu this way on a noisy host)")
    p.add_argument("--split-tokens", type=non_negative, default=16,
                   help="decode steps of the extra instrumented run that splits the step time (0: skip)")
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="GPU dtype, and --synth's weights (default float16; see --cpu-dtype for the CPU side)")
    add_cpu_dtype_argument(p)
    p.add_argument("--bandwidth-mib", type=positive_int, default=1024,
                   help="buffer size of the bandwidth measurements behind the roofline (default: 1024)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--plot", default=None, metavar="PNG", help="also draw decode tok/s per mode (needs matplotlib)")
    p.add_argument("--plot-from", default=None, metavar="JSON",
                   help="only draw --plot from an earlier --json result, benchmark nothing")


def _write_json(path: str, report: dict) -> None:
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)


def _plot_from(args) -> int:
    from pathlib import Path

    from powerinfer.bench import plot_results
    from powerinfer.errors import PowerInferError

    if not args.plot:
        raise PowerInferError("--plot-from needs --plot OUT.png")
    if args.model or args.synth:
        raise PowerInferError("--plot-from draws an earlier result; it takes no --model or --synth")
    try:
        report = json.loads(Path(args.plot_from).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PowerInferError(f"{args.plot_from}: cannot read a bench result ({e})") from None
    if not isinstance(report, dict) or not isinstance(report.get("results"), list):
        raise PowerInferError(f"{args.plot_from}: not a `powerinfer bench --json` result (no results list)")
    print(f"wrote {plot_results(report, args.plot)}")
    return 0


def _modes(args, artifact: bool, cuda: bool) -> list[str]:
    from powerinfer.api import CPU_DTYPES
    from powerinfer.bench import BENCH_MODES, check_hf_accelerate
    from powerinfer.errors import PowerInferError

    if args.modes:
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    else:
        modes = ((["hybrid", "gpu"] if artifact else []) + ["dense-gpu"]) if cuda else []
        modes += (["cpu"] if artifact else []) + ["dense-cpu"]
    names = {entry.partition(":")[0] for entry in modes}
    if (args.prompt_file or args.temperature) and "hf-accelerate" in names:
        raise PowerInferError("--prompt-file and --temperature: the hf-accelerate peer decodes random token ids "
                              "greedily")
    if args.interleave and not names <= {"cpu", "dense-cpu"}:
        raise PowerInferError("--interleave runs CPU modes only (cpu, dense-cpu): each GPU mode needs the GPU's "
                              "memory to itself (its peak memory is measured)")
    for entry in modes:
        mode, _, cpu_dtype = entry.partition(":")
        if mode not in BENCH_MODES:
            raise PowerInferError(f"unknown bench mode {mode!r} (choose from {', '.join(BENCH_MODES)})")
        if cpu_dtype and cpu_dtype not in CPU_DTYPES:
            raise PowerInferError(f"{entry}: unknown CPU dtype {cpu_dtype!r} (choose from {', '.join(CPU_DTYPES)})")
        if cpu_dtype and mode == "hf-accelerate":
            raise PowerInferError(f"{entry}: hf-accelerate keeps its own CPU weights; it takes no CPU dtype")
        if cpu_dtype == "int8" and mode not in ("hybrid", "gpu", "cpu"):
            raise PowerInferError(f"{entry}: int8 CPU rows run in the sparse modes only (hybrid, gpu, cpu)")
        if mode in ("hybrid", "gpu", "cpu") and not artifact:
            raise PowerInferError(f"mode {mode} needs an artifact from `powerinfer build` (or --synth)")
        if mode == "hf-accelerate":
            check_hf_accelerate()
        if mode in ("hybrid", "gpu", "dense-gpu", "offload") and not cuda:
            raise PowerInferError(f"mode {mode} needs a CUDA GPU")
    for mode in ("offload", "hf-accelerate") + (("hybrid",) if args.synth else ()):
        if mode in names and args.vram_budget is None:
            raise PowerInferError(f"the {mode} mode needs --vram-budget GiB")
    return modes


def run(args) -> int:
    import gc
    import shutil
    import tempfile

    import torch

    import powerinfer
    from powerinfer.bench import (environment, format_table, hf_directory, measure_bandwidths, plot_results,
                                  require_matplotlib, run_hf_accelerate, run_mode, run_modes_interleaved,
                                  synthetic_artifact)
    from powerinfer.errors import PowerInferError
    from powerinfer.loading import open_checkpoint, resolve_dtype
    from powerinfer.runtime import SamplingParams

    if args.plot_from:
        return _plot_from(args)
    if args.synth and args.model:
        raise PowerInferError("--synth and --model are alternatives: pass one of them")
    set_threads(args.threads)
    cuda = torch.cuda.is_available()
    checkpoint = None if args.synth else open_checkpoint(args.model)
    artifact = bool(args.synth) or checkpoint.format == "artifact"
    modes = _modes(args, artifact, cuda)
    if args.plot:  # fail now, not after the benchmark
        require_matplotlib()
    context = args.prompt_tokens + args.gen_tokens + 8
    sampling = SamplingParams(temperature=args.temperature, seed=0) if args.temperature else None
    prompt_text = None
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompt_text = f.read(64 * args.prompt_tokens)  # more than enough characters for the tokens
        except (OSError, UnicodeDecodeError) as e:
            raise PowerInferError(f"--prompt-file: cannot read {args.prompt_file}: {e}") from None
    gpu_dtype = resolve_dtype(args.dtype, "cuda")
    log = sys.stderr
    started = time.perf_counter()

    synthetic = None
    if args.synth and modes == ["hf-accelerate"]:  # the peer reads the plain checkpoint: no artifact to build
        from powerinfer.offline.synth import synthetic_checkpoint
        checkpoint, _ = synthetic_checkpoint(args.synth, args.sparsity, args.skew, args.seed, dtype=gpu_dtype,
                                             device="cuda" if cuda else "cpu")
        artifact = False
        synthetic = {"shape_name": args.synth, "sparsity": args.sparsity, "skew": args.skew, "seed": args.seed}
    elif args.synth:
        args.calib_tokens = args.calib_tokens or (8192 if cuda else 2048)
        checkpoint, synthetic = synthetic_artifact(args.synth, args.sparsity, args.skew, args.seed,
                                                   args.calib_tokens, context, gpu_dtype, cuda, log)
    bandwidths = measure_bandwidths(cuda, args.bandwidth_mib)
    print(f"bandwidths (GB/s): {', '.join(f'{k} {v:g}' for k, v in bandwidths.items())}", file=log, flush=True)
    model_ref = checkpoint if args.synth else args.model

    def load(entry):
        mode, _, cpu_dtype = entry.partition(":")
        device = "cpu" if mode in ("cpu", "dense-cpu") else "cuda"
        executor = {"dense-gpu": "dense", "dense-cpu": "dense"}.get(mode, mode)
        budget = args.vram_budget if executor in ("hybrid", "offload") else None
        dtype = gpu_dtype if device == "cuda" else "float32"
        # int8 applies to the predicted-sparse FFN only: the dense baselines keep their default
        cpu_dtype = cpu_dtype or (None if args.cpu_dtype == "int8" and executor in ("dense", "offload")
                                  else args.cpu_dtype)
        return powerinfer.load(model_ref, device=device, dtype=dtype, context=context, mode=executor,
                               cpu_dtype=cpu_dtype, vram_budget=budget)

    config = checkpoint.config
    report = {**environment(cuda), "model": {
        "path": str(checkpoint.path), "format": "in-memory artifact" if args.synth else checkpoint.format,
        "synthetic": bool(config.get("powerinfer_synthetic", False)), "shape_name": args.synth,
        "shape": {k: config.get(k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                             "num_attention_heads", "num_key_value_heads", "vocab_size",
                                             "hidden_act")},
        "strategy": checkpoint.manifest["strategy"]["name"] if artifact else None},
        "vram_budget_gib": args.vram_budget, "threads": torch.get_num_threads(), "batch_size": 1,
        "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens, "repeats": args.repeats,
        "interleaved": args.interleave, "prompt": args.prompt_file or "random token ids",
        "sampling": {"temperature": args.temperature, "seed": 0} if args.temperature else "greedy",
        "gpu_dtype": str(gpu_dtype).removeprefix("torch."), "cpu_dtype": args.cpu_dtype or "auto",
        "bandwidths_GBps": bandwidths,
        "bandwidth_method": {"cpu_read": "torch sum of a float32 buffer, configured threads",
                             "gpu_copy": "device-to-device copy, bytes read + written",
                             "pcie_h2d": "pinned host -> device copy", "pcie_d2h": "pinned device -> host copy"},
        "synthetic_build": synthetic, "results": []}
    tmp_root = None
    try:
        if args.interleave:
            print(f"benchmarking {', '.join(modes)} in turns ...", file=log, flush=True)
            report["results"] = run_modes_interleaved(load, modes, args.prompt_tokens, args.gen_tokens,
                                                      args.repeats, args.split_tokens, bandwidths, prompt_text,
                                                      sampling)
            report["seconds_total"] = round(time.perf_counter() - started, 1)
            if args.json:
                _write_json(args.json, report)
            modes = []  # measured
        for mode in modes:
            print(f"benchmarking {mode} ...", file=log, flush=True)
            if mode == "hf-accelerate":
                tmp_root = tmp_root or tempfile.mkdtemp(prefix="powerinfer-hf-")
                hf_dir = hf_directory(checkpoint, tmp_root, gpu_dtype)
                if checkpoint.format == "memory":  # the plain synthetic model, written out: free its GPU copy
                    checkpoint.tensors.clear()
                    gc.collect()
                result = run_hf_accelerate(hf_dir, args.vram_budget,
                                           args.prompt_tokens, args.gen_tokens, args.repeats, gpu_dtype, bandwidths)
            else:
                result = run_mode(load, mode, args.prompt_tokens, args.gen_tokens, args.repeats, args.split_tokens,
                                  bandwidths, prompt_text, sampling)
            report["results"].append(result)
            print(f"{mode}: {result['decode_tok_s']:.1f} tok/s decode (load {result['seconds']['load']:.1f} s, "
                  f"measure {result['seconds']['measure']:.1f} s)", file=log, flush=True)
            report["seconds_total"] = round(time.perf_counter() - started, 1)
            if args.json:  # after every mode: a run cut short keeps what it measured
                _write_json(args.json, report)
    finally:
        if tmp_root:
            shutil.rmtree(tmp_root, ignore_errors=True)
    label = " (SYNTHETIC model: planted activation profile, random weights)" if report["model"]["synthetic"] else ""
    print(f"{report['device']}, {checkpoint.path}{label}, batch 1, prompt {args.prompt_tokens}, "
          f"gen {args.gen_tokens}, threads {report['threads']}"
          + (f", VRAM budget {args.vram_budget:g} GiB" if args.vram_budget else ""))
    if synthetic and "planted_sparsity_mean" in synthetic:  # a built artifact (not the peer-only model)
        print(f"synthetic build: planted sparsity {synthetic['planted_sparsity_mean']:.3f}, profiled "
              f"{synthetic['profiled_sparsity_mean']:.3f}, predicted {synthetic['predicted_sparsity_mean']:.3f} at "
              f"recall {synthetic['predictor_recall_mean']:.3f} (predictor ranks {synthetic['predictor_ranks']}); "
              f"bandwidths (GB/s): {', '.join(f'{k} {v:g}' for k, v in bandwidths.items())}")
    print(format_table(report["results"]))
    if args.plot:
        print(f"wrote {plot_results(report, args.plot)}")
    return 0
