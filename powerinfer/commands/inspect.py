"""`powerinfer inspect`: what a checkpoint holds, without loading its weights."""

from __future__ import annotations

import json
from collections import Counter

from powerinfer.loading import open_checkpoint
from powerinfer.models import architecture

HELP = "show a model's architecture, tensor shapes and types, tokenizer and size"


def add_arguments(p) -> None:
    p.add_argument("path", nargs="?", default=None, help="GGUF file or model directory (default: the default model)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--tensors", action="store_true", help="list every tensor")


def describe(path) -> dict:
    checkpoint = open_checkpoint(path)
    args = architecture(checkpoint.config.get("model_type", "llama")).ModelArgs.from_config(checkpoint.config)
    tensors = checkpoint.tensor_info()
    tokenizer = checkpoint.tokenizer
    n_params = sum(_numel(t["shape"]) for t in tensors)
    return {
        "path": str(checkpoint.path),
        "format": checkpoint.format,
        "architecture": args.model_type,
        "config": {k: v for k, v in args.to_config().items() if not k.startswith("_")},
        "ffn_activation": args.hidden_act,
        "parameters": n_params,
        "file_bytes": sum(t["bytes"] for t in tensors),
        "tensor_types": dict(Counter(t["type"] for t in tensors)),
        "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
                      "bos_token_id": tokenizer.bos_token_id, "eos_token_ids": tokenizer.eos_token_ids,
                      "chat_template": tokenizer.chat_template is not None},
        "tensors": tensors,
    }


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def run(args) -> int:
    info = describe(args.path)
    if not args.tensors:
        info_out = {k: v for k, v in info.items() if k != "tensors"}
        info_out["num_tensors"] = len(info["tensors"])
    else:
        info_out = info
    if args.json:
        print(json.dumps(info_out, indent=2))
        return 0
    c = info["config"]
    print(f"{info['path']} ({info['format']})")
    print(f"  architecture   {info['architecture']}, FFN activation {info['ffn_activation']}")
    print(f"  layers         {c['num_hidden_layers']}, hidden {c['hidden_size']}, FFN {c['intermediate_size']}")
    print(f"  attention      {c['num_attention_heads']} heads, {c['num_key_value_heads']} KV heads, "
          f"head dim {c['head_dim']}, rope theta {c['rope_theta']:g}"
          + (f", scaling {c['rope_scaling']}" if c.get("rope_scaling") else ""))
    print(f"  context        {c['max_position_embeddings']}, vocab {c['vocab_size']}, "
          f"tied embeddings {c['tie_word_embeddings']}")
    print(f"  parameters     {info['parameters'] / 1e6:.1f} M, {info['file_bytes'] / 2**20:.1f} MiB of tensors")
    print("  tensor types   " + ", ".join(f"{k}: {v}" for k, v in info["tensor_types"].items()))
    t = info["tokenizer"]
    print(f"  tokenizer      {t['kind']}, {t['vocab_size']} tokens, BOS {t['bos_token_id']}, "
          f"EOS {t['eos_token_ids']}, chat template {'yes' if t['chat_template'] else 'no'}")
    if args.tensors:
        for tensor in info["tensors"]:
            print(f"    {tensor['name']:<48} {str(tensor['shape']):<16} {tensor['type']}")
    return 0
