"""Adaptive activation predictors (PowerInfer §5.1; Deja Vu, Liu et al. 2023, arXiv 2310.17157).

Per layer, an `ActivationPredictor` d -> r -> n_ff is trained with binary cross-entropy to predict the
profiled active set from the FFN input. When the layer's gate matrix is given, training starts from the best
rank-r/2 approximation of the gate pre-activation on the profiled inputs (reduced-rank regression: the top
right singular vectors V of the targets X·Wᵀ give fc1 = ±VᵀW and fc2 = ±V, the ± pairs passing the linear map
through the hidden ReLU); for a ReLU-family layer a neuron is active where its gate pre-activation is
positive, so this starting point already separates most of them, and whichever of it and its fine-tuned
version predicts fewer neurons at the recall target is kept. With `loss="magnitude"` each active sample's
BCE term is weighted by its |h| relative to the layer's mean active |h|, so that the neurons a predictor
misses are the small ones (recall is still counted in neurons).

For a ReLU-family FFN a second kind is tried too: `QuantizedGatePredictor`, the gate pre-activation from a
4-bit copy of the gate matrix (kernels.quantized; SparseInfer, arXiv 2411.12692, uses sign bits only). It needs
no training, only its threshold calibrated, and at ~9% of the FFN's 16-bit bytes it sees what decides
activity itself rather than a rank-r shadow of it; measured on a ReLU-fied SmolLM2, recall 0.90 at 0.889
predicted sparsity and precision 0.93, where rank-112 MLPs reached 0.74-0.76 (docs/OFFLINE.md).

PowerInfer sizes each layer's predictor from its sparsity and skew; here the size comes from a measured
cost instead: ranks from a ladder are tried smallest first,
each with its decision threshold calibrated on held-out tokens so that it keeps `recall` of the truly
active neurons, and the climb stops at the first rank whose expected per-token work — predictor weights
plus the FFN rows of predicted-active neurons — does not beat the previous rank's. A sparse, skewed layer
thus earns a larger predictor; a dense or unpredictable one keeps the smallest. No layer's predictor
exceeds `max_fraction` (10%) of its FFN's size (both counted in 16-bit words), so the total stays within
that share too. The layer keeps whichever kind costs least per token.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from powerinfer.errors import PowerInferError
from powerinfer.models.predictor import (PREDICTOR_KINDS, ActivationPredictor, QuantizedGatePredictor,
                                         predictor_state)

RANK_LADDER = (16, 32, 64, 128, 256, 512, 1024)
LOSSES = ("count", "magnitude")  # how active samples are weighted in the BCE (module docstring)
KIND_CHOICES = ("auto", *PREDICTOR_KINDS)  # auto: every kind the layer allows, the cheapest kept
GATE_DECIDES = ("relu", "drelu")  # activations whose active set the gate pre-activation decides (or bounds)
RECALL_TARGETS = (0.99, 0.95)  # stricter operating points the build also measures
HOLDOUT_FRACTION = 0.2
MAX_POS_WEIGHT = 10.0
STEPS_PER_EPOCH = 64
PRECISE_ENOUGH = 0.99


def recall_targets(recall: float) -> list[float]:
    """The operating points measured for a recall floor: `recall` and the stricter standard targets."""
    return sorted({recall, *(t for t in RECALL_TARGETS if t >= recall)}, reverse=True)


def predictor_parameters(d: int, rank: int, n_ff: int) -> int:
    return rank * (d + n_ff) + n_ff


def predictor_nbytes(kind: str, d: int, n_ff: int, rank: int, dtype_bytes: int) -> int:
    """Bytes of one predictor whose floating-point tensors are stored `dtype_bytes` wide."""
    if kind == QuantizedGatePredictor.kind:
        return n_ff * d // 2 + dtype_bytes * n_ff * (d // QuantizedGatePredictor.group_size_for(d))
    return dtype_bytes * predictor_parameters(d, rank, n_ff)


def quantized_gate_words(d: int, n_ff: int) -> int:
    """An int4-gate predictor's size in 16-bit words: packed nibbles plus one 16-bit scale per group."""
    return predictor_nbytes(QuantizedGatePredictor.kind, d, n_ff, 0, 2) // 2


