"""KV cache, sampling, stop conditions and streaming on small random models."""

from __future__ import annotations

import pytest
import torch

from model_files import byte_level_tokenizer, write_hf_model
from powerinfer.errors import ContextOverflowError, PowerInferError
from powerinfer.loading import IncrementalDecoder, load_model
from powerinfer.models.llama import ModelArgs, Transformer, to_hf_weights
from powerinfer.runtime import Generator, KVCache, Sampler, SamplingParams

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    args = ModelArgs(vocab_size=260, hidden_size=48, intermediate_size=67, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                     bos_token_id=256, eos_token_id=257)
    torch.manual_seed(0)
    model = Transformer(args)
    path = write_hf_model(tmp_path_factory.mktemp("tiny"), args.to_config(),
                          to_hf_weights(model.state_dict(), args))
    return load_model(path)


@torch.inference_mode()
@pytest.mark.parametrize("batch", [1, 2])
def test_cached_decode_equals_full_recompute(tiny, batch):
    model, args = tiny.model, tiny.args
    ids = torch.randint(0, 256, (batch, 30))
    full = model(ids, torch.arange(30))
    cache = KVCache.for_model(args, batch, 64, torch.float32, "cpu")
    cache.set_window(13)
    prefix = model(ids[:, :13], torch.arange(13), cache)
    torch.testing.assert_close(prefix, full[:, :13], atol=1e-5, rtol=1e-5)
    for pos in range(13, 30):
        cache.set_window(pos + 1)
        step = model(ids[:, pos:pos + 1], torch.tensor([pos]), cache)
        torch.testing.assert_close(step[:, 0], full[:, pos], atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_full_window_mask_equals_trimmed_window(tiny):
    """CUDA-graph mode attends over the whole masked cache; it must equal the trimmed eager window."""
    ids = torch.randint(0, 256, (1, 9))
    a, b = (KVCache.for_model(tiny.args, 1, 64, torch.float32, "cpu") for _ in range(2))
    a.set_window(9)
    b.set_window(64)
    torch.testing.assert_close(tiny.model(ids, torch.arange(9), a), tiny.model(ids, torch.arange(9), b))


def test_attention_mask_is_none_only_where_causal_attention_is_the_same():
    cache = KVCache(1, 1, 1, 4, 16, torch.float32, "cpu")
    cache.set_window(6)
    assert cache.attention_mask(torch.arange(6)) is None  # the tokens fill the window
    assert cache.attention_mask(torch.tensor([5])) is None  # one decode token in the window's last slot
    assert torch.equal(cache.attention_mask(torch.tensor([3])), torch.arange(6)[None] <= 3)
    assert cache.attention_mask(torch.arange(2, 5)).shape == (3, 6)
    sliding = KVCache(1, 1, 1, 4, 16, torch.float32, "cpu", sliding_window=4)
    sliding.set_window(6)
    assert torch.equal(sliding.attention_mask(torch.tensor([5])), torch.tensor([[False, False, True, True, True, True]]))


def test_generator_greedy_equals_argmax_loop(tiny):
    prompt = [256, 10, 20, 30]
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        for _ in range(12):
            nxt = tiny.model(ids, torch.arange(ids.shape[1]))[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    want = ids[0, 4:].tolist()
    got = Generator(tiny, context=64).generate(prompt, max_tokens=12, sampling=GREEDY).tokens
    cut = want.index(257) + 1 if 257 in want else 12
    assert got == want[:cut]


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    logits = torch.randn(3, 50)
    draw = lambda p: Sampler(p, torch.device("cpu"))(logits)
    assert torch.equal(draw(SamplingParams(temperature=1.0, seed=7)), draw(SamplingParams(temperature=1.0, seed=7)))
    assert torch.equal(draw(SamplingParams(temperature=1.0, top_k=1)), logits.argmax(-1))
    assert torch.equal(draw(SamplingParams(temperature=1.0, top_p=1e-6, seed=3)), logits.argmax(-1))
    # top-k=5 never draws outside the 5 largest
    top5 = logits.topk(5).indices
    for seed in range(20):
        tok = draw(SamplingParams(temperature=2.0, top_k=5, seed=seed))
        assert all(t in row for t, row in zip(tok.tolist(), top5.tolist()))


def test_sampling_distribution_follows_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    sampler = Sampler(SamplingParams(temperature=1.0, seed=0), torch.device("cpu"))
    counts = torch.bincount(torch.cat([sampler(logits) for _ in range(4000)]), minlength=3).float()
    torch.testing.assert_close(counts / 4000, torch.softmax(logits[0], 0), atol=0.03, rtol=0)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2)])
def test_bad_sampling_params(bad):
    with pytest.raises(PowerInferError):
        SamplingParams(**bad)


def test_stream_pieces_join_to_full_text_and_stop_strings(tiny):
    gen = Generator(tiny, context=96)
    sampling = SamplingParams(temperature=1.0, seed=5)
    full = gen.generate([256, 1, 2, 3], max_tokens=40, sampling=sampling)
    pieces = list(gen.stream([256, 1, 2, 3], max_tokens=40, sampling=sampling))
    assert "".join(c.text for c in pieces) == full.text
    assert pieces[-1].finish_reason in ("stop", "length")
    if len(full.text) > 6:  # stop on a substring of the unstopped text: output is cut right before it
        stop = full.text[3:6]
        stopped = gen.generate([256, 1, 2, 3], max_tokens=40, sampling=sampling, stop=[stop])
        assert stopped.text == full.text[:full.text.index(stop)]
        assert stopped.stats.finish_reason == "stop"


def test_max_tokens_and_context_limits(tiny):
    gen = Generator(tiny, context=16)
    out = gen.generate([256] + [5] * 10, max_tokens=100, sampling=SamplingParams(temperature=1, seed=1))
    assert len(out.tokens) <= 16 - 11
    with pytest.raises(ContextOverflowError):
        gen.generate([5] * 16, max_tokens=1)
    with pytest.raises(PowerInferError):
        gen.generate([5], max_tokens=0)


def test_incremental_decoder_keeps_multibyte_characters_whole():
    from powerinfer.loading.tokenizer import Tokenizer

    tok = Tokenizer(byte_level_tokenizer(), 256, [257], False)
    text = "naïve 日本語 ok"
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.push(i) for i in tok.encode(text)]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
