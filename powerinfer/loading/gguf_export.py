"""Write a Hugging Face LLaMA directory as a dense GGUF file (llama.cpp's format, spec: ggml `docs/gguf.md`).

What llama.cpp's converter (`convert_hf_to_gguf.py`) writes for a LLaMA model, for the tensor types the
checkpoint holds (F16, BF16 or F32; 1-D tensors F32): `llama.*` hyper-parameters, the tokenizer as
`tokenizer.ggml.*` (byte-level BPE only: `gpt2` model with tokens, types and merges), and Q/K rows
permuted to llama.cpp's rope layout, which `gguf_file._unpermute` undoes on loading. llama.cpp's `llama`
architecture has no activation field and always computes SiLU; `powerinfer.hidden_act` carries the real
one for this package's loader (a ReLU model in llama.cpp has the right shapes and speed, not its outputs).
Tensors are streamed to the file one at a time; the file is written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import numpy as np
import torch

from powerinfer.errors import PowerInferError, UnsupportedModelError
from powerinfer.loading import gguf_file

# the loader's GGUF -> Hugging Face tables, inverted: one naming table for both directions
_LAYER_NAMES = {hf: gg for gg, hf in gguf_file._LAYER_NAMES.items()}
_GLOBAL_NAMES = {hf: gg for gg, hf in gguf_file._GLOBAL_NAMES.items()}


def gguf_name(hf_name: str) -> str:
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    parts = hf_name.split(".", 3)  # model.layers.<i>.<rest>
    if len(parts) == 4 and parts[1] == "layers" and parts[3] in _LAYER_NAMES:
        return f"blk.{parts[2]}.{_LAYER_NAMES[parts[3]]}"
    raise UnsupportedModelError(f"no GGUF name for tensor {hf_name}")


def llama_cpp_permute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Q/K rows from the rotate-half layout [head, 2, pair] to llama.cpp's [head, pair, 2]."""
    rows = weight.shape[0]
    return (weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).transpose(1, 2)
            .reshape(weight.shape))


def tokenizer_fields(tokenizer) -> dict:
    """`tokenizer.ggml.*` fields of a byte-level BPE `Tokenizer` (ids must be 0..n-1)."""
    data = json.loads(tokenizer.backend.to_str())
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise UnsupportedModelError(f"GGUF export supports byte-level BPE tokenizers, not {model.get('type')!r}")
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise UnsupportedModelError("GGUF export needs token ids 0..n-1 without gaps")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2", "tokenizer.ggml.tokens": tokens,
              "tokenizer.ggml.token_type": [3 if i in tokenizer.special_ids else 1 for i in range(len(tokens))],
              "tokenizer.ggml.add_bos_token": bool(tokenizer.add_bos)}
    if merges:  # gguf-py cannot write an empty array
        fields["tokenizer.ggml.merges"] = merges
    if tokenizer.bos_token_id is not None:
        fields["tokenizer.ggml.bos_token_id"] = int(tokenizer.bos_token_id)
    if tokenizer.eos_token_ids:
        fields["tokenizer.ggml.eos_token_id"] = int(tokenizer.eos_token_ids[0])
    return fields


def add_fields(writer, fields: dict) -> None:
    """Metadata fields with the GGUF value type their Python type implies (int: uint32, float: float32)."""
    for key, value in fields.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)


def export_llama_gguf(hf_dir: str | Path, out: str | Path, name: str | None = None, force: bool = False) -> Path:
    """Write the Hugging Face LLaMA directory `hf_dir` as the GGUF file `out`; returns its path."""
    try:
        import gguf
    except ImportError:
        raise PowerInferError("writing GGUF files needs the `gguf` package: pip install gguf") from None
    from safetensors import safe_open

    from powerinfer.loading.hf_dir import HFCheckpoint
    from powerinfer.models.llama import ModelArgs

    out = Path(out)
    if out.exists() and not force:
        raise PowerInferError(f"{out} already exists (pass --force to replace it)")
    checkpoint = HFCheckpoint(Path(hf_dir))
    config = checkpoint.config
    args = ModelArgs.from_config(config)
    if args.model_type != "llama" or args.qkv_bias or args.rope_scaling or args.sliding_window:
        raise UnsupportedModelError("GGUF export supports plain LLaMA models (no biases, rope scaling or sliding "
                                    "window)")
    info = {t["name"]: t for t in checkpoint.tensor_info()}
    dtypes = {t["type"] for t in info.values() if len(t["shape"]) == 2}
    file_type = {"F32": 0, "F16": 1, "BF16": 32}.get(  # llama.cpp's LLAMA_FTYPE_* codes
        dtypes.pop() if len(dtypes) == 1 else "", None)
    if file_type is None:
        raise UnsupportedModelError("GGUF export needs all 2-D weights in one of float32, float16, bfloat16")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
    writer = gguf.GGUFWriter(str(tmp), "llama")
    try:
        writer.add_name(name or Path(hf_dir).name)
        writer.add_file_type(file_type)
        add_fields(writer, {
            "llama.context_length": args.max_position_embeddings, "llama.embedding_length": args.hidden_size,
            "llama.block_count": args.num_hidden_layers, "llama.feed_forward_length": args.intermediate_size,
            "llama.rope.dimension_count": args.head_dim, "llama.attention.head_count": args.num_attention_heads,
            "llama.attention.head_count_kv": args.num_key_value_heads, "llama.vocab_size": args.vocab_size,
            "llama.attention.layer_norm_rms_epsilon": float(args.rms_norm_eps),
            "llama.rope.freq_base": float(args.rope_theta), "powerinfer.hidden_act": args.hidden_act,
            "powerinfer.synthetic": bool(config.get("powerinfer_synthetic", False)),
            **tokenizer_fields(checkpoint.tokenizer)})
        # tensor infos, then the data below, both in the checkpoint's file and key order
        names = [n for n in info if not (args.tie_word_embeddings and n == "lm_head.weight")]
        for n in names:
            t = info[n]
            count = int(np.prod(t["shape"]))
            if len(t["shape"]) == 1 or t["type"] == "F32":  # llama.cpp keeps 1-D tensors in F32
                writer.add_tensor_info(gguf_name(n), t["shape"], np.dtype(np.float32), 4 * count)
            elif t["type"] == "BF16":  # numpy has no bfloat16: raw bytes
                writer.add_tensor_info(gguf_name(n), [*t["shape"][:-1], 2 * t["shape"][-1]], np.dtype(np.uint8),
                                       2 * count, raw_dtype=gguf.GGMLQuantizationType.BF16)
            else:
                writer.add_tensor_info(gguf_name(n), t["shape"], np.dtype(np.float16), 2 * count)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        selected = set(names)
        for file in checkpoint.files:
            with safe_open(str(file), framework="pt") as f:
                for n in f.keys():
                    if n not in selected:
                        continue
                    tensor = f.get_tensor(n)
                    if n.endswith("q_proj.weight"):
                        tensor = llama_cpp_permute(tensor, args.num_attention_heads)
                    elif n.endswith("k_proj.weight"):
                        tensor = llama_cpp_permute(tensor, args.num_key_value_heads)
                    if tensor.dim() == 1 or tensor.dtype == torch.float32:
                        array = tensor.float().contiguous().numpy()
                    elif tensor.dtype == torch.bfloat16:
                        array = tensor.contiguous().view(torch.uint8).numpy()
                    else:
                        array = tensor.contiguous().numpy()
                    writer.write_tensor_data(array)
        writer.close()
        os.replace(tmp, out)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return out
