"""How much of a CPU decode step the FFN is, and what the sparse FFN saves of it (PowerInfer §7's premise).

For an artifact on the CPU: decode ms per token in `dense` and `cpu` (sparse) modes, in interleaved pairs, and
per layer the dense FFN and the sparse FFN (predictor + active rows) alone, on the layer's real inputs from a
prefill of real text (cycling over 64 tokens, so the active sets vary; one layer at a time, so its weights are
warm in cache). `rest_of_step_ms` is each mode's step minus its FFNs timed alone: if it is smaller in `cpu`
mode, the other work (attention, LM head) ran faster there too — fewer FFN bytes evict less of it from cache.

    python benchmarks/bench_ffn_share.py --model artifacts/tiny-relu.pi --threads 1 --json out.json
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import powerinfer  # noqa: F401  (first: sets the OpenMP spin before torch loads)
import torch

from benchmarks.common import environment, write_json
from powerinfer import kernels
from powerinfer.bench import git_commit


def per_call_us(fn, inputs, repeats: int) -> float:
    cycle = itertools.cycle(inputs)
    for _ in range(20):
        fn(next(cycle))
    start = time.perf_counter()
    for _ in range(repeats):
        fn(next(cycle))
    return (time.perf_counter() - start) / repeats * 1e6


def decode_ms(generator, text: list[int], prompt_tokens: int, steps: int) -> float:
    """ms per decode step after a prompt, fed the text's next tokens (a repeated token would keep the same
    active rows in cache and flatter the sparse mode)."""
    generator.prefill(text[:prompt_tokens])
    positions = range(prompt_tokens, prompt_tokens + 4 + steps)
    for position in positions[:4]:  # warm-up
        generator.decode_step(torch.tensor([text[position]]), position)
    start = time.perf_counter()
    for position in positions[4:]:
        generator.decode_step(torch.tensor([text[position]]), position)
    return (time.perf_counter() - start) / steps * 1e3


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="an artifact from `powerinfer build`")
    parser.add_argument("--data", default="../shared/data/wikitext2-test.txt", help="text for the inputs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=5, help="interleaved dense/cpu decode runs")
    parser.add_argument("--steps", type=int, default=128, help="decode steps per run")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernels.set_num_threads(args.threads)

    dense = powerinfer.load(args.model, mode="dense")
    sparse = powerinfer.load(args.model, mode="cpu")
    with open(args.data, encoding="utf-8") as f:
        text = dense.tokenizer.encode(f.read(40_000))
    if len(text) < 68 + args.steps:
        raise SystemExit(f"{args.data}: too little text for {args.steps} decode steps")

    inputs = {}  # layer -> its FFN inputs [1, 1, d], one per token
    hooks = [layer.mlp.register_forward_pre_hook(
        lambda module, args, i=i: inputs.__setitem__(i, [t.view(1, 1, -1).clone() for t in args[0][0, -64:]]))
        for i, layer in enumerate(dense.model.layers)]
    dense.prefill(text[:192])
    for hook in hooks:
        hook.remove()

    repeats = 500
    layers = []
    for i, (layer, ffn) in enumerate(zip(dense.model.layers, sparse.model.ffns)):
        layers.append({"layer": i, "dense_ffn_us": per_call_us(layer.mlp, inputs[i], repeats),
                       "sparse_ffn_us": per_call_us(ffn, inputs[i], repeats)})
    runs = {"dense": [], "cpu": []}
    for _ in range(args.pairs):
        runs["dense"].append(decode_ms(dense, text, 64, args.steps))
        runs["cpu"].append(decode_ms(sparse, text, 64, args.steps))
    dense_step, cpu_step = (statistics.median(runs[m]) for m in ("dense", "cpu"))
    dense_ffns = sum(layer["dense_ffn_us"] for layer in layers) / 1e3
    sparse_ffns = sum(layer["sparse_ffn_us"] for layer in layers) / 1e3
    result = {
        **environment("cpu"), "commit": git_commit(), "benchmark": "ffn_share", "model": args.model,
        "threads": args.threads, "decode_steps": args.steps,
        "decode_ms_per_token": {mode: [round(ms, 3) for ms in values] for mode, values in runs.items()},
        "layers": [{k: round(v, 2) if isinstance(v, float) else v for k, v in layer.items()} for layer in layers],
        "dense_step_ms": round(dense_step, 3), "cpu_step_ms": round(cpu_step, 3),
        "dense_ffns_ms": round(dense_ffns, 3), "sparse_ffns_ms": round(sparse_ffns, 3),
        "ffn_share_of_dense_step": round(dense_ffns / dense_step, 3),
        "rest_of_step_ms": {"dense": round(dense_step - dense_ffns, 3), "cpu": round(cpu_step - sparse_ffns, 3)},
        "cpu_vs_dense": round(dense_step / cpu_step, 3),
    }
    for key in ("dense_step_ms", "cpu_step_ms", "dense_ffns_ms", "sparse_ffns_ms", "ffn_share_of_dense_step",
                "rest_of_step_ms", "cpu_vs_dense"):
        print(f"{key}: {result[key]}")
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
