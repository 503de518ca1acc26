"""Hugging Face model directories: `config.json`, `*.safetensors` (single or sharded with
`model.safetensors.index.json`) and `tokenizer.json`."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from powerinfer.errors import ModelFormatError
from powerinfer.loading.tokenizer import Tokenizer, tokenizer_from_hf_dir


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{path}: cannot read JSON ({e})") from None


class HFCheckpoint:
    format = "hf"

    def __init__(self, path: Path):
        self.path = path
        if not (path / "config.json").exists():
            raise ModelFormatError(f"{path}: not a model directory (no config.json)")
        self.config = _read_json(path / "config.json")
        index = path / "model.safetensors.index.json"
        if index.exists():
            weight_map = _read_json(index).get("weight_map", {})
            self.files = sorted({path / f for f in weight_map.values()})
        else:
            self.files = sorted(path.glob("*.safetensors"))
        if not self.files:
            raise ModelFormatError(f"{path}: no *.safetensors weights")
        for f in self.files:
            if not f.exists():
                raise ModelFormatError(f"{path}: shard {f.name} listed in the index is missing")
        self._tokenizer: Tokenizer | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = tokenizer_from_hf_dir(self.path, self.config)
        return self._tokenizer

    def _open(self, file: Path):
        from safetensors import safe_open
        try:
            return safe_open(str(file), framework="pt")
        except Exception as e:  # safetensors raises its own error type on corrupt headers
            raise ModelFormatError(f"{file}: corrupt safetensors file ({e})") from None

    def tensor_info(self) -> list[dict]:
        info = []
        for file in self.files:
            with self._open(file) as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    shape = list(sl.get_shape())
                    dtype = sl.get_dtype()
                    size = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1}.get(dtype, 4)
                    n = 1
                    for s in shape:
                        n *= s
                    info.append({"name": name, "shape": shape, "type": dtype, "bytes": n * size})
        return info

    @property
    def num_tensors(self) -> int:
        return len(self.tensor_info())

    def rope_freq_factors(self):
        return None

    def weights(self, dtype: torch.dtype, progress=None):
        for file in self.files:
            with self._open(file) as f:
                for name in f.keys():
                    try:
                        tensor = f.get_tensor(name)
                    except Exception as e:
                        raise ModelFormatError(f"{file}: cannot read tensor {name} ({e})") from None
                    if progress is not None:
                        progress.update(1)
                    yield name, tensor.to(dtype)
