"""Synthetic ReLU LLaMA checkpoints with a planted activation profile (for tests and benchmarks).

Real ReLU-family models (PowerInfer §2.2, Fig. 3) activate a small, skewed subset of FFN neurons per
token: most neurons are rarely active, a hot minority fires on most tokens. `make_synthetic_relu_model`
writes a standard Hugging Face LLaMA checkpoint (config.json, safetensors, tokenizer.json) with random
weights built so that this profile is known in advance:

1. Target frequencies. Per layer, neuron frequencies follow a power law f(rank) ∝ (rank + 1)^-α, scaled
   so that the mean is 1 - `sparsity` (capped at 0.99), with α found by bisection so that the hottest 20%
   of neurons hold `skew` of all activations; neuron ids are shuffled per layer.
2. A constant channel. Embedding channel 0 is the constant C for every token; no attention or FFN output
   writes to it (row 0 of `o_proj` and `down_proj` is zero), so every layer's residual stream carries C.
3. Gate offsets. The gate matrix is low-rank (`gate_rank`, so a small predictor can learn it, as Deja
   Vu — Liu et al. 2023, arXiv 2310.17157 — observed for real models) plus a column on the constant channel.
   RMSNorm divides the whole gate pre-activation by a positive number, so neuron i is active exactly when
   p_i(x) + W[i, 0]·C > 0, where p_i is its gate read of the non-constant channels. While the weights are
   generated layer by layer, random calibration tokens run through the layers built so far, giving each
   neuron's mean μ_i and spread σ_i of p_i; the offset W[i, 0]·C = -(μ_i + σ_i·Φ⁻¹(1 - f_i)) makes a
   Gaussian p_i exceed it with probability f_i.

The planted frequencies are saved next to the weights in `planted_frequencies.safetensors`
(`layers.i.frequency`, original neuron order) and the config is labelled `powerinfer_synthetic: true`.
Weights are drawn with `torch.randn` in float32 row chunks and cast, and written in ~1 GiB shards with a
`model.safetensors.index.json`, so 7B/13B shapes fit in memory.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from powerinfer.errors import PowerInferError
from powerinfer.loading.artifact import atomic_directory
from powerinfer.models.llama import Block, ModelArgs, rope_inverse_frequencies, to_hf_weights

SHAPES = {
    "tiny": dict(hidden_size=128, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096),
}
CONSTANT_CHANNEL = 0
CONSTANT_VALUE = 1.0
MAX_FREQUENCY = 0.99
MIN_FREQUENCY = 1e-4
HOT_FRACTION = 0.2  # `skew` is the activation share of this fraction of the hottest neurons
SHARD_BYTES = 1 << 30
BOS, EOS = "<s>", "</s>"


def planted_frequencies(n_ff: int, sparsity: float, skew: float) -> torch.Tensor:
    """Power-law frequencies in hot-first order: mean 1 - sparsity, hottest 20% holding `skew` of the mass."""
    if not 0 < sparsity < 1:
        raise PowerInferError(f"sparsity must be in (0, 1), got {sparsity}")
    mean = 1.0 - sparsity
    ranks = torch.arange(1, n_ff + 1, dtype=torch.float64)
    n_hot = max(1, round(HOT_FRACTION * n_ff))

    def frequencies(alpha: float) -> torch.Tensor:
        raw = ranks ** -alpha
        lo, hi = 0.0, MAX_FREQUENCY / raw[-1].item()
        for _ in range(100):  # scale so that the capped frequencies keep the target mean
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if (raw * mid).clamp(MIN_FREQUENCY, MAX_FREQUENCY).mean() < mean else (lo, mid)
        return (raw * hi).clamp(MIN_FREQUENCY, MAX_FREQUENCY)

    def share(alpha: float) -> float:
        f = frequencies(alpha)
        return (f[:n_hot].sum() / f.sum()).item()

    lo, hi = 0.0, 8.0
    if not share(lo) <= skew <= share(hi):
        raise PowerInferError(f"skew {skew} is not reachable at sparsity {sparsity} "
                              f"(reachable: {share(lo):.2f} to {share(hi):.2f})")
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if share(mid) < skew else (lo, mid)
    return frequencies(hi).float()


def _randn(rows: int, cols: int, std: float, generator: torch.Generator, chunk: int = 1024) -> torch.Tensor:
    out = torch.empty(rows, cols, dtype=torch.float32)
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        out[start:stop] = torch.randn(stop - start, cols, generator=generator) * std
    return out


def _byte_level_tokenizer(vocab_size: int):
    """Byte-level BPE without merges: ids 0/1 are BOS/EOS, then the 256 bytes, then inert filler tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if vocab_size < 258:
        raise PowerInferError(f"a synthetic model needs vocab_size >= 258, got {vocab_size}")
    vocab = {BOS: 0, EOS: 1}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    while len(vocab) < vocab_size:
        vocab[f"<filler_{len(vocab)}>"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab, [], fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(BOS, special=True), AddedToken(EOS, special=True)])
    return tokenizer


