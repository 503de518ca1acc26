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
import powerinfer  # noqa: F401  (before torch)
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from powerinfer.loading import load_model
from powerinfer.offline.profile import read_text_file, tokenize_text, split_windows
from powerinfer.offline import predictors as P
from powerinfer.models.predictor import ActivationPredictor
torch.set_num_threads(2)
lm = load_model(None, device="cpu", dtype=torch.float32)
model = lm.model
layers = [int(a) for a in sys.argv[1].split(',')]
N = int(sys.argv[2])
text = read_text_file(os.path.join(os.environ.get('POWERINFER_DATA_DIR', '../shared/data'), 'wikitext2-valid.txt'))
tokens = tokenize_text(lm.tokenizer, text, N)
xs = {l: [] for l in layers}
hooks = [model.layers[l].mlp.register_forward_pre_hook(lambda m, a, l=l: xs[l].append(a[0].reshape(-1, a[0].shape[-1]))) for l in layers]
with torch.inference_mode():
    for w in split_windows(tokens, 512):
        model(w[None], torch.arange(len(w)), None)
R = 112
def train(X, Y, W, rank, epochs=20, lr=1e-2, seed=0):
    torch.manual_seed(seed)
    n, d = X.shape; n_ff = Y.shape[1]
    pred = ActivationPredictor(d, rank, n_ff)
    f = Y.float().mean(0).clamp(1e-4, 1-1e-4)
    with torch.no_grad(): pred.fc2.bias.copy_(torch.log(f/(1-f)))
    pos = Y.float().mean()
    pw = ((1-pos)/pos).sqrt().clamp(1, 10)
    opt = torch.optim.AdamW(pred.parameters(), lr=lr, weight_decay=1e-4)
    bs = max(256, n//64)
    steps = epochs*math.ceil(n/bs)
    sch = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=g).split(bs):
            y = Y[idx].float()
            w = None if W is None else W[idx]
            loss = F.binary_cross_entropy_with_logits(pred(X[idx]), y, weight=w, pos_weight=pw)
            opt.zero_grad(); loss.backward(); opt.step(); sch.step()
    return pred.eval()
for l in layers:
    X = torch.cat(xs[l]).clone()
    W_gu = model.layers[l].mlp.gate_up_proj.weight.detach()
    Wd = model.layers[l].mlp.down_proj.weight.detach()
    G = X @ W_gu[:1536].T; U = X @ W_gu[1536:].T
    n = len(X); split = int(0.8*n)
    for S in (0.866, 0.92):
        tau = torch.quantile(G.flatten()[::7], S).item()
        Y = G > tau
        H = torch.where(Y, G, 0) * U
        out = H[split:] @ Wd.T
        A = H.abs()
        def report(name, scores):
            s = scores[split:]; y = Y[split:]
            res = []
            for rec in (0.90, 0.95):
                th = P.calibrate_threshold(s[y], rec)
                r, p, ps = P._metrics(s, y, th)
                m = s > th
                err = ((torch.where(m, H[split:], 0) @ Wd.T - out).norm() / out.norm()).item()
                missed = (A[split:] * (~m)).sum().item() / A[split:].sum().item()
                res.append(f"rec{rec}: sp {ps:.3f} prec {p:.3f} err {err:.3f} missmass {missed:.3f}")
            th = torch.quantile(s.flatten()[::3], 0.80).item()
            r, p, ps = P._metrics(s, y, th)
            res.append(f"@sp.8 rec {r:.3f}")
            print(f"L{l} S{S} {name:>8}: " + " | ".join(res), flush=True)
        t = time.time()
        report("bce", train(X[:split], Y[:split], None, R)(X).detach())
        Wm = (A[:split] / A[:split][Y[:split]].mean()).sqrt().clamp(0.25, 4)
        Wm = torch.where(Y[:split], Wm, 1.0)
        report("mag-bce", train(X[:split], Y[:split], Wm, R)(X).detach())
        print(f"  {time.time()-t:.0f}s", flush=True)
