"""Golden tests: the dense engine against Hugging Face `transformers` (test-only dependency)."""

from __future__ import annotations

import warnings

import pytest
import torch

from model_files import add_fields, write_gguf, write_hf_model
from powerinfer.loading import default_model_path, load_model
from powerinfer.models.llama import ModelArgs, Transformer
from powerinfer.runtime import Generator, SamplingParams

transformers = pytest.importorskip("transformers")
GREEDY = SamplingParams(temperature=0)
PROMPT = "The capital of France is Paris. The capital of Germany is"


@pytest.fixture(scope="module")
def smollm2():
    return load_model(None, dtype="float32")


@pytest.fixture(scope="module")
def smollm2_reference():
    path = default_model_path()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@torch.inference_mode()
def test_smollm2_logits_match_transformers(smollm2, smollm2_reference):
    ids = torch.tensor([smollm2.tokenizer.encode(PROMPT)])
    ours = smollm2.model(ids, torch.arange(ids.shape[1]))
    reference = smollm2_reference(ids).logits
    assert (ours - reference).abs().max().item() <= 1e-3


@torch.inference_mode()
def test_smollm2_greedy_tokens_match_transformers(smollm2, smollm2_reference):
    ids = smollm2.tokenizer.encode(PROMPT)
    ours = Generator(smollm2, context=256).generate(ids, max_tokens=32, sampling=GREEDY)
    reference = smollm2_reference.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                           eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert ours.tokens[:32] == reference[:len(ours.tokens)]
    assert len(ours.tokens) == 32 or ours.tokens[-1] in smollm2.tokenizer.eos_token_ids


def test_smollm2_tokenizer_matches_transformers():
    path = default_model_path()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ours = load_model.__globals__["open_checkpoint"](None).tokenizer
    for text in [PROMPT, "Numbers 12345 and 3.14, émigré naïve 日本語!", "<|im_start|>user\nhi<|im_end|>\n",
                 "  leading spaces\n\n\ttabs"]:
        assert ours.encode(text) == reference.encode(text, add_special_tokens=False), text
        assert ours.decode(ours.encode(text), skip_special=False) == text


def _random_hf_model(tmp_path, activation: str, model_type: str = "llama", **overrides):
    """A small random checkpoint written by `transformers` itself, and that reference model."""
    config_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                  "qwen2": transformers.Qwen2Config}[model_type]
    hidden_act = {"gelu_tanh": "gelu_pytorch_tanh", "drelu": "relu"}.get(activation, activation)
    kwargs = dict(vocab_size=300, hidden_size=72, intermediate_size=101, num_hidden_layers=3,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                  hidden_act=hidden_act, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  bos_token_id=256, eos_token_id=257)
    kwargs.update(overrides)
    torch.manual_seed(0)
    reference = getattr(transformers, config_cls.__name__.replace("Config", "ForCausalLM"))(
        config_cls(**kwargs)).eval()
    with torch.no_grad():  # default init leaves norms at 1 and biases at 0: perturb them to test them
        for name, p in reference.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    if activation == "drelu":  # transformers has no dReLU: patch its MLP to relu(gate) * relu(up)
        for layer in reference.model.layers:
            mlp = layer.mlp
            mlp.forward = (lambda m: lambda x: m.down_proj(torch.relu(m.gate_proj(x)) * torch.relu(m.up_proj(x))))(mlp)
    config = reference.config.to_dict()
    config["hidden_act"] = {"drelu": "drelu"}.get(activation, config["hidden_act"])
    path = write_hf_model(tmp_path / f"{model_type}-{activation}", config, reference.state_dict())
    return path, reference


@pytest.mark.parametrize("activation", ["silu", "relu", "drelu", "gelu_tanh"])
@torch.inference_mode()
def test_random_llama_matches_transformers_for_each_activation(tmp_path, activation):
    path, reference = _random_hf_model(tmp_path, activation)
    loaded = load_model(path)
    assert loaded.args.hidden_act == activation
    ids = torch.randint(0, 256, (2, 19))
    ours = loaded.model(ids, torch.arange(19))
    assert (ours - reference(ids).logits).abs().max().item() <= 1e-4
    # 32 greedy tokens, through the cached decode path
    prompt = ids[0, :5].tolist()
    got = Generator(loaded, context=64).generate(prompt, max_tokens=32, sampling=GREEDY).tokens
    want = reference.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, 5:].tolist()
    assert got == want[:len(got)] and (len(got) == 32 or got[-1] == 257)


