"""Quality of the sparse FFN: perplexity dense vs sparse, predictor recall, greedy-token agreement, and the
sparsity–perplexity curve from which `build` picks a strategy.

`PredictedSparseFFN` computes a block's FFN the way the sparse runtime does — mathematically
down(h * mask), h = act(gate(x)) * up(x) — for three strategies:
- `predictor` (PowerInfer §5.1): mask = the layer predictor's predicted-active set;
- `exact-sparse-down`: gate and up computed densely, the down rows of neurons with |h| at or below a
  per-layer threshold skipped (exact for ReLU models at threshold 0, a measured approximation for SiLU);
- `dense`: nothing skipped.
In every strategy the first `n_always_active` hot-first neurons (the "massive" ones, largest |h| in the
profile) are always kept: skipping one of them costs far more than its share of the work.
Perplexity follows the usual recipe: non-overlapping windows of the text, each token predicted from the
tokens before it in its window.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from powerinfer.errors import PowerInferError
from powerinfer.models.llama import ffn_activation
from powerinfer.offline.placement import relative_ffn_bytes
from powerinfer.offline.profile import model_device, model_dtype

STRATEGIES = ("predictor", "exact-sparse-down", "dense")
GREEDY_TOKENS = 128
GREEDY_PROMPT_TOKENS = 32


class PredictedSparseFFN(nn.Module):
    """A block's FFN with h restricted to the strategy's kept neurons; also counts what it skipped and,
    when it has a predictor, that predictor's recall of the truly active neurons (|h| > active_threshold)."""

    def __init__(self, ffn: nn.Module, strategy: str, *, predictor: nn.Module | None = None,
                 predictor_threshold: float | None = None, h_threshold: float = 0.0,
                 n_always_active: int = 0, active_threshold: float = 0.0):
        super().__init__()
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}")
        if strategy == "predictor" and predictor is None:
            raise ValueError("the predictor strategy needs a predictor")
        self.ffn, self.strategy, self.predictor = ffn, strategy, predictor
        self.predictor_threshold = (predictor.threshold.item() if predictor is not None and
                                    predictor_threshold is None else predictor_threshold)
        self.h_threshold, self.n_always_active, self.active_threshold = h_threshold, n_always_active, active_threshold
        self.reset_counts()

    def reset_counts(self) -> None:
        self.kept = self.total = self.true_positive = self.active = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.ffn.gate_up_proj(x).chunk(2, dim=-1)
        h = ffn_activation(gate, up, self.ffn.activation, self.ffn.threshold)
        predicted = None
        if self.predictor is not None:
            logits = self.predictor(x.to(self.predictor.dtype))
            predicted = logits > self.predictor_threshold
            predicted[..., :self.n_always_active] = True
            active = h.abs() > self.active_threshold
            self.true_positive += (predicted & active).sum().item()
            self.active += active.sum().item()
        if self.strategy == "dense":
            self.kept += h.numel()
            self.total += h.numel()
            return self.ffn.down_proj(h)
        keep = predicted if self.strategy == "predictor" else h.abs() > self.h_threshold
        keep[..., :self.n_always_active] = True
        self.kept += keep.sum().item()
        self.total += keep.numel()
        return self.ffn.down_proj(h * keep)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / max(self.total, 1)

    @property
    def recall(self) -> float | None:
        return self.true_positive / self.active if self.predictor is not None and self.active else None


@contextlib.contextmanager
def replaced_ffns(model: nn.Module, wrappers: list[nn.Module]):
    """Swap each block's `mlp` for its wrapper for the duration of the block."""
    originals = [block.mlp for block in model.layers]
    try:
        for block, wrapper in zip(model.layers, wrappers):
            block.mlp = wrapper
        yield wrappers
    finally:
        for block, ffn in zip(model.layers, originals):
            block.mlp = ffn


@torch.inference_mode()
def window_losses(model: nn.Module, windows: list[torch.Tensor], progress: bool = False,
                  desc: str = "perplexity") -> list[tuple[float, int]]:
    """(summed negative log-likelihood, predicted tokens) of each window."""
    device = model_device(model)
    out = []
    if progress:
        from tqdm import tqdm
        windows = tqdm(windows, desc=desc, unit="window", leave=False)
    for window in windows:
        window = window.to(device)
        logits = model(window[None], torch.arange(len(window), device=device))[0, :-1].float()
        out.append((F.cross_entropy(logits, window[1:], reduction="sum").item(), len(window) - 1))
    return out


def perplexity(model: nn.Module, windows: list[torch.Tensor], progress: bool = False, desc: str = "perplexity") -> float:
    return _ppl(window_losses(model, windows, progress, desc))


def _ppl(losses: list[tuple[float, int]]) -> float:
    return math.exp(sum(nll for nll, _ in losses) / sum(n for _, n in losses))


