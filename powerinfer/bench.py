"""`powerinfer bench`: decode and prefill speed of each executor mode, measured side by side in one run.

For each mode: decode tok/s over `gen_tokens` steps after a `prompt_tokens` prompt (median and spread over
`repeats` runs), prefill tok/s, time to first token, peak GPU memory, and the share of active FFN neurons
served by each device. Then two things that say how good that speed is:
- where a decode step's time goes (GPU compute, CPU compute, PCIe transfers, the rest), from one extra
  instrumented decode (`runtime.timing.PhaseTimer`), kept apart from the timed runs;
- the roofline: the bytes a decode step must move for that mode — weights and KV cache resident on the
  GPU, on the CPU (sparse FFN rows at the measured active counts), and over PCIe — divided by bandwidths
  measured in the same run (a device-to-device copy, a CPU `sum` with the configured threads, pinned
  host<->device copies), as `roofline_tok_s` and the percentage of it reached.
The `hf-accelerate` peer runs the same checkpoint through `transformers` + `accelerate` with the GPU capped
at the same VRAM budget. Results carry the device, date and commit; synthetic models are labelled as such.
"""

from __future__ import annotations

import datetime
import gc
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from powerinfer.errors import PowerInferError

BENCH_MODES = ("hybrid", "gpu", "dense-gpu", "offload", "cpu", "dense-cpu", "hf-accelerate")
GiB = 1 << 30


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
    """This checkout's commit; POWERINFER_COMMIT when set (a copied working tree's git HEAD may be stale)."""
    if os.environ.get("POWERINFER_COMMIT"):
        return os.environ["POWERINFER_COMMIT"]
    try:
        here = Path(__file__).resolve().parent
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=here)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=here).stdout.strip()
        commit = head.stdout.strip()
        return commit + ("-dirty" if dirty else "") if commit else os.environ.get("POWERINFER_COMMIT", "unknown")
    except (OSError, subprocess.TimeoutExpired):
        return os.environ.get("POWERINFER_COMMIT", "unknown")


def random_prompt(vocab: int, n: int) -> list[int]:
    torch.manual_seed(0)
    return torch.randint(min(100, vocab - 1), vocab, (n,)).tolist()


# -- bandwidths -------------------------------------------------------------------------------------------

