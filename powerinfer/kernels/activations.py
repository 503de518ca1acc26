"""Gated FFN activations shared by the reference and the fast kernels.

A LLaMA-style FFN computes h = act(x @ Wg^T) * (x @ Wu^T); ``drelu`` (ReLU on both
branches, as in the ReLU-fied models PowerInfer targets) is relu(gate) * relu(up).
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


def gated_activation(gate: torch.Tensor, up: torch.Tensor, name: str) -> torch.Tensor:
    """Plain-PyTorch act(gate) * up (relu(gate) * relu(up) for ``drelu``)."""
    activation_code(name)  # raises with the list of valid names
    return _GATED_ACTIVATIONS[name](gate, up)
