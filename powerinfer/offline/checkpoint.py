"""Files the offline training tools write: resumable training state and Hugging Face model directories.

Every file is written to a temporary name beside its target and renamed over it, so an interruption
leaves either the old file or the new one, never half of one. A training-state file carries the SHA-256
of its payload in its header; a truncated or altered file is refused with a one-line error instead of
being loaded.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from pathlib import Path
from typing import Callable

import torch

from powerinfer.errors import PowerInferError

STATE_MAGIC = b"POWERINFER-TRAINING-STATE\n"
STATE_FORMAT_VERSION = 1
_HEADER_LENGTH = struct.Struct("<Q")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(temporary_path)`, flush it to disk, then rename it to `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # some writers create private files
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def run_key(run_config: dict) -> str:
    """A short hash naming a training run's configuration (resuming needs an identical one)."""
    return hashlib.sha256(json.dumps(run_config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_training_state(path: Path, state: dict, run_config: dict, step: int) -> None:
    """Write `state` (tensors, numbers, nested dicts) with a checksummed header, atomically."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getbuffer()
    header = json.dumps({
        "format": "powerinfer-training-state", "format_version": STATE_FORMAT_VERSION,
        "run_key": run_key(run_config), "run": run_config, "step": step,
        "payload_bytes": len(payload), "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }, sort_keys=True, default=str).encode()

    def write(tmp: Path):
        with open(tmp, "wb") as f:
            f.write(STATE_MAGIC)
            f.write(_HEADER_LENGTH.pack(len(header)))
            f.write(header)
            f.write(payload)

    atomic_write(path, write)


def read_training_state_header(path: Path) -> dict:
    """The header of a training-state file (run configuration, step), without reading the payload."""
    with open(path, "rb") as f:
        return _read_header(f, path)


def load_training_state(path: Path, device: str | torch.device = "cpu") -> tuple[dict, dict]:
    """(header, state) of a training-state file, after checking its length and checksum."""
    with open(path, "rb") as f:
        header = _read_header(f, path)
        payload = f.read()
    if len(payload) != header["payload_bytes"]:
        raise PowerInferError(f"training checkpoint {path} is truncated ({len(payload)} of "
                              f"{header['payload_bytes']} payload bytes); delete it or pass --no-resume")
    if hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
        raise PowerInferError(f"training checkpoint {path} is corrupt (checksum mismatch); "
                              "delete it or pass --no-resume")
    state = torch.load(io.BytesIO(payload), map_location=device, weights_only=True)
    return header, state


def _read_header(f, path: Path) -> dict:
    magic = f.read(len(STATE_MAGIC))
    if magic != STATE_MAGIC[:len(magic)]:
        raise PowerInferError(f"{path} is not a powerinfer training checkpoint")
    length = f.read(_HEADER_LENGTH.size)
    if len(magic) < len(STATE_MAGIC) or len(length) < _HEADER_LENGTH.size:
        raise PowerInferError(f"training checkpoint {path} is truncated; delete it or pass --no-resume")
    raw = f.read(_HEADER_LENGTH.unpack(length)[0])
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise PowerInferError(f"training checkpoint {path} has a corrupt or truncated header; "
                              "delete it or pass --no-resume") from None
    if header.get("format_version", 0) > STATE_FORMAT_VERSION:
        raise PowerInferError(f"training checkpoint {path} has format version {header['format_version']}, "
                              f"newer than this powerinfer reads ({STATE_FORMAT_VERSION})")
    return header


def save_hf_model(out_dir: Path, model: torch.nn.Module, tokenizer, dtype: torch.dtype = torch.float32,
                  extra_files: dict[str, str] | None = None) -> Path:
    """Write `model` as a Hugging Face directory: config.json, model.safetensors, tokenizer.json and
    tokenizer_config.json (chat template, BOS/EOS), plus `extra_files` (name -> text).

    config.json is written last, so a directory interrupted half-way is not mistaken for a model.
    """
    from safetensors.torch import save_file

    from powerinfer.models.llama import to_hf_weights

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    args = model.args
    state = {k: v.detach().to("cpu", dtype) for k, v in model.state_dict().items()}
    weights = to_hf_weights(state, args)
    atomic_write(out_dir / "model.safetensors",
                 lambda tmp: save_file(weights, str(tmp), metadata={"format": "pt"}))
    atomic_write(out_dir / "tokenizer.json", lambda tmp: tokenizer.backend.save(str(tmp)))

    def token_text(token_id):
        return None if token_id is None else tokenizer.backend.id_to_token(token_id)

    eos = tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else None
    tokenizer_config = {"bos_token": token_text(tokenizer.bos_token_id), "eos_token": token_text(eos),
                        "add_bos_token": tokenizer.add_bos, "chat_template": tokenizer.chat_template}
    atomic_write_text(out_dir / "tokenizer_config.json", json.dumps(tokenizer_config, indent=2))
    for name, text in (extra_files or {}).items():
        atomic_write_text(out_dir / name, text)
    config = {**args.to_config(), "torch_dtype": str(dtype).removeprefix("torch.")}
    atomic_write_text(out_dir / "config.json", json.dumps(config, indent=2))
    return out_dir
