"""GGUF checkpoints (llama.cpp's format, spec: ggml `docs/gguf.md`), read with the `gguf` package.

Every tensor type that `gguf` dequantizes (F32, F16, BF16, Q4_0, Q4_1, Q8_0, K-quants, ...) loads into the
dtype the caller asks for. llama.cpp's converter permutes the rows of Q and K of LLaMA-architecture models
so that its rope kernel can rotate adjacent pairs; we undo that permutation to get back the Hugging Face
rotate-half layout (Qwen2 files are stored unpermuted).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from powerinfer.errors import ModelFormatError, UnsupportedModelError
from powerinfer.loading.tokenizer import Tokenizer, tokenizer_from_gguf

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
_PERMUTED_ARCHITECTURES = ("llama",)

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight", "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}


def hf_name(gguf_name: str) -> str | None:
    """GGUF tensor name -> Hugging Face name (None for tensors with no HF counterpart)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
            12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # row-major (PyTorch order): GGUF lists dimensions fastest-first
    qtype: object  # gguf.GGMLQuantizationType
    offset: int  # absolute, in the file
    n_bytes: int


class _Cursor:
    """Little-endian reads over the file's bytes with a clear error past the end."""

    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise ValueError("unexpected end of file in the header")
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            raise ValueError("unexpected end of file in the header")
        value = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return value

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, count = self.unpack("<I"), self.unpack("<Q")
            if item_type in _SCALARS:  # numeric arrays in one read
                dtype = np.dtype(_SCALARS[item_type])
                end = self.pos + count * dtype.itemsize
                if end > len(self.buf):
                    raise ValueError("unexpected end of file in the header")
                values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).tolist()
                self.pos = end
                return values
            return [self.value(item_type) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {vtype}")


def read_gguf(path: Path) -> tuple[dict, list[TensorInfo], np.memmap]:
    """Parse a GGUF file's metadata and tensor directory (the `gguf` package's reader parses the whole
    vocabulary field by field, ~4 s for SmolLM2; this takes a fraction of that)."""
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as e:
        raise ModelFormatError(f"{path}: cannot read ({e})") from None
    if bytes(data[:4]) != GGUF_MAGIC:
        raise ModelFormatError(f"{path}: not a GGUF file (bad magic {bytes(data[:4])!r})")
    try:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    except ImportError:
        raise ModelFormatError("reading GGUF files needs the `gguf` package: pip install gguf") from None
    try:
        cur = _Cursor(data)
        cur.pos = 4
        version = cur.unpack("<I")
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        n_tensors, n_fields = cur.unpack("<Q"), cur.unpack("<Q")
        fields = {}
        for _ in range(n_fields):
            key = cur.string()
            fields[key] = cur.value(cur.unpack("<I"))
        raw = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.unpack("<Q") for _ in range(cur.unpack("<I"))]
            raw.append((name, dims, GGMLQuantizationType(cur.unpack("<I")), cur.unpack("<Q")))
        alignment = int(fields.get("general.alignment", 32))
        data_start = -(-cur.pos // alignment) * alignment
        tensors = []
        for name, dims, qtype, offset in raw:
            block, block_bytes = GGML_QUANT_SIZES[qtype]
            n_elements = int(np.prod(dims)) if dims else 1
            n_bytes = n_elements // block * block_bytes
            start = data_start + offset
            if start + n_bytes > len(data):
                raise ValueError(f"tensor {name} is truncated")
            tensors.append(TensorInfo(name, tuple(reversed(dims)), qtype, start, n_bytes))
    except (ValueError, KeyError) as e:
        raise ModelFormatError(f"{path}: corrupt or truncated GGUF file ({e})") from None
    return fields, tensors, data


def config_from_fields(fields: dict, tensor_names: set[str]) -> dict:
    """GGUF metadata -> a Hugging Face `config.json` dict."""
    arch = fields.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"unsupported GGUF architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")

    def get(key, default=None):
        return fields.get(f"{arch}.{key}", default)

    try:
        heads = int(get("attention.head_count"))
        hidden = int(get("embedding_length"))
        config = {
            "model_type": arch,
            "hidden_size": hidden,
            "intermediate_size": int(get("feed_forward_length")),
            "num_hidden_layers": int(get("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(get("attention.head_count_kv", heads)),
            "head_dim": int(get("attention.key_length", hidden // heads)),
            "max_position_embeddings": int(get("context_length", 4096)),
            "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": float(get("rope.freq_base", 10000.0)),
            "vocab_size": int(get("vocab_size", len(fields.get("tokenizer.ggml.tokens", [])))),
            "tie_word_embeddings": "output.weight" not in tensor_names,
            "hidden_act": fields.get("powerinfer.hidden_act", "silu"),
            "bos_token_id": fields.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": fields.get("tokenizer.ggml.eos_token_id"),
        }
    except TypeError:
        raise ModelFormatError(f"GGUF metadata is missing {arch}.* hyper-parameters") from None
    if get("rope.scaling.type") == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    if get("attention.sliding_window"):
        config["sliding_window"] = int(get("attention.sliding_window"))
    return config


def _unpermute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    rows = weight.shape[0]
    # llama.cpp stored rows as [head, pair, 2]; back to the rotate-half order [head, 2, pair]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, -1).swapaxes(1, 2).reshape(weight.shape)


class GGUFCheckpoint:
    """Metadata read eagerly, tensors dequantized on demand by `weights()`."""

    format = "gguf"

    def __init__(self, path: Path):
        self.path = path
        self.fields, self.tensors, self._data = read_gguf(path)
        self.config = config_from_fields(self.fields, {t.name for t in self.tensors})
        self._tokenizer: Tokenizer | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = tokenizer_from_gguf(self.fields)
        return self._tokenizer

    @property
    def num_tensors(self) -> int:
        return len(self.tensors)

    def tensor_info(self) -> list[dict]:
        return [{"name": t.name, "shape": list(t.shape), "type": t.qtype.name, "bytes": t.n_bytes}
                for t in self.tensors]

    def _array(self, t: TensorInfo) -> np.ndarray:
        from gguf.quants import dequantize

        raw = self._data[t.offset:t.offset + t.n_bytes]
        try:
            return dequantize(raw, t.qtype).reshape(t.shape)
        except (NotImplementedError, ValueError) as e:
            raise ModelFormatError(f"{self.path}: cannot dequantize {t.name} ({t.qtype.name}): {e}") from None

    def rope_freq_factors(self) -> torch.Tensor | None:
        """Llama-3 style rope scaling is stored by llama.cpp as per-frequency divisors."""
        for t in self.tensors:
            if t.name == "rope_freqs.weight":
                return torch.from_numpy(np.array(self._array(t), dtype=np.float32).reshape(-1))
        return None

    def weights(self, dtype: torch.dtype, progress=None):
        """Yield (hf_name, tensor) with every tensor dequantized to `dtype`."""
        unpermute = self.config["model_type"] in _PERMUTED_ARCHITECTURES
        heads, kv_heads = self.config["num_attention_heads"], self.config["num_key_value_heads"]
        for t in self.tensors:
            name = hf_name(t.name)
            if name is None:
                continue
            array = self._array(t)
            if unpermute and name.endswith("q_proj.weight"):
                array = _unpermute(array, heads)
            elif unpermute and name.endswith("k_proj.weight"):
                array = _unpermute(array, kv_heads)
            if progress is not None:
                progress.update(1)
            yield name, torch.from_numpy(np.require(array, np.float32, ["C", "W"])).to(dtype)
