"""`powerinfer eval`: perplexity dense vs sparse, predictor recall, greedy agreement of a model or artifact."""

from __future__ import annotations

import json

from powerinfer.commands._common import positive_int
from powerinfer.commands.profile import add_compute_arguments, resolve_compute

HELP = "evaluate quality: perplexity dense vs sparse (artifact), predictor recall, greedy-token agreement"


def add_arguments(p) -> None:
    add_compute_arguments(p)
    p.add_argument("--data", required=True, help="UTF-8 evaluation text")
    p.add_argument("--tokens", type=positive_int, default=None, help="evaluate at most N tokens (default: all)")
    p.add_argument("--window", type=positive_int, default=512, help="perplexity window in tokens (default: 512)")
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> int:
    from powerinfer.offline.build import format_curve
    from powerinfer.offline.evaluate import evaluate_model

    result = evaluate_model(args.model, args.data, args.tokens, args.window, resolve_compute(args), progress=True)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    label = " (synthetic model)" if result["synthetic"] else ""
    print(f"{result['model']}{label}: {result['tokens']} tokens of {result['data']} in windows of {result['window']}")
    print(f"  perplexity dense   {result['ppl_dense']:.4f}")
    if result["ppl_sparse"] is None:
        print(f"  ({result['note']})")
        return 0
    s = result["strategy"]
    print(f"  perplexity sparse  {result['ppl_sparse']:.4f} (x{result['ppl_ratio']:.4f}), strategy {s['name']}"
          + (f" ({s['parameter']:g})" if s["parameter"] is not None else ""))
    print(f"  FFN sparsity       {result['ffn_sparsity']:.3f}")
    if result["recall_mean"] is not None:
        print(f"  predictor recall   {result['recall_mean']:.3f} mean, per layer "
              + " ".join(f"{r:.2f}" for r in result["recall_per_layer"]))
    print(f"  greedy agreement   {result['greedy_agreement']:.3f} over {result['greedy_tokens']} tokens")
    print(f"build-time curve on {s['holdout_tokens']} held-out calibration tokens:")
    print(format_curve(result["curve"]))
    return 0
