"""ReLU-fication: turn a SwiGLU model into a ReLU-sparse one by swapping its FFN activation and
fine-tuning it to imitate the original.

The activation becomes ReGLU, relu(gate) * up, as in ReluLLaMA and ProSparse (Song et al. 2024, arXiv
2402.13516), or dReLU, relu(gate) * relu(up), as in TurboSparse (Song et al. 2024, arXiv 2406.05955 §3).
The swap alone costs much of the model's quality; it is recovered by knowledge distillation (Hinton et al.
2015, arXiv 1503.02531) from the untouched original: the loss is KL(teacher || student) on the next-token
distributions at temperature 1. Training text is the user's text mixed with continuations the teacher
samples itself — text of unlimited length drawn from exactly the distribution being imitated. ProSparse's
progressive L1 penalty on the activations (see `powerinfer.offline.train`) raises sparsity further.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from powerinfer.errors import PowerInferError
from powerinfer.kernels.fused import rotary_qkv_to_cache
from powerinfer.loading import load_model
from powerinfer.loading.artifact import sha256_file
from powerinfer.offline.checkpoint import save_hf_model
from powerinfer.offline.profile import read_text_file
from powerinfer.offline.train import (TrainConfig, keyed_generator, measure_sparsity_and_ppl, random_windows,
                                      train)

RELU_ACTIVATIONS = ("relu", "drelu")
STATE_FILE = "relufy-state.ckpt"
LOG_FILE = "relufy-log.jsonl"
RECIPE_FILE = "relufy.json"


@dataclass
class RelufyConfig:
    activation: str = "relu"
    sample_share: float = 0.25      # share of each batch that is teacher samples (1 without --data)
    prompt_len: int = 32            # data tokens that prompt each teacher sample
    block_rows: int | None = None   # samples generated at once (None: 512 on CUDA, 16 on the CPU)
    temperature: float = 1.0        # of the teacher's sampling
    threshold: float = 0.0          # FATReLU gate threshold, in training and in the written model (0: ReLU)


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """One token stream for a whole text file, encoded line by line (fast, and no line spans two pieces)."""
    lines = text.splitlines(keepends=True)
    ids = [i for encoding in tokenizer.backend.encode_batch(lines, add_special_tokens=False)
           for i in encoding.ids]
    return torch.tensor(ids, dtype=torch.long)


def set_ffn_activation(model: torch.nn.Module, activation: str, threshold: float = 0.0) -> None:
    model.args.hidden_act, model.args.relu_threshold = activation, threshold
    for layer in model.layers:
        layer.mlp.activation, layer.mlp.threshold = activation, threshold


class _SamplingCache:
    """A static key/value cache for batched sampling, in the model's `cache` protocol.

    Every row shares the same positions and attention always spans all `max_len` slots (later ones
    masked), so a decode step has static shapes and can be captured in a CUDA graph.
    """

    def __init__(self, args, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        shape = (batch, args.num_key_value_heads, max_len, args.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.num_hidden_layers)]
        self.slots = torch.arange(max_len, device=device)

    def store_rotary(self, layer: int, qkv, cos, sin, positions: torch.Tensor, n_heads: int, n_kv_heads: int):
        keys, values = self.keys[layer], self.values[layer]
        return rotary_qkv_to_cache(qkv, cos, sin, n_heads, n_kv_heads, keys, values, positions), keys, values

    def decode_attention(self, *args) -> None:
        return None  # batched rows: attention through store_rotary and the mask

    def attention_mask(self, positions: torch.Tensor) -> torch.Tensor:
        return self.slots[None, :] <= positions[:, None]


def _captured(fn):
    """`fn` recorded once in a CUDA graph; calling the result replays it and returns its output buffer."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up outside the graph, as capture requires
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = fn()

    def replay():
        graph.replay()
        return output

    return replay


@torch.no_grad()
def sample_continuations(model: torch.nn.Module, prompts: torch.Tensor, length: int,
                         generator: torch.Generator, temperature: float = 1.0) -> torch.Tensor:
    """prompts [B, P] -> [B, length]: each prompt followed by tokens sampled from `model`.

    On CUDA the decode step runs as a CUDA graph: at these sizes launching kernels, not computing, is
    what takes the time.
    """
    device = prompts.device
    batch, prompt_len = prompts.shape
    cache = _SamplingCache(model.args, batch, length, next(model.parameters()).dtype, device)
    token = torch.zeros((batch, 1), dtype=torch.long, device=device)
    position = torch.zeros(1, dtype=torch.long, device=device)

    def decode():
        return model(token, position, cache)[:, -1]

    if device.type == "cuda":
        decode = _captured(decode)  # its warm-up writes slot 0, which the prompt then overwrites
    out = torch.empty((batch, length), dtype=torch.long, device=device)
    out[:, :prompt_len] = prompts
    logits = model(prompts, torch.arange(prompt_len, device=device), cache, last_logits_only=True)[:, -1]
    for p in range(prompt_len, length):
        probs = F.softmax(logits.float() / temperature, dim=-1)
        out[:, p] = torch.multinomial(probs, 1, generator=generator)[:, 0]
        if p + 1 == length:
            break
        token.copy_(out[:, p:p + 1])
        position.fill_(p)
        logits = decode()
    return out