@dataclass
class LayerReport:
    rank: int  # 0 for the int4-gate kind
    recall: float  # on held-out tokens, at `threshold`
    precision: float
    predicted_sparsity: float
    sparsity: float  # true sparsity of the held-out tokens
    threshold: float
    parameters: int  # size in 16-bit words (a low-rank predictor's parameter count)
    thresholds: dict = field(default_factory=dict)  # str(recall target) -> logit threshold
    points: dict = field(default_factory=dict)  # str(recall target) -> (recall, precision, predicted sparsity)
    tried: list = field(default_factory=list)  # per candidate: kind, rank, predicted_sparsity, cost
    kind: str = ActivationPredictor.kind

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items()}

    def at(self, target: float) -> LayerReport:
        """This report at another of its measured recall targets (threshold and held-out metrics)."""
        recall, precision, predicted_sparsity = self.points[str(target)]
        return replace(self, threshold=self.thresholds[str(target)], recall=recall, precision=precision,
                       predicted_sparsity=predicted_sparsity)


def calibrate_thresholds(active_logits: torch.Tensor, recalls) -> dict[float, float]:
    """Per recall target, the largest logit threshold whose `logit > threshold` rule keeps at least that share
    of the actives (one sort, on the logits' device)."""
    if active_logits.numel() == 0:
        return {r: 1e9 for r in recalls}  # never active on held-out tokens: predict never active
    values = active_logits.float().flatten().sort().values
    below = torch.tensor(-math.inf, device=values.device)
    # actives allowed below the threshold: floor((1 - recall) * n)
    return {r: float(torch.nextafter(values[math.floor((1.0 - r) * values.numel())], below).item()) for r in recalls}


def calibrate_threshold(active_logits: torch.Tensor, recall: float) -> float:
    """The largest logit threshold whose `logit > threshold` rule keeps at least `recall` of the actives."""
    return calibrate_thresholds(active_logits, [recall])[recall]


def _metrics(logits: torch.Tensor, labels: torch.Tensor, threshold: float) -> tuple[float, float, float]:
    predicted = logits > threshold
    true_positive = (predicted & labels).sum().item()
    recall = true_positive / max(labels.sum().item(), 1)
    precision = true_positive / max(predicted.sum().item(), 1)
    return recall, precision, 1.0 - predicted.float().mean().item()


def gate_initialized(inputs: torch.Tensor, gate: torch.Tensor, rank: int, seed: int = 0) -> ActivationPredictor:
    """A predictor computing the best rank-(rank // 2) approximation of `inputs @ gate.T` (module docstring)."""
    k = rank // 2
    gate = gate.to(inputs.device, torch.float32)
    targets = inputs @ gate.T
    torch.manual_seed(seed)  # svd_lowrank's random projection: builds must not depend on earlier RNG use
    _, _, v = torch.svd_lowrank(targets, q=min(k + 8, *targets.shape), niter=4)
    v = v[:, :k]
    predictor = ActivationPredictor(inputs.shape[1], rank, gate.shape[0]).to(inputs.device)
    with torch.no_grad():
        predictor.fc1.weight.zero_()
        predictor.fc2.weight.zero_()
        predictor.fc2.bias.zero_()
        down, up = v, v.T @ gate
        predictor.fc1.weight[:2 * k].copy_(torch.cat([up, -up]))
        predictor.fc2.weight[:, :2 * k].copy_(torch.cat([down, -down], 1))
    return predictor


