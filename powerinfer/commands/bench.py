"""`powerinfer bench`: decode/prefill speed of each executor mode, side by side in one run."""

from __future__ import annotations

import json
import sys

from powerinfer.commands._common import positive_float, positive_int

HELP = "benchmark decode and prefill speed of executor modes on one model, side by side"


def add_arguments(p) -> None:
    p.add_argument("--model", "-m", default=None, help="artifact, GGUF file or model directory (default model)")
    p.add_argument("--modes", default=None,
                   help="comma-separated: hybrid,gpu,dense-gpu,offload,cpu,dense-cpu (default: what fits the "
                        "model and machine)")
    p.add_argument("--vram-budget", type=positive_float, default=None, metavar="GiB",
                   help="GPU memory for hybrid (re-plans the artifact) and offload")
    p.add_argument("--prompt-tokens", type=positive_int, default=64)
    p.add_argument("--gen-tokens", type=positive_int, default=128)
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="GPU dtype (default float16; the CPU side is float32)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")


def run(args) -> int:
    import torch

    import powerinfer
    from powerinfer import kernels
    from powerinfer.bench import BENCH_MODES, environment, format_table, run_mode
    from powerinfer.errors import PowerInferError
    from powerinfer.loading import open_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
        kernels.set_num_threads(args.threads)
    checkpoint = open_checkpoint(args.model)
    artifact = checkpoint.format == "artifact"
    cuda = torch.cuda.is_available()
    if args.modes:
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    else:
        modes = ((["hybrid", "gpu"] if artifact else []) + ["dense-gpu"]) if cuda else []
        modes += (["cpu"] if artifact else []) + ["dense-cpu"]
    for mode in modes:
        if mode not in BENCH_MODES:
            raise PowerInferError(f"unknown bench mode {mode!r} (choose from {', '.join(BENCH_MODES)})")
        if mode in ("hybrid", "gpu", "cpu") and not artifact:
            raise PowerInferError(f"mode {mode} needs an artifact from `powerinfer build`")
        if mode in ("hybrid", "gpu", "dense-gpu", "offload") and not cuda:
            raise PowerInferError(f"mode {mode} needs a CUDA GPU")
    if "offload" in modes and args.vram_budget is None:
        raise PowerInferError("the offload mode needs --vram-budget GiB")
    context = args.prompt_tokens + args.gen_tokens + 8

    def load(mode):
        device = "cpu" if mode in ("cpu", "dense-cpu") else "cuda"
        executor = {"dense-gpu": "dense", "dense-cpu": "dense"}.get(mode, mode)
        budget = args.vram_budget if executor in ("hybrid", "offload") else None
        dtype = args.dtype if device == "cuda" else "float32"
        return powerinfer.load(args.model, device=device, dtype=dtype, context=context, mode=executor,
                               vram_budget=budget)

    results = []
    for mode in modes:
        print(f"benchmarking {mode} ...", file=sys.stderr)
        results.append(run_mode(load, mode, args.prompt_tokens, args.gen_tokens, args.repeats))
    config = checkpoint.config
    report = {**environment(), "model": {
        "path": str(checkpoint.path), "format": checkpoint.format,
        "synthetic": bool(config.get("powerinfer_synthetic", False)),
        "shape": {k: config.get(k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                             "vocab_size", "hidden_act")},
        "strategy": checkpoint.manifest["strategy"]["name"] if artifact else None},
        "vram_budget_gib": args.vram_budget, "batch_size": 1, "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens, "repeats": args.repeats, "results": results}
    label = " (SYNTHETIC model)" if report["model"]["synthetic"] else ""
    print(f"{report['device']}, {checkpoint.path}{label}, batch 1, prompt {args.prompt_tokens}, "
          f"gen {args.gen_tokens}")
    print(format_table(results))
    if args.json:
        from pathlib import Path
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(path)
    return 0
