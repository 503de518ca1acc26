"""`powerinfer train-predictors`: per-layer activation predictors from a profile directory."""

from __future__ import annotations

from pathlib import Path

from powerinfer.commands._common import add_predictor_arguments, probability
from powerinfer.commands.profile import add_compute_arguments, resolve_compute

HELP = "train per-layer activation predictors from a `powerinfer profile` directory"


def add_arguments(p) -> None:
    p.add_argument("--profile", required=True, help="directory written by `powerinfer profile` (predictors go there)")
    add_compute_arguments(p)
    p.add_argument("--recall", type=probability, default=0.95,
                   help="recall each layer's threshold is calibrated to on held-out tokens (default: 0.95)")
    add_predictor_arguments(p)
    p.add_argument("--max-fraction", type=probability, default=0.1,
                   help="largest predictor size as a fraction of its FFN's parameters (default: 0.1)")


def run(args) -> int:
    import torch

    from powerinfer.errors import PowerInferError
    from powerinfer.loading import load_model, open_checkpoint
    from powerinfer.loading.artifact import source_fingerprint
    from powerinfer.offline.predictors import format_predictor_table, save_predictors, train_predictors
    from powerinfer.offline.profile import load_profile

    device = resolve_compute(args)
    profile = load_profile(args.profile)
    model_path = args.model or profile.source.get("path")
    if model_path is None or not Path(model_path).exists():
        raise PowerInferError(f"{args.profile} was profiled from {model_path}, which is not there any more; "
                              "pass the model with --model (its FFN weights start and weight the predictors)")
    checkpoint = open_checkpoint(model_path)
    if source_fingerprint(checkpoint) != profile.source.get("sha256"):
        raise PowerInferError(f"{args.profile} profiles another model ({profile.source.get('path')}), "
                              f"not {model_path}")
    model = load_model(checkpoint, device=device, dtype=torch.float32).model
    predictors, reports = train_predictors(profile.inputs, profile.labels, args.recall,
                                           max_fraction=args.max_fraction, ffns=[block.mlp for block in model.layers],
                                           loss=args.predictor_loss, kind=args.predictor_kind, device=device,
                                           seed=args.seed, progress=True)
    save_predictors(predictors, reports, Path(args.profile))
    print(f"predictors (threshold calibrated for recall {args.recall:g} on held-out tokens):")
    print(format_predictor_table(reports))
    return 0
