"""The training loop shared by the offline tools (ReLU-fication, the tiny test model).

AdamW with linear warm-up and cosine decay; bf16 autocast on CUDA; forward hooks on every FFN measure the
share of neurons whose output is exactly zero — the activation sparsity PowerInfer exploits (Song et al.
2023, arXiv 2312.12456, §2) — and can add ProSparse's L1 penalty on the activation outputs, its
coefficient ramped up over training (Song et al. 2024, arXiv 2402.13516, §3.2). The budget is a number of
steps, a wall-clock time, or both; the training state is checkpointed atomically every few steps and on
Ctrl-C, and a restart resumes from it. `batch_at(step)` must be a pure function of the step, so that a
resumed run sees the same data as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from powerinfer.errors import PowerInferError
from powerinfer.models.llama import ffn_activation
from powerinfer.offline.checkpoint import (load_training_state, read_training_state_header, run_key,
                                           save_training_state)


@dataclass
class TrainConfig:
    batch_size: int = 8                # sequences per optimizer step
    micro_batch_size: int | None = None  # sequences per forward pass (gradient accumulation); None: all
    seq_len: int = 512
    max_steps: int | None = None       # at least one of max_steps and max_minutes
    max_minutes: float | None = None
    lr: float = 2e-4
    min_lr_ratio: float = 0.1          # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    l1: float = 0.0                    # final coefficient of the activation L1 penalty
    l1_ramp: float = 0.5               # the coefficient grows linearly until this fraction of training
    save_every: int = 200              # checkpoint every this many steps ...
    save_minutes: float = 5.0          # ... or this many minutes, whichever comes first
    eval_every: int = 0                # call eval_fn every this many steps (0: only at the end)
    seed: int = 0

    def __post_init__(self):
        if not (self.max_steps or self.max_minutes):
            raise PowerInferError("a positive training budget is needed: a number of tokens or of minutes")
        self.micro_batch_size = min(self.micro_batch_size or self.batch_size, self.batch_size)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def progress(self, step: int, elapsed_s: float) -> float:
        """Fraction of the budget spent: the larger of the step and the time fractions."""
        by_steps = step / self.max_steps if self.max_steps else 0.0
        by_time = elapsed_s / (60 * self.max_minutes) if self.max_minutes else 0.0
        return max(by_steps, by_time)

    def lr_at(self, step: int, progress: float) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine)

    def l1_at(self, progress: float) -> float:
        if not self.l1:
            return 0.0
        return self.l1 * min(1.0, progress / self.l1_ramp) if self.l1_ramp > 0 else self.l1


def keyed_generator(seed: int, *key: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A random generator determined by (seed, key): batches that depend only on the step number."""
    digest = hashlib.sha256(repr((seed,) + key).encode()).digest()[:8]
    return torch.Generator(device).manual_seed(int.from_bytes(digest, "little") >> 1)


