"""Activation profiler (PowerInfer §5.1 "offline profiling"): per FFN neuron, how often and how strongly it
fires on calibration text, plus the FFN inputs and active sets that predictors train on.

Each block's `mlp` is wrapped while the dense model runs over the text in windows; the wrapper sees the
FFN input x (the post-attention RMSNorm output) and h = act(gate(x)) * up(x). A neuron is active when
|h| exceeds its layer's threshold: 0 for `relu`/`drelu` models (exact zeros), and for `silu`/`gelu_tanh`
models (no exact zeros) the |h| quantile that makes `target_sparsity` of the layer's values inactive,
calibrated on the first window. "Skew" is the fraction of neurons that hold 80% of the activations.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from powerinfer.errors import PowerInferError
from powerinfer.loading.artifact import atomic_directory
from powerinfer.models.llama import ffn_activation

EXACT_ZERO_ACTIVATIONS = ("relu", "drelu")
SKEW_MASS = 0.8
PROFILE_FORMAT = "powerinfer-profile"


def read_text_file(path: str | Path) -> str:
    """A calibration/evaluation text file, with a one-line error for a missing, non-UTF-8 or empty file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PowerInferError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise PowerInferError(f"{path}: is a directory, expected a text file") from None
    except OSError as e:
        raise PowerInferError(f"{path}: cannot read ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PowerInferError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None
    if not text.strip():
        raise PowerInferError(f"{path}: empty text file")
    return text


def tokenize_text(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    return torch.tensor(tokenizer.encode(text)[:max_tokens], dtype=torch.int64)


def split_windows(tokens: torch.Tensor, window: int) -> list[torch.Tensor]:
    """Non-overlapping windows; a trailing window shorter than 2 tokens is dropped (nothing to predict)."""
    return [w for w in tokens.split(window) if len(w) >= 2]


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def generate_calibration_tokens(model: nn.Module, n_tokens: int, window: int, start_token: int,
                                seed: int = 0, progress: bool = False) -> torch.Tensor:
    """Text the model writes itself (temperature-1 sampling from `start_token`, ceil(n/window) sequences in
    a batch): calibration data that needs no dataset."""
    # a leaf module of the runtime package; the profiler only borrows its static KV cache
    from powerinfer.runtime.kv_cache import KVCache

    device = model_device(model)
    batch = math.ceil(n_tokens / window)
    cache = KVCache.for_model(model.args, batch, window, model_dtype(model), device)
    generator = torch.Generator(device).manual_seed(seed)
    token = torch.full((batch, 1), start_token, dtype=torch.int64, device=device)
    out = [token]
    steps = range(window - 1)
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc="generating calibration text", unit="tok", leave=False)
    for position in steps:
        cache.set_window(position + 1)
        logits = model(token, torch.tensor([position], device=device), cache)
        token = torch.multinomial(torch.softmax(logits[:, -1].float(), -1), 1, generator=generator)
        out.append(token)
    return torch.cat(out, 1).reshape(-1)[:n_tokens].cpu()


@dataclass
class LayerStats:
    """One layer's profile, in the checkpoint's neuron order."""

    frequency: torch.Tensor  # [n_ff] fraction of tokens on which the neuron is active
    mean_abs: torch.Tensor  # [n_ff] mean |h|
    max_abs: torch.Tensor  # [n_ff] largest |h| seen
    active_threshold: float  # active means |h| > this

    @property
    def sparsity(self) -> float:
        return 1.0 - self.frequency.mean().item()

    @property
    def skew(self) -> float:
        """Fraction of neurons holding 80% of the layer's activations."""
        counts = self.frequency.double().sort(descending=True).values
        total = counts.sum()
        if total == 0:
            return 0.0
        held = int(torch.searchsorted(counts.cumsum(0) / total, SKEW_MASS).item()) + 1
        return min(held, len(counts)) / len(counts)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"frequency": self.frequency, "mean_abs": self.mean_abs, "max_abs": self.max_abs}


@dataclass
class Profile:
    activation: str
    target_sparsity: float | None  # None when active means h != 0
    tokens: int
    layers: list[LayerStats]
    inputs: list[torch.Tensor] = field(repr=False)  # per layer [n, d] float16 FFN inputs
    labels: list[torch.Tensor] = field(repr=False)  # per layer [n, n_ff] bool active sets
    source: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)


