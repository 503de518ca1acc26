"""`powerinfer synth`: write a synthetic ReLU LLaMA checkpoint with a planted activation profile
(powerinfer/offline/synth.py), optionally also as a GGUF file; for benchmarks of 7B/13B shapes without
downloading a model. Its numbers are labelled synthetic wherever they appear."""

from __future__ import annotations

import sys
import time

from powerinfer.commands.bench import open_unit

HELP = "write a synthetic ReLU LLaMA checkpoint (planted sparsity) as a Hugging Face directory and/or GGUF"


def add_arguments(p) -> None:
    from powerinfer.offline.synth import SHAPES

    p.add_argument("--shape", choices=list(SHAPES), required=True, help="model shape")
    p.add_argument("--activation", choices=["relu"], default="relu",
                   help="FFN activation (ReGLU; the planted profile needs exact zeros)")
    p.add_argument("--sparsity", type=open_unit, default=0.9, help="mean fraction of inactive neurons (0.9)")
    p.add_argument("--skew", type=open_unit, default=0.8,
                   help="activation share of the hottest 20%% of neurons (0.8)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    p.add_argument("--seed", type=int, default=0, help="weights are deterministic per seed on one device type")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where the random weights are drawn (cuda: much faster; other weights than cpu)")
    p.add_argument("--out", "-o", required=True, help="Hugging Face model directory to write (atomically)")
    p.add_argument("--export-gguf", default=None, metavar="FILE", help="also write a dense GGUF file")
    p.add_argument("--force", action="store_true", help="replace --out / --export-gguf if they exist")


def run(args) -> int:
    from pathlib import Path

    from powerinfer.errors import PowerInferError
    from powerinfer.loading import DTYPES
    from powerinfer.offline.synth import SyntheticModel, make_synthetic_relu_model

    for path in (args.out, args.export_gguf):
        if path and Path(path).exists() and not args.force:
            raise PowerInferError(f"{path} already exists (pass --force to replace it)")
    if args.export_gguf:
        import importlib.util
        if importlib.util.find_spec("gguf") is None:
            raise PowerInferError("--export-gguf needs the `gguf` package: pip install gguf")
    dtype = DTYPES[args.dtype]
    recipe = SyntheticModel(args.shape, args.sparsity, args.skew, args.seed, device=args.device)  # validates
    start = time.perf_counter()
    out = make_synthetic_relu_model(args.shape, args.sparsity, args.skew, args.seed, args.out, dtype, force=args.force,
                                    progress=sys.stderr.isatty(), device=args.device)
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    n = recipe.parameters()
    print(f"wrote SYNTHETIC model {out} ({args.shape}, {n / 1e9:.2f} B" if n >= 1e9 else
          f"wrote SYNTHETIC model {out} ({args.shape}, {n / 1e6:.1f} M", end="")
    print(f" parameters, {size / 2**20:.1f} MiB {args.dtype}) in {seconds:.1f} s: random weights with a planted ReLU "
          f"activation profile (sparsity {args.sparsity:g}, skew {args.skew:g}, seed {args.seed}, drawn on "
          f"{args.device}); not a trained model")
    if args.export_gguf:
        from powerinfer.loading.gguf_export import export_llama_gguf

        start = time.perf_counter()
        gguf = export_llama_gguf(out, args.export_gguf, name=f"powerinfer synthetic {args.shape}", force=args.force)
        print(f"wrote SYNTHETIC GGUF {gguf} ({gguf.stat().st_size / 2**20:.1f} MiB) in "
              f"{time.perf_counter() - start:.1f} s")
    return 0
