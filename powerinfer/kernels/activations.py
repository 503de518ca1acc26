"""Gated FFN activations shared by the reference and the fast kernels.

A LLaMA-style FFN computes h = act(x @ Wg^T) * (x @ Wu^T); ``drelu`` (ReLU on both
branches, as in the ReLU-fied models PowerInfer targets) is relu(gate) * relu(up). A gate
threshold t > 0 turns relu/drelu's gate into FATReLU's (ProSparse, arXiv 2402.13516):
gate * [gate > t].
The fast kernels fuse the activation, so they receive it as a small integer code;
the order of ``ACTIVATIONS`` defines those codes.
"""

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "relu", "drelu", "gelu_tanh")


def activation_code(name: str) -> int:
    """Integer code of an activation name, as the fused kernels expect it."""
    try:
        return ACTIVATIONS.index(name)
    except ValueError:
        raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}") from None


_GATED_ACTIVATIONS = {
    "silu": lambda gate, up: F.silu(gate) * up,
    "relu": lambda gate, up: F.relu(gate) * up,
    "drelu": lambda gate, up: F.relu(gate) * F.relu(up),
    "gelu_tanh": lambda gate, up: F.gelu(gate, approximate="tanh") * up,
}


def check_gate_threshold(name: str, threshold: float) -> None:
    if threshold and (name not in ("relu", "drelu") or threshold < 0):
        raise ValueError(f"a gate threshold must be >= 0 and needs relu or drelu (got {threshold} with {name!r})")


def gated_activation(gate: torch.Tensor, up: torch.Tensor, name: str, threshold: float = 0.0) -> torch.Tensor:
    """Plain-PyTorch act(gate) * up (relu(gate) * relu(up) for ``drelu``). With `threshold` > 0 (relu/drelu
    only) the gate is FATReLU's: gate where gate > threshold, else 0."""
    activation_code(name)  # raises with the list of valid names
    check_gate_threshold(name, threshold)
    if threshold:
        gate = torch.where(gate > threshold, gate, torch.zeros((), dtype=gate.dtype, device=gate.device))
    return _GATED_ACTIVATIONS[name](gate, up)
