"""A/B of hybrid decode-step variants (DecodeSegments switches) in one process, on one SYNTHETIC model.

Builds a SYNTHETIC model in memory (powerinfer.bench.synthetic_artifact), loads it in hybrid mode at a VRAM
budget, captures one DecodeSegments per variant (class attributes of runtime.segments.DecodeSegments set while
it captures) and alternates them in rotating order, so each round times every variant back to back on the same
host state: ms per token over `--steps` greedy steps after a 64-token prompt. Also reports whether each variant's
greedy tokens agree with the first one's (random synthetic weights: they may part after a differently rounded
logit; the golden and CUDA tests check the kernels).

    python benchmarks/bench_hybrid_ab.py --shape llama2-7b --vram-budget 8 \\
        --variant base:fuse_predictor_hidden=0 --variant fused: --json out.json
"""

import powerinfer  # noqa: F401  (before torch: sets the OpenMP wait policy)

import argparse
import json
import statistics
import time

import torch

from powerinfer.bench import environment, random_prompt, synthetic_artifact
from powerinfer.commands._common import set_threads
from powerinfer.runtime import SamplingParams
from powerinfer.runtime.segments import DecodeSegments


def parse_variant(text: str) -> tuple[str, dict]:
    """'name:attr=value,attr=value' (values are Python ints) -> (name, {attr: value})."""
    name, _, settings = text.partition(":")
    overrides = {}
    for item in filter(None, settings.split(",")):
        key, _, value = item.partition("=")
        if not hasattr(DecodeSegments, key):
            raise SystemExit(f"error: DecodeSegments has no switch {key!r}")
        overrides[key] = int(value)
    return name, overrides


def capture(gen, overrides: dict) -> DecodeSegments:
    saved = {key: getattr(DecodeSegments, key) for key in overrides}
    try:
        for key, value in overrides.items():
            setattr(DecodeSegments, key, type(saved[key])(value))
        return DecodeSegments(gen.model, gen.cache)
    finally:
        for key, value in saved.items():
            setattr(DecodeSegments, key, value)


def decode(gen, prompt, steps) -> tuple[float, list[int]]:
    token = gen.prefill(prompt).argmax(-1)
    position, tokens = len(prompt), []
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        token = gen.decode_step(token, position).argmax(-1)
        tokens.append(int(token))
        position += 1
    return (time.perf_counter() - start) / steps, tokens


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama2-7b")
    p.add_argument("--vram-budget", type=float, default=8.0)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--calib-tokens", type=int, default=4096)
    p.add_argument("--variant", action="append", required=True, help="name:switch=value,... (repeatable)")
    p.add_argument("--json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: the A/B times CUDA-graph decode steps: it needs a CUDA GPU")
    variants = [parse_variant(v) for v in args.variant]
    set_threads(args.threads)
    context = 64 + args.steps + 16
    artifact, summary = synthetic_artifact(args.shape, 0.9, 0.8, 0, args.calib_tokens, context, torch.float16,
                                           True, None)
    gen = powerinfer.load(artifact, device="cuda", dtype=torch.float16, context=context, mode="hybrid",
                          vram_budget=args.vram_budget)
    prompt = random_prompt(gen.loaded.args.vocab_size, 64)
    gen.generate(prompt, max_tokens=4, sampling=SamplingParams(temperature=0), ignore_eos=True)  # warms up
    if gen._segments is None or gen._segments._whole is None:
        raise SystemExit("error: this host runs no whole-step graph (no numba OpenMP team?): nothing to compare")
    times, tokens = {name: [] for name, _ in variants}, {}
    with torch.inference_mode():  # as the Generator captures its own (the kernels run outside autograd)
        segments = {name: capture(gen, overrides) for name, overrides in variants}
        for r in range(args.rounds):
            order = list(segments)[r % len(segments):] + list(segments)[:r % len(segments)]
            for name in order:
                gen._segments = segments[name]
                seconds, greedy = decode(gen, prompt, args.steps)
                times[name].append(round(1e3 * seconds, 3))
                tokens.setdefault(name, greedy)
            print(f"round {r}: " + ", ".join(f"{n} {times[n][-1]:.3f}" for n in segments) + " ms/token", flush=True)
    first = variants[0][0]
    report = {**environment(True), "what": f"SYNTHETIC {args.shape} hybrid decode A/B, ms per token over "
                                            f"{args.steps} greedy steps after a 64-token prompt, variants "
                                            "alternated in rotating order",
              "vram_budget_gib": args.vram_budget, "variants": dict(variants), "decode_ms": times,
              "median_ms": {n: statistics.median(t) for n, t in times.items()},
              "faster_than_first_rounds": {n: sum(a < b for a, b in zip(times[n], times[first])) for n in times},
              "greedy_tokens_agree_with_first": {n: sum(a == b for a, b in zip(tokens[n], tokens[first]))
                                                 for n in tokens},
              "tokens": args.steps, "synthetic_build": summary}
    print(json.dumps({k: report[k] for k in ("median_ms", "faster_than_first_rounds",
                                             "greedy_tokens_agree_with_first")}), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
