"""The LLaMA family: LLaMA-2/3, Mistral, Qwen2, SmolLM2 — and their ReLU-fied variants.

A pre-norm decoder (Touvron et al. 2023, arXiv 2302.13971): RMSNorm, rotary position embeddings
(Su et al. 2021, arXiv 2104.09864; rotate-half layout as in Hugging Face `transformers`), grouped-query
attention (Ainslie et al. 2023) and a gated FFN down(act(gate(x)) * up(x)). The FFN activation is what
makes PowerInfer work (Song et al. 2023, arXiv 2312.12456, §2): with `relu` (ReGLU, as ReluLLaMA and
ProSparse) or `drelu` (relu(gate) * relu(up), as Bamboo and TurboSparse) most neurons output exactly zero,
while `silu` (SwiGLU) and `gelu_tanh` are dense.

The model only computes: `forward(tokens, positions, cache)`. The KV cache, sampling, generation and the
sparse executors live in `powerinfer.runtime`; the executors replace each block's `mlp` in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from powerinfer.errors import UnsupportedModelError
from powerinfer.kernels.activations import check_gate_threshold, gated_activation
from powerinfer.kernels.dense import linear
from powerinfer.kernels.fused import add_rms_norm, rms_norm, rotary_qkv

ACTIVATIONS = ("silu", "relu", "drelu", "gelu_tanh")
# Hugging Face `hidden_act` spellings of the four activations.
_ACTIVATION_ALIASES = {"silu": "silu", "swish": "silu", "relu": "relu", "drelu": "drelu",
                       "gelu_tanh": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass
class ModelArgs:
    """Architecture hyper-parameters; field names are the Hugging Face `config.json` keys."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    # FATReLU (ProSparse, arXiv 2402.13516 §3.3): a relu/drelu gate counts only above this threshold,
    # h = gate * [gate > t] * up. Not a transformers key: a model with t > 0 runs as intended only here.
    relu_threshold: float = 0.0
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise UnsupportedModelError(
                f"unsupported architecture {self.model_type!r} (supported: {', '.join(MODEL_TYPES)})")
        act = _ACTIVATION_ALIASES.get(str(self.hidden_act).lower())
        if act is None:
            raise UnsupportedModelError(
                f"unsupported FFN activation {self.hidden_act!r} (supported: {', '.join(ACTIVATIONS)})")
        self.hidden_act = act
        try:
            check_gate_threshold(act, self.relu_threshold)
        except ValueError as e:
            raise UnsupportedModelError(f"relu_threshold={self.relu_threshold}: {e}") from None
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        if self.rope_scaling and _rope_type(self.rope_scaling) not in ("default", "linear", "llama3"):
            raise UnsupportedModelError(f"unsupported rope_scaling {self.rope_scaling!r}")

    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        """Build from a Hugging Face `config.json` dict; unknown keys are kept in `extra`."""
        known = {f.name for f in fields(cls)} - {"extra"}
        args = {k: v for k, v in config.items() if k in known}
        rope = config.get("rope_parameters")  # transformers >= 5 spelling of rope_theta + rope_scaling
        if isinstance(rope, dict):
            args.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
            if _rope_type(rope) != "default" and not args.get("rope_scaling"):
                args["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        return cls(**args, extra={k: v for k, v in config.items() if k not in known})

    def to_config(self) -> dict:
        """The Hugging Face `config.json` dict for this model (as `transformers` reads it)."""
        config = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        config["hidden_act"] = {"gelu_tanh": "gelu_pytorch_tanh"}.get(self.hidden_act, self.hidden_act)
        if not self.relu_threshold:
            del config["relu_threshold"]
        config["architectures"] = [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                    "qwen2": "Qwen2ForCausalLM"}[self.model_type]]
        return {**self.extra, **config}

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.model_type != "qwen2" and self.attention_bias

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]


def _rope_type(scaling: dict) -> str:
    return scaling.get("rope_type", scaling.get("type", "default"))


