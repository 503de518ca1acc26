"""Token sampling: greedy, temperature, top-k, top-p (nucleus), seeded.

Sampling draws with the exponential-race trick (argmax of p / q, q ~ Exp(1)), which needs no
`torch.multinomial` and so no host synchronisation on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from powerinfer.errors import PowerInferError


@dataclass
class SamplingParams:
    temperature: float = 0.7
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    seed: int | None = None

    def __post_init__(self):
        if not (self.temperature >= 0):  # also rejects NaN
            raise PowerInferError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise PowerInferError(f"top_k must be >= 0, got {self.top_k}")
        if not (0 < self.top_p <= 1):
            raise PowerInferError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


class Sampler:
    def __init__(self, params: SamplingParams, device: torch.device):
        self.params = params
        self.generator = torch.Generator(device=device)
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] float32 -> token ids [B]."""
        p = self.params
        if p.greedy:
            return logits.argmax(dim=-1)
        logits = logits / p.temperature
        if p.top_k:
            kth = torch.topk(logits, min(p.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # drop a token when the tokens ranked above it already hold top_p of the mass
            drop = sorted_probs.cumsum(dim=-1) - sorted_probs > p.top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        race = torch.empty_like(probs).exponential_(1.0, generator=self.generator)
        return (probs / race).argmax(dim=-1)
