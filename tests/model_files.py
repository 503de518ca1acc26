"""Helpers that write small model files for tests: byte-level tokenizers, HF directories, GGUF files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from powerinfer.loading.gguf_export import add_fields, gguf_name  # add_fields: tests import it from here


def byte_level_tokenizer(extra_special: tuple[str, ...] = ("<s>", "</s>")):
    """A `tokenizers` byte-level BPE with the 256 byte symbols and no merges (ids 0..255, specials after)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers import AddedToken

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in extra_special])
    return tok


def write_hf_model(path: Path, config: dict, state_dict: dict[str, torch.Tensor]) -> Path:
    """config.json + model.safetensors + tokenizer.json (byte-level; BOS 256, EOS 257)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    tied = config.get("tie_word_embeddings")
    save_file({k: v.contiguous() for k, v in state_dict.items() if not (tied and k == "lm_head.weight")},
              str(path / "model.safetensors"))
    byte_level_tokenizer().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return path


def _permute_for_llama_cpp(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to Q/K rows (the inverse of the loader's un-permute). Kept apart from
    `gguf_export.llama_cpp_permute` on purpose: the exporter's test compares against it."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)




def write_gguf(path: Path, config: dict, hf_weights: dict[str, torch.Tensor], qtype_name: str = "F32",
               arch: str = "llama", tokenizer_fields: dict | None = None) -> Path:
    """A GGUF file as llama.cpp's converter would write it (Q/K permuted for `llama`)."""
    import gguf
    from gguf.quants import quantize

    qtype = gguf.GGMLQuantizationType[qtype_name]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.block_count", config["num_hidden_layers"])
    w.add_uint32(f"{arch}.context_length", config["max_position_embeddings"])
    w.add_uint32(f"{arch}.embedding_length", config["hidden_size"])
    w.add_uint32(f"{arch}.feed_forward_length", config["intermediate_size"])
    w.add_uint32(f"{arch}.attention.head_count", config["num_attention_heads"])
    w.add_uint32(f"{arch}.attention.head_count_kv", config["num_key_value_heads"])
    w.add_float32(f"{arch}.rope.freq_base", config.get("rope_theta", 10000.0))
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", config["rms_norm_eps"])
    add_fields(w, tokenizer_fields or byte_level_gguf_tokenizer())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    for name, tensor in hf_weights.items():
        array = tensor.float().numpy()
        if arch == "llama" and name.endswith("self_attn.q_proj.weight"):
            array = _permute_for_llama_cpp(array, heads)
        elif arch == "llama" and name.endswith("self_attn.k_proj.weight"):
            array = _permute_for_llama_cpp(array, kv_heads)
        # norms and biases stay F32, as llama.cpp keeps 1-D tensors
        t = qtype if array.ndim == 2 else gguf.GGMLQuantizationType.F32
        data = quantize(np.ascontiguousarray(array), t)
        w.add_tensor(gguf_name(name), data, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def byte_level_gguf_tokenizer() -> dict:
    tok = byte_level_tokenizer()
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [1] * 256 + [3, 3],
            "tokenizer.ggml.bos_token_id": 256, "tokenizer.ggml.eos_token_id": 257}
