"""Argument helpers shared by the subcommands."""

from __future__ import annotations

import argparse

from powerinfer.errors import PowerInferError
from powerinfer.runtime import SamplingParams


def _number(cast, accept, expected: str):
    """An argparse `type=` that parses with `cast` and accepts values for which `accept` is true."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(value):  # comparisons are false for NaN, so NaN is refused too
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value
    return parse


positive_int = _number(int, lambda v: v >= 1, "a positive integer")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
non_negative_float = _number(float, lambda v: 0 <= v < float("inf"), "a number >= 0")
positive_float = _number(float, lambda v: 0 < v < float("inf"), "a number > 0")
probability = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
port_number = _number(int, lambda v: 0 <= v <= 65535, "a port in 0..65535")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="GGUF file or Hugging Face model directory (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="weight dtype (default: float32 on cpu, float16 on cuda)")
    p.add_argument("--ctx", type=positive_int, default=None, help="context length (default: 2048)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="disable CUDA graph capture of decode")
    p.add_argument("--mode", choices=["hybrid", "gpu", "cpu", "dense", "offload"], default=None,
                   help="executor (default: an artifact runs hybrid on cuda, cpu otherwise; a plain model dense)")
    p.add_argument("--vram-budget", type=positive_float, default=None, metavar="GiB",
                   help="GPU memory for hybrid (re-plans the artifact) and offload")
    add_cpu_dtype_argument(p)


def add_cpu_dtype_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cpu-dtype", choices=["float32", "bfloat16", "int8"], default=None,
                   help="dtype of the weight matrices kept in CPU memory by hybrid/cpu/offload, and of a dense model's "
                        "linear layers on the CPU (default: bfloat16 when the GPU holds the rest, else float32; bfloat16 "
                        "halves the bytes the CPU streams per token; int8: the predicted-sparse FFN's CPU rows with one "
                        "scale per row, the other CPU matrices bfloat16, for artifacts of the predictor strategy)")


def add_predictor_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--predictor-kind", choices=["auto", "low-rank", "int4-gate"], default="auto",
                   help="low-rank: a trained d -> r -> n_ff MLP; int4-gate: the gate pre-activation from a 4-bit "
                        "copy of the gate matrix (ReLU-family models); auto: per layer the cheaper of those the "
                        "model allows at the recall target (default: auto)")
    p.add_argument("--predictor-loss", choices=["magnitude", "count"], default="magnitude",
                   help="how the low-rank predictors' BCE weights active samples: by |h|, so that the neurons they "
                        "miss are the small ones (magnitude), or all alike (count) (default: magnitude)")


def add_sampling_arguments(p: argparse.ArgumentParser, temperature: float = 0.7) -> None:
    p.add_argument("--max-tokens", "-n", type=positive_int, default=256)
    p.add_argument("--temperature", "-t", type=non_negative_float, default=temperature,
                   help=f"0 = greedy (default: {temperature})")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampling_from_args(args) -> SamplingParams:
    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def set_threads(threads: int | None) -> None:
    """torch's and the CPU kernels' thread counts (None: their defaults)."""
    import os

    import torch

    from powerinfer import kernels

    if not threads:
        return
    if threads > (os.cpu_count() or 1):
        raise PowerInferError(f"--threads {threads} is more than the {os.cpu_count()} cores here")
    torch.set_num_threads(threads)
    kernels.set_num_threads(threads)


def load_generator(args):
    import powerinfer

    set_threads(args.threads)
    return powerinfer.load(args.model, device=args.device, dtype=args.dtype, context=args.ctx,
                           cuda_graphs=False if args.no_cuda_graphs else None, mode=args.mode,
                           vram_budget=args.vram_budget, cpu_dtype=args.cpu_dtype)