def increase_upper_bound(dense: list[tuple[float, int]], sparse: list[tuple[float, int]],
                         confidence: float = 0.95) -> float:
    """One-sided upper confidence bound on the relative perplexity increase, from its spread over windows
    (Student t); the point estimate when there is a single window."""
    from scipy.stats import t

    increases = torch.tensor([math.exp((s - d) / n) - 1.0 for (d, n), (s, _) in zip(dense, sparse)],
                             dtype=torch.float64)
    if len(increases) < 2:
        return increases.mean().item()
    spread = increases.std().item() / math.sqrt(len(increases))
    return increases.mean().item() + t.ppf(confidence, len(increases) - 1) * spread


@torch.inference_mode()
def greedy_tokens(model: nn.Module, prompt: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """`n_tokens` greedy continuation tokens of `prompt` (1-D)."""
    from powerinfer.runtime.kv_cache import KVCache  # a leaf module; the runtime's static cache

    device = model_device(model)
    cache = KVCache.for_model(model.args, 1, len(prompt) + n_tokens, model_dtype(model), device)
    cache.set_window(len(prompt))
    logits = model(prompt[None].to(device), torch.arange(len(prompt), device=device), cache, last_logits_only=True)
    out = []
    for position in range(len(prompt), len(prompt) + n_tokens):
        token = logits[:, -1].argmax(-1, keepdim=True)
        out.append(token)
        cache.set_window(position + 1)
        logits = model(token, torch.tensor([position], device=device), cache)
    return torch.cat(out, 1)[0].cpu()


@torch.inference_mode()
def greedy_agreement(model: nn.Module, wrappers: list[nn.Module], prompt: torch.Tensor,
                     n_tokens: int = GREEDY_TOKENS) -> float:
    """Fraction of the dense model's `n_tokens` greedy tokens that the sparse model (teacher-forced on the
    same sequence) also picks."""
    reference = greedy_tokens(model, prompt, n_tokens)
    sequence = torch.cat([prompt, reference])[:-1].to(model_device(model))
    with replaced_ffns(model, wrappers):
        logits = model(sequence[None], torch.arange(len(sequence), device=sequence.device))
    chosen = logits[0, len(prompt) - 1:].argmax(-1).cpu()
    return (chosen == reference).float().mean().item()


@torch.inference_mode()
def h_quantile_thresholds(model: nn.Module, inputs: list[torch.Tensor], levels: list[float]) -> list[dict]:
    """Per layer, for each sparsity level s, the |h| value at or below which a fraction s of the profiled
    (token, neuron) values lie."""
    device, out = model_device(model), []
    for block, x in zip(model.layers, inputs):
        ffn = block.mlp
        gate, up = ffn.gate_up_proj(x.to(device=device, dtype=model_dtype(model))).chunk(2, dim=-1)
        magnitude = ffn_activation(gate, up, ffn.activation, ffn.threshold).abs().float().reshape(-1)
        out.append({str(level): magnitude.kthvalue(max(1, round(level * magnitude.numel()))).values.item()
                    for level in levels})
    return out


@dataclass
class CurvePoint:
    strategy: str
    parameter: float | None  # sparsity level (exact-sparse-down) or recall target (predictor)
    ffn_sparsity: float  # measured fraction of (token, neuron) FFN values skipped
    ppl: float
    ppl_increase: float  # ppl / ppl_dense - 1
    ppl_increase_upper: float  # its one-sided 95% upper confidence bound over the windows
    relative_ffn_bytes: float  # FFN weight bytes read per token relative to the dense FFN
    ffn_ms_per_token: float | None = None  # measured on the CPU (offline.speed), for the points within budget

    def to_json(self) -> dict:
        return asdict(self)


def measure_curve(model: nn.Module, windows: list[torch.Tensor], *, active_thresholds: list[float],
                  n_always_active: int, predictors: list | None, predictor_thresholds: list[dict] | None,
                  recall_targets: list[float], h_thresholds: list[dict] | None, sparsity_levels: list[float],
                  predictor_fraction: float, progress: bool = False) -> tuple[float, list[CurvePoint]]:
    """Perplexity on `windows` of the dense model and of every strategy's operating points.

    `h_thresholds` (per layer, level -> |h| threshold) gives the exact-sparse-down points for models without
    exact zeros; with None the single exact point skips exactly the zero neurons.
    """
    dense = window_losses(model, windows, progress, "dense perplexity")
    ppl_dense = _ppl(dense)
    points = [CurvePoint("dense", None, 0.0, ppl_dense, 0.0, 0.0, 1.0)]

    def point(strategy, parameter, wrappers) -> CurvePoint:
        with replaced_ffns(model, wrappers):
            sparse = window_losses(model, windows, progress, f"{strategy} {parameter}")
        sparsity = 1.0 - sum(w.kept for w in wrappers) / max(sum(w.total for w in wrappers), 1)
        cost = relative_ffn_bytes(strategy, sparsity, predictor_fraction)
        return CurvePoint(strategy, parameter, sparsity, _ppl(sparse), _ppl(sparse) / ppl_dense - 1.0,
                          increase_upper_bound(dense, sparse), cost)

    exact_points = [(level, [layer[str(level)] for layer in h_thresholds]) for level in sparsity_levels] \
        if h_thresholds is not None else [(None, active_thresholds)]
    for level, thresholds in exact_points:
        wrappers = [PredictedSparseFFN(block.mlp, "exact-sparse-down", h_threshold=t, n_always_active=n_always_active)
                    for block, t in zip(model.layers, thresholds)]
        points.append(point("exact-sparse-down", level, wrappers))
    if predictors is not None:
        for recall in recall_targets:
            wrappers = [PredictedSparseFFN(block.mlp, "predictor", predictor=p, predictor_threshold=t[str(recall)],
                                           n_always_active=n_always_active)
                        for block, p, t in zip(model.layers, predictors, predictor_thresholds)]
            points.append(point("predictor", recall, wrappers))
    return ppl_dense, points


# Measured times closer than this are a tie, settled by FFN bytes (timing noise must not pick a costlier point).
TIME_TIE = 0.05


def within_budget(points: list[CurvePoint], max_ppl_increase: float) -> list[CurvePoint]:
    """The points whose perplexity cost is within budget with 95% confidence (held-out windows vary: on SmolLM2
    at sparsity 0.5 the increase over groups of 4 windows ranged 1.0–2.6% around a 1.8% mean); dense always is."""
    return [p for p in points if p.ppl_increase_upper <= max_ppl_increase or p.strategy == "dense"]


def choose_strategy(points: list[CurvePoint], max_ppl_increase: float) -> CurvePoint:
    """The fastest point within budget: by measured FFN time where the points within budget have one (within
    `TIME_TIE` of the fastest, the fewest bytes), else the fewest FFN bytes per token."""
    allowed = within_budget(points, max_ppl_increase)
    by_bytes = sorted(allowed, key=lambda p: (p.relative_ffn_bytes, p.ppl_increase))
    if any(p.ffn_ms_per_token is None for p in allowed):
        return by_bytes[0]
    fastest = min(p.ffn_ms_per_token for p in allowed)
    return next(p for p in by_bytes if p.ffn_ms_per_token <= fastest * (1 + TIME_TIE))


def evaluate_model(path, data: str, max_tokens: int | None = None, window: int = 512, device: str = "cpu",
                   progress: bool = False) -> dict:
    """Perplexity of the dense model on `data` and, for an artifact, of its sparse FFN as the runtime runs
    it (the manifest's strategy), with per-layer predictor recall and greedy-token agreement."""
    from powerinfer.loading import load_model
    from powerinfer.offline.profile import read_text_file, split_windows, tokenize_text

    text = read_text_file(data)
    loaded = load_model(path, device=device, dtype=torch.float32, progress=progress)
    model, checkpoint = loaded.model, loaded.checkpoint
    windows = split_windows(tokenize_text(loaded.tokenizer, text, max_tokens), window)
    if not windows:
        raise PowerInferError(f"{data}: fewer than 2 tokens; nothing to evaluate")
    result = {"model": str(checkpoint.path), "data": str(data), "tokens": sum(len(w) for w in windows),
              "window": window, "synthetic": bool(loaded.args.extra.get("powerinfer_synthetic", False)),
              "activation": loaded.args.hidden_act}
    ppl_dense = perplexity(model, windows, progress, "dense perplexity")
    result["ppl_dense"] = ppl_dense
    if checkpoint.format != "artifact":
        result.update(ppl_sparse=None, ppl_ratio=None, ffn_sparsity=None, recall_mean=None, strategy=None,
                      curve=None, note="not a `powerinfer build` artifact: dense perplexity only")
        return result
    manifest = checkpoint.manifest
    strategy = manifest["strategy"]
    wrappers = [PredictedSparseFFN(block.mlp, strategy["name"], predictor=predictor,
                                   h_threshold=layer["h_threshold"] or 0.0,
                                   n_always_active=layer["n_always_active"],
                                   active_threshold=layer["active_threshold"])
                for block, predictor, layer in zip(model.layers, checkpoint.predictors(device), manifest["layers"])]
    with replaced_ffns(model, wrappers):
        ppl_sparse = perplexity(model, windows, progress, f"{strategy['name']} perplexity")
    recalls = [w.recall for w in wrappers]
    measured = [r for r in recalls if r is not None]
    ffn_sparsity = 1.0 - sum(w.kept for w in wrappers) / sum(w.total for w in wrappers)
    prompt = torch.cat(windows)[:GREEDY_PROMPT_TOKENS]
    result.update(
        ppl_sparse=ppl_sparse, ppl_ratio=ppl_sparse / ppl_dense, ffn_sparsity=ffn_sparsity,
        recall_mean=sum(measured) / len(measured) if measured else None, recall_per_layer=recalls,
        sparsity_per_layer=[w.sparsity for w in wrappers],
        greedy_agreement=greedy_agreement(model, wrappers, prompt, GREEDY_TOKENS),
        greedy_tokens=GREEDY_TOKENS,
        strategy={k: v for k, v in strategy.items() if k != "curve"}, curve=strategy["curve"],
        build={k: manifest["build"][k] for k in ("seconds", "data", "profiled_tokens", "holdout_tokens",
                                                 "max_ppl_increase", "target_sparsity", "keep_massive")},
        source=manifest["source"])
    return result