def measure_bandwidths(cuda: bool, mib: int = 1024, repeats: int = 5) -> dict:
    """GB/s (1e9 bytes/s), best of `repeats`: CPU read (`sum` of a float32 buffer with torch's threads), and
    with CUDA the device-to-device copy (bytes read + written) and pinned host->device / device->host."""
    n = max(1, mib) << 20
    host = torch.ones(n // 4)
    host.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        host.sum()
        times.append(time.perf_counter() - start)
    out = {"cpu_read": n / min(times) / 1e9}
    del host
    if cuda:
        def best(fn, bytes_moved):
            fn()
            elapsed = []
            for _ in range(repeats):
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                fn()
                end.record()
                end.synchronize()
                elapsed.append(begin.elapsed_time(end) / 1e3)
            return bytes_moved / min(elapsed) / 1e9

        a = torch.empty(n, dtype=torch.uint8, device="cuda")
        b = torch.empty_like(a)
        out["gpu_copy"] = best(lambda: b.copy_(a), 2 * n)
        del a, b
        m = min(n, 256 << 20)
        pinned = torch.empty(m, dtype=torch.uint8, pin_memory=True)
        device = torch.empty(m, dtype=torch.uint8, device="cuda")
        out["pcie_h2d"] = best(lambda: device.copy_(pinned, non_blocking=True), m)
        out["pcie_d2h"] = best(lambda: pinned.copy_(device, non_blocking=True), m)
        del pinned, device
        torch.cuda.empty_cache()
    return {k: round(v, 2) for k, v in out.items()}


# -- bytes per token and the roofline ----------------------------------------------------------------------

def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def bytes_per_token(model, active: tuple[float, float] | None, position: int) -> dict:
    """Bytes one decode step at `position` must read on the GPU and on the CPU (weights, KV cache) and move
    over PCIe. `active`: (GPU, CPU) active FFN rows per token, summed over layers (measured)."""
    from powerinfer.runtime.executor import HybridTransformer

    out = {"gpu": 0, "cpu": 0, "pcie": 0}

    def add(device: torch.device, n: float) -> None:
        out["gpu" if device.type == "cuda" else "cpu"] += int(n)

    args = model.args
    d, kv = args.hidden_size, args.num_key_value_heads * args.head_dim
    embed = model.embed_tokens.weight
    add(embed.device, d * embed.element_size())  # one row
    for p in (*model.norm.parameters(), model.lm_head.weight):
        add(p.device, _nbytes(p))
    if not isinstance(model, HybridTransformer):
        for block in model.layers:
            for p in block.parameters():
                add(p.device, _nbytes(p))
            add(embed.device, 2 * position * kv * embed.element_size())
        return out
    hot, cold = active or (0.0, 0.0)
    # the measured counts are sums over layers: spread them over the layers that hold rows on that side
    hot /= max(1, sum(ffn.hot is not None for ffn in model.ffns))
    cold /= max(1, sum(ffn.cold is not None for ffn in model.ffns))
    previous = embed.device
    for block, ffn, layer in zip(model.attention_layers, model.ffns, model.plan.layers):
        device = layer.attention_device
        dtype_bytes = torch.tensor([], dtype=model.plan.device_dtype(device)).element_size()
        if (device.type == "cuda") != (previous.type == "cuda"):
            out["pcie"] += d * dtype_bytes
        previous = device
        for p in block.parameters():
            add(device, _nbytes(p))
        add(device, 2 * position * kv * dtype_bytes)
        if ffn.predictor is not None:
            for p in (*ffn.predictor.parameters(), *ffn.predictor.buffers()):
                add(p.device, _nbytes(p))
        for rows, n_active, scales in ((ffn.hot, hot, None), (ffn.cold, cold, ffn.cold_scales)):
            if rows is None:
                continue
            gate = rows[0]
            row = d * gate.element_size() + (4 if scales is not None else 0)
            every, when_active = {"predictor": (0, 3), "exact-sparse-down": (2, 1), "dense": (3, 0)}[
                layer.strategy]
            add(gate.device, every * gate.shape[0] * row + when_active * n_active * row)
        sides = {device.type} | ({ffn.hot[0].device.type} if ffn.hot is not None else set()) | (
            {"cpu"} if ffn.cold is not None else set())
        if len(sides) > 1:  # the FFN input crosses over and its partial output back (float32), and the mask
            mask = ffn.n_ff - ffn.n_hot if ffn.predictor is not None and ffn.hot is not None else 0
            out["pcie"] += 2 * d * 4 + mask
    if (model.plan.head_device.type == "cuda") != (previous.type == "cuda"):
        out["pcie"] += d * 4
    return out


def roofline(traffic: dict, bandwidths: dict, decode_tok_s: float | None = None) -> dict:
    """Seconds per token if each device moved its bytes at the measured bandwidth, one after the other
    (`roofline_tok_s`) or all at once (`roofline_overlap_tok_s`); None when a bandwidth is missing. With
    the measured `decode_tok_s`, also `roofline_pct`: its share of the serial roofline."""
    gbps = {"gpu": bandwidths.get("gpu_copy"), "cpu": bandwidths.get("cpu_read")}
    if bandwidths.get("pcie_h2d") and bandwidths.get("pcie_d2h"):
        gbps["pcie"] = (bandwidths["pcie_h2d"] + bandwidths["pcie_d2h"]) / 2
    seconds = {}
    for kind, n in traffic.items():
        if n:
            if not gbps.get(kind):
                return {"roofline_tok_s": None, "roofline_overlap_tok_s": None}
            seconds[kind] = n / (gbps[kind] * 1e9)
    serial, overlap = sum(seconds.values()), max(seconds.values(), default=0.0)
    result = {"roofline_tok_s": round(1 / serial, 2) if serial else None,
              "roofline_overlap_tok_s": round(1 / overlap, 2) if overlap else None,
              "roofline_seconds": {k: round(v, 6) for k, v in seconds.items()}}
    if decode_tok_s is not None and serial:
        result["roofline_pct"] = round(100 * decode_tok_s / result["roofline_tok_s"], 2)
    return result


# -- the instrumented decode -------------------------------------------------------------------------------

def decode_split(gen, prompt: list[int], tokens: int, sampling=None) -> tuple[dict, tuple[float, float] | None]:
    """Per-token seconds of `tokens` decode steps (greedy, or with `sampling`) split into GPU compute, CPU
    compute, PCIe transfers and the rest (`overhead_s`: Python, launches, synchronisation not hidden behind
    other work; `overlap_s`: time the GPU and CPU parts ran at once), and the active FFN rows per token on
    each side."""
    from powerinfer.runtime import Sampler, SamplingParams
    from powerinfer.runtime.executor import HybridTransformer
    from powerinfer.runtime.timing import PhaseTimer

    model = gen.model
    executor = isinstance(model, HybridTransformer)
    cuda = any(p.is_cuda for p in model.parameters())
    timer = PhaseTimer(cuda)
    counts = getattr(model, "counts", None)
    whole_step = "gpu" if cuda and (gen.use_graphs or not executor) else None
    wall, position = 0.0, len(prompt)
    sampler = Sampler(sampling or SamplingParams(temperature=0), gen.device)
    with torch.inference_mode():
        token = sampler(gen.prefill(prompt))
        int(token)
        if counts is not None:
            counts.hot.zero_()
            counts.cold = 0
        if executor and not gen.use_graphs:  # a captured graph replays without running Python
            model.timer = timer
        try:
            for _ in range(tokens):
                timer.mark(None)
                start = time.perf_counter()
                if cuda:
                    logits = gen.decode_step(token, position)
                else:
                    with timer.cpu():
                        logits = gen.decode_step(token, position)
                timer.mark(whole_step)
                token = sampler(logits)
                int(token)  # the generation loop synchronises once per token too
                wall += time.perf_counter() - start
                position += 1
        finally:
            if executor:
                model.timer = None
    stream = timer.stream_seconds()
    n = max(tokens, 1)
    split = {"wall_s": wall / n, "gpu_compute_s": stream["gpu"] / n, "cpu_compute_s": timer.cpu_s / n,
             "transfer_s": stream["transfer"] / n}
    residual = split["wall_s"] - split["gpu_compute_s"] - split["cpu_compute_s"] - split["transfer_s"]
    split.update(overhead_s=max(0.0, residual), overlap_s=max(0.0, -residual),
                 gpu_idle_for_cpu_s=stream["idle"] / n)
    split = {k: round(v, 6) for k, v in split.items()}
    split["tokens"] = tokens
    active = (int(counts.hot) / n, counts.cold / n) if counts is not None else None
    return split, active


# -- synthetic models and the transformers peer ---------------------------------------------------------

def synthetic_artifact(shape: str, sparsity: float, skew: float, seed: int, calib_tokens: int, context: int,
                       dtype: torch.dtype, cuda: bool, log):
    """A SYNTHETIC model of `shape` (drawn on the GPU when there is one) and its in-memory artifact, built
    from `calib_tokens` random token ids; returns (artifact, summary of the build)."""
    import importlib.util

    from powerinfer.offline.build import build_in_memory
    from powerinfer.offline.synth import load_synthetic_model

    device = "cuda" if cuda else "cpu"
    progress = importlib.util.find_spec("tqdm") is not None
    start = time.perf_counter()
    # profiled in float16 on the GPU, float32 on the CPU (no fast float16 matmul there)
    loaded = load_synthetic_model(shape, sparsity, skew, seed,
                                  dtype=dtype if cuda else torch.float32, device=device, progress=progress)
    synth_s = time.perf_counter() - start
    print(f"synthesize: {synth_s:.1f} s (SYNTHETIC {shape}, drawn on {device})", file=log, flush=True)
    planted = loaded.checkpoint.planted
    tokens = torch.randint(2, loaded.args.vocab_size, (calib_tokens,),
                           generator=torch.Generator().manual_seed(seed + 1))
    artifact = build_in_memory(loaded, tokens, ctx=context, gpu_dtype=str(dtype).removeprefix("torch."),
                               weights_dtype=dtype, seed=seed, progress=progress, log=log)
    del loaded
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    layers = artifact.manifest["layers"]
    planted_sparsity = [1 - planted[f"layers.{i}.frequency"].mean().item() for i in range(len(layers))]

    def mean(values):
        return round(sum(values) / len(values), 4)

    summary = {
        "shape_name": shape, "sparsity": sparsity, "skew": skew, "seed": seed,
        "weights_device": device, "weights_dtype": str(dtype).removeprefix("torch."),
        "calibration": f"{calib_tokens} random token ids",
        "planted_sparsity_mean": mean(planted_sparsity),
        "profiled_sparsity_mean": mean([layer["sparsity"] for layer in layers]),
        "profiled_sparsity_min": round(min(layer["sparsity"] for layer in layers), 4),
        "profiled_sparsity_max": round(max(layer["sparsity"] for layer in layers), 4),
        "predicted_sparsity_mean": mean([layer["predicted_sparsity"] for layer in layers]),
        "predictor_recall_mean": mean([layer["recall"] for layer in layers]),
        "predictor_precision_mean": mean([layer["precision"] for layer in layers]),
        "predictor_ranks": sorted({layer["rank"] for layer in layers}),
        "seconds": {"synthesize": round(synth_s, 2), **artifact.manifest["build"]["seconds"]},
    }
    return artifact, summary


def hf_directory(checkpoint, tmp_root: str, dtype):
    """A Hugging Face directory of `checkpoint` for transformers: its own if it is one, else written (in
    `dtype`) under `tmp_root` (an artifact's FFN is in hot-first order: the same function)."""
    from pathlib import Path

    from powerinfer.offline.synth import write_hf_checkpoint

    if checkpoint.format == "hf":
        return checkpoint.path
    out = Path(tmp_root) / "hf"
    if not out.exists():
        out.mkdir()
        config = dict(checkpoint.config, torch_dtype=str(dtype).removeprefix("torch."))
        write_hf_checkpoint(out, config, checkpoint.weights(dtype), checkpoint.tokenizer)
    return out



# -- one mode ---------------------------------------------------------------------------------------------

class _ModeRun:
    """One mode's loaded generator and its timed repeats so far."""

    def __init__(self, load_generator, mode: str, prompt_tokens: int, prompt_text: str | None = None,
                 sampling=None):
        from powerinfer.runtime import SamplingParams

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        self.mode, self.sampling = mode, sampling or SamplingParams(temperature=0)
        started = time.perf_counter()
        self.gen = load_generator(mode)
        self.load_s = time.perf_counter() - started
        if prompt_text is None:
            self.prompt = random_prompt(self.gen.loaded.args.vocab_size, prompt_tokens)
        else:  # a trained model's active neurons depend on its context: random ids are not language
            self.prompt = self.gen.tokenizer.encode(prompt_text)[:prompt_tokens]
            if len(self.prompt) < prompt_tokens:
                raise PowerInferError(f"the prompt text holds {len(self.prompt)} tokens, fewer than the "
                                      f"{prompt_tokens} of --prompt-tokens")
        self.gen.generate(self.prompt, max_tokens=4, sampling=self.sampling, ignore_eos=True)  # warm-up, graphs
        self.decode, self.prefill, self.ttft = [], [], []
        self.measure_s = time.perf_counter() - started - self.load_s

    def repeat(self, gen_tokens: int) -> None:
        """One timed generation of `gen_tokens` tokens after the prompt."""
        from powerinfer.runtime import GenerationStats

        stats, first = GenerationStats(), None
        start = time.perf_counter()
        for _chunk in self.gen.stream(self.prompt, gen_tokens, self.sampling, stats=stats, ignore_eos=True):
            if first is None:
                first = time.perf_counter() - start
        self.measure_s += time.perf_counter() - start
        self.ttft.append(first)
        self.decode.append(stats.decode_tok_s)
        self.prefill.append(stats.prefill_tok_s)

    def result(self, gen_tokens: int, split_tokens: int, bandwidths: dict | None) -> dict:
        """The mode's result (after its repeats): speed, placement, time split, traffic and roofline; frees the
        generator."""
        from powerinfer.runtime.executor import HybridTransformer

        started, gen, cuda = time.perf_counter(), self.gen, torch.cuda.is_available()
        result = {
            "mode": self.mode,
            "decode_tok_s": round(statistics.median(self.decode), 2),
            "decode_tok_s_min": round(min(self.decode), 2), "decode_tok_s_max": round(max(self.decode), 2),
            "prefill_tok_s": round(statistics.median(self.prefill), 1),
            "ttft_s": round(statistics.median(self.ttft), 4),
            "peak_gpu_bytes": torch.cuda.max_memory_reserved() if cuda else 0,
        }
        counts = getattr(gen.model, "counts", None)
        if counts is not None:
            hot, cold = counts.shares()
            result.update(gpu_neuron_share=round(hot, 4), cpu_neuron_share=round(cold, 4))
        if isinstance(gen.model, HybridTransformer):
            plan, n_ff = gen.model.plan, gen.loaded.args.intermediate_size
            result["placement"] = {
                "gpu_ffn_row_share": round(sum(layer.n_hot for layer in plan.layers) / (len(plan.layers) * n_ff), 4),
                "attention_layers_on_gpu": sum(layer.attention_device.type == "cuda" for layer in plan.layers),
                "embeddings_on_gpu": plan.embed_device.type == "cuda",
                "lm_head_on_gpu": plan.head_device.type == "cuda",
                "cpu_ffn_dtype": str(plan.cold_dtype).removeprefix("torch.")}
        active = None
        if split_tokens:
            result["decode_split"], active = decode_split(gen, self.prompt, min(split_tokens, gen_tokens),
                                                          self.sampling)
            if active is not None:
                result["active_rows_per_token"] = {"gpu": round(active[0], 1), "cpu": round(active[1], 1)}
        traffic = bytes_per_token(gen.model, active, len(self.prompt) + gen_tokens // 2)
        result["bytes_per_token"] = traffic
        if bandwidths is not None:
            result.update(roofline(traffic, bandwidths, result["decode_tok_s"]))
        self.measure_s += time.perf_counter() - started
        result["seconds"] = {"load": round(self.load_s, 2), "measure": round(self.measure_s, 2)}
        self.gen = None
        del gen
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        return result


def run_mode(load_generator, mode: str, prompt_tokens: int, gen_tokens: int, repeats: int,
             split_tokens: int = 16, bandwidths: dict | None = None, prompt_text: str | None = None,
             sampling=None) -> dict:
    """Measure one mode; `load_generator(mode)` returns a ready `Generator`. The prompt: the first
    `prompt_tokens` tokens of `prompt_text`, else random token ids; decoding greedy unless `sampling` (a
    `SamplingParams`; seeded, every repeat draws the same tokens)."""
    run = _ModeRun(load_generator, mode, prompt_tokens, prompt_text, sampling)
    for _ in range(repeats):
        run.repeat(gen_tokens)
    return run.result(gen_tokens, split_tokens, bandwidths)


def run_modes_interleaved(load_generator, modes: list[str], prompt_tokens: int, gen_tokens: int, repeats: int,
                          split_tokens: int = 16, bandwidths: dict | None = None,
                          prompt_text: str | None = None, sampling=None) -> list[dict]:
    """Measure several modes loaded at once, their repeats in turns (A, B, A, B, ...), so that a shared
    machine's drift slows every mode alike (on the 2-core VM one mode's repeats spread by 16-42% when the
    modes ran one after another). Every mode's memory is held at once: for CPU modes."""
    runs = [_ModeRun(load_generator, mode, prompt_tokens, prompt_text, sampling) for mode in modes]
    for _ in range(repeats):
        for run in runs:
            run.repeat(gen_tokens)
    return [run.result(gen_tokens, split_tokens, bandwidths) for run in runs]


# -- the transformers + accelerate peer -------------------------------------------------------------------

def check_hf_accelerate() -> None:
    import importlib.util

    if not torch.cuda.is_available():
        raise PowerInferError("mode hf-accelerate needs a CUDA GPU (it offloads what does not fit the VRAM "
                              "budget to the CPU)")
    missing = [m for m in ("transformers", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise PowerInferError(f"mode hf-accelerate needs {' and '.join(missing)}: pip install transformers accelerate")


def run_hf_accelerate(hf_dir, vram_budget_gib: float, prompt_tokens: int, gen_tokens: int, repeats: int,
                      dtype: torch.dtype, bandwidths: dict | None = None) -> dict:
    """The same checkpoint through `transformers` with `device_map="auto"`: `accelerate` keeps what fits
    `vram_budget_gib` on the GPU and streams the rest from CPU memory on every forward pass."""
    import accelerate
    import transformers

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    reserved_before = torch.cuda.memory_reserved()  # counted in the peak: should be ~0
    started = time.perf_counter()
    host = int(0.9 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(hf_dir), dtype=dtype, device_map="auto", max_memory={0: int(vram_budget_gib * GiB), "cpu": host})
    except (ValueError, RuntimeError, OSError) as e:
        raise PowerInferError(f"hf-accelerate: transformers could not load {hf_dir} ({e})") from None
    model.eval()
    load_s = time.perf_counter() - started
    prompt = torch.tensor([random_prompt(model.config.vocab_size, prompt_tokens)], device="cuda")

    def timed(n: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    timed(4)  # warm-up
    decode, prefill, ttft = [], [], []
    for _ in range(repeats):
        first, whole = timed(1), timed(gen_tokens)
        ttft.append(first)
        prefill.append(prompt_tokens / first)
        decode.append((gen_tokens - 1) / max(whole - first, 1e-9))
    traffic = {"gpu": 0, "cpu": 0, "pcie": 0}
    offloaded = 0
    for name, p in model.named_parameters():
        n = p.numel() * p.element_size()
        if "embed_tokens" in name:
            n = p.shape[-1] * p.element_size()  # one row is read, unless offloaded (below)
        if p.device.type != "cuda":  # accelerate keeps it in CPU memory and copies it in for each forward
            n = p.numel() * p.element_size()
            traffic["pcie"] += n
            offloaded += n
        traffic["gpu"] += n
    result = {
        "mode": "hf-accelerate",
        "decode_tok_s": round(statistics.median(decode), 2),
        "decode_tok_s_min": round(min(decode), 2), "decode_tok_s_max": round(max(decode), 2),
        "prefill_tok_s": round(statistics.median(prefill), 1), "ttft_s": round(statistics.median(ttft), 4),
        "peak_gpu_bytes": torch.cuda.max_memory_reserved(), "gpu_bytes_reserved_before_load": reserved_before,
        "peer": f"transformers {transformers.__version__} + accelerate {accelerate.__version__}, "
                f"device_map=auto, max_memory GPU {vram_budget_gib:g} GiB",
        "offloaded_bytes": offloaded, "bytes_per_token": traffic,
        "decode_split": None,  # not instrumented
    }
    if bandwidths is not None:
        result.update(roofline(traffic, bandwidths, result["decode_tok_s"]))
    result["seconds"] = {"load": round(load_s, 2), "measure": round(time.perf_counter() - started - load_s, 2)}
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return result


# -- report -----------------------------------------------------------------------------------------------

def environment(cuda: bool | None = None) -> dict:
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return {"device": device_name(cuda), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "commit": git_commit(), "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads()}


def format_table(results: list[dict]) -> str:
    head = (f"{'mode':<14}{'decode tok/s':>13}{'(min-max)':>15}{'roofline':>10}{'%roof':>7}{'prefill tok/s':>15}"
            f"{'TTFT s':>9}{'peak GPU MiB':>14}")
    rows = [head]
    for r in results:
        spread = f"{r['decode_tok_s_min']:.1f}-{r['decode_tok_s_max']:.1f}"
        roof = r.get("roofline_tok_s")
        pct = r.get("roofline_pct")
        rows.append(f"{r['mode']:<14}{r['decode_tok_s']:>13.1f}{spread:>15}"
                    f"{(f'{roof:.1f}' if roof else '-'):>10}{(f'{pct:.0f}' if pct else '-'):>7}"
                    f"{r['prefill_tok_s']:>15.1f}{r['ttft_s']:>9.3f}{r['peak_gpu_bytes'] / 2**20:>14.0f}")
    splits = [r for r in results if r.get("decode_split")]
    if splits:
        rows += ["", "decode step, ms per token (instrumented run): "
                 f"{'wall':>7}{'GPU':>8}{'CPU':>8}{'PCIe':>8}{'other':>8}{'overlap':>9}"]
        for r in splits:
            s = r["decode_split"]
            rows.append(f"  {r['mode']:<46}" + "".join(
                f"{1e3 * s[k]:>{w}.2f}" for k, w in (("wall_s", 7), ("gpu_compute_s", 8), ("cpu_compute_s", 8),
                                                   ("transfer_s", 8), ("overhead_s", 8), ("overlap_s", 9))))
    return "\n".join(rows)


def require_matplotlib() -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise PowerInferError("--plot needs matplotlib: pip install 'powerinfer[plot]' (or plot the JSON later "
                              "with `powerinfer bench --plot-from FILE --plot OUT.png`)")


def plot_results(report: dict, path) -> Path:
    """A PNG bar chart of decode tok/s per mode with each mode's roofline marked (needs matplotlib)."""
    require_matplotlib()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    results = report.get("results") or []
    if not results:
        raise PowerInferError("no results to plot")
    path = Path(path)
    modes = [r["mode"] for r in results]
    speed = [r["decode_tok_s"] for r in results]
    fig, ax = plt.subplots(figsize=(1.6 * len(modes) + 3, 4.5))
    bars = ax.bar(modes, speed, color="#4477aa", label="decode tok/s (measured)")
    label = "roofline (bandwidths measured in the run)"
    for bar, r in zip(bars, results):
        ax.annotate(f"{r['decode_tok_s']:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
        if r.get("roofline_tok_s"):
            ax.hlines(r["roofline_tok_s"], bar.get_x(), bar.get_x() + bar.get_width(), colors="#cc3311",
                      linewidth=2, label=label)
            label = None  # one legend entry
    values = speed + [r["roofline_tok_s"] for r in results if r.get("roofline_tok_s")]
    if max(values) > 50 * max(min(values), 1e-9):
        ax.set_yscale("log")
    model = report.get("model", {})
    name = model.get("shape_name") or Path(str(model.get("path", "model"))).name
    synthetic = " (SYNTHETIC)" if model.get("synthetic") else ""
    budget = report.get("vram_budget_gib")
    ax.set_title(f"{name}{synthetic}: batch 1, prompt {report.get('prompt_tokens')}, gen {report.get('gen_tokens')}"
                 + (f", VRAM budget {budget:g} GiB" if budget else "")
                 + f"\n{report.get('device', '')}, commit {str(report.get('code_commit') or report.get('commit', ''))[:10]}",
                 fontsize=8)
    ax.set_ylabel("decode tokens/s")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format=(path.suffix.lstrip(".") or "png"), dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path
