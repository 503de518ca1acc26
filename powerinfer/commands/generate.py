"""`powerinfer generate`: complete a prompt, streaming to stdout, speed summary to stderr."""

from __future__ import annotations

import sys

from powerinfer.commands._common import (add_model_arguments, add_sampling_arguments, load_generator,
                                         sampling_from_args)
from powerinfer.runtime import GenerationStats

HELP = "complete a prompt (streams the text, then a speed summary on stderr)"


def add_arguments(p) -> None:
    add_model_arguments(p)
    add_sampling_arguments(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("prompt", help="the prompt text ('-' reads stdin)")


def run(args) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    generator = load_generator(args)
    stats = GenerationStats()
    ids = generator.encode_prompt(prompt, chat=args.chat)
    for chunk in generator.stream(ids, args.max_tokens, sampling_from_args(args), args.stop, stats):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(summary_line(stats, generator), file=sys.stderr)
    return 0


def summary_line(stats: GenerationStats, generator=None) -> str:
    line = (f"prompt: {stats.prompt_tokens} tokens, {stats.prefill_tok_s:.1f} tok/s | "
            f"decode: {stats.generated_tokens} tokens, {stats.decode_tok_s:.1f} tok/s | "
            f"finish: {stats.finish_reason}")
    if generator is None:
        return line
    import torch

    model = generator.model
    plan = getattr(model, "plan", None)
    line += f" | mode: {plan.mode if plan else 'dense'}"
    if torch.cuda.is_available():
        line += f" | VRAM: {torch.cuda.max_memory_reserved() / 2**30:.2f} GiB"
    counts = getattr(model, "counts", None)
    if counts is not None:
        hot, cold = counts.shares()
        line += f" | active neurons: {hot:.0%} GPU, {cold:.0%} CPU"
    return line
