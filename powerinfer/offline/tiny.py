"""A tiny ReLU LLaMA trained from scratch, for tests and CI: a real model with natural activation sparsity.

A byte-level BPE vocabulary is learnt from the calibration text (WikiText-2 validation) and a 4-layer,
d=256 LLaMA with ReGLU FFNs (`hidden_act: relu`) is trained on it with next-token cross-entropy by the
shared loop in `powerinfer.offline.train`, deterministically (fixed seeds, deterministic algorithms). ReLU
networks trained from scratch are naturally sparse (Li et al. 2022, "The Lazy Neuron Phenomenon", arXiv
2210.06313); a light ProSparse L1 term (arXiv 2402.13516) strengthens that within the short budget.

The model is cached under `<cache>/tiny-relu/<key>/`, `key` a hash of the recipe and the calibration
text, so that changing either retrains. `<cache>` is `$POWERINFER_CACHE`, else `.cache/` at the repository
root (or `~/.cache/powerinfer` for an installed package). The WikiText-2 files are read from
`$POWERINFER_DATA_DIR`, else `../shared/data` beside the repository.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from powerinfer.errors import PowerInferError
from powerinfer.loading.tokenizer import Tokenizer
from powerinfer.models.llama import ModelArgs, Transformer
from powerinfer.offline.checkpoint import save_hf_model
from powerinfer.offline.profile import read_text_file
from powerinfer.offline.relufy import tokenize_text
from powerinfer.offline.train import (TrainConfig, keyed_generator, measure_sparsity_and_ppl, random_windows,
                                      train)

_REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = Path(os.environ.get("POWERINFER_DATA_DIR") or _REPO_ROOT.parent / "shared" / "data")
CALIBRATION_FILE = "wikitext2-valid.txt"
HELD_OUT_FILE = "wikitext2-test.txt"
RECIPE_VERSION = 1  # part of the cache key: bump it when a code change alters what is trained
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
HELD_OUT_TOKENS = 32768  # measured into tiny.json at build time


@dataclass
class TinyRecipe:
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 1024
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 200
    lr: float = 5e-3
    warmup_steps: int = 20
    weight_decay: float = 0.1
    l1: float = 0.1
    seed: int = 0

    def model_args(self, vocab_size: int, eot_id: int) -> ModelArgs:
        return ModelArgs(model_type="llama", vocab_size=vocab_size, hidden_size=self.hidden_size,
                         intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
                         num_attention_heads=self.num_attention_heads,
                         num_key_value_heads=self.num_key_value_heads, hidden_act="relu",
                         max_position_embeddings=self.max_position_embeddings, rms_norm_eps=1e-5,
                         rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=eot_id,
                         eos_token_id=eot_id)

    def train_config(self) -> TrainConfig:
        return TrainConfig(batch_size=self.batch_size, seq_len=self.seq_len, max_steps=self.steps,
                           lr=self.lr, warmup_steps=self.warmup_steps, weight_decay=self.weight_decay,
                           l1=self.l1, save_every=self.steps, save_minutes=float("inf"), seed=self.seed)


def default_cache_dir() -> Path:
    """Where tiny models are cached: `$POWERINFER_CACHE/tiny-relu`, else `.cache/tiny-relu` in the repo."""
    if os.environ.get("POWERINFER_CACHE"):
        return Path(os.environ["POWERINFER_CACHE"]) / "tiny-relu"
    if (_REPO_ROOT / "pyproject.toml").exists():
        return _REPO_ROOT / ".cache" / "tiny-relu"
    return Path.home() / ".cache" / "powerinfer" / "tiny-relu"


def train_bpe_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer learnt from `text`, with an end-of-text token and ChatML markers."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(text.splitlines(keepends=True), trainer)
    eot = backend.token_to_id(SPECIAL_TOKENS[0])
    return Tokenizer(backend, eot, [eot], add_bos=False, chat_template=CHATML_TEMPLATE, kind="bpe",
                     special_ids={backend.token_to_id(t) for t in SPECIAL_TOKENS})


def init_weights(model: Transformer, seed: int) -> None:
    """GPT-2 style: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * layers); norms at 1."""
    generator = torch.Generator().manual_seed(seed)
    residual_std = 0.02 / (2 * model.args.num_hidden_layers) ** 0.5
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim < 2:
                param.fill_(1.0)
            else:
                std = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def recipe_key(recipe: TinyRecipe, calibration_sha256: str) -> str:
    blob = json.dumps({"version": RECIPE_VERSION, "recipe": asdict(recipe), "data": calibration_sha256},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_tiny_relu_model(out_dir: Path, calibration_file: Path, recipe: TinyRecipe,
                          held_out_file: Path | None = None, show_progress: bool = True) -> dict:
    """Train the tiny model, write it to `out_dir` as a Hugging Face directory; return its measurements."""
    start = time.perf_counter()
    text = read_text_file(calibration_file)
    previous_determinism = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(recipe.seed)
        tokenizer = train_bpe_tokenizer(text, recipe.vocab_size)
        data = tokenize_text(tokenizer, text)
        args = recipe.model_args(tokenizer.vocab_size, tokenizer.bos_token_id)
        model = Transformer(args)
        init_weights(model, recipe.seed)
        config = recipe.train_config()

        def batch_at(step: int) -> torch.Tensor:
            return random_windows(data, config.batch_size, config.seq_len, keyed_generator(config.seed, step))

        def next_token_loss(model, batch):
            positions = torch.arange(batch.shape[1], device=batch.device)
            logits = model(batch[:, :-1], positions[:-1])
            return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

        result = train(model, batch_at, next_token_loss, config, desc="tiny ReLU model",
                       show_progress=show_progress)
    finally:
        torch.use_deterministic_algorithms(previous_determinism)
    info = {"recipe": asdict(recipe), "recipe_version": RECIPE_VERSION,
            "calibration_file": calibration_file.name,
            "parameters": model.num_parameters(), "train_tokens": result.tokens,
            "final_train_loss": result.last_loss, "train_seconds": time.perf_counter() - start}
    if held_out_file is not None and held_out_file.exists():
        ids = tokenize_text(tokenizer, read_text_file(held_out_file))
        measured = measure_sparsity_and_ppl(model, ids, seq_len=recipe.seq_len, max_tokens=HELD_OUT_TOKENS)
        info["held_out"] = {"file": held_out_file.name, **{k: measured[k] for k in (
            "tokens", "ppl", "sparsity", "layer_sparsity", "neuron_share_for_80pct_activations")}}
    save_hf_model(out_dir, model, tokenizer, extra_files={"tiny.json": json.dumps(info, indent=2)})
    return info


def ensure_tiny_relu_model(cache_dir: str | Path | None = None, calibration_file: str | Path | None = None,
                           recipe: TinyRecipe | None = None, show_progress: bool = False) -> Path:
    """The directory of the cached tiny ReLU model, training it first if the cache lacks this recipe.

    `cache_dir`: the directory holding tiny models (default: `default_cache_dir()`); `calibration_file`:
    the training text (default: WikiText-2 validation in `../shared/data`).
    """
    recipe = recipe or TinyRecipe()
    calibration_file = Path(calibration_file or DEFAULT_DATA_DIR / CALIBRATION_FILE)
    if not calibration_file.is_file():
        raise PowerInferError(f"calibration text {calibration_file} not found "
                              "(the tiny model is trained on it; set POWERINFER_DATA_DIR)")
    sha = hashlib.sha256(calibration_file.read_bytes()).hexdigest()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    model_dir = cache_dir / recipe_key(recipe, sha)
    if (model_dir / "config.json").exists():
        return model_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent builders never see a half-written model.
    build_dir = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.build-", dir=cache_dir))
    try:
        build_tiny_relu_model(build_dir, calibration_file, recipe,
                              held_out_file=calibration_file.with_name(HELD_OUT_FILE),
                              show_progress=show_progress)
        try:
            os.rename(build_dir, model_dir)
        except OSError:
            if not (model_dir / "config.json").exists():  # not a concurrent builder that won the race
                raise
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
    return model_dir


__all__ = ["ensure_tiny_relu_model", "build_tiny_relu_model", "TinyRecipe", "default_cache_dir"]
