"""`powerinfer plan`: the GPU/CPU placement for a VRAM budget, from an artifact (re-planned in place,
no re-profiling) or a `powerinfer profile` directory."""

from __future__ import annotations

import json
from pathlib import Path

from powerinfer.commands._common import positive_int, probability

HELP = "solve the GPU/CPU weight placement for a VRAM budget (re-plans an artifact in place)"


def add_placement_arguments(p, defaults: bool) -> None:
    """Placement flags; with defaults=False they stay None so that an artifact's build values apply."""
    p.add_argument("--vram-budget", type=float, required=True, metavar="GiB", help="GPU memory to use, in GiB")
    p.add_argument("--ctx", type=positive_int, default=2048 if defaults else None,
                   help="context length the KV cache is sized for (default: 2048, or the artifact's)")
    p.add_argument("--gpu-dtype", choices=["float16", "bfloat16", "float32"], default="float16" if defaults else None,
                   help="dtype of GPU weights (default: float16)")
    p.add_argument("--cpu-dtype", choices=["float32", "bfloat16"], default="bfloat16" if defaults else None,
                   help="dtype of CPU weights, for the bytes-per-token objective (default: bfloat16, what the "
                        "hybrid runtime keeps in CPU memory by default)")
    p.add_argument("--neuron-batch", type=positive_int, default=64 if defaults else None,
                   help="placement granularity in hot-first neurons (default: 64)")
    p.add_argument("--min-layer-fraction", type=probability, default=0.125 if defaults else None,
                   help="a layer's GPU share of neurons is 0 or at least this (default: 0.125)")


def add_arguments(p) -> None:
    p.add_argument("--model", "-m", default=None, help="an artifact directory (`powerinfer build`) to re-plan")
    p.add_argument("--profile", default=None, help="or a `powerinfer profile` directory (placement.json goes there)")
    add_placement_arguments(p, defaults=False)
    p.add_argument("--strategy", choices=["predictor", "exact-sparse-down", "dense"], default=None,
                   help="FFN strategy (default: the artifact's; for a profile: predictor if trained, else dense)")
    p.add_argument("--keep-massive", type=int, default=4,
                   help="profile mode: neurons with the largest |h| kept first and always computed (default: 4)")
    p.add_argument("--json", action="store_true", help="print the placement as JSON")


def run(args) -> int:
    from powerinfer.errors import PowerInferError
    from powerinfer.offline.placement import DTYPE_BYTES, GiB, format_placement, plan_for_artifact, plan_placement
    from powerinfer.offline.predictors import predictor_nbytes

    if (args.model is None) == (args.profile is None):
        raise PowerInferError("pass exactly one of --model ARTIFACT_DIR or --profile PROFILE_DIR")
    if args.model is not None:
        from powerinfer.loading import open_checkpoint

        checkpoint = open_checkpoint(args.model)
        if checkpoint.format != "artifact":
            raise PowerInferError(f"{args.model} is not an artifact; run `powerinfer build`, or plan from "
                                  "a profile with --profile")
        placement = plan_for_artifact(checkpoint, int(args.vram_budget * GiB), args.strategy,
                                      **{name: getattr(args, name) for name in
                                         ("ctx", "gpu_dtype", "cpu_dtype", "neuron_batch", "min_layer_fraction")})
    else:
        from powerinfer.offline.profile import hot_first_order, load_profile

        profile = load_profile(args.profile, samples=False)
        trained = (Path(args.profile) / "predictors.json").is_file()
        strategy = args.strategy or ("predictor" if trained else "dense")
        if strategy == "predictor" and not trained:
            raise PowerInferError(f"{args.profile}: no trained predictors; run `powerinfer train-predictors`")
        reports = json.loads((Path(args.profile) / "predictors.json").read_text())["layers"] if trained else []
        settings = {"ctx": args.ctx or 2048, "gpu_dtype": args.gpu_dtype or "float16",
                    "cpu_dtype": args.cpu_dtype or "bfloat16", "neuron_batch": args.neuron_batch or 64,
                    "min_layer_fraction": args.min_layer_fraction or 0.125}
        config = profile.config
        predictor_bytes = [predictor_nbytes(r.get("kind", "low-rank"), config["hidden_size"],
                                            config["intermediate_size"], r["rank"], DTYPE_BYTES[settings["gpu_dtype"]])
                           for r in reports]
        placement = plan_placement(config,
                                   [layer.frequency[hot_first_order(layer, args.keep_massive)] for layer in profile.layers],
                                   vram_budget_bytes=int(args.vram_budget * GiB), strategy=strategy,
                                   n_always_active=args.keep_massive, predictor_bytes=predictor_bytes, **settings)
    if args.model is not None:
        checkpoint.write_placement(placement)
        written = Path(args.model) / "placement.json"
    else:
        from powerinfer.loading.artifact import write_json_atomic

        written = Path(args.profile) / "placement.json"
        write_json_atomic(written, placement)
    print(json.dumps(placement, indent=1) if args.json else format_placement(placement))
    if not args.json:
        print(f"written to {written}")
    return 0