@pytest.mark.parametrize("model_type,overrides", [
    ("qwen2", {}),
    ("mistral", {"sliding_window": 7}),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),
    ("llama", {"tie_word_embeddings": True, "attention_bias": True}),
])
@torch.inference_mode()
def test_architecture_variants_match_transformers(tmp_path, model_type, overrides):
    path, reference = _random_hf_model(tmp_path, "silu", model_type, **overrides)
    loaded = load_model(path)
    ids = torch.randint(0, 256, (1, 23))
    assert (loaded.model(ids, torch.arange(23)) - reference(ids).logits).abs().max().item() <= 1e-4
    # cached decode must agree with the full forward too (sliding window included)
    gen = Generator(loaded, context=64)
    gen.prefill(ids[0, :11].tolist())
    for pos in range(11, 23):
        step = gen.decode_step(ids[0, pos:pos + 1], pos)
        assert (step - reference(ids[:, :pos + 1]).logits[:, -1]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_gguf_tensor_types_load_as_written(tmp_path, qtype):
    """Weights from a GGUF file of each type equal exactly what that type's round trip gives (so the
    Q/K un-permutation and the tensor layout are exact), and are close to the originals."""
    import gguf
    from gguf.quants import dequantize, quantize

    from powerinfer.models.llama import sanitize, to_hf_weights

    args = ModelArgs(vocab_size=258, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(1)
    model = Transformer(args)
    hf = to_hf_weights(model.state_dict(), args)
    path = write_gguf(tmp_path / f"m-{qtype}.gguf", args.to_config(), hf, qtype)
    t = gguf.GGMLQuantizationType[qtype]
    round_trip = {k: torch.from_numpy(dequantize(quantize(v.numpy(), t), t).reshape(v.shape).astype("float32"))
                  if v.ndim == 2 else v for k, v in hf.items()}
    expected = sanitize(round_trip, args)
    loaded = load_model(path).model.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name
        assert (tensor - model.state_dict()[name]).abs().max() <= 0.13 * tensor.abs().max()


def test_gguf_k_quant_blocks_dequantize_like_gguf(tmp_path):
    """K-quant files can't be written here (gguf-py has no K quantizer), so feed our loader raw Q6_K
    blocks and check it returns what `gguf` itself dequantizes, with the right shape and un-permutation."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize

    from powerinfer.loading.gguf_file import GGUFCheckpoint

    args = ModelArgs(vocab_size=258, hidden_size=256, intermediate_size=256, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    path = write_gguf(tmp_path / "base.gguf", args.to_config(),
                      {k: v for k, v in __import__("powerinfer.models.llama", fromlist=["x"]).to_hf_weights(
                          Transformer(args).state_dict(), args).items()}, "F32")
    # rewrite one tensor as random Q6_K blocks: 210 bytes per 256 values; scales kept finite
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    src = GGUFCheckpoint(path)
    add_fields(w, {k: v for k, v in src.fields.items() if not k.startswith(("general.architecture", "GGUF."))})
    raw = None
    for t in src.tensors:
        data = np.array(src._data[t.offset:t.offset + t.n_bytes]).view(np.float32).reshape(t.shape)
        if t.name == "blk.0.ffn_up.weight":
            raw = rng.integers(0, 255, size=(256, 210), dtype=np.uint8)
            raw[:, 208:210] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)  # block scale d
            w.add_tensor(t.name, raw, raw_dtype=gguf.GGMLQuantizationType.Q6_K)
        else:
            w.add_tensor(t.name, data)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    loaded = load_model(tmp_path / "k.gguf")
    expected = torch.from_numpy(dequantize(raw, gguf.GGMLQuantizationType.Q6_K).reshape(256, 256))
    got = loaded.model.layers[0].mlp.gate_up_proj.weight[256:]
    assert torch.equal(got, expected)
