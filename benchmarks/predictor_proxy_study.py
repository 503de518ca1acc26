"""How far can a low-rank predictor go on a ReLU-like FFN of SmolLM2's size? A CPU proxy study (no ReLU model needed).

SmolLM2's own gate pre-activations g = W_g x (x: the real FFN inputs on WikiText-2 validation text) are
thresholded at the quantile S of all (token, neuron) values, so a fraction 1 - S of neurons is "active",
as in a ReLU model with a shifted threshold (FATReLU). Per layer, a rank-112 predictor (the largest within
10% of the FFN's parameters) is trained on 80% of the tokens with the project's BCE recipe, plain and with
active samples weighted by sqrt(|h|) (magnitude-weighted), and evaluated on the rest: predicted sparsity and
precision at recall 0.90 / 0.95, the FFN output's relative error when only predicted neurons are computed
(h = g * [g > tau] * u), the share of |h| mass missed, and recall at 80% predicted sparsity.

    PYTHONPATH=. python benchmarks/predictor_proxy_study.py 4,15 16384
"""

import math
import os
import sys
import time

import powerinfer  # noqa: F401  (first: sets the OpenMP spin before torch loads)
import torch
import torch.nn.functional as F

from powerinfer.loading import load_model
from powerinfer.models.predictor import ActivationPredictor
from powerinfer.offline import predictors
from powerinfer.offline.profile import read_text_file, split_windows, tokenize_text

RANK = 112
TRAIN_SHARE = 0.8


def ffn_inputs(model, tokens: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """Each layer's FFN inputs [tokens, d] over the text, in 512-token windows."""
    inputs = {layer: [] for layer in layers}
    hooks = [model.layers[layer].mlp.register_forward_pre_hook(
        lambda module, args, layer=layer: inputs[layer].append(args[0].reshape(-1, args[0].shape[-1])))
        for layer in layers]
    with torch.inference_mode():
        for window in split_windows(tokens, 512):
            model(window[None], torch.arange(len(window)), None)
    for hook in hooks:
        hook.remove()
    return {layer: torch.cat(xs).clone() for layer, xs in inputs.items()}


def train(x, active, weight, rank, epochs=20, lr=1e-2, seed=0) -> ActivationPredictor:
    """The project's BCE recipe: bias from the activation frequency, balanced positives, one-cycle AdamW."""
    torch.manual_seed(seed)
    n, d = x.shape
    predictor = ActivationPredictor(d, rank, active.shape[1])
    frequency = active.float().mean(0).clamp(1e-4, 1 - 1e-4)
    with torch.no_grad():
        predictor.fc2.bias.copy_(torch.log(frequency / (1 - frequency)))
    positive = active.float().mean()
    pos_weight = ((1 - positive) / positive).sqrt().clamp(1, 10)
    optimizer = torch.optim.AdamW(predictor.parameters(), lr=lr, weight_decay=1e-4)
    batch = max(256, n // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * math.ceil(n / batch),
                                                   pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=g).split(batch):
            loss = F.binary_cross_entropy_with_logits(predictor(x[idx]), active[idx].float(),
                                                      weight=None if weight is None else weight[idx],
                                                      pos_weight=pos_weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return predictor.eval()


def report(name: str, label: str, scores, active, h, w_down, split: int) -> None:
    """Held-out metrics of `scores` (see the module docstring), one line."""
    scores, labels, h_test = scores[split:], active[split:], h[split:]
    out = h_test @ w_down.T
    magnitude = h_test.abs()
    parts = []
    for recall in (0.90, 0.95):
        threshold = predictors.calibrate_threshold(scores[labels], recall)
        _, precision, sparsity = predictors._metrics(scores, labels, threshold)
        kept = scores > threshold
        error = ((torch.where(kept, h_test, 0) @ w_down.T - out).norm() / out.norm()).item()
        missed = (magnitude * ~kept).sum().item() / magnitude.sum().item()
        parts.append(f"rec{recall}: sp {sparsity:.3f} prec {precision:.3f} err {error:.3f} missmass {missed:.3f}")
    recall_at_80, _, _ = predictors._metrics(scores, labels, torch.quantile(scores.flatten()[::3], 0.80).item())
    parts.append(f"@sp.8 rec {recall_at_80:.3f}")
    print(f"{label} {name:>8}: " + " | ".join(parts), flush=True)


def main() -> None:
    layers = [int(a) for a in sys.argv[1].split(",")]
    n_tokens = int(sys.argv[2])
    torch.set_num_threads(2)
    loaded = load_model(None, device="cpu", dtype=torch.float32)
    data_dir = os.environ.get("POWERINFER_DATA_DIR", "../shared/data")
    tokens = tokenize_text(loaded.tokenizer, read_text_file(os.path.join(data_dir, "wikitext2-valid.txt")), n_tokens)
    inputs = ffn_inputs(loaded.model, tokens, layers)
    n_ff = loaded.args.intermediate_size
    for layer, x in inputs.items():
        mlp = loaded.model.layers[layer].mlp
        w_gate_up, w_down = mlp.gate_up_proj.weight.detach(), mlp.down_proj.weight.detach()
        gate, up = x @ w_gate_up[:n_ff].T, x @ w_gate_up[n_ff:].T
        split = int(TRAIN_SHARE * len(x))
        for quantile in (0.866, 0.92):
            tau = torch.quantile(gate.flatten()[::7], quantile).item()
            active = gate > tau
            h = torch.where(active, gate, 0) * up
            label = f"L{layer} S{quantile}"
            started = time.time()
            plain = train(x[:split], active[:split], None, RANK)
            report("bce", label, plain(x).detach(), active, h, w_down, split)
            magnitude = h[:split].abs()
            weight = (magnitude / magnitude[active[:split]].mean()).sqrt().clamp(0.25, 4)
            weighted = train(x[:split], active[:split], torch.where(active[:split], weight, 1.0), RANK)
            report("mag-bce", label, weighted(x).detach(), active, h, w_down, split)
            print(f"  {time.time() - started:.0f}s", flush=True)


if __name__ == "__main__":
    main()