class _ShardWriter:
    """Collects Hugging Face tensors and flushes ~1 GiB safetensors shards, then writes the index."""

    def __init__(self, directory: Path):
        self.directory, self.pending, self.pending_bytes = directory, {}, 0
        self.shards: list[dict[str, torch.Tensor]] = []
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        for name, tensor in tensors.items():
            self.pending[name] = tensor.contiguous()
            self.pending_bytes += tensor.numel() * tensor.element_size()
        if self.pending_bytes >= SHARD_BYTES:
            name = f"model-{len(self.shards) + 1:05d}.safetensors"
            save_file(self.pending, str(self.directory / name), metadata={"format": "pt"})
            self.shards.append(name)
            self.weight_map.update({k: name for k in self.pending})
            self.total_bytes += self.pending_bytes
            self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        from safetensors.torch import save_file

        if self.pending:
            name = f"model-{len(self.shards) + 1:05d}.safetensors"
            save_file(self.pending, str(self.directory / name), metadata={"format": "pt"})
            self.shards.append(name)
            self.weight_map.update({k: name for k in self.pending})
            self.total_bytes += self.pending_bytes
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": self.weight_map}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def make_synthetic_relu_model(shape: str | dict = "tiny", sparsity: float = 0.9, skew: float = 0.8,
                              seed: int = 0, out_dir: str | Path = "synthetic-relu",
                              dtype: torch.dtype = torch.float32, gate_rank: int = 8,
                              calibration_tokens: int = 1024, force: bool = False,
                              progress: bool = False) -> Path:
    """Write a synthetic ReLU LLaMA checkpoint to `out_dir` (see the module docstring); returns its path.

    `shape` is a name in `SHAPES` or a dict of config keys overriding the tiny shape.
    """
    dims = dict(SHAPES["tiny"], **shape) if isinstance(shape, dict) else dict(SHAPES[shape])
    shape_name = shape if isinstance(shape, str) else "custom"
    args = ModelArgs(hidden_act="relu", bos_token_id=0, eos_token_id=1, rms_norm_eps=1e-5, **dims)
    d, n_ff, vocab = args.hidden_size, args.intermediate_size, args.vocab_size
    if not 0 < gate_rank <= d:
        raise PowerInferError(f"gate_rank must be in [1, {d}], got {gate_rank}")
    generator = torch.Generator().manual_seed(seed)
    base = planted_frequencies(n_ff, sparsity, skew)
    normal = torch.distributions.Normal(0.0, 1.0)

    out_dir = Path(out_dir)
    with atomic_directory(out_dir, force=force) as tmp:
        writer = _ShardWriter(tmp)
        embed = _randn(vocab, d, 1.0, generator)
        embed[:, CONSTANT_CHANNEL] = CONSTANT_VALUE
        writer.add({"model.embed_tokens.weight": embed.to(dtype)})
        calib_ids = torch.randint(2, vocab, (1, calibration_tokens), generator=generator)
        x = embed[calib_ids]
        angles = torch.arange(calibration_tokens).float()[:, None] * rope_inverse_frequencies(args)[None, :]
        cos, sin = angles.cos(), angles.sin()
        planted = {}
        layers = range(args.num_hidden_layers)
        if progress:
            from tqdm import tqdm
            layers = tqdm(layers, desc="synthesizing", unit="layer", leave=False)
        for i in layers:
            block = _random_block(args, i, generator, gate_rank)
            with torch.no_grad():
                x = x + block.self_attn(block.input_layernorm(x), cos, sin, None, None, None)
                # gate read of the non-constant channels on the un-normalized stream (RMSNorm's weight is 1)
                gate = block.mlp.gate_up_proj.weight[:n_ff]
                stream = x.clone()
                stream[..., CONSTANT_CHANNEL] = 0
                reads = (stream @ gate.T).reshape(-1, n_ff)
                mean, std = reads.mean(0), reads.std(0)
                frequency = base[torch.randperm(n_ff, generator=generator)]
                quantile = normal.icdf(1 - frequency.double()).float()
                gate[:, CONSTANT_CHANNEL] = -(mean + std * quantile) / CONSTANT_VALUE
                x = x + block.mlp(block.post_attention_layernorm(x))
            planted[f"layers.{i}.frequency"] = frequency
            state = {f"layers.{i}.{k}": v for k, v in block.state_dict().items()}
            writer.add({k: v.to(dtype) for k, v in to_hf_weights(state, args).items()})
            del block
        writer.add({"model.norm.weight": torch.ones(d, dtype=dtype)})
        if not args.tie_word_embeddings:
            writer.add({"lm_head.weight": _randn(vocab, d, 1.0 / math.sqrt(d), generator).to(dtype)})
        writer.close()

        from safetensors.torch import save_file
        save_file(planted, str(tmp / "planted_frequencies.safetensors"))
        config = args.to_config()
        config.update(torch_dtype=str(dtype).removeprefix("torch."), powerinfer_synthetic=True,
                      powerinfer_synthetic_profile={
                          "shape": shape_name, "sparsity": sparsity, "skew": skew, "seed": seed,
                          "gate_rank": gate_rank, "constant_channel": CONSTANT_CHANNEL,
                          "hot_fraction": HOT_FRACTION})
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        _byte_level_tokenizer(vocab).save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(
            {"bos_token": BOS, "eos_token": EOS, "add_bos_token": True}, indent=1))
    return out_dir


