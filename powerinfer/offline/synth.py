"""Synthetic ReLU LLaMA checkpoints with a planted activation profile (for tests and benchmarks).

Real ReLU-family models (PowerInfer §2.2, Fig. 3) activate a small, skewed subset of FFN neurons per
token: most neurons are rarely active, a hot minority fires on most tokens. `make_synthetic_relu_model`
writes a standard Hugging Face LLaMA checkpoint (config.json, safetensors, tokenizer.json) with random
weights built so that this profile is known in advance; `load_synthetic_model` builds the same model in
memory (no disk round trip, for `powerinfer bench --synth`):

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
Weights are drawn in float32 on `device` (a CUDA generator draws a 7B model in seconds; the weights are
deterministic per seed on one kind of device, and differ between CPU and CUDA) and cast to `dtype`; on
disk they go in ~1 GiB shards with a `model.safetensors.index.json`, one layer in memory at a time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterator

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
MERGE = ("q", "u")  # one real merge: llama.cpp refuses a BPE vocabulary without merges


def planted_frequencies(n_ff: int, sparsity: float, skew: float) -> torch.Tensor:
    """Power-law frequencies in hot-first order: mean 1 - sparsity, hottest 20% holding `skew` of the mass."""
    if not 0 < sparsity < 1:
        raise PowerInferError(f"sparsity must be in (0, 1), got {sparsity}")
    if not 0 < skew < 1:
        raise PowerInferError(f"skew must be in (0, 1), got {skew}")
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


def synthetic_args(shape: str | dict) -> tuple[ModelArgs, str]:
    """The `ModelArgs` of a shape name in `SHAPES` (or a dict of config keys overriding the tiny shape)."""
    if isinstance(shape, str) and shape not in SHAPES:
        raise PowerInferError(f"unknown synthetic shape {shape!r} (choose from {', '.join(SHAPES)})")
    dims = dict(SHAPES["tiny"], **shape) if isinstance(shape, dict) else dict(SHAPES[shape])
    args = ModelArgs(hidden_act="relu", bos_token_id=0, eos_token_id=1, rms_norm_eps=1e-5, **dims)
    return args, shape if isinstance(shape, str) else "custom"


def progress_bar(iterable, desc: str, enabled: bool, unit: str = "layer"):
    """tqdm when asked for and installed (it is optional on benchmark machines), else the iterable."""
    if enabled:
        try:
            from tqdm import tqdm
        except ImportError:
            return iterable
        return tqdm(iterable, desc=desc, unit=unit, leave=False)
    return iterable


class SyntheticModel:
    """One synthetic model's recipe; `tensors()` draws its weights (module docstring)."""

    def __init__(self, shape: str | dict = "tiny", sparsity: float = 0.9, skew: float = 0.8, seed: int = 0,
                 gate_rank: int = 8, calibration_tokens: int = 1024, device="cpu"):
        self.args, self.shape_name = synthetic_args(shape)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise PowerInferError("--device cuda was asked for but no CUDA GPU is available")
        d = self.args.hidden_size
        if not 0 < gate_rank <= d:
            raise PowerInferError(f"gate_rank must be in [1, {d}], got {gate_rank}")
        if self.args.vocab_size < 258:
            raise PowerInferError(f"a synthetic model needs vocab_size >= 258, got {self.args.vocab_size}")
        self.base = planted_frequencies(self.args.intermediate_size, sparsity, skew)  # validates both
        self.sparsity, self.skew, self.seed = sparsity, skew, seed
        self.gate_rank, self.calibration_tokens = gate_rank, calibration_tokens
        self.planted: dict[str, torch.Tensor] = {}  # filled by tensors(): layers.i.frequency

    def config(self, dtype: torch.dtype) -> dict:
        config = self.args.to_config()
        config.update(torch_dtype=str(dtype).removeprefix("torch."), powerinfer_synthetic=True,
                      powerinfer_synthetic_profile={
                          "shape": self.shape_name, "sparsity": self.sparsity, "skew": self.skew,
                          "seed": self.seed, "device": self.device.type, "gate_rank": self.gate_rank,
                          "constant_channel": CONSTANT_CHANNEL, "hot_fraction": HOT_FRACTION})
        return config

    def parameters(self) -> int:
        a = self.args
        q, kv = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
        per_layer = a.hidden_size * (2 * q + 2 * kv) + 3 * a.hidden_size * a.intermediate_size + 2 * a.hidden_size
        return a.num_hidden_layers * per_layer + 2 * a.vocab_size * a.hidden_size + a.hidden_size

    @torch.no_grad()
    def tensors(self, dtype: torch.dtype = torch.float32,
                progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """Hugging Face names and weights (in `dtype`, on the model's device), one layer at a time."""
        device = self.device
        args, generator = self.args, torch.Generator(device).manual_seed(self.seed)
        d, n_ff, vocab = args.hidden_size, args.intermediate_size, args.vocab_size

        def randn(rows, cols, std):
            return torch.empty(rows, cols, device=device).normal_(0.0, std, generator=generator)

        embed = randn(vocab, d, 1.0)
        embed[:, CONSTANT_CHANNEL] = CONSTANT_VALUE
        yield "model.embed_tokens.weight", embed.to(dtype)
        calib_ids = torch.randint(2, vocab, (1, self.calibration_tokens), generator=generator, device=device)
        x = embed[calib_ids]
        del embed
        angles = (torch.arange(self.calibration_tokens, device=device).float()[:, None]
                  * rope_inverse_frequencies(args).to(device)[None, :])
        cos, sin = angles.cos(), angles.sin()
        base = self.base.to(device)
        for i in progress_bar(range(args.num_hidden_layers), "synthesizing", progress):
            block = self._random_block(i, randn)
            x = x + block.self_attn(block.input_layernorm(x), cos, sin, None, None, None)
            # gate read of the non-constant channels on the un-normalized stream (RMSNorm's weight is 1)
            gate = block.mlp.gate_up_proj.weight[:n_ff]
            stream = x.clone()
            stream[..., CONSTANT_CHANNEL] = 0
            reads = (stream @ gate.T).reshape(-1, n_ff)
            mean, std = reads.mean(0), reads.std(0)
            del stream, reads
            frequency = base[torch.randperm(n_ff, generator=generator, device=device)]
            quantile = torch.special.ndtri(1 - frequency.double()).float()
            gate[:, CONSTANT_CHANNEL] = -(mean + std * quantile) / CONSTANT_VALUE
            x = x + block.mlp(block.post_attention_layernorm(x))
            self.planted[f"layers.{i}.frequency"] = frequency.cpu()
            state = {f"layers.{i}.{k}": v for k, v in block.state_dict().items()}
            del block
            for name, tensor in to_hf_weights(state, args).items():
                yield name, tensor.to(dtype)
            del state
        yield "model.norm.weight", torch.ones(d, dtype=dtype, device=device)
        if not args.tie_word_embeddings:
            yield "lm_head.weight", randn(vocab, d, 1.0 / math.sqrt(d)).to(dtype)

    def _random_block(self, index: int, randn) -> Block:
        """A float32 block with standard-scale random weights, a low-rank gate and no writes to the constant
        channel; the gate's constant-channel column is set by the caller."""
        args = self.args
        d, n_ff = args.hidden_size, args.intermediate_size
        q_out = args.num_attention_heads * args.head_dim
        qkv_out = q_out + 2 * args.num_key_value_heads * args.head_dim
        with torch.device("meta"):  # no random initialisation to throw away
            block = Block(args, index)
        o_proj = randn(d, q_out, 1.0 / math.sqrt(q_out))
        o_proj[CONSTANT_CHANNEL] = 0
        gate = randn(n_ff, self.gate_rank, 1.0) @ randn(self.gate_rank, d, 1.0 / math.sqrt(d))
        up = randn(n_ff, d, 1.0 / math.sqrt(d))
        down = randn(d, n_ff, 1.0 / math.sqrt(n_ff))
        down[CONSTANT_CHANNEL] = 0
        ones = torch.ones(d, device=o_proj.device)
        block.load_state_dict({
            "input_layernorm.weight": ones, "post_attention_layernorm.weight": ones.clone(),
            "self_attn.qkv_proj.weight": randn(qkv_out, d, 1.0 / math.sqrt(d)),
            "self_attn.o_proj.weight": o_proj,
            "mlp.gate_up_proj.weight": torch.cat([gate, up]),
            "mlp.down_proj.weight": down,
        }, assign=True)
        return block


def byte_level_tokenizer(vocab_size: int):
    """Byte-level BPE: ids 0/1 are BOS/EOS, then the 256 bytes, then "qu" (one merge), then inert fillers."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {BOS: 0, EOS: 1}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    merges = []
    if vocab_size > len(vocab):
        vocab["".join(MERGE)] = len(vocab)
        merges.append(MERGE)
    while len(vocab) < vocab_size:
        vocab[f"<filler_{len(vocab)}>"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(BOS, special=True), AddedToken(EOS, special=True)])
    return tokenizer


class _ShardWriter:
    """Collects Hugging Face tensors and flushes ~1 GiB safetensors shards, then writes the index."""

    def __init__(self, directory: Path):
        self.directory, self.pending, self.pending_bytes = directory, {}, 0
        self.shards: list[str] = []
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.pending[name] = tensor.detach().to("cpu").contiguous()
        self.pending_bytes += tensor.numel() * tensor.element_size()
        if self.pending_bytes >= SHARD_BYTES:
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        name = f"model-{len(self.shards) + 1:05d}.safetensors"
        save_file(self.pending, str(self.directory / name), metadata={"format": "pt"})
        self.shards.append(name)
        self.weight_map.update({k: name for k in self.pending})
        self.total_bytes += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending:
            self._flush()
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": self.weight_map}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def write_hf_checkpoint(directory: Path, config: dict, tensors, tokenizer) -> _ShardWriter:
    """A Hugging Face model directory (sharded safetensors, config.json, tokenizer files) in `directory`,
    from (name, tensor) pairs; `tokenizer` is a powerinfer `Tokenizer`."""
    writer = _ShardWriter(directory)
    for name, tensor in tensors:
        writer.add(name, tensor)
    writer.close()
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    tokenizer.backend.save(str(directory / "tokenizer.json"))

    def text(token_id):
        return None if token_id is None else tokenizer.backend.id_to_token(token_id)

    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": text(tokenizer.bos_token_id),
         "eos_token": text(tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else None),
         "add_bos_token": tokenizer.add_bos}, indent=1))
    return writer


def synthetic_tokenizer(vocab_size: int):
    from powerinfer.loading import Tokenizer

    return Tokenizer(byte_level_tokenizer(vocab_size), 0, [1], True, None, "hf", {0, 1})


def make_synthetic_relu_model(shape: str | dict = "tiny", sparsity: float = 0.9, skew: float = 0.8,
                              seed: int = 0, out_dir: str | Path = "synthetic-relu",
                              dtype: torch.dtype = torch.float32, gate_rank: int = 8,
                              calibration_tokens: int = 1024, force: bool = False,
                              progress: bool = False, device="cpu") -> Path:
    """Write a synthetic ReLU LLaMA checkpoint to `out_dir` (see the module docstring); returns its path.

    `shape` is a name in `SHAPES` or a dict of config keys overriding the tiny shape."""
    from safetensors.torch import save_file

    synth = SyntheticModel(shape, sparsity, skew, seed, gate_rank, calibration_tokens, device)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, force=force) as tmp:
        write_hf_checkpoint(tmp, synth.config(dtype), synth.tensors(dtype, progress),
                            synthetic_tokenizer(synth.args.vocab_size))
        save_file(synth.planted, str(tmp / "planted_frequencies.safetensors"))
    return out_dir


def synthetic_checkpoint(shape: str | dict = "tiny", sparsity: float = 0.9, skew: float = 0.8, seed: int = 0,
                         dtype: torch.dtype = torch.float16, device="cpu", gate_rank: int = 8,
                         calibration_tokens: int = 1024, progress: bool = False):
    """(the synthetic checkpoint in memory, on `device` in `dtype`, nothing written; its `SyntheticModel`):
    the same weights `make_synthetic_relu_model` writes for the same arguments and device."""
    from powerinfer.loading.memory import MemoryCheckpoint

    synth = SyntheticModel(shape, sparsity, skew, seed, gate_rank, calibration_tokens, device)
    weights = dict(synth.tensors(dtype, progress))
    return MemoryCheckpoint(f"synthetic:{synth.shape_name}", synth.config(dtype),
                            synthetic_tokenizer(synth.args.vocab_size), weights), synth


def load_synthetic_model(shape: str | dict = "tiny", sparsity: float = 0.9, skew: float = 0.8, seed: int = 0,
                         dtype: torch.dtype = torch.float16, device="cpu", gate_rank: int = 8,
                         calibration_tokens: int = 1024, progress: bool = False):
    """The synthetic model of `synthetic_checkpoint` loaded (a `LoadedModel`)."""
    from powerinfer.loading import load_model

    checkpoint, synth = synthetic_checkpoint(shape, sparsity, skew, seed, dtype, device, gate_rank,
                                             calibration_tokens, progress)
    loaded = load_model(checkpoint, device=device, dtype=dtype)
    checkpoint.tensors.clear()  # the model owns the weights now (q/k/v and gate/up were fused into copies)
    loaded.checkpoint.planted = synth.planted
    return loaded
