"""Dense decode on the CPU with the linear layers' weights in float32 vs bfloat16 (`--cpu-dtype`): speed side by
side in one process, and what the rounding costs in perplexity on WikiText-2 test text and in greedy-token
agreement. Activations and the embedding table stay float32; the bfloat16 GEMV widens each weight in registers.

    python benchmarks/bench_cpu_dtype.py --threads 2 --tokens 32768 --json results/smollm2_dense_cpu_bfloat16.json
"""

import powerinfer  # noqa: F401  (before torch: the OpenMP wait policy)

import argparse
import json
import statistics
import time

import torch

from common import environment, write_json
from powerinfer.commands._common import set_threads
from powerinfer.offline.evaluate import greedy_tokens, perplexity
from powerinfer.offline.profile import read_text_file, split_windows, tokenize_text
from powerinfer.offline.tiny import DEFAULT_DATA_DIR, HELD_OUT_FILE


def decode_tok_s(gen, prompt: list[int], steps: int) -> float:
    with torch.inference_mode():
        token = gen.prefill(prompt).argmax(-1)
        position = len(prompt)
        start = time.perf_counter()
        for _ in range(steps):
            token = gen.decode_step(token, position).argmax(-1)
            position += 1
        return steps / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=32768, help="WikiText-2 test tokens for the perplexity")
    p.add_argument("--steps", type=int, default=48, help="decode steps per speed measurement")
    p.add_argument("--rounds", type=int, default=3, help="speed measurements per dtype, alternated")
    p.add_argument("--json")
    args = p.parse_args()
    set_threads(args.threads)
    gens = {dtype: powerinfer.load(args.model, context=2048, cpu_dtype=dtype) for dtype in ("float32", "bfloat16")}
    prompt = list(range(100, 164))
    speed = {dtype: [] for dtype in gens}
    for _ in range(args.rounds):
        for dtype, gen in gens.items():
            speed[dtype].append(round(decode_tok_s(gen, prompt, args.steps), 1))
    tokenizer = gens["float32"].loaded.tokenizer
    windows = split_windows(tokenize_text(tokenizer, read_text_file(DEFAULT_DATA_DIR / HELD_OUT_FILE), args.tokens), 512)
    with torch.inference_mode():
        ppl = {dtype: perplexity(gen.loaded.model, windows, progress=True, desc=dtype) for dtype, gen in gens.items()}
        greedy = {dtype: greedy_tokens(gen.loaded.model, windows[0][:64], 64) for dtype, gen in gens.items()}
    agree = int((greedy["float32"] == greedy["bfloat16"]).sum())
    report = {**environment("cpu"), "threads": args.threads, "what": " ".join(__doc__.split("\n\n")[0].split()),
              "model": args.model or "SmolLM2-135M-Instruct (embedded Q4_1 GGUF, dequantized)", "decode_tok_s": speed,
              "decode_ratio_median": round(statistics.median(speed["bfloat16"]) / statistics.median(speed["float32"]), 3),
              "eval_tokens": sum(len(w) for w in windows), "perplexity": {k: round(v, 4) for k, v in ppl.items()},
              "perplexity_ratio": round(ppl["bfloat16"] / ppl["float32"], 5),
              "greedy_agreement": f"{agree}/{len(greedy['float32'])}"}
    print(json.dumps(report, indent=1))
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
