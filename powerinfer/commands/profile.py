"""`powerinfer profile`: per-neuron FFN activation statistics of a model on calibration text."""

from __future__ import annotations

import sys

from powerinfer.commands._common import positive_int, probability

HELP = "profile FFN neuron activations on calibration text (frequency, magnitude, predictor training data)"


def add_compute_arguments(p) -> None:
    """--model/--device/--threads/--seed, shared by the offline commands."""
    p.add_argument("--model", "-m", default=None,
                   help="GGUF file or Hugging Face model directory (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when present, else cpu")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)


def add_calibration_arguments(p, tokens: int) -> None:
    p.add_argument("--data", default=None,
                   help="UTF-8 calibration text (default: text the model generates itself)")
    p.add_argument("--tokens", type=positive_int, default=tokens, help=f"tokens to profile (default: {tokens})")
    p.add_argument("--sample-tokens", type=positive_int, default=4096,
                   help="profiled tokens whose FFN inputs are kept to train predictors (default: 4096)")
    p.add_argument("--window", type=positive_int, default=512, help="tokens per forward pass (default: 512)")
    p.add_argument("--target-sparsity", type=probability, default=0.5,
                   help="SiLU/GELU models: fraction of |act(gate)*up| values per layer counted inactive "
                        "(default: 0.5); ReLU models: active means nonzero")


def resolve_compute(args) -> str:
    """Apply --threads; the device to use."""
    import torch

    from powerinfer.commands._common import set_threads

    set_threads(args.threads)
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def add_arguments(p) -> None:
    add_compute_arguments(p)
    add_calibration_arguments(p, tokens=8192)
    p.add_argument("--out", "-o", required=True, help="output directory (written atomically)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")


def run(args) -> int:
    import torch

    from powerinfer.loading import load_model
    from powerinfer.loading.artifact import source_fingerprint
    from powerinfer.offline.build import calibration_tokens
    from powerinfer.offline.profile import format_profile_table, profile_model, save_profile, split_windows

    device = resolve_compute(args)
    loaded = load_model(args.model, device=device, dtype=torch.float32, progress=True)
    tokens, _ = calibration_tokens(loaded, args.data, args.tokens, 0, args.window, args.seed, progress=True)
    profile = profile_model(loaded.model, split_windows(tokens, args.window), args.target_sparsity,
                            args.sample_tokens, progress=True)
    checkpoint = loaded.checkpoint
    profile.source = {"path": str(checkpoint.path), "sha256": source_fingerprint(checkpoint),
                      "format": checkpoint.format, "data": args.data or "self-generated"}
    save_profile(profile, args.out, force=args.force)
    print(f"profiled {profile.tokens} tokens ({profile.activation} FFN; "
          + ("active means h != 0" if profile.target_sparsity is None
             else f"active means |h| above the layer's {profile.target_sparsity:g} quantile") + ")")
    print("per-layer sparsity and skew (fraction of neurons holding 80% of activations):")
    print(format_profile_table(profile))
    print(f"written to {args.out}", file=sys.stderr)
    return 0
