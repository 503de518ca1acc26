"""Measure a model, ReLU-fy it, measure the result: the Python half of `gpu_relufy_smollm2.sh`.

Training text is WikiText-2 validation minus its last 5% of lines, which are held back to monitor
perplexity and sparsity during training; the before/after numbers are measured on WikiText-2 test with the
same protocol (`powerinfer.offline.train.measure_sparsity_and_ppl`: non-overlapping 512-token windows, full
precision). Results go to `<out>/relufy_results.json`.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from powerinfer.offline.relufy import LOG_FILE, RelufyConfig, measure_model, relufy  # noqa: E402


def split_lines(source: Path, train: Path, held_out: Path, held_out_share: float) -> None:
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    cut = int(len(lines) * (1 - held_out_share))
    train.write_text("".join(lines[:cut]), encoding="utf-8")
    held_out.write_text("".join(lines[cut:]), encoding="utf-8")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--data-dir", required=True, type=Path)
    p.add_argument("--work", required=True, type=Path, help="where the relufied model is written")
    p.add_argument("--out", required=True, type=Path, help="where the results JSON and the log go")
    p.add_argument("--minutes", type=float, required=True)
    p.add_argument("--activation", default="relu")
    p.add_argument("--l1", type=float, default=3.0)
    p.add_argument("--l1-ramp", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup-steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--micro-batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--sample-share", type=float, default=0.5)
    p.add_argument("--threshold", type=float, default=0.0, help="FATReLU gate threshold (0: plain ReLU)")
    p.add_argument("--eval-every", type=int, default=200)
    args = p.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    train_file, monitor_file = args.work / "train.txt", args.work / "monitor.txt"
    split_lines(args.data_dir / "wikitext2-valid.txt", train_file, monitor_file, 0.05)
    test_file = args.data_dir / "wikitext2-test.txt"
    results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
               "torch": torch.__version__, "model": args.model, "eval_text": test_file.name,
               "protocol": f"non-overlapping {args.seq_len}-token windows, float32"}
    out_json = args.out / "relufy_results.json"

    def write():
        out_json.write_text(json.dumps(results, indent=2))

    start = time.perf_counter()
    results["original"] = measure_model(args.model, test_file, seq_len=args.seq_len, progress=False)
    write()
    model_dir = args.work / f"smollm2-{args.activation}"
    if model_dir.exists() and (model_dir / "config.json").exists():
        shutil.rmtree(model_dir)
    train_options = dict(batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                         seq_len=args.seq_len, lr=args.lr, warmup_steps=args.warmup_steps, l1=args.l1,
                         l1_ramp=args.l1_ramp, eval_every=args.eval_every, save_minutes=3.0, save_every=10**9)
    try:
        recipe = relufy(args.model, model_dir, args.activation, data_file=train_file, minutes=args.minutes,
                        train_options=train_options, config=RelufyConfig(sample_share=args.sample_share,
                                                                    threshold=args.threshold),
                        eval_file=monitor_file, eval_tokens=32768)
    finally:
        if (model_dir / LOG_FILE).exists():
            shutil.copy(model_dir / LOG_FILE, args.out / LOG_FILE)
    results["relufy"] = {k: recipe[k] for k in ("activation", "relufy", "train", "steps", "tokens_trained",
                                                "minutes_trained", "final_loss", "final_train_sparsity",
                                                "evaluations")}
    results["relufied_model_dir"] = str(model_dir)
    results["relufied"] = measure_model(model_dir, test_file, seq_len=args.seq_len, progress=False)
    original, relufied = results["original"], results["relufied"]
    results["summary"] = {
        "activation": args.activation, "tokens_trained": recipe["tokens_trained"],
        "minutes_trained": recipe["minutes_trained"], "sparsity_test": relufied["sparsity"],
        "ppl_original": original["ppl"], "ppl_relufied": relufied["ppl"],
        "ppl_ratio": relufied["ppl"] / original["ppl"],
        "neuron_share_for_80pct_activations": relufied["neuron_share_for_80pct_activations"],
        "wall_minutes_total": (time.perf_counter() - start) / 60,
    }
    write()
    print(json.dumps(results["summary"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