def hot_first_order(stats: LayerStats, keep_massive: int) -> torch.Tensor:
    """Neuron ids hot-first: the `keep_massive` largest-|h| neurons (always computed), then by frequency,
    ties by mean |h|."""
    by_strength = torch.argsort(stats.mean_abs, descending=True, stable=True)
    order = by_strength[torch.argsort(stats.frequency[by_strength], descending=True, stable=True)]
    massive = torch.topk(stats.max_abs, min(keep_massive, len(order))).indices if keep_massive else order[:0]
    rest = order[~torch.isin(order, massive)]
    return torch.cat([massive, rest])


class _ProfilingFFN(nn.Module):
    """Computes the wrapped FFN while accumulating its neuron statistics and input samples."""

    def __init__(self, ffn: nn.Module, target_sparsity: float | None, sample_tokens: int):
        super().__init__()
        self.ffn, self.target_sparsity, self.sample_tokens = ffn, target_sparsity, sample_tokens
        n_ff = ffn.down_proj.in_features
        device = ffn.down_proj.weight.device
        self.threshold = 0.0 if target_sparsity is None else None
        self.counts = torch.zeros(n_ff, dtype=torch.float64, device=device)
        self.sum_abs = torch.zeros(n_ff, dtype=torch.float64, device=device)
        self.max_abs = torch.zeros(n_ff, dtype=torch.float32, device=device)
        self.tokens = 0
        self.inputs: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.sampled = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.ffn.gate_up_proj(x).chunk(2, dim=-1)
        h = ffn_activation(gate, up, self.ffn.activation, self.ffn.threshold)
        magnitude = h.detach().float().abs().reshape(-1, h.shape[-1])
        if self.threshold is None:  # calibrate on the first window: target_sparsity of |h| at or below
            flat = magnitude.reshape(-1)
            k = max(1, min(flat.numel(), round(self.target_sparsity * flat.numel())))
            self.threshold = flat.kthvalue(k).values.item()
        active = magnitude > self.threshold
        self.counts += active.sum(0)
        self.sum_abs += magnitude.sum(0)
        self.max_abs = torch.maximum(self.max_abs, magnitude.max(0).values)
        self.tokens += magnitude.shape[0]
        take = min(self.sample_tokens - self.sampled, magnitude.shape[0])
        if take > 0:
            self.inputs.append(x.detach().reshape(-1, x.shape[-1])[:take].to(torch.float16).cpu())
            self.labels.append(active[:take].cpu())
            self.sampled += take
        return self.ffn.down_proj(h)

    def result(self) -> LayerStats:
        n = max(self.tokens, 1)
        return LayerStats((self.counts / n).float().cpu(), (self.sum_abs / n).float().cpu(),
                          self.max_abs.cpu(), float(self.threshold))


@torch.inference_mode()
def profile_model(model: nn.Module, windows: list[torch.Tensor], target_sparsity: float = 0.5,
                  sample_tokens: int = 4096, progress: bool = False) -> Profile:
    """Run `model` over `windows` (1-D token tensors) and profile every FFN neuron."""
    if not windows:
        raise PowerInferError("no calibration tokens to profile")
    activation = model.args.hidden_act
    exact = activation in EXACT_ZERO_ACTIVATIONS
    if not exact and not 0 < target_sparsity < 1:
        raise PowerInferError(f"--target-sparsity must be in (0, 1), got {target_sparsity}")
    device = model_device(model)
    originals = [block.mlp for block in model.layers]
    wrappers = [_ProfilingFFN(ffn, None if exact else target_sparsity, sample_tokens) for ffn in originals]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(len(w) for w in windows), desc="profiling", unit="tok", leave=False)
    try:
        for block, wrapper in zip(model.layers, wrappers):
            block.mlp = wrapper
        for window in windows:
            model(window[None].to(device), torch.arange(len(window), device=device), last_logits_only=True)
            if bar is not None:
                bar.update(len(window))
    finally:
        for block, ffn in zip(model.layers, originals):
            block.mlp = ffn
        if bar is not None:
            bar.close()
    return Profile(activation, None if exact else target_sparsity, sum(len(w) for w in windows),
                   [w.result() for w in wrappers], [torch.cat(w.inputs) for w in wrappers],
                   [torch.cat(w.labels) for w in wrappers], config=model.args.to_config())


