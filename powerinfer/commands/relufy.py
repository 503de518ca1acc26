"""`powerinfer relufy`: make a ReLU-sparse model from a SwiGLU one by distillation; measure a model's
sparsity and perplexity (`--eval-only`); build the tiny ReLU test model (`--build-tiny`)."""

from __future__ import annotations

import argparse
import json

from powerinfer.commands._common import non_negative_float, positive_float, positive_int
from powerinfer.errors import PowerInferError

HELP = "ReLU-fy a model: swap its FFN activation to ReLU/dReLU and recover quality by distillation"


def _fraction(text: str) -> float:
    value = non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


def add_arguments(p) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="GGUF file or Hugging Face model directory (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--activation", choices=["relu", "drelu"], default="relu",
                   help="relu: relu(gate) * up (ReGLU, as ProSparse); "
                        "drelu: relu(gate) * relu(up) (as TurboSparse)")
    p.add_argument("--output", "-o", default=None, help="output model directory (Hugging Face format)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--tokens", type=positive_int, help="training budget in tokens")
    budget.add_argument("--minutes", type=positive_float, help="training budget in minutes of training")
    p.add_argument("--data", default=None,
                   help="UTF-8 training text, mixed with the teacher's own samples (default: samples only)")
    p.add_argument("--sample-share", type=_fraction, default=0.25,
                   help="share of each batch that is teacher samples when --data is given (default 0.25)")
    p.add_argument("--l1", type=non_negative_float, default=0.0,
                   help="final coefficient of the L1 penalty on activations (ProSparse; default 0: off)")
    p.add_argument("--threshold", type=non_negative_float, default=0.0,
                   help="FATReLU (ProSparse): the gate counts only above this value, in training and in the "
                        "written model (config key relu_threshold; default 0: plain ReLU)")
    p.add_argument("--l1-ramp", type=_fraction, default=0.5,
                   help="share of training over which the L1 coefficient ramps up from 0 (default 0.5)")
    p.add_argument("--lr", type=non_negative_float, default=2e-4, help="peak learning rate (default 2e-4)")
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--weight-decay", type=non_negative_float, default=0.0)
    p.add_argument("--batch-size", type=positive_int, default=8, help="sequences per step (default 8)")
    p.add_argument("--micro-batch-size", type=positive_int, default=None,
                   help="sequences per forward pass, for gradient accumulation (default: --batch-size)")
    p.add_argument("--seq-len", type=positive_int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--save-every", type=positive_int, default=200,
                   help="checkpoint every N steps (default 200)")
    p.add_argument("--save-minutes", type=non_negative_float, default=5.0,
                   help="... and at least every this many minutes (default 5)")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start over even if the output directory holds a checkpoint of this run")
    p.add_argument("--eval-data", default=None,
                   help="text to measure perplexity and sparsity on while training (and with --eval-only)")
    p.add_argument("--eval-tokens", type=positive_int, default=None,
                   help="measure on at most this many tokens of --eval-data (default: 32768 while training, "
                        "all with --eval-only)")
    p.add_argument("--eval-every", type=int, default=0, help="measure every N steps (default 0: at the end)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--eval-only", action="store_true",
                   help="only measure --model's perplexity and sparsity on --eval-data; print JSON")
    p.add_argument("--build-tiny", action="store_true",
                   help="build (or find in the cache) the tiny ReLU test model; print its directory")


def run(args) -> int:
    from powerinfer.commands._common import set_threads

    set_threads(args.threads)
    if args.build_tiny:
        from powerinfer.offline.tiny import ensure_tiny_relu_model
        path = ensure_tiny_relu_model(show_progress=True)
        print(path)
        return 0
    if args.eval_only:
        if args.eval_data is None:
            raise PowerInferError("--eval-only needs --eval-data FILE")
        from powerinfer.offline.relufy import measure_model
        print(json.dumps(measure_model(args.model, args.eval_data, seq_len=args.seq_len,
                                       max_tokens=args.eval_tokens, device=args.device), indent=2))
        return 0
    if args.output is None:
        raise PowerInferError("give an output directory with -o DIR")
    if args.tokens is None and args.minutes is None:
        raise PowerInferError("give a training budget: --tokens N or --minutes T")

    from powerinfer.offline.relufy import RelufyConfig, relufy

    train_options = dict(
        batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, seq_len=args.seq_len, lr=args.lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, l1=args.l1, l1_ramp=args.l1_ramp,
        save_every=args.save_every, save_minutes=args.save_minutes, eval_every=args.eval_every,
        seed=args.seed)
    recipe = relufy(args.model, args.output, args.activation, data_file=args.data, tokens=args.tokens,
                    minutes=args.minutes, train_options=train_options,
                    config=RelufyConfig(sample_share=args.sample_share, threshold=args.threshold),
                    eval_file=args.eval_data,
                    eval_tokens=args.eval_tokens or 32768, resume=args.resume, device=args.device)
    summary = (f"wrote {args.output}: {recipe['activation']} model, {recipe['steps']} steps, "
               f"{recipe['tokens_trained']:,} tokens in {recipe['minutes_trained']:.1f} min, "
               f"final distillation loss {recipe['final_loss']:.4f}")
    if recipe["evaluations"]:
        last = recipe["evaluations"][-1]
        summary += f"; on --eval-data: ppl {last['ppl']:.2f}, sparsity {last['sparsity']:.3f}"
    print(summary)
    return 0
