"""The CLI end to end: the default model, and one-line errors for every kind of bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from model_files import write_gguf, write_hf_model
from powerinfer.loading import default_model_path


def powerinfer(*argv, stdin: str | None = None):
    return subprocess.run([sys.executable, "-m", "powerinfer", *argv], capture_output=True, text=True,
                          input=stdin, timeout=300)


def assert_one_line_error(result, *words):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_generate_default_model_streams_and_summarises():
    r = powerinfer("generate", "--max-tokens", "8", "--temperature", "0", "The capital of France is")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "decode:" in r.stderr and "tok/s" in r.stderr


def test_chat_reads_turns_from_stdin():
    r = powerinfer("chat", "--max-tokens", "8", "--temperature", "0", stdin="What is 2+2?\n/quit\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


def test_inspect_json_and_text():
    r = powerinfer("inspect", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["architecture"] == "llama" and info["config"]["num_hidden_layers"] == 30
    assert info["tensor_types"]["Q4_1"] == 210 and info["tokenizer"]["chat_template"]
    r = powerinfer("inspect", str(default_model_path()), "--tensors")
    assert r.returncode == 0 and "blk.0.ffn_gate.weight" in r.stdout and "Q4_1" in r.stdout


def test_missing_file():
    assert_one_line_error(powerinfer("generate", "--model", "/no/such/model.gguf", "hi"), "/no/such/model.gguf",
                          "no such file")


def test_truncated_and_corrupt_gguf(tmp_path):
    data = default_model_path().read_bytes()
    (tmp_path / "trunc.gguf").write_bytes(data[: len(data) // 2])
    assert_one_line_error(powerinfer("generate", "--model", str(tmp_path / "trunc.gguf"), "hi"), "truncated")
    (tmp_path / "head.gguf").write_bytes(data[:5000])
    assert_one_line_error(powerinfer("inspect", str(tmp_path / "head.gguf")), "truncated")
    (tmp_path / "junk.gguf").write_bytes(b"NOPE" + data[4:100000])
    assert_one_line_error(powerinfer("inspect", str(tmp_path / "junk.gguf")), "not a GGUF file")


def test_unsupported_architecture(tmp_path):
    path = write_hf_model(tmp_path / "bert", {"model_type": "bert", "hidden_size": 8}, {})
    assert_one_line_error(powerinfer("generate", "--model", str(path), "hi"), "unsupported architecture", "bert")
    config = dict(num_hidden_layers=1, max_position_embeddings=8, hidden_size=8, intermediate_size=8,
                  num_attention_heads=2, num_key_value_heads=2, rms_norm_eps=1e-5)
    gguf_path = write_gguf(tmp_path / "gpt2.gguf", config, {}, arch="gpt2")
    assert_one_line_error(powerinfer("inspect", str(gguf_path)), "unsupported GGUF architecture", "gpt2")


def test_prompt_longer_than_context():
    assert_one_line_error(powerinfer("generate", "--ctx", "8", "one two three four five six seven eight nine"),
                          "context")


@pytest.mark.parametrize("flags,word", [
    (["--temperature", "-1"], "--temperature"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--top-p", "2"], "--top-p"),
    (["--device", "tpu"], "--device"),
    (["--dtype", "int3"], "--dtype"),
    (["--ctx", "many"], "--ctx"),
    (["--threads", "100000"], "--threads"),
])
def test_bad_flag_values(flags, word):
    assert_one_line_error(powerinfer("generate", *flags, "hi"), word)


def test_cuda_requested_without_gpu():
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert_one_line_error(powerinfer("generate", "--device", "cuda", "hi"), "CUDA")
