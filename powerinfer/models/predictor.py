"""Per-layer activation predictor (PowerInfer §5.1; Deja Vu, Liu et al. 2023, arXiv 2310.17157).

A low-rank MLP d -> r -> n_ff that, from the FFN's input (the post-attention RMSNorm output), scores each
FFN neuron; neurons whose logit exceeds the layer's calibrated `threshold` are predicted active. Its output
index i refers to neuron i in the artifact's hot-first order, not the checkpoint's original order.
"""

from __future__ import annotations

import torch
from torch import nn


class ActivationPredictor(nn.Module):
    def __init__(self, hidden_size: int, rank: int, intermediate_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, rank, bias=False)
        self.fc2 = nn.Linear(rank, intermediate_size, bias=True)
        self.register_buffer("threshold", torch.zeros(()))

    @property
    def rank(self) -> int:
        return self.fc1.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d] -> logits [..., n_ff]."""
        return self.fc2(torch.relu(self.fc1(x)))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean mask [..., n_ff] of neurons predicted active."""
        return self(x) > self.threshold
