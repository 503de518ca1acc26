"""Per-layer activation predictors (PowerInfer §5.1; Deja Vu, Liu et al. 2023, arXiv 2310.17157).

Each scores every FFN neuron from the FFN's input (the post-attention RMSNorm output); neurons whose score
exceeds the layer's calibrated `threshold` are predicted active. Output index i refers to neuron i in the
artifact's hot-first order, not the checkpoint's original order.

* `ActivationPredictor` ("low-rank"): a trained low-rank MLP d -> r -> n_ff, as in PowerInfer.
* `QuantizedGatePredictor` ("int4-gate"): the gate pre-activation computed from a 4-bit copy of the gate
  matrix (kernels.quantized), for ReLU-family FFNs, where the gate alone decides which neurons are active.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from powerinfer.kernels.lowrank import bind_lowrank_mask, lowrank_decide, lowrank_mask
from powerinfer.kernels.quantized import int4_gemv, quantize_int4


class ActivationPredictor(nn.Module):
    kind = "low-rank"

    def __init__(self, hidden_size: int, rank: int, intermediate_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, rank, bias=False)
        self.fc2 = nn.Linear(rank, intermediate_size, bias=True)
        self.register_buffer("threshold", torch.zeros(()))

    @property
    def rank(self) -> int:
        return self.fc1.out_features

    @property
    def dtype(self) -> torch.dtype:
        return self.fc1.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d] -> logits [..., n_ff]. The layers are applied without their module calls: a decode step
        predicts once per layer, and on the CPU the calls cost about as much as the products."""
        return F.linear(torch.relu(F.linear(x, self.fc1.weight)), self.fc2.weight, self.fc2.bias)

    def predict(self, x: torch.Tensor, always_active: int = 0, tail: torch.Tensor | None = None,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Boolean mask [..., n_ff] of neurons predicted active, the first `always_active` always; `tail` (one
        token) also gets the mask's last len(tail) entries (kernels.lowrank: two kernels on CUDA). `hidden`: x's
        relu(fc1) layer as float32 [T, rank], computed already (kernels.fused `add_rms_norm_relu_project`)."""
        if hidden is not None:
            return lowrank_decide(hidden, self.fc2.weight, self.fc2.bias, self.threshold,
                                  always_active=always_active, tail=tail)
        return lowrank_mask(x, self.fc1.weight, self.fc2.weight, self.fc2.bias, self.threshold,
                            always_active=always_active, tail=tail)

    def bind(self, x: torch.Tensor, mask: torch.Tensor, always_active: int = 0):
        """A call without arguments that writes `predict(x, always_active)` of what x [T, d] holds then into mask
        [T, n_ff] (kernels.lowrank: on the CPU a numba kernel over the fixed buffers, ~5 us where `predict`
        takes ~20)."""
        weights = self.fc1.weight.detach(), self.fc2.weight.detach(), self.fc2.bias.detach()
        return bind_lowrank_mask(*weights, self.threshold, always_active).bind(x, mask)

    def reordered(self, order: torch.Tensor) -> ActivationPredictor:
        """A copy whose output i is this one's output order[i]."""
        out = copy.deepcopy(self)
        with torch.no_grad():
            out.fc2.weight.copy_(self.fc2.weight[order])
            out.fc2.bias.copy_(self.fc2.bias[order])
        return out


class QuantizedGatePredictor(nn.Module):
    """Scores = x @ Q(W_gate)^T with Q a 4-bit, group-scaled copy; the score estimates the gate
    pre-activation, so its threshold sits near the FFN's own (0, or FATReLU's)."""

    kind = "int4-gate"

    def __init__(self, hidden_size: int, intermediate_size: int, group_size: int):
        super().__init__()
        self.register_buffer("packed", torch.zeros(intermediate_size, hidden_size // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(intermediate_size, hidden_size // group_size))
        self.register_buffer("threshold", torch.zeros(()))

    @staticmethod
    def group_size_for(hidden_size: int) -> int | None:
        """The scale group for inputs of this width: 64, else 32; None when neither divides it."""
        return next((g for g in (64, 32) if hidden_size % g == 0), None)

    @classmethod
    def from_gate(cls, gate: torch.Tensor, group_size: int) -> QuantizedGatePredictor:
        n_ff, d = gate.shape
        predictor = cls(d, n_ff, group_size).to(gate.device)  # filled where the gate is: no round trip
        packed, scales = quantize_int4(gate, group_size)
        predictor.packed.copy_(packed)
        predictor.scales.copy_(scales)
        return predictor

    @property
    def dtype(self) -> torch.dtype:
        return self.scales.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d] -> scores [..., n_ff]."""
        flat = x.reshape(-1, x.shape[-1])
        return int4_gemv(flat.to(self.scales.dtype), self.packed, self.scales).view(*x.shape[:-1], -1)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self(x) > self.threshold

    def bind(self, x: torch.Tensor, mask: torch.Tensor):
        """A call without arguments that writes `predict` of what x [T, d] holds then into mask [T, n_ff]."""
        return lambda: torch.gt(self(x), self.threshold, out=mask)

    def reordered(self, order: torch.Tensor) -> QuantizedGatePredictor:
        out = copy.deepcopy(self)
        out.packed.copy_(self.packed[order])
        out.scales.copy_(self.scales[order])
        return out


PREDICTOR_KINDS = {cls.kind: cls for cls in (ActivationPredictor, QuantizedGatePredictor)}


def predictor_state(predictor: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict to store: floating-point tensors as float32, on the CPU."""
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
            for k, v in predictor.state_dict().items()}


def predictor_from_state(state: dict[str, torch.Tensor], hidden_size: int, intermediate_size: int) -> nn.Module:
    """A predictor of either kind from its state dict (the kind is told by the tensor names)."""
    if "packed" in state:
        predictor = QuantizedGatePredictor(hidden_size, intermediate_size,
                                           hidden_size // state["scales"].shape[1])
    else:
        predictor = ActivationPredictor(hidden_size, state["fc1.weight"].shape[0], intermediate_size)
    predictor.load_state_dict(state)
    return predictor