def format_profile_table(profile: Profile) -> str:
    threshold_column = profile.target_sparsity is not None
    lines = [f"{'layer':>5}  {'sparsity':>8}  {'skew':>6}" + ("  |h| threshold" if threshold_column else "")]
    for i, layer in enumerate(profile.layers):
        lines.append(f"{i:>5}  {layer.sparsity:>8.3f}  {layer.skew:>6.3f}"
                     + (f"  {layer.active_threshold:>13.4g}" if threshold_column else ""))
    mean_sparsity = sum(layer.sparsity for layer in profile.layers) / len(profile.layers)
    mean_skew = sum(layer.skew for layer in profile.layers) / len(profile.layers)
    lines.append(f"{'mean':>5}  {mean_sparsity:>8.3f}  {mean_skew:>6.3f}")
    return "\n".join(lines)


def save_profile(profile: Profile, out_dir: str | Path, force: bool = False) -> Path:
    """profile.json (summary), profile.safetensors (per-neuron statistics) and samples.safetensors (FFN
    inputs and bit-packed active sets for predictor training), written atomically."""
    from safetensors.torch import save_file

    with atomic_directory(out_dir, force=force) as tmp:
        save_file({f"layers.{i}.{k}": v.contiguous() for i, layer in enumerate(profile.layers)
                   for k, v in layer.tensors().items()}, str(tmp / "profile.safetensors"))
        samples = {}
        for i, (inputs, labels) in enumerate(zip(profile.inputs, profile.labels)):
            samples[f"layers.{i}.inputs"] = inputs.contiguous()
            samples[f"layers.{i}.labels"] = torch.from_numpy(np.packbits(labels.numpy(), axis=1))
        save_file(samples, str(tmp / "samples.safetensors"))
        (tmp / "profile.json").write_text(json.dumps({
            "format": PROFILE_FORMAT, "format_version": 1, "source": profile.source, "config": profile.config,
            "activation": profile.activation, "target_sparsity": profile.target_sparsity,
            "tokens": profile.tokens,
            "layers": [{"sparsity": layer.sparsity, "skew": layer.skew,
                        "active_threshold": layer.active_threshold} for layer in profile.layers],
        }, indent=1))
    return Path(out_dir)


def load_profile(path: str | Path, samples: bool = True) -> Profile:
    """A saved profile; `samples=False` skips the predictor training data."""
    from safetensors import safe_open

    path = Path(path)
    meta_file = path / "profile.json"
    if not meta_file.is_file():
        raise PowerInferError(f"{path}: not a profile directory (no profile.json); run `powerinfer profile`")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PowerInferError(f"{meta_file}: cannot read ({e})") from None
    if meta.get("format") != PROFILE_FORMAT:
        raise PowerInferError(f"{meta_file}: not a powerinfer profile")
    n_ff = meta["config"]["intermediate_size"]
    layers, inputs, labels = [], [], []
    try:
        with safe_open(str(path / "profile.safetensors"), framework="pt") as f:
            for i, layer in enumerate(meta["layers"]):
                layers.append(LayerStats(f.get_tensor(f"layers.{i}.frequency"), f.get_tensor(f"layers.{i}.mean_abs"),
                                         f.get_tensor(f"layers.{i}.max_abs"), layer["active_threshold"]))
        if samples:
            with safe_open(str(path / "samples.safetensors"), framework="pt") as s:
                for i in range(len(layers)):
                    inputs.append(s.get_tensor(f"layers.{i}.inputs"))
                    packed = s.get_tensor(f"layers.{i}.labels").numpy()
                    labels.append(torch.from_numpy(np.unpackbits(packed, axis=1, count=n_ff).astype(bool)))
    except Exception as e:  # safetensors raises its own error types on missing or corrupt files
        raise PowerInferError(f"{path}: corrupt profile ({e})") from None
    return Profile(meta["activation"], meta["target_sparsity"], meta["tokens"], layers, inputs, labels,
                   meta["source"], meta["config"])