class DistillationBatches:
    """`batch_at(step)`: a [batch_size, seq_len] token batch that depends only on the seed and the step.

    Rows are random windows of the data, and (a `sample_share` of each batch) teacher continuations of
    `prompt_len`-token data prompts — or of the BOS token when there is no data. Teacher samples are made
    in blocks of about `block_rows` rows, enough for several steps, each block seeded by its index.
    """

    def __init__(self, teacher, data: torch.Tensor | None, bos_id: int, train_config: TrainConfig,
                 config: RelufyConfig, device: torch.device):
        self.teacher, self.data, self.bos_id, self.device = teacher, data, bos_id, device
        self.seq_len, self.batch_size = train_config.seq_len, train_config.batch_size
        self.seed = train_config.seed
        self.config = config
        share = 1.0 if data is None else config.sample_share
        self.sample_rows = round(share * self.batch_size)
        self.prompt_len = min(config.prompt_len, self.seq_len // 2)  # leave room to sample
        self.block_steps = max(1, config.block_rows // self.sample_rows) if self.sample_rows else 1
        self._block_index, self._block = None, None

    def _samples(self, block: int) -> torch.Tensor:
        if self._block_index != block:
            rows = self.sample_rows * self.block_steps
            if self.data is None:
                prompts = torch.full((rows, 1), self.bos_id, dtype=torch.long)
            else:
                prompts = random_windows(self.data, rows, self.prompt_len,
                                         keyed_generator(self.seed, 1, block))
            generator = keyed_generator(self.seed, 2, block, device=self.device)
            self._block = sample_continuations(self.teacher, prompts.to(self.device), self.seq_len, generator,
                                               self.config.temperature)
            self._block_index = block
        return self._block

    def __call__(self, step: int) -> torch.Tensor:
        parts = []
        data_rows = self.batch_size - self.sample_rows
        if data_rows:
            windows = random_windows(self.data, data_rows, self.seq_len, keyed_generator(self.seed, 0, step))
            parts.append(windows.to(self.device))
        if self.sample_rows:
            block, offset = divmod(step, self.block_steps)
            rows = self._samples(block)[offset * self.sample_rows:(offset + 1) * self.sample_rows]
            parts.append(rows)
        return torch.cat(parts)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions, temperature 1, mean over positions."""
    student = F.log_softmax(student_logits.float().flatten(0, -2), dim=-1)
    teacher = F.log_softmax(teacher_logits.float().flatten(0, -2), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def _check_output_dir(out_dir: Path, resume: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise PowerInferError(f"output {out_dir} exists and is not a directory")
    if (out_dir / "config.json").exists() and not (resume and (out_dir / STATE_FILE).exists()):
        raise PowerInferError(f"{out_dir} already holds a model; "
                              "remove it or choose another output directory")


def relufy(model_path: str | Path | None, out_dir: str | Path, activation: str = "relu",
           data_file: str | Path | None = None, tokens: int | None = None, minutes: float | None = None,
           train_options: dict | None = None, config: RelufyConfig | None = None,
           eval_file: str | Path | None = None, eval_tokens: int = 32768, resume: bool = True,
           device: str | None = None, show_progress: bool = True) -> dict:
    """ReLU-fy `model_path` and write the result to `out_dir` as a Hugging Face model directory.

    `train_options`: `TrainConfig` fields other than the budget. Returns the recipe and results, also
    written to `out_dir/relufy.json`.
    """
    if activation not in RELU_ACTIVATIONS:
        raise PowerInferError(f"unknown activation {activation!r} "
                              f"(choose from {', '.join(RELU_ACTIVATIONS)})")
    if config is not None and not config.threshold >= 0:
        raise PowerInferError(f"--threshold must be >= 0, got {config.threshold}")
    if tokens is None and minutes is None:
        raise PowerInferError("give a training budget: --tokens N or --minutes T")
    if tokens is not None and tokens < 1:
        raise PowerInferError(f"--tokens must be positive, got {tokens}")
    if minutes is not None and not minutes > 0:
        raise PowerInferError(f"--minutes must be positive, got {minutes}")
    config = config or RelufyConfig()
    config.activation = activation
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if config.block_rows is None:
        config.block_rows = 512 if device.type == "cuda" else 16
    train_options = train_options or {}
    tokens_per_step = train_options.get("batch_size", TrainConfig.batch_size) * train_options.get(
        "seq_len", TrainConfig.seq_len)
    train_config = TrainConfig(**train_options, max_minutes=minutes,
                               max_steps=-(-tokens // tokens_per_step) if tokens is not None else None)
    out_dir = Path(out_dir)
    data_text = read_text_file(data_file) if data_file is not None else None
    eval_text = read_text_file(eval_file) if eval_file is not None else None
    _check_output_dir(out_dir, resume)

    torch.manual_seed(train_config.seed)
    teacher = load_model(model_path, device=str(device),
                         dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    if teacher.args.hidden_act in RELU_ACTIVATIONS:
        raise PowerInferError(f"the model already uses {teacher.args.hidden_act}; "
                              "relufy converts SiLU/GELU models")
    teacher.model.requires_grad_(False)
    student = load_model(model_path, device=str(device), dtype=torch.float32)
    original_activation = student.args.hidden_act
    set_ffn_activation(student.model, activation, config.threshold)
    tokenizer = teacher.tokenizer
    out_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        (out_dir / LOG_FILE).unlink(missing_ok=True)

    data = None
    if data_text is not None:
        data = tokenize_text(tokenizer, data_text)
        need = max(train_config.seq_len, config.prompt_len)
        if len(data) < need:
            raise PowerInferError(f"data file {data_file} has {len(data)} tokens; at least {need} are needed")
    bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_ids[0]
    batches = DistillationBatches(teacher.model, data, bos_id, train_config, config, device)

    def loss_fn(model, batch):
        positions = torch.arange(batch.shape[1], device=batch.device)
        with torch.no_grad():
            teacher_logits = teacher.model(batch, positions)
        return distillation_loss(model(batch, positions), teacher_logits)

    eval_fn = None
    if eval_text is not None:
        eval_fn = _monitor(tokenize_text(tokenizer, eval_text)[:eval_tokens], train_config.seq_len)

    source = Path(model_path) if model_path is not None else student.checkpoint.path
    run_config = {
        "model": str(Path(source).resolve()), "model_bytes": _source_bytes(Path(source)),
        "data_sha256": sha256_file(Path(data_file)) if data_file is not None else None,
        "relufy": asdict(config), "tokens": tokens, "minutes": minutes,
    }
    result = train(student.model, batches, loss_fn, train_config, state_file=out_dir / STATE_FILE,
                   run_config=run_config, resume=resume, eval_fn=eval_fn, log_file=out_dir / LOG_FILE,
                   desc=f"relufy ({activation})", show_progress=show_progress)

    text = ("teacher samples" if batches.sample_rows == train_config.batch_size else
            "data text" if not batches.sample_rows else "data text mixed with teacher samples")
    recipe = {
        "source": run_config["model"], "original_activation": original_activation, "activation": activation,
        "method": f"knowledge distillation, KL(teacher || student) at temperature 1, on {text}"
                  + (", with a progressive L1 penalty on activations" if train_config.l1 else "")
                  + (f", FATReLU gate threshold {config.threshold:g}" if config.threshold else ""),
        "data": str(data_file) if data_file is not None else None, "relufy": asdict(config),
        "train": asdict(train_config), "device": str(device),
        "steps": result.steps, "tokens_trained": result.tokens, "minutes_trained": result.elapsed_s / 60,
        "resumed_from_step": result.resumed_from_step, "final_loss": result.last_loss,
        "final_train_sparsity": result.last_sparsity, "evaluations": result.evaluations,
    }
    save_hf_model(out_dir, student.model, tokenizer, extra_files={RECIPE_FILE: json.dumps(recipe, indent=2)})
    (out_dir / STATE_FILE).unlink(missing_ok=True)
    return recipe


def _monitor(ids: torch.Tensor, seq_len: int):
    """Evaluation during training: perplexity, sparsity and skew on held-out tokens."""
    def evaluate(model) -> dict:
        result = measure_sparsity_and_ppl(model, ids, seq_len=min(seq_len, len(ids)))
        return {k: result[k] for k in ("ppl", "sparsity", "neuron_share_for_80pct_activations")}
    return evaluate


def _source_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return path.stat().st_size


def measure_model(model_path: str | Path | None, text_file: str | Path, seq_len: int = 512,
                  max_tokens: int | None = None, device: str | None = None, batch_size: int = 8,
                  progress: bool = True) -> dict:
    """Perplexity and activation sparsity of a model on a text file (full precision)."""
    text = read_text_file(text_file)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_model(model_path, device=device, dtype=torch.float32)
    ids = tokenize_text(loaded.tokenizer, text)
    result = measure_sparsity_and_ppl(loaded.model, ids, seq_len=seq_len, batch_size=batch_size,
                                      max_tokens=max_tokens, progress=progress)
    return {"model": str(loaded.checkpoint.path), "activation": loaded.args.hidden_act,
            "text": str(text_file), **result}
