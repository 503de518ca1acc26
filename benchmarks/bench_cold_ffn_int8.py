"""int8 vs bfloat16 CPU FFN rows (`--cpu-dtype int8`), side by side: speed of one layer's cold FFN and, for an
artifact, perplexity through the executor (PowerInfer, arXiv 2312.12456, §5: the CPU computes the active cold
neurons; halving their bytes shortens the CPU's share of every decode step).

Speed: --layers layers of --cold-rows neurons bundled as the executor keeps them ([rows, 3, d], huge pages), once in
bfloat16 and once quantized to int8 (`kernels.quantize_rows_int8`); the two bound masked-FFN calls are timed in
alternating rounds (the order flips every round), each call with the next of 8 hot-first active sets of its
layer, so drift on a shared machine hits both alike. Quality (--artifact): perplexity of `cpu` mode with
float32, bfloat16 and int8 CPU rows on the first --ppl-tokens of --data.

    python benchmarks/bench_cold_ffn_int8.py --threads 16 --json results/int8_cold_rows.json
    python benchmarks/bench_cold_ffn_int8.py --d 5120 --cold-rows 11059 --active 266   # 13B at 12 GiB
"""

import powerinfer  # noqa: F401  (before torch: the OpenMP wait policy)

import argparse
import statistics
import time

import torch

from common import active_sets, add_cold_ffn_arguments, write_json
from powerinfer.bench import environment
from powerinfer.kernels import cpu
from powerinfer.kernels.sparse_ffn import quantize_rows_int8
from powerinfer.runtime.host_memory import huge_page_copy


def cold_layers(d: int, n_rows: int, active: int, n_layers: int, generator: torch.Generator) -> list[dict]:
    """Per layer: its bfloat16 and int8 masked FFNs bound to one set of buffers, and 8 active sets."""
    layers = []
    for _ in range(n_layers):
        weights = [torch.randn(n_rows, d, generator=generator).to(torch.bfloat16) * 0.02 for _ in range(3)]
        quantized = [quantize_rows_int8(w) for w in weights]
        bfloat16 = cpu.MaskedFFN(*huge_page_copy(torch.stack(weights, dim=1)).unbind(1), "relu")
        int8 = cpu.MaskedFFN(*huge_page_copy(torch.stack([q for q, _ in quantized], dim=1)).unbind(1), "relu",
                             scales=torch.stack([s for _, s in quantized], dim=1).unbind(1))
        masks = active_sets(n_rows, active, 8, generator)
        x, mask, out = torch.randn(1, d, generator=generator), torch.zeros(n_rows, dtype=torch.bool), torch.zeros(1, d)
        layers.append({"bfloat16": bfloat16.bind(x, mask, out), "int8": int8.bind(x, mask, out),
                       "mask": mask, "masks": masks})
    return layers


def alternate(layers: list[dict], rounds: int) -> dict[str, list[float]]:
    """Mean us per call of each dtype, per round (the first round, which compiles, dropped)."""
    per_round = {"bfloat16": [], "int8": []}
    for r in range(rounds + 1):
        for dtype in ("bfloat16", "int8") if r % 2 == 0 else ("int8", "bfloat16"):
            total = 0.0
            for i in range(8):
                for layer in layers:
                    layer["mask"].copy_(layer["masks"][i])
                    start = time.perf_counter()
                    layer[dtype]()
                    total += time.perf_counter() - start
            if r:
                per_round[dtype].append(round(total / (8 * len(layers)) * 1e6, 1))
    return per_round


def perplexities(artifact: str, data: str, n_tokens: int, window: int) -> dict[str, float]:
    """`cpu` mode's perplexity on the first n_tokens of `data` with each CPU row dtype."""
    from powerinfer.offline.evaluate import perplexity
    from powerinfer.offline.profile import read_text_file, split_windows, tokenize_text

    out = {}
    for dtype in ("float32", "bfloat16", "int8"):
        gen = powerinfer.load(artifact, device="cpu", mode="cpu", cpu_dtype=dtype)
        windows = split_windows(tokenize_text(gen.loaded.tokenizer, read_text_file(data), n_tokens), window)
        out[dtype] = round(perplexity(gen.loaded.model, windows), 4)
        print(f"perplexity, {dtype} CPU rows: {out[dtype]}", flush=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cold_ffn_arguments(p)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--artifact", help="also measure perplexity through `cpu` mode (float32, bfloat16, int8)")
    p.add_argument("--data", default="../shared/data/wikitext2-test.txt")
    p.add_argument("--ppl-tokens", type=int, default=8192)
    p.add_argument("--json")
    args = p.parse_args()
    cpu.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    layers = cold_layers(args.d, args.cold_rows, args.active, args.layers, torch.Generator().manual_seed(0))
    rounds = alternate(layers, args.rounds)
    median = {k: statistics.median(v) for k, v in rounds.items()}
    speedup = round(median["bfloat16"] / median["int8"], 3)
    print(f"cold FFN per call: bfloat16 {median['bfloat16']:.1f} us, int8 {median['int8']:.1f} us (x{speedup})")
    report = {**environment(cuda=False), "benchmark": "cold_ffn_int8", "numba_threads": args.threads,
              "shape": {"d": args.d, "cold_rows": args.cold_rows, "active": args.active, "layers": args.layers},
              "us_per_call_median": median, "us_per_call_rounds": rounds, "speedup_int8": speedup}
    if args.artifact:
        report["perplexity"] = {"artifact": args.artifact, "data": args.data, "tokens": args.ppl_tokens,
                                **perplexities(args.artifact, args.data, args.ppl_tokens, 256)}
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
