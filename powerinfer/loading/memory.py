"""Checkpoints held in memory: what `load_model` and `powerinfer.load` read, without a file.

`powerinfer bench --synth` builds a 7B/13B synthetic model and its artifact pieces (profile, predictors,
hot-first order) in memory instead of writing and re-reading many GiB; these classes give them the
interface of `HFCheckpoint` and `ArtifactCheckpoint` (docs/ARTIFACT.md), so every loader and executor
path runs unchanged.
"""

from __future__ import annotations

import copy

import torch


class MemoryCheckpoint:
    """Hugging Face tensor names -> tensors, a config dict and a `Tokenizer`."""

    format = "memory"
    planted = None  # a synthetic model's planted frequencies (layers.i.frequency), when known

    def __init__(self, name: str, config: dict, tokenizer, tensors: dict[str, torch.Tensor],
                 rope_freq_factors: torch.Tensor | None = None):
        self.path, self.config, self.tokenizer, self.tensors = name, config, tokenizer, tensors
        self._rope_freq_factors = rope_freq_factors

    @property
    def num_tensors(self) -> int:
        return len(self.tensors)

    def tensor_info(self) -> list[dict]:
        return [{"name": k, "shape": list(v.shape), "type": str(v.dtype).removeprefix("torch."),
                 "bytes": v.numel() * v.element_size()} for k, v in self.tensors.items()]

    def rope_freq_factors(self) -> torch.Tensor | None:
        return self._rope_freq_factors

    def weights(self, dtype: torch.dtype, progress=None):
        for name, tensor in self.tensors.items():
            if progress is not None:
                progress.update(1)
            yield name, tensor.to(dtype)


class MemoryArtifact(MemoryCheckpoint):
    """An artifact in memory: FFN tensors already in hot-first order (down_proj as in Hugging Face, not
    transposed), predictors and profile in hot-first order, a manifest; the placement is planned when it
    is loaded for a VRAM budget (`plan_for_artifact`)."""

    format = "artifact"

    def __init__(self, name: str, manifest: dict, tokenizer, tensors: dict[str, torch.Tensor],
                 predictors: list, profile: list[dict[str, torch.Tensor]], orders: list[torch.Tensor],
                 rope_freq_factors: torch.Tensor | None = None):
        super().__init__(name, manifest["config"], tokenizer, tensors, rope_freq_factors)
        self.manifest, self._predictors, self._profile, self._orders = manifest, predictors, profile, orders

    def predictors(self, device="cpu") -> list:
        # copies: executors move their predictors in place
        return [copy.deepcopy(p).to(device).eval() for p in self._predictors]

    def profile(self) -> list[dict[str, torch.Tensor]]:
        return self._profile

    def neuron_orders(self) -> list[torch.Tensor]:
        return self._orders

    def placement(self) -> dict | None:
        return None
