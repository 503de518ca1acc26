"""`powerinfer bench`: decode and prefill speed of each executor mode, measured side by side in one run.

For each mode: decode tok/s over `gen_tokens` steps after a `prompt_tokens` prompt (median and spread over
`repeats` runs), prefill tok/s, time to first token, peak GPU memory, and the share of active FFN neurons
served by each device. Results carry the device, date and commit; synthetic models are labelled as such.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

BENCH_MODES = ("hybrid", "gpu", "dense-gpu", "offload", "cpu", "dense-cpu")


def device_name(cuda: bool) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cpu = f"{cpu} ({os.cpu_count()} logical cores)"
    return f"{torch.cuda.get_device_name()} + {cpu}" if cuda else cpu


def git_commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=here)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=here).stdout.strip()
        commit = head.stdout.strip()
        return commit + ("-dirty" if dirty else "") if commit else os.environ.get("POWERINFER_COMMIT", "unknown")
    except (OSError, subprocess.TimeoutExpired):
        return os.environ.get("POWERINFER_COMMIT", "unknown")


def run_mode(load_generator, mode: str, prompt_tokens: int, gen_tokens: int, repeats: int) -> dict:
    """Measure one mode; `load_generator(mode)` returns a ready `Generator`."""
    from powerinfer.runtime import GenerationStats, SamplingParams

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    gen = load_generator(mode)
    torch.manual_seed(0)
    vocab = gen.loaded.args.vocab_size
    prompt = torch.randint(min(100, vocab - 1), vocab, (prompt_tokens,)).tolist()
    greedy = SamplingParams(temperature=0)
    gen.generate(prompt, max_tokens=4, sampling=greedy, ignore_eos=True)  # warm-up, CUDA graph capture
    counts = getattr(gen.model, "counts", None)
    decode, prefill, ttft = [], [], []
    for _ in range(repeats):
        stats, first = GenerationStats(), None
        start = time.perf_counter()
        for _chunk in gen.stream(prompt, gen_tokens, greedy, stats=stats, ignore_eos=True):
            if first is None:
                first = time.perf_counter() - start
        ttft.append(first)
        decode.append(stats.decode_tok_s)
        prefill.append(stats.prefill_tok_s)
    result = {
        "mode": mode,
        "decode_tok_s": round(statistics.median(decode), 2),
        "decode_tok_s_min": round(min(decode), 2), "decode_tok_s_max": round(max(decode), 2),
        "prefill_tok_s": round(statistics.median(prefill), 1),
        "ttft_s": round(statistics.median(ttft), 4),
        "peak_gpu_bytes": torch.cuda.max_memory_reserved() if cuda else 0,
    }
    if counts is not None:
        hot, cold = counts.shares()
        result.update(gpu_neuron_share=round(hot, 4), cpu_neuron_share=round(cold, 4))
    del gen
    return result


def environment(cuda: bool | None = None) -> dict:
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return {"device": device_name(cuda), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "commit": git_commit(), "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads()}


def format_table(results: list[dict]) -> str:
    head = f"{'mode':<10}{'decode tok/s':>14}{'(min-max)':>16}{'prefill tok/s':>15}{'TTFT s':>9}{'peak GPU MiB':>14}"
    rows = [head]
    for r in results:
        spread = f"{r['decode_tok_s_min']:.1f}-{r['decode_tok_s_max']:.1f}"
        rows.append(f"{r['mode']:<10}{r['decode_tok_s']:>14.1f}{spread:>16}{r['prefill_tok_s']:>15.1f}"
                    f"{r['ttft_s']:>9.3f}{r['peak_gpu_bytes'] / 2**20:>14.0f}")
    return "\n".join(rows)