def _random_block(args: ModelArgs, index: int, generator: torch.Generator, gate_rank: int) -> Block:
    """A float32 block with standard-scale random weights, a low-rank gate and no writes to the constant
    channel; the gate's constant-channel column is set by the caller."""
    d, n_ff = args.hidden_size, args.intermediate_size
    q_out = args.num_attention_heads * args.head_dim
    qkv_out = q_out + 2 * args.num_key_value_heads * args.head_dim
    block = Block(args, index)
    o_proj = _randn(d, q_out, 1.0 / math.sqrt(q_out), generator)
    o_proj[CONSTANT_CHANNEL] = 0
    gate = _randn(n_ff, gate_rank, 1.0, generator) @ _randn(gate_rank, d, 1.0 / math.sqrt(d), generator)
    up = _randn(n_ff, d, 1.0 / math.sqrt(d), generator)
    down = _randn(d, n_ff, 1.0 / math.sqrt(n_ff), generator)
    down[CONSTANT_CHANNEL] = 0
    block.load_state_dict({
        "input_layernorm.weight": torch.ones(d), "post_attention_layernorm.weight": torch.ones(d),
        "self_attn.qkv_proj.weight": _randn(qkv_out, d, 1.0 / math.sqrt(d), generator),
        "self_attn.o_proj.weight": o_proj,
        "mlp.gate_up_proj.weight": torch.cat([gate, up]),
        "mlp.down_proj.weight": down,
    })
    return block