def rope_inverse_frequencies(args: ModelArgs) -> torch.Tensor:
    """Per-pair rotation frequencies, with linear or Llama-3 scaling applied."""
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = args.rope_scaling or {}
    kind = _rope_type(scaling) if scaling else "default"
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":  # frequency-dependent scaling, Llama 3.1 model card
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        medium = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv_freq = torch.where(medium, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    return inv_freq.float()


def ffn_activation(gate: torch.Tensor, up: torch.Tensor, kind: str, threshold: float = 0.0) -> torch.Tensor:
    """h = act(gate) * up — the per-neuron value whose zeros PowerInfer skips (`threshold`: FATReLU)."""
    return gated_activation(gate, up, kind, threshold)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add_then_norm(self, x: torch.Tensor, *deltas: torch.Tensor, copy_to: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + deltas, its norm): a residual add and this norm (one kernel on CUDA); see kernels.fused."""
        return add_rms_norm(x, deltas, self.weight, self.eps, copy_to)


class Linear(nn.Linear):
    """nn.Linear whose few-token CPU products use the bandwidth-bound GEMV kernel (kernels/dense.py)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean attention mask (True: may attend) as the additive one (0 / -inf) that
    scaled_dot_product_attention would otherwise build from it in every layer: once per forward pass."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = (
            args.num_attention_heads, args.num_key_value_heads, args.head_dim)
        qkv_out = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        self.qkv_proj = Linear(args.hidden_size, qkv_out, bias=args.qkv_bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, args.hidden_size, bias=args.o_bias)

    def forward(self, x, cos, sin, positions, cache, mask):
        batch, seq, _ = x.shape
        qkv = self.qkv_proj(x)
        if cache is not None and seq == 1:  # one decode token: one fused call where the cache has one
            y = cache.decode_attention(self.layer_idx, qkv, cos, sin, positions, self.n_heads, self.n_kv_heads)
            if y is not None:
                return self.o_proj(y)
        if cache is None:
            q, k, v = rotary_qkv(qkv, cos, sin, self.n_heads, self.n_kv_heads)
        else:  # k and v rotated straight into the cache's slots
            q, k, v = cache.store_rotary(self.layer_idx, qkv, cos, sin, positions, self.n_heads, self.n_kv_heads)
        if mask is None:  # no cache, or the tokens fill the cache window: plain causal attention
            y = F.scaled_dot_product_attention(q, k, v, is_causal=seq > 1, enable_gqa=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    """Gated FFN with gate and up fused into one [2 * n_ff, d] matrix (rows 0..n_ff are gate)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.activation, self.threshold = args.hidden_act, args.relu_threshold
        self.gate_up_proj = Linear(args.hidden_size, 2 * args.intermediate_size, bias=False)
        self.down_proj = Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(ffn_activation(gate, up, self.activation, self.threshold))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, layer_idx)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = FeedForward(args)

    def forward(self, x, cos, sin, positions, cache, mask):
        attention = self.self_attn(self.input_layernorm(x), cos, sin, positions, cache, mask)
        x, normed = self.post_attention_layernorm.add_then_norm(x, attention)
        return x + self.mlp(normed)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inverse_frequencies(args), persistent=False)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache=None,
                last_logits_only: bool = False) -> torch.Tensor:
        """tokens: [B, T] int64; positions: [T] int64 (shared by the batch) -> logits [B, T or 1, V].

        `cache` is a `powerinfer.runtime.KVCache` (or anything with its `store_rotary`, `decode_attention` and
        `attention_mask`); without one, attention is causal over `tokens` alone.
        """
        x = self.embed_tokens(tokens)
        angles = positions.float()[:, None] * self.inv_freq[None, :]
        cos, sin = angles.cos(), angles.sin()
        if cache is not None:
            mask = cache.attention_mask(positions)
        elif self.args.sliding_window and tokens.shape[1] > self.args.sliding_window:
            offset = positions[:, None] - positions[None, :]  # query minus key position
            mask = (offset >= 0) & (offset < self.args.sliding_window)
        else:
            mask = None  # plain causal attention
        mask = additive_mask(mask, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, positions, cache, mask)
        if last_logits_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x)).float()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def sanitize(weights: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Hugging Face checkpoint names -> this module's: fuse q/k/v and gate/up, drop unused tensors."""
    out = {}
    for name, tensor in weights.items():
        name = name.removeprefix("model.")
        if "rotary_emb" in name or name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight",
                                                  "q_proj.bias", "k_proj.bias", "v_proj.bias",
                                                  "gate_proj.weight", "up_proj.weight")):
            continue
        out[name] = tensor
    for i in range(args.num_hidden_layers):
        p = f"model.layers.{i}." if f"model.layers.{i}.mlp.up_proj.weight" in weights else f"layers.{i}."
        for kind in ("weight", "bias") if args.qkv_bias else ("weight",):
            out[f"layers.{i}.self_attn.qkv_proj.{kind}"] = torch.cat(
                [weights[f"{p}self_attn.{n}_proj.{kind}"] for n in "qkv"])
        out[f"layers.{i}.mlp.gate_up_proj.weight"] = torch.cat(
            [weights[f"{p}mlp.gate_proj.weight"], weights[f"{p}mlp.up_proj.weight"]])
    if args.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def to_hf_weights(state_dict: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """The inverse of `sanitize`: Hugging Face names, q/k/v and gate/up split again."""
    q, kv = args.num_attention_heads * args.head_dim, args.num_key_value_heads * args.head_dim
    out = {}
    for name, tensor in state_dict.items():
        if name == "lm_head.weight":
            if not args.tie_word_embeddings:
                out[name] = tensor
            continue
        if ".qkv_proj." in name:
            for n, part in zip("qkv", tensor.split([q, kv, kv])):
                out["model." + name.replace("qkv_proj", f"{n}_proj")] = part
        elif ".gate_up_proj." in name:
            gate, up = tensor.chunk(2)
            out["model." + name.replace("gate_up_proj", "gate_proj")] = gate
            out["model." + name.replace("gate_up_proj", "up_proj")] = up
        else:
            out["model." + name] = tensor
    return {k: v.contiguous() for k, v in out.items()}


Model = Transformer
