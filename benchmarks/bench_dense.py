"""Dense decode and prefill speed of powerinfer vs Hugging Face `transformers` on the same machine.

Both load SmolLM2-135M-Instruct from the same GGUF file in the same dtype. Decode tok/s is measured as
(N - 1) / (t(N tokens) - t(1 token)) for both engines, so prefill and start-up cancel out; prefill is one
forward over a P-token prompt (transformers with `logits_to_keep=1`, as its `generate` does).

    python benchmarks/bench_dense.py --device cpu --json benchmarks/results/dense_cpu.json
    python benchmarks/bench_dense.py --device cuda --dtype float16 --json benchmarks/results/dense_cuda.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import powerinfer  # first: it sets GOMP_SPINCOUNT before torch loads its OpenMP runtime
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, write_json  # noqa: E402

from powerinfer.loading import default_model_path  # noqa: E402
from powerinfer.runtime import SamplingParams  # noqa: E402

GREEDY = SamplingParams(temperature=0)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median_of(fn, repeats, device):
    return statistics.median(timed(fn, device) for _ in range(repeats))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = args.dtype or ("float16" if args.device == "cuda" else "float32")
    n = args.gen_tokens

    gen = powerinfer.load(None, device=args.device, dtype=dtype, context=args.prompt_tokens + n + 8)
    torch.manual_seed(0)
    prompt = torch.randint(1000, 40000, (args.prompt_tokens,)).tolist()
    short = prompt[:16]

    def ours(tokens):
        return lambda: gen.generate(short, max_tokens=tokens, sampling=GREEDY, ignore_eos=True)

    ours(n)()  # warm-up (and CUDA graph capture)
    ours_decode = (n - 1) / (median_of(ours(n), args.repeats, args.device)
                             - median_of(ours(1), args.repeats, args.device))
    gen.prefill(prompt)
    ours_prefill = args.prompt_tokens / median_of(lambda: gen.prefill(prompt), args.repeats, args.device)

    from transformers import AutoModelForCausalLM
    path = default_model_path()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                  dtype=getattr(torch, dtype)).to(args.device).eval()
    ids = torch.tensor([short], device=args.device)
    long_ids = torch.tensor([prompt], device=args.device)

    def theirs(tokens):
        return lambda: hf.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                   pad_token_id=0)

    with torch.inference_mode():
        theirs(n)()
        hf_decode = (n - 1) / (median_of(theirs(n), args.repeats, args.device)
                               - median_of(theirs(1), args.repeats, args.device))
        hf(long_ids, logits_to_keep=1)
        hf_prefill = args.prompt_tokens / median_of(lambda: hf(long_ids, logits_to_keep=1), args.repeats,
                                                    args.device)

    result = {
        "benchmark": "dense decode/prefill, powerinfer vs transformers",
        **environment(args.device),
        "model": {"name": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)", "synthetic": False},
        "dtype": dtype, "batch_size": 1, "prompt_tokens": args.prompt_tokens, "gen_tokens": n,
        "repeats": args.repeats, "cuda_graphs": gen.use_graphs,
        "powerinfer": {"decode_tok_s": round(ours_decode, 2), "prefill_tok_s": round(ours_prefill, 1)},
        "transformers": {"decode_tok_s": round(hf_decode, 2), "prefill_tok_s": round(hf_prefill, 1)},
        "ratio_decode": round(ours_decode / hf_decode, 2),
        "ratio_prefill": round(ours_prefill / hf_prefill, 2),
    }
    print(f"{'engine':<14}{'decode tok/s':>14}{'prefill tok/s':>15}   ({result['device']}, {dtype})")
    for name in ("powerinfer", "transformers"):
        print(f"{name:<14}{result[name]['decode_tok_s']:>14.1f}{result[name]['prefill_tok_s']:>15.1f}")
    print(f"{'ratio':<14}{result['ratio_decode']:>14.2f}{result['ratio_prefill']:>15.2f}")
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
