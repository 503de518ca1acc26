"""`powerinfer build`: profile, train predictors, choose the FFN strategy, plan placement, write the artifact."""

from __future__ import annotations

import argparse
import sys

from powerinfer.commands._common import (add_predictor_arguments, non_negative_float, positive_int,
                                         probability)
from powerinfer.commands.plan import add_placement_arguments
from powerinfer.commands.profile import add_calibration_arguments, add_compute_arguments, resolve_compute

HELP = "build a PowerInfer artifact: profile, predictors, quality-checked strategy, placement (docs/ARTIFACT.md)"


def sparsity_levels(text: str) -> tuple:
    try:
        levels = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not levels or not all(0 < x < 1 for x in levels):
        raise argparse.ArgumentTypeError(f"sparsity levels must be in (0, 1), got {text!r}")
    return levels


def add_arguments(p) -> None:
    from powerinfer.offline.build import DEFAULT_SPARSITY_LEVELS

    add_compute_arguments(p)
    add_calibration_arguments(p, tokens=8192)
    p.add_argument("--holdout-tokens", type=positive_int, default=4096,
                   help="calibration tokens after the profiled ones, for the quality measurement (default: 4096)")
    p.add_argument("--recall", type=probability, default=0.95,
                   help="predictor recall target on held-out tokens (default: 0.95)")
    add_predictor_arguments(p)
    p.add_argument("--max-ppl-increase", type=non_negative_float, default=0.02,
                   help="largest relative perplexity increase the sparse FFN may cost (default: 0.02)")
    p.add_argument("--choose-by", choices=["auto", "time", "bytes"], default="auto",
                   help="how the fastest strategy within the quality budget is found: its measured FFN decode "
                        "time on this CPU (time), its FFN bytes per token (bytes), or auto: time for a CPU "
                        "build, bytes for a CUDA one (default: auto; use bytes for an artifact meant for a GPU "
                        "machine)")
    p.add_argument("--keep-massive", type=int, default=4,
                   help="per layer, neurons with the largest |h| that are always computed (default: 4)")
    p.add_argument("--sparsity-levels", type=sparsity_levels, default=DEFAULT_SPARSITY_LEVELS,
                   help="SiLU/GELU models: exact-sparse-down levels to measure (default: "
                        + ",".join(f"{x:g}" for x in DEFAULT_SPARSITY_LEVELS) + ")")
    add_placement_arguments(p, defaults=True)
    p.add_argument("--weights-dtype", choices=["float16", "bfloat16", "float32"], default="float16",
                   help="dtype of the artifact's weights (default: float16)")
    p.add_argument("--out", "-o", required=True, help="artifact directory (written atomically)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")


def run(args) -> int:
    from powerinfer.offline.build import BuildOptions, build_artifact, print_build_summary

    device = resolve_compute(args)
    opts = BuildOptions(
        out=args.out, vram_budget_gib=args.vram_budget, model=args.model, data=args.data, tokens=args.tokens,
        holdout_tokens=args.holdout_tokens, sample_tokens=args.sample_tokens, window=args.window,
        target_sparsity=args.target_sparsity, recall=args.recall, predictor_loss=args.predictor_loss,
        predictor_kind=args.predictor_kind,
        max_ppl_increase=args.max_ppl_increase,
        keep_massive=args.keep_massive, sparsity_levels=args.sparsity_levels, ctx=args.ctx,
        gpu_dtype=args.gpu_dtype, cpu_dtype=args.cpu_dtype, weights_dtype=args.weights_dtype,
        neuron_batch=args.neuron_batch, min_layer_fraction=args.min_layer_fraction, device=device,
        choose_by=args.choose_by,
        seed=args.seed, force=args.force, progress=True, log=sys.stderr)
    print_build_summary(build_artifact(opts))
    return 0