def _train(inputs: torch.Tensor, labels: torch.Tensor, rank: int, epochs: int, batch_size: int,
           lr: float, seed: int, start: ActivationPredictor | None = None,
           weights: torch.Tensor | None = None) -> ActivationPredictor:
    torch.manual_seed(seed)
    n, d = inputs.shape
    n_ff = labels.shape[1]
    if start is not None:
        predictor = copy.deepcopy(start).train()
    else:
        predictor = ActivationPredictor(d, rank, n_ff).to(inputs.device)
        frequency = labels.float().mean(0).clamp(1e-4, 1 - 1e-4)
        with torch.no_grad():  # start from each neuron's base rate
            predictor.fc2.bias.copy_(torch.log(frequency / (1 - frequency)))
    positives = labels.float().mean().clamp_min(1e-6)
    # rare actives: weight them up (square root of the class ratio, capped) so that recall is learnable
    pos_weight = ((1 - positives) / positives).sqrt().clamp(1.0, MAX_POS_WEIGHT)
    optimizer = torch.optim.AdamW(predictor.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(n / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator(inputs.device).manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=generator, device=inputs.device).split(batch_size):
            loss = F.binary_cross_entropy_with_logits(predictor(inputs[idx]), labels[idx].float(),
                                                      None if weights is None else weights[idx],
                                                      pos_weight=pos_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return predictor.eval()


@dataclass
class _Candidate:
    """A trained predictor and its held-out metrics at the calibrated threshold."""
    predictor: ActivationPredictor
    logits: torch.Tensor
    threshold: float
    recall: float
    precision: float
    predicted_sparsity: float
    thresholds: dict  # str(recall target) -> threshold, the targets of `recall_targets`
    points: dict  # str(recall target) -> (recall, precision, predicted sparsity) at that threshold


def train_layer_predictor(inputs: torch.Tensor, labels: torch.Tensor, recall: float = 0.95,
                          gate: torch.Tensor | None = None, magnitudes: torch.Tensor | None = None,
                          kinds: tuple[str, ...] = (ActivationPredictor.kind,),
                          ladder=RANK_LADDER, max_fraction: float = 0.1,
                          epochs: int = 20, batch_size: int = 256, lr: float = 1e-2, device="cpu",
                          seed: int = 0
                          ) -> tuple[torch.nn.Module, LayerReport]:
    """One layer's predictor from (FFN input, active set) samples, of the cheapest of `kinds`. The low-rank
    kind starts from `gate` (the layer's [n_ff, d] gate matrix, checkpoint neuron order) when given and
    weights each active sample by `magnitudes` (|h| of the samples, [n, n_ff]) when given; the int4-gate
    kind quantizes `gate`. See the module docstring."""
    n, d = inputs.shape
    n_ff = labels.shape[1]
    if n < 10:
        raise PowerInferError(f"only {n} profiled tokens per layer; profile more text to train predictors")
    if gate is not None and tuple(gate.shape) != (n_ff, d):
        raise PowerInferError(f"gate matrix of shape {tuple(gate.shape)} does not match the profile's "
                              f"{n_ff} neurons x {d} inputs")
    if QuantizedGatePredictor.kind in kinds and (gate is None or QuantizedGatePredictor.group_size_for(d) is None):
        raise PowerInferError("the int4-gate predictor needs the layer's gate matrix and a hidden size "
                              "divisible by 32")
    if magnitudes is not None and tuple(magnitudes.shape) != tuple(labels.shape):
        raise PowerInferError(f"magnitudes of shape {tuple(magnitudes.shape)} for labels {tuple(labels.shape)}")
    split = n - max(1, round(HOLDOUT_FRACTION * n))
    batch_size = max(batch_size, split // STEPS_PER_EPOCH)  # many tokens: bigger batches, not more steps
    x = inputs.to(device=device, dtype=torch.float32)
    y = labels.to(device)
    held_inputs, held_labels = x[split:], y[split:]
    ffn_parameters = 3 * d * n_ff

    targets = recall_targets(recall)

    def evaluated(predictor) -> _Candidate:
        with torch.no_grad():
            logits = predictor(held_inputs)
        thresholds = calibrate_thresholds(logits[held_labels], targets)
        threshold = thresholds[recall]
        points = {str(t): _metrics(logits, held_labels, v) for t, v in thresholds.items()}
        return _Candidate(predictor, logits, threshold, *points[str(recall)],
                          {str(t): v for t, v in thresholds.items()}, points)

    best, tried = None, []

    def consider(candidate: _Candidate, kind: str, rank: int, size: int, **notes) -> float:
        """Record the candidate and keep it if it is the cheapest so far; returns its cost per token."""
        nonlocal best
        cost = size + (1 - candidate.predicted_sparsity) * ffn_parameters
        tried.append({"kind": kind, "rank": rank, "predicted_sparsity": candidate.predicted_sparsity,
                      "cost": cost, **notes})
        if best is None or cost < best[0]:
            report = LayerReport(rank, candidate.recall, candidate.precision, candidate.predicted_sparsity,
                                 1 - held_labels.float().mean().item(), candidate.threshold, size,
                                 candidate.thresholds, candidate.points, kind=kind)
            best = (cost, candidate.predictor.eval(), report)
        return cost

    if QuantizedGatePredictor.kind in kinds:  # no training: quantize and calibrate
        group = QuantizedGatePredictor.group_size_for(d)
        consider(evaluated(QuantizedGatePredictor.from_gate(gate.to(device), group)),
                 QuantizedGatePredictor.kind, 0, quantized_gate_words(d, n_ff))
    if ActivationPredictor.kind in kinds:
        _climb_ladder(x[:split], y[:split], magnitudes, gate, ladder, max_fraction * ffn_parameters,
                      evaluated, consider, dict(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed))
    _, predictor, report = best
    report.tried = tried
    predictor.threshold.fill_(report.threshold)
    return predictor.cpu(), report


def _climb_ladder(x, y, magnitudes, gate, ladder, budget, evaluated, consider, train_options) -> None:
    """Low-rank predictors of increasing rank until one costs no less than the rank before it."""
    n_ff, d = y.shape[1], x.shape[1]
    weights = None
    if magnitudes is not None:
        magnitude = magnitudes[:x.shape[0]].to(x.device, torch.float32)
        scale = magnitude[y].mean().clamp_min(1e-12)
        weights = torch.where(y, (magnitude / scale).clamp(max=MAX_POS_WEIGHT), 1.0)
    ranks = [r for r in ladder if predictor_parameters(d, r, n_ff) <= budget]
    # the ladder's next step may just miss the budget: also try the largest rank within it (a multiple of 16)
    largest = int((budget - n_ff) // (d + n_ff))
    largest = largest - largest % 16 if largest >= 16 else max(1, largest)
    if not ranks or (largest > ranks[-1] and largest < max(ladder)):
        ranks.append(largest)
    previous = None
    for rank in ranks:
        from_gate = gate is not None and rank >= 2
        if from_gate:
            start = evaluated(gate_initialized(x, gate, rank, train_options["seed"]))
            candidates = [start]
            if start.precision < PRECISE_ENOUGH:  # else fine-tuning has no false positives left to remove
                candidates.append(evaluated(_train(x, y, rank, start=start.predictor, weights=weights,
                                                   **train_options)))
        else:
            candidates = [evaluated(_train(x, y, rank, weights=weights, **train_options))]
        chosen = max(candidates, key=lambda c: c.predicted_sparsity)
        cost = consider(chosen, ActivationPredictor.kind, rank, predictor_parameters(d, rank, n_ff),
                        start="gate" if from_gate else "random",
                        fine_tuned=not from_gate or chosen is not candidates[0])
        if previous is not None and cost >= previous:
            break
        previous = cost


def ffn_gate(ffn) -> torch.Tensor:
    """The [n_ff, d] gate matrix of a FeedForward (the first half of its fused gate/up projection)."""
    return ffn.gate_up_proj.weight.detach().chunk(2)[0]


def ffn_magnitudes(ffn, inputs: torch.Tensor) -> torch.Tensor:
    """|h| [n, n_ff] of a FeedForward for its inputs [n, d], as float32."""
    from powerinfer.models.llama import ffn_activation

    weight = ffn.gate_up_proj.weight
    with torch.no_grad():
        gate, up = F.linear(inputs.to(weight.device, weight.dtype), weight).chunk(2, dim=-1)
        return ffn_activation(gate, up, ffn.activation, ffn.threshold).abs().float()


def layer_kinds(kind: str, ffn, hidden_size: int) -> tuple[str, ...]:
    """The predictor kinds to try for a layer: `kind`, or for "auto" every kind the layer allows (the
    int4-gate one where the FFN's gate decides activity and its width splits into scale groups)."""
    if kind not in KIND_CHOICES:
        raise PowerInferError(f"unknown predictor kind {kind!r} (choose from {', '.join(KIND_CHOICES)})")
    gate_ok = (ffn is not None and ffn.activation in GATE_DECIDES
               and QuantizedGatePredictor.group_size_for(hidden_size) is not None)
    if kind == QuantizedGatePredictor.kind and not gate_ok:
        raise PowerInferError(f"the {kind} predictor needs a ReLU-family model ({', '.join(GATE_DECIDES)}) "
                              "with a hidden size divisible by 32, and its FFN weights")
    if kind != "auto":
        return (kind,)
    return tuple(PREDICTOR_KINDS) if gate_ok else (ActivationPredictor.kind,)


def train_predictors(inputs: list[torch.Tensor], labels: list[torch.Tensor], recall: float = 0.95,
                     max_fraction: float = 0.1, ffns: list | None = None, loss: str = "count",
                     kind: str = "auto", device="cpu", seed: int = 0, progress: bool = False,
                     **kwargs) -> tuple[list[torch.nn.Module], list[LayerReport]]:
    """One predictor per layer from the profile's samples; with the model's FeedForward modules (`ffns`),
    low-rank ones start from the layer's gate matrix, `loss="magnitude"` weights active samples by |h|, and
    ReLU-family layers may take the int4-gate kind (`kind`: see `layer_kinds`)."""
    if not 0 < recall <= 1:
        raise PowerInferError(f"--recall must be in (0, 1], got {recall}")
    if loss not in LOSSES:
        raise PowerInferError(f"unknown predictor loss {loss!r} (choose from {', '.join(LOSSES)})")
    if ffns is None and loss == "magnitude":
        raise PowerInferError("the magnitude-weighted predictor loss needs the model's FFN weights")
    if ffns is not None and len(ffns) != len(inputs):
        raise PowerInferError(f"{len(ffns)} FFNs for a profile of {len(inputs)} layers")
    layers = range(len(inputs))
    if progress:
        from tqdm import tqdm
        layers = tqdm(layers, desc="training predictors", unit="layer", leave=False)
    predictors, reports = [], []
    for i in layers:
        ffn = None if ffns is None else ffns[i]
        kinds = layer_kinds(kind, ffn, inputs[i].shape[1])
        gate = None if ffn is None else ffn_gate(ffn)
        magnitudes = (ffn_magnitudes(ffn, inputs[i]) if loss == "magnitude" and ActivationPredictor.kind in kinds
                      else None)
        predictor, report = train_layer_predictor(inputs[i], labels[i], recall, gate=gate, magnitudes=magnitudes,
                                                  kinds=kinds, max_fraction=max_fraction, device=device,
                                                  seed=seed + i, **kwargs)
        predictors.append(predictor)
        reports.append(report)
    return predictors, reports


def format_predictor_table(reports: list[LayerReport]) -> str:
    lines = [f"{'layer':>5}  {'rank':>5}  {'recall':>6}  {'precision':>9}  {'pred. sparsity':>14}  {'sparsity':>8}"]
    for i, r in enumerate(reports):
        size = r.rank if r.kind == ActivationPredictor.kind else "int4"
        lines.append(f"{i:>5}  {size:>5}  {r.recall:>6.3f}  {r.precision:>9.3f}  "
                     f"{r.predicted_sparsity:>14.3f}  {r.sparsity:>8.3f}")
    n = len(reports)
    lines.append(f"{'mean':>5}  {'':>5}  {sum(r.recall for r in reports) / n:>6.3f}  "
                 f"{sum(r.precision for r in reports) / n:>9.3f}  "
                 f"{sum(r.predicted_sparsity for r in reports) / n:>14.3f}  {sum(r.sparsity for r in reports) / n:>8.3f}")
    return "\n".join(lines)


def save_predictors(predictors: list[torch.nn.Module], reports: list[LayerReport], directory: Path) -> None:
    """predictors.safetensors (checkpoint neuron order) and predictors.json next to a profile."""
    from safetensors.torch import save_file

    from powerinfer.loading.artifact import write_json_atomic

    tensors = {f"layers.{i}.{k}": v for i, p in enumerate(predictors) for k, v in predictor_state(p).items()}
    tmp = directory / ".predictors.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(directory / "predictors.safetensors")
    write_json_atomic(directory / "predictors.json", {"layers": [r.to_json() for r in reports]})
