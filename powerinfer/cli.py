"""`powerinfer <subcommand>`: a thin dispatcher; each subcommand module owns its arguments.

A subcommand module defines `HELP`, `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from powerinfer.errors import PowerInferError

# name -> module under powerinfer.commands
SUBCOMMANDS = {
    "generate": "generate",
    "chat": "chat",
    "inspect": "inspect",
    "profile": "profile",
    "train-predictors": "train_predictors",
    "plan": "plan",
    "build": "build",
    "eval": "eval",
    "relufy": "relufy",
    "synth": "synth",
    "serve": "serve",
    "bench": "bench",
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (no usage dump) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from powerinfer import __version__

    parser = _Parser(prog="powerinfer", description=(
        "Fast local LLM inference exploiting activation sparsity (PowerInfer)."))
    parser.add_argument("--version", action="version", version=f"powerinfer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True, parser_class=_Parser)
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(f"powerinfer.commands.{module_name}")
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args._run(args) or 0
    except PowerInferError as e:
        print(f"powerinfer {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `powerinfer generate ... | head`
        return 0