def random_windows(data: torch.Tensor, count: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """`count` windows of `length` tokens at uniformly random offsets of the stream `data`."""
    starts = torch.randint(0, len(data) - length + 1, (count,), generator=generator)
    return torch.stack([data[s:s + length] for s in starts.tolist()])


def activation_l1(gate: torch.Tensor, up: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean absolute output of the FFN's activation function (ProSparse's regulariser; on the plain ReLU gate
    also under FATReLU, so that gates just below the threshold are pushed down too)."""
    if kind == "relu":
        return F.relu(gate).mean()
    if kind == "drelu":  # either factor at zero silences the neuron: push both
        return 0.5 * (F.relu(gate).mean() + F.relu(up).mean())
    return ffn_activation(gate, up, kind).abs().mean()


class ActivationMonitor:
    """Forward hooks on every layer's fused gate/up projection.

    Counts neuron outputs act(gate) * up that are exactly zero (overall, and per neuron when
    `count_neurons`), and while `penalize` is set collects the L1 penalty of each layer for the loss.
    """

    def __init__(self, model: torch.nn.Module, count_neurons: bool = False):
        self.kind, self.threshold = model.args.hidden_act, model.args.relu_threshold
        self.penalize = False
        self.penalties: list[torch.Tensor] = []
        self.zeros: torch.Tensor | int = 0
        self.total = 0
        self.neuron_counts = None  # per layer: how often each neuron was active
        self.rows = 0
        if count_neurons:
            self.neuron_counts = [torch.zeros(model.args.intermediate_size, dtype=torch.float64,
                                              device=layer.mlp.gate_up_proj.weight.device)
                                  for layer in model.layers]
        self._handles = [layer.mlp.gate_up_proj.register_forward_hook(partial(self._hook, i))
                         for i, layer in enumerate(model.layers)]

    def _hook(self, layer: int, module, inputs, output):
        gate, up = output.chunk(2, dim=-1)
        if self.penalize:
            self.penalties.append(activation_l1(gate, up, self.kind))
        with torch.no_grad():
            active = ffn_activation(gate, up, self.kind, self.threshold) != 0
            self.zeros = self.zeros + (~active).sum()
            self.total += active.numel()
            if self.neuron_counts is not None:
                active = active.reshape(-1, active.shape[-1])
                self.neuron_counts[layer] += active.sum(0, dtype=torch.float64)
                if layer == 0:
                    self.rows += active.shape[0]

    def take_penalty(self) -> torch.Tensor | None:
        """Mean over layers of the penalties collected since the last call."""
        if not self.penalties:
            return None
        penalty = torch.stack(self.penalties).mean()
        self.penalties = []
        return penalty

    def take_sparsity(self) -> float:
        """Share of zero neuron outputs since the last call."""
        sparsity = float(self.zeros) / self.total if self.total else 0.0
        self.zeros, self.total = 0, 0
        return sparsity

    def remove(self):
        for handle in self._handles:
            handle.remove()


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; full precision elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def share_of_neurons_for(counts: torch.Tensor, mass: float = 0.8) -> float:
    """Skew: the smallest share of neurons that together account for `mass` of all activations."""
    ordered = counts.sort(descending=True).values
    total = float(ordered.sum())
    if total == 0:
        return 0.0
    needed = int(torch.searchsorted(ordered.cumsum(0), torch.tensor(mass * total, dtype=ordered.dtype,
                                                                     device=ordered.device)))
    return (needed + 1) / len(ordered)


@torch.no_grad()
def measure_sparsity_and_ppl(model: torch.nn.Module, ids: list[int] | torch.Tensor, seq_len: int = 512,
                             batch_size: int = 8, max_tokens: int | None = None,
                             progress: bool = False) -> dict:
    """Perplexity and FFN activation sparsity on a token stream, in full precision.

    The stream is cut into non-overlapping windows of `seq_len` tokens (the tail shorter than a window is
    dropped); every token but each window's first is predicted. Sparsity is the share of neuron outputs
    act(gate) * up that are exactly zero, over all layers and positions.
    """
    device = next(model.parameters()).device
    ids = torch.as_tensor(ids, dtype=torch.long)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n_windows = len(ids) // seq_len
    if n_windows == 0:
        raise PowerInferError(f"the evaluation text has {len(ids)} tokens, "
                              f"fewer than one window of {seq_len}")
    windows = ids[:n_windows * seq_len].view(n_windows, seq_len)
    was_training = model.training
    model.eval()
    monitor = ActivationMonitor(model, count_neurons=True)
    nll, predicted = 0.0, 0
    positions = torch.arange(seq_len, device=device)
    batches = windows.split(batch_size)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc="measuring", unit="batch", leave=False)
    try:
        for batch in batches:
            batch = batch.to(device)
            logits = model(batch, positions)
            nll += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(),
                                         reduction="sum"))
            predicted += batch[:, 1:].numel()
    finally:
        monitor.remove()
        model.train(was_training)
    layer_sparsity = [1 - float(c.sum()) / (monitor.rows * len(c)) for c in monitor.neuron_counts]
    layer_skew = [share_of_neurons_for(c) for c in monitor.neuron_counts]
    return {"ppl": math.exp(nll / predicted), "nll": nll / predicted, "tokens": predicted + n_windows,
            "seq_len": seq_len, "sparsity": sum(layer_sparsity) / len(layer_sparsity),
            "layer_sparsity": layer_sparsity,
            "neuron_share_for_80pct_activations": sum(layer_skew) / len(layer_skew),
            "layer_neuron_share_for_80pct_activations": layer_skew}


@dataclass
class TrainResult:
    steps: int
    tokens: int
    elapsed_s: float
    resumed_from_step: int
    last_loss: float
    last_sparsity: float
    evaluations: list[dict] = field(default_factory=list)


def train(model: torch.nn.Module, batch_at: Callable[[int], torch.Tensor],
          loss_fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor], config: TrainConfig, *,
          state_file: Path | None = None, run_config: dict | None = None, resume: bool = True,
          eval_fn: Callable[[torch.nn.Module], dict] | None = None, log_file: Path | None = None,
          desc: str = "training", show_progress: bool = True) -> TrainResult:
    """Optimise `loss_fn(model, batch_at(step)) + L1 penalty` until the budget is spent.

    `state_file`: where the training state is checkpointed; with `resume`, a checkpoint there from a run
    with the same `run_config` is continued (one from a different run is an error).
    """
    from tqdm import tqdm

    device = next(model.parameters()).device
    run_config = {**(run_config or {}), "train": asdict(config)}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas,
                                  fused=device.type == "cuda")
    step, tokens, elapsed = 0, 0, 0.0
    evaluations: list[dict] = []
    if state_file is not None and Path(state_file).exists():
        if not resume:
            Path(state_file).unlink()
        else:
            header = read_training_state_header(state_file)
            if header.get("run_key") != run_key(run_config):
                raise PowerInferError(f"{state_file} holds a checkpoint of a different run; pass --no-resume "
                                      "to start over, or write to another output directory")
            _, state = load_training_state(state_file, device)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            step, tokens, elapsed = state["step"], state["tokens"], state["elapsed_s"]
            evaluations = json.loads(state["evaluations"])
    resumed_from = step

    def save():
        if state_file is not None:
            save_training_state(state_file, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                             "step": step, "tokens": tokens, "elapsed_s": elapsed,
                                             "evaluations": json.dumps(evaluations)}, run_config, step)

    def log(record: dict):
        if log_file is not None:
            with open(log_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def evaluate():
        record = {"step": step, "tokens": tokens, "elapsed_s": round(elapsed, 1), **eval_fn(model)}
        evaluations.append(record)
        log({"event": "eval", **record})
        return record

    monitor = ActivationMonitor(model)
    model.train()
    bar = tqdm(total=config.max_steps, initial=step, desc=desc, unit="step", disable=not show_progress,
               dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 10.0)  # logs: a line per 10 s
    session_start, session_tokens, last_save = time.perf_counter(), 0, time.perf_counter()
    step_start = time.perf_counter()
    loss_value = sparsity = float("nan")
    consistent = True  # False while the optimizer is updating: an interrupt then must not save
    try:
        while config.progress(step, elapsed) < 1.0:
            progress = config.progress(step, elapsed)
            for group in optimizer.param_groups:
                group["lr"] = config.lr_at(step, progress)
            l1 = config.l1_at(progress)
            monitor.penalize = l1 > 0
            batch = batch_at(step)
            micro_batches = batch.split(config.micro_batch_size)
            loss_sum = torch.zeros((), device=device)
            for micro in micro_batches:
                with autocast_for(device):
                    loss = loss_fn(model, micro.to(device))
                penalty = monitor.take_penalty()
                total = loss + l1 * penalty if penalty is not None else loss
                (total * (len(micro) / len(batch))).backward()
                loss_sum += loss.detach() * len(micro)
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            consistent = False
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += batch.numel()
            now = time.perf_counter()
            elapsed += now - step_start
            step_start = now
            consistent = True
            session_tokens += batch.numel()
            loss_value, sparsity = float(loss_sum) / len(batch), monitor.take_sparsity()
            tok_s = session_tokens / (now - session_start)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", sparsity=f"{sparsity:.3f}", tok_s=f"{tok_s:,.0f}",
                            **({"l1": f"{l1:.2g}"} if l1 else {}), refresh=False)
            log({"event": "step", "step": step, "tokens": tokens, "elapsed_s": round(elapsed, 2),
                 "loss": loss_value, "sparsity": sparsity, "lr": optimizer.param_groups[0]["lr"],
                 "l1": l1, "tokens_per_s": tok_s})
            if eval_fn is not None and config.eval_every and step % config.eval_every == 0:
                evaluate()
                step_start = time.perf_counter()  # evaluation time is not training time
            if step % config.save_every == 0 or now - last_save > 60 * config.save_minutes:
                save()
                last_save = step_start = time.perf_counter()
    except KeyboardInterrupt:
        if consistent:
            save()
            bar.write(f"interrupted: training state saved at step {step}; rerun the same command to resume")
        raise
    finally:
        monitor.remove()
        bar.close()
    if eval_fn is not None and (not evaluations or evaluations[-1]["step"] != step):
        evaluate()
    save()
    return TrainResult(step, tokens, elapsed, resumed_from, loss_value, sparsity, evaluations)
