"""`powerinfer chat`: an interactive conversation using the model's chat template."""

from __future__ import annotations

import sys

from powerinfer.commands._common import (add_model_arguments, add_sampling_arguments, load_generator,
                                         sampling_from_args)
from powerinfer.commands.generate import summary_line
from powerinfer.errors import ContextOverflowError
from powerinfer.runtime import GenerationStats

HELP = "interactive chat with the model's chat template (/reset clears history, /quit or Ctrl-D exits)"


def add_arguments(p) -> None:
    add_model_arguments(p)
    add_sampling_arguments(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--verbose", "-v", action="store_true", help="print a speed summary after each reply")


def run(args) -> int:
    generator = load_generator(args)
    tokenizer = generator.tokenizer
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chatting with the model. /reset clears the history, /quit exits.", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        if line.strip() in ("/quit", "/exit"):
            break
        if line.strip() == "/reset":
            history = []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        text = tokenizer.apply_chat_template(system + history)
        ids = tokenizer.encode(text, add_bos=False)
        stats = GenerationStats()
        reply = []
        try:
            for chunk in generator.stream(ids, args.max_tokens, sampling_from_args(args), args.stop, stats):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                reply.append(chunk.text)
        except ContextOverflowError:
            print("(the conversation no longer fits the context; history cleared)", file=sys.stderr)
            history = []
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": "".join(reply)})
        if args.verbose:
            print(summary_line(stats, generator), file=sys.stderr)
    return 0
