"""ReLU-fication, the shared training loop, training checkpoints and the tiny ReLU test model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model_files import write_hf_model
from powerinfer.cli import main
from powerinfer.errors import PowerInferError
from powerinfer.loading import load_model
from powerinfer.models.llama import ModelArgs, Transformer, to_hf_weights
from powerinfer.offline import relufy as relufy_module
from powerinfer.offline.checkpoint import save_hf_model
from powerinfer.offline.relufy import (LOG_FILE, STATE_FILE, RelufyConfig, distillation_loss, relufy,
                                       sample_continuations, tokenize_text)
from powerinfer.offline.tiny import DEFAULT_DATA_DIR, HELD_OUT_FILE
from powerinfer.offline.train import measure_sparsity_and_ppl, share_of_neurons_for

TRAIN = dict(batch_size=4, seq_len=64, lr=3e-4, warmup_steps=2, save_every=2)
SMALL_RUN_TOKENS = 6 * 4 * 64  # six steps


@pytest.fixture(scope="module")
def silu_model(tmp_path_factory) -> Path:
    """A small random SwiGLU model (synthetic weights) with a byte-level tokenizer, as a HF directory."""
    args = ModelArgs(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, hidden_act="silu",
                     max_position_embeddings=256, bos_token_id=256, eos_token_id=257)
    torch.manual_seed(0)
    model = Transformer(args)
    for p in model.parameters():
        if p.ndim > 1:  # norms stay at 1
            torch.nn.init.normal_(p, std=0.3)
    return write_hf_model(tmp_path_factory.mktemp("silu"), args.to_config(),
                          to_hf_weights(model.state_dict(), args))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    text = (DEFAULT_DATA_DIR / "wikitext2-valid.txt").read_text(encoding="utf-8")[:20000]
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text(text, encoding="utf-8")
    return path


def run_small(model, out, data, **kwargs):
    return relufy(model, out, "relu", data_file=data, tokens=SMALL_RUN_TOKENS, train_options=dict(TRAIN),
                  config=RelufyConfig(prompt_len=8), device="cpu", show_progress=False, **kwargs)


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_model(out).model.state_dict()


# -- the tiny ReLU model ----------------------------------------------------------------------------------

def test_tiny_model_is_naturally_sparse_with_sane_perplexity(tiny_relu_model):
    loaded = load_model(tiny_relu_model)
    assert loaded.args.hidden_act == "relu"
    info = json.loads((tiny_relu_model / "tiny.json").read_text())
    assert info["train_tokens"] > 0 and info["parameters"] > 1_000_000
    text = (DEFAULT_DATA_DIR / HELD_OUT_FILE).read_text(encoding="utf-8")
    ids = tokenize_text(loaded.tokenizer, text)
    held_out_tail = ids[-8192:]
    result = measure_sparsity_and_ppl(loaded.model, held_out_tail, seq_len=info["recipe"]["seq_len"])
    assert result["sparsity"] >= 0.70
    assert result["ppl"] < loaded.args.vocab_size / 10
    assert all(s > 0.5 for s in result["layer_sparsity"])


def test_tiny_model_cache_is_reused(tiny_relu_model):
    from powerinfer.offline.tiny import ensure_tiny_relu_model

    stamp = (tiny_relu_model / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_relu_model() == tiny_relu_model
    assert (tiny_relu_model / "model.safetensors").stat().st_mtime_ns == stamp


def test_tiny_model_generates_text(tiny_relu_model):
    import powerinfer

    completion = powerinfer.load(tiny_relu_model).generate("The game was", max_tokens=8,
                                                          sampling=powerinfer.SamplingParams(temperature=0))
    assert completion.tokens and completion.text.strip()


# -- pieces --------------------------------------------------------------------------------------------

def test_share_of_neurons_for_80_percent():
    assert share_of_neurons_for(torch.tensor([8.0, 1.0, 1.0, 0.0])) == 0.25
    assert share_of_neurons_for(torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])) == 0.8


def test_distillation_loss_is_zero_for_equal_logits_and_positive_otherwise():
    logits = torch.randn(2, 5, 11)
    assert distillation_loss(logits, logits).abs() < 1e-6
    assert distillation_loss(logits, torch.randn(2, 5, 11)) > 0.01


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_sampling_with_cache_matches_full_forward(silu_model, device):
    model = load_model(silu_model, device=device, dtype=torch.float32).model
    prompts = torch.tensor([[256, 72, 101], [256, 87, 111]], device=device)
    out = sample_continuations(model, prompts, 12, torch.Generator(device).manual_seed(0), temperature=1e-4)
    assert torch.equal(out[:, :3], prompts)
    with torch.no_grad():  # near-zero temperature: each sampled token is the argmax of a full forward pass
        logits = model(out, torch.arange(12, device=device))
    assert torch.equal(logits[:, 2:-1].argmax(-1), out[:, 3:])


def test_saved_model_round_trips(tmp_path, silu_model):
    loaded = load_model(silu_model)
    save_hf_model(tmp_path / "copy", loaded.model, loaded.tokenizer)
    again = load_model(tmp_path / "copy")
    tokens = torch.tensor([[256, 1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(loaded.model(tokens, torch.arange(5)), again.model(tokens, torch.arange(5)))
    assert again.tokenizer.encode("hello") == loaded.tokenizer.encode("hello")


# -- relufy ----------------------------------------------------------------------------------------------

def test_relufy_writes_a_loadable_relu_model_and_distillation_loss_falls(tmp_path, silu_model, data_file):
    out = tmp_path / "relu"
    recipe = run_small(silu_model, out, data_file, eval_file=data_file, eval_tokens=1024)
    loaded = load_model(out)
    assert loaded.args.hidden_act == "relu"
    assert json.loads((out / "config.json").read_text())["hidden_act"] == "relu"
    assert not (out / STATE_FILE).exists()  # training state is dropped once the model is written
    assert recipe["steps"] == 6 and recipe["tokens_trained"] == SMALL_RUN_TOKENS
    losses = [r["loss"] for r in map(json.loads, (out / LOG_FILE).read_text().splitlines())
              if r["event"] == "step"]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert 0 < recipe["evaluations"][-1]["sparsity"] < 1
    assert main(["inspect", str(out)]) == 0


def test_relufy_drelu_through_the_cli(tmp_path, silu_model, data_file, capsys):
    out = tmp_path / "drelu"
    assert main(["relufy", "-m", str(silu_model), "--activation", "drelu", "--data", str(data_file),
                 "--tokens", "256", "--batch-size", "2", "--seq-len", "64", "-o", str(out)]) == 0
    assert load_model(out).args.hidden_act == "drelu"
    assert "wrote" in capsys.readouterr().out
    assert main(["relufy", "--eval-only", "-m", str(out), "--eval-data", str(data_file),
                 "--seq-len", "64", "--eval-tokens", "512"]) == 0
    measured = json.loads(capsys.readouterr().out)
    assert measured["activation"] == "drelu" and measured["ppl"] > 1 and 0 < measured["sparsity"] < 1


def _interrupt_at(monkeypatch, step: int, exception: type[BaseException]):
    original = relufy_module.DistillationBatches.__call__

    def interrupted(self, s):
        if s == step:
            raise exception()
        return original(self, s)

    monkeypatch.setattr(relufy_module.DistillationBatches, "__call__", interrupted)


@pytest.mark.parametrize("exception, resumed_from", [(KeyboardInterrupt, 3), (RuntimeError, 2)])
def test_interrupted_run_resumes_to_the_same_model(tmp_path, silu_model, data_file, monkeypatch,
                                                   exception, resumed_from):
    # Ctrl-C saves the state at the last finished step; a crash leaves the last periodic checkpoint (every 2).
    straight = tmp_path / "straight"
    run_small(silu_model, straight, data_file)
    resumed = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 3, exception)
        with pytest.raises(exception):
            run_small(silu_model, resumed, data_file)
    assert (resumed / STATE_FILE).exists() and not (resumed / "config.json").exists()
    recipe = run_small(silu_model, resumed, data_file)
    assert recipe["resumed_from_step"] == resumed_from and recipe["steps"] == 6
    expected, got = final_weights(straight), final_weights(resumed)
    assert all(torch.equal(expected[name], got[name]) for name in expected)


def _interrupted_run(tmp_path, silu_model, data_file, monkeypatch) -> Path:
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 3, KeyboardInterrupt)
        with pytest.raises(KeyboardInterrupt):
            run_small(silu_model, out, data_file)
    return out


@pytest.mark.parametrize("damage, message", [("flip", "corrupt (checksum mismatch)"),
                                             ("truncate", "truncated")])
def test_damaged_checkpoint_is_refused_with_one_line(tmp_path, silu_model, data_file, monkeypatch,
                                                     damage, message):
    out = _interrupted_run(tmp_path, silu_model, data_file, monkeypatch)
    state = out / STATE_FILE
    raw = bytearray(state.read_bytes())
    if damage == "flip":
        raw[-100] ^= 0xFF
    else:
        raw = raw[:len(raw) // 2]
    state.write_bytes(bytes(raw))
    with pytest.raises(PowerInferError) as error:
        run_small(silu_model, out, data_file)
    assert message in str(error.value) and "\n" not in str(error.value)
    run_small(silu_model, out, data_file, resume=False)  # starting over replaces it
    assert load_model(out).args.hidden_act == "relu"


def test_checkpoint_of_another_run_is_not_resumed(tmp_path, silu_model, data_file, monkeypatch):
    out = _interrupted_run(tmp_path, silu_model, data_file, monkeypatch)
    with pytest.raises(PowerInferError, match="different run"):
        relufy(silu_model, out, "relu", data_file=data_file, tokens=SMALL_RUN_TOKENS,
               train_options={**TRAIN, "lr": 1e-4}, config=RelufyConfig(prompt_len=8), device="cpu",
               show_progress=False)


def test_relufy_without_data_trains_on_teacher_samples(tmp_path, silu_model):
    recipe = relufy(silu_model, tmp_path / "out", "relu", tokens=2 * 4 * 64, train_options=dict(TRAIN),
                    config=RelufyConfig(), device="cpu", show_progress=False)
    assert recipe["steps"] == 2 and load_model(tmp_path / "out").args.hidden_act == "relu"


@pytest.mark.parametrize("problem", ["missing model", "empty data", "binary data", "no budget",
                                     "existing model", "eval-only without data"])
def test_bad_input_is_a_one_line_error(tmp_path, silu_model, data_file, capsys, problem):
    empty, binary = tmp_path / "empty.txt", tmp_path / "binary.txt"
    empty.write_text("  \n")
    binary.write_bytes(b"caf\xe9 \xff\xfe")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "config.json").write_text("{}")
    base = ["relufy", "-m", str(silu_model), "--tokens", "256", "-o", str(tmp_path / "out")]
    argv, expected = {
        "missing model": (["relufy", "-m", str(tmp_path / "nope.gguf"), "--tokens", "256", "-o",
                           str(tmp_path / "out")], "no such file"),
        "empty data": (base + ["--data", str(empty)], "empty text file"),
        "binary data": (base + ["--data", str(binary)], "not UTF-8 text"),
        "no budget": (["relufy", "-m", str(silu_model), "-o", str(tmp_path / "out")], "training budget"),
        "existing model": (["relufy", "-m", str(silu_model), "--tokens", "256", "-o", str(existing)],
                           "already holds a model"),
        "eval-only without data": (["relufy", "--eval-only", "-m", str(silu_model)], "--eval-data"),
    }[problem]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err and "Traceback" not in err


@pytest.mark.parametrize("budget", [{"minutes": 0}, {"tokens": 0}, {}])
def test_relufy_needs_a_positive_budget(tmp_path, silu_model, budget):
    with pytest.raises(PowerInferError, match="budget|positive"):
        relufy(silu_model, tmp_path / "out", "relu", device="cpu", show_progress=False, **budget)
    assert not (tmp_path / "out").exists()


def test_relufy_refuses_a_model_that_is_already_relu(tmp_path, tiny_relu_model, data_file):
    with pytest.raises(PowerInferError, match="already uses relu"):
        relufy(tiny_relu_model, tmp_path / "out", "relu", data_file=data_file, tokens=256,
               device="cpu", show_progress=False)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_relufy_on_cuda(tmp_path, silu_model, data_file):
    recipe = relufy(silu_model, tmp_path / "out", "drelu", data_file=data_file, tokens=SMALL_RUN_TOKENS,
                    train_options=dict(TRAIN, l1=1e-2), config=RelufyConfig(prompt_len=8), device="cuda",
                    show_progress=False)
    assert recipe["steps"] == 6 and load_model(tmp_path / "out").args.hidden_act == "drelu"


def test_relufy_with_a_fatrelu_threshold_writes_it_and_sparsifies_more(tmp_path, silu_model, data_file):
    """--threshold: the student trains with FATReLU and the written config carries relu_threshold, which the
    loaded model applies (more exact zeros than the same weights with plain ReLU)."""
    out = tmp_path / "fat"
    assert main(["relufy", "-m", str(silu_model), "--data", str(data_file), "--threshold", "0.05",
                 "--tokens", "256", "--batch-size", "2", "--seq-len", "64", "-o", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["relu_threshold"] == 0.05
    loaded = load_model(out)
    assert loaded.args.relu_threshold == 0.05 and loaded.model.layers[0].mlp.threshold == 0.05
    ids = torch.randint(0, loaded.args.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    gate, up = loaded.model.layers[0].mlp.gate_up_proj(torch.randn(32, loaded.args.hidden_size)).chunk(2, dim=-1)
    from powerinfer.models.llama import ffn_activation
    assert (ffn_activation(gate, up, "relu", 0.05) == 0).sum() > (ffn_activation(gate, up, "relu") == 0).sum()
    with torch.inference_mode():
        assert torch.isfinite(loaded.model(ids, torch.arange(32))).all()


def test_relu_threshold_config_round_trip_and_errors():
    from powerinfer.errors import UnsupportedModelError
    from powerinfer.models.llama import ModelArgs

    config = ModelArgs(hidden_act="relu", relu_threshold=0.1).to_config()
    assert config["relu_threshold"] == 0.1 and ModelArgs.from_config(config).relu_threshold == 0.1
    assert "relu_threshold" not in ModelArgs(hidden_act="relu").to_config()  # plain configs stay transformers'
    for bad in (dict(hidden_act="silu", relu_threshold=0.1), dict(hidden_act="relu", relu_threshold=-1.0)):
        with pytest.raises(UnsupportedModelError, match="relu_threshold"):
            ModelArgs(**bad)
