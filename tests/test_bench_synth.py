"""`powerinfer synth` and `powerinfer bench --synth` on the tiny shape (CPU): the checkpoint and GGUF round
trips, transformers on the same checkpoint, the bench JSON (roofline, time split, synthetic label), plots,
and one-line errors. How well the profiler recovers a planted profile from a written checkpoint is tested in
tests/test_offline.py; here it is checked for the in-memory path that `bench --synth` takes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from model_files import _permute_for_llama_cpp
from powerinfer.cli import main
from powerinfer.loading import load_model

TOKENS = torch.randint(2, 512, (1, 48), generator=torch.Generator().manual_seed(0))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def synth_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    out, gguf = root / "tiny", root / "tiny.gguf"
    assert main(["synth", "--shape", "tiny", "--activation", "relu", "--seed", "3", "--out", str(out),
                 "--export-gguf", str(gguf)]) == 0
    return out, gguf


def _logits(loaded):
    with torch.inference_mode():
        return loaded.model(TOKENS, torch.arange(TOKENS.shape[1]))


def test_synth_writes_labelled_checkpoint_and_gguf_with_equal_logits(synth_files, capsys):
    out, gguf = synth_files
    config = json.loads((out / "config.json").read_text())
    assert config["powerinfer_synthetic"] is True and config["torch_dtype"] == "float16"
    assert config["hidden_act"] == "relu" and config["powerinfer_synthetic_profile"]["seed"] == 3
    hf, gg = load_model(out), load_model(gguf)
    assert torch.equal(_logits(hf), _logits(gg))  # the same float16 weights, Q/K un-permuted exactly
    text = "quite a quiz, héllo"
    assert gg.tokenizer.encode(text) == hf.tokenizer.encode(text)
    assert gg.tokenizer.decode(gg.tokenizer.encode(text)) == text


def test_gguf_holds_llama_cpp_layout_and_metadata(synth_files):
    from powerinfer.loading.gguf_file import read_gguf

    out, gguf = synth_files
    fields, tensors, data = read_gguf(gguf)
    assert fields["powerinfer.synthetic"] is True and fields["powerinfer.hidden_act"] == "relu"
    assert fields["general.file_type"] == 1 and fields["tokenizer.ggml.merges"] == ["q u"]
    assert fields["llama.attention.head_count_kv"] == 2
    from safetensors.torch import load_file
    hf = load_file(str(next(out.glob("model-*.safetensors"))))
    info = {t.name: t for t in tensors}
    for name, heads in (("attn_q", 4), ("attn_k", 2)):
        t = info[f"blk.1.{name}.weight"]
        assert t.qtype.name == "F16"
        stored = np.frombuffer(bytes(data[t.offset:t.offset + t.n_bytes]), dtype=np.float16).reshape(t.shape)
        original = hf[f"model.layers.1.self_attn.{name[-1]}_proj.weight"].numpy()
        assert np.array_equal(stored, _permute_for_llama_cpp(original, heads))  # the test helper's reference
        assert not np.array_equal(stored, original)
    assert info["blk.0.attn_norm.weight"].qtype.name == "F32"


def test_transformers_loads_the_synthetic_checkpoint(synth_files):
    transformers = pytest.importorskip("transformers")
    out, _ = synth_files
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = reference(TOKENS).logits
    assert (_logits(load_model(out)) - expected).abs().max().item() <= 1e-4


def test_weights_are_deterministic_per_seed():
    from powerinfer.offline.synth import SyntheticModel

    def weights(seed):
        return dict(SyntheticModel("tiny", seed=seed).tensors())

    a, b, c = weights(5), weights(5), weights(6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], c["model.layers.0.mlp.up_proj.weight"])


def test_bench_synth_reports_roofline_split_and_synthetic_label(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--synth", "tiny", "--modes", "cpu,dense-cpu", "--prompt-tokens", "16", "--gen-tokens",
                 "12", "--repeats", "1", "--split-tokens", "8", "--calib-tokens", "1024", "--bandwidth-mib", "16",
                 "--threads", "1", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "SYNTHETIC" in out and "roofline" in out and "ms per token" in out
    report = json.loads(path.read_text())
    for key in ("device", "commit", "date", "model", "vram_budget_gib", "threads", "results", "bandwidths_GBps"):
        assert key in report, key
    assert report["model"]["synthetic"] is True and report["model"]["shape"]["hidden_size"] == 128
    assert report["bandwidths_GBps"]["cpu_read"] > 0 and "gpu_copy" not in report["bandwidths_GBps"]
    results = {r["mode"]: r for r in report["results"]}
    assert set(results) == {"cpu", "dense-cpu"}
    for r in results.values():
        for key in ("decode_tok_s", "prefill_tok_s", "ttft_s", "peak_gpu_bytes", "roofline_tok_s"):
            assert r[key] is not None, key
        assert r["roofline_tok_s"] > 0 and r["roofline_pct"] == pytest.approx(
            100 * r["decode_tok_s"] / r["roofline_tok_s"], abs=0.051)
        split = r["decode_split"]
        assert split["tokens"] == 8 and split["cpu_compute_s"] > 0 and split["gpu_compute_s"] == 0
        assert split["wall_s"] >= split["cpu_compute_s"]
    # the sparse CPU mode reads only the predicted-active rows: fewer bytes per token than dense
    assert results["cpu"]["bytes_per_token"]["cpu"] < results["dense-cpu"]["bytes_per_token"]["cpu"]
    assert 0 < results["cpu"]["active_rows_per_token"]["cpu"] < 4 * 1024
    build = report["synthetic_build"]
    assert build["planted_sparsity_mean"] == pytest.approx(0.9, abs=0.01)
    assert build["profiled_sparsity_mean"] == pytest.approx(build["planted_sparsity_mean"], abs=0.03)
    assert build["predictor_recall_mean"] >= 0.9


def test_bench_compares_cpu_dtypes_of_a_mode_in_one_run(tmp_path):
    """`--modes cpu:bfloat16,cpu:int8`: the same mode with each CPU row dtype, one synthetic build, results
    labelled by the entry; int8 rows read fewer bytes per token."""
    path = tmp_path / "bench.json"
    assert main(["bench", "--synth", "tiny", "--modes", "cpu:bfloat16,cpu:int8", "--prompt-tokens", "8",
                 "--gen-tokens", "6", "--repeats", "1", "--split-tokens", "4", "--calib-tokens", "1024",
                 "--bandwidth-mib", "16", "--threads", "1", "--json", str(path)]) == 0
    results = {r["mode"]: r for r in json.loads(path.read_text())["results"]}
    assert [results[m]["placement"]["cpu_ffn_dtype"] for m in ("cpu:bfloat16", "cpu:int8")] == ["bfloat16", "int8"]
    assert results["cpu:int8"]["bytes_per_token"]["cpu"] < results["cpu:bfloat16"]["bytes_per_token"]["cpu"]


def test_bench_interleaves_the_repeats_of_cpu_modes(tmp_path, monkeypatch):
    """`--interleave`: both modes loaded at once, their timed repeats in turns; each still gets its own result."""
    from powerinfer import bench

    order, repeat = [], bench._ModeRun.repeat

    def recorded(run, gen_tokens):
        order.append(run.mode)
        repeat(run, gen_tokens)
    monkeypatch.setattr(bench._ModeRun, "repeat", recorded)
    path = tmp_path / "bench.json"
    assert main(["bench", "--synth", "tiny", "--modes", "cpu,dense-cpu", "--interleave", "--prompt-tokens", "8",
                 "--gen-tokens", "6", "--repeats", "3", "--split-tokens", "4", "--calib-tokens", "1024",
                 "--bandwidth-mib", "16", "--threads", "1", "--json", str(path)]) == 0
    assert order == ["cpu", "dense-cpu"] * 3
    report = json.loads(path.read_text())
    assert report["interleaved"] is True
    results = {r["mode"]: r for r in report["results"]}
    assert set(results) == {"cpu", "dense-cpu"} and all(r["decode_tok_s"] > 0 for r in results.values())
    assert results["cpu"]["bytes_per_token"]["cpu"] < results["dense-cpu"]["bytes_per_token"]["cpu"]


def test_bench_takes_its_prompt_from_a_text_file_and_samples_at_a_temperature(tmp_path, capsys):
    text = tmp_path / "prompt.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 8)
    path = tmp_path / "bench.json"
    assert main(["bench", "--synth", "tiny", "--modes", "dense-cpu", "--prompt-file", str(text), "--prompt-tokens",
                 "8", "--gen-tokens", "4", "--repeats", "1", "--split-tokens", "0", "--calib-tokens", "1024",
                 "--bandwidth-mib", "16", "--threads", "1", "--json", str(path)]) == 0
    assert json.loads(path.read_text())["prompt"] == str(text)
    assert main(["bench", "--synth", "tiny", "--modes", "dense-cpu", "--temperature", "0.8", "--prompt-tokens", "8",
                 "--gen-tokens", "4", "--repeats", "2", "--split-tokens", "2", "--calib-tokens", "1024",
                 "--bandwidth-mib", "16", "--threads", "1", "--json", str(path)]) == 0
    assert json.loads(path.read_text())["sampling"] == {"temperature": 0.8, "seed": 0}
    text.write_text("two words")  # fewer tokens than --prompt-tokens: an error once the tokenizer has counted them
    assert main(["bench", "--synth", "tiny", "--modes", "dense-cpu", "--prompt-file", str(text), "--calib-tokens",
                 "256", "--bandwidth-mib", "16"]) == 1
    assert capsys.readouterr().err.splitlines()[-1].startswith("powerinfer bench: error: the prompt text holds")


def _report_json(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"device": "cpu", "commit": "abc", "model": {"synthetic": True, "shape_name": "tiny"},
                                "prompt_tokens": 4, "gen_tokens": 8, "results": [
                                    {"mode": "cpu", "decode_tok_s": 10.0, "roofline_tok_s": 40.0},
                                    {"mode": "dense-cpu", "decode_tok_s": 7.0, "roofline_tok_s": None}]}))
    return path


def test_plot_from_json(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "plot.png"
    assert main(["bench", "--plot-from", str(_report_json(tmp_path)), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else find_spec(name, *a))
    assert main(["bench", "--plot-from", str(_report_json(tmp_path)), "--plot", str(tmp_path / "p.png")]) == 1
    err = capsys.readouterr().err
    assert "matplotlib" in err and "powerinfer[plot]" in err and err.count("\n") == 1


@pytest.mark.parametrize("argv, word, status", [
    (["synth", "--shape", "llama2-70b", "--out", "{tmp}/m"], "--shape", 2),
    (["bench", "--synth", "gpt-5"], "--synth", 2),
    (["synth", "--shape", "tiny", "--sparsity", "1.5", "--out", "{tmp}/m"], "--sparsity", 2),
    (["bench", "--synth", "tiny", "--sparsity", "0"], "--sparsity", 2),
    (["synth", "--shape", "tiny", "--sparsity", "0.5", "--skew", "0.95", "--out", "{tmp}/m"], "not reachable", 1),
    (["bench", "--synth", "tiny", "--model", "x.gguf"], "alternatives", 1),
    (["bench", "--synth", "tiny", "--modes", "hybrid", "--vram-budget", "1"], "CUDA", 1),
    (["bench", "--synth", "tiny", "--modes", "dense-cpu:int8"], "sparse modes only", 1),
    (["bench", "--synth", "tiny", "--modes", "cpu:float16"], "unknown CPU dtype", 1),
    (["bench", "--synth", "tiny", "--modes", "cpu,dense-gpu", "--interleave"], "CPU modes only", 1),
    (["bench", "--synth", "tiny", "--modes", "dense-cpu", "--prompt-file", "{tmp}/none.txt"], "cannot read", 1),
    (["bench", "--synth", "tiny", "--modes", "hf-accelerate", "--vram-budget", "1", "--temperature", "0.5"],
     "greedily", 1),
    (["bench", "--synth", "tiny", "--temperature", "-1"], "--temperature", 2),
    (["bench", "--plot-from", "{tmp}/none.json"], "--plot", 1),
    (["bench", "--plot-from", "{tmp}/none.json", "--plot", "{tmp}/p.png"], "cannot read", 1),
])
def test_bad_input_is_one_line(tmp_path, capsys, argv, word, status):
    if torch.cuda.is_available() and word == "CUDA":
        pytest.skip("this machine has a GPU")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    assert rc == status
    err = capsys.readouterr().err
    assert word in err and err.count("\n") == 1, err
    assert not (tmp_path / "m").exists()


def test_hf_accelerate_without_cuda_is_one_line_cli_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = subprocess.run([sys.executable, "-m", "powerinfer", "bench", "--synth", "tiny", "--modes", "hf-accelerate",
                        "--vram-budget", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "hf-accelerate needs a CUDA GPU" in lines[0]


def test_existing_output_is_refused(synth_files, capsys):
    out, gguf = synth_files
    assert main(["synth", "--shape", "tiny", "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err


def test_in_memory_artifact_runs_like_the_model_and_exports_for_transformers(tmp_path):
    """The in-memory artifact of `bench --synth` (hot-first FFN) computes what its source computes, and the
    Hugging Face directory written from it for the hf-accelerate peer loads in transformers to the same."""
    from powerinfer.bench import hf_directory
    from powerinfer.offline.build import build_in_memory
    from powerinfer.offline.synth import load_synthetic_model

    loaded = load_synthetic_model("tiny", seed=1, dtype=torch.float32)
    expected = _logits(loaded)
    tokens = torch.randint(2, 512, (256,), generator=torch.Generator().manual_seed(2))
    artifact = build_in_memory(loaded, tokens, weights_dtype=torch.float32)
    assert artifact.format == "artifact" and artifact.manifest["strategy"]["name"] == "predictor"
    assert not torch.equal(artifact.tensors["model.layers.0.mlp.up_proj.weight"],
                           loaded.model.layers[0].mlp.gate_up_proj.weight[1024:])  # reordered hot-first
    torch.testing.assert_close(_logits(load_model(artifact)), expected, atol=1e-4, rtol=1e-4)
    hf_dir = hf_directory(artifact, str(tmp_path), torch.float32)
    torch.testing.assert_close(_logits(load_model(hf_dir)), expected, atol=1e-4, rtol=1e-4)
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.inference_mode():
        torch.testing.assert_close(reference(TOKENS).logits, expected, atol=1e-4, rtol=1e-4)


def test_peer_only_checkpoint_exports_the_same_model(tmp_path):
    """`bench --synth S --modes hf-accelerate` writes the plain synthetic checkpoint (no artifact) for transformers:
    it must hold every weight of the model that `load_synthetic_model` builds."""
    from powerinfer.bench import hf_directory
    from powerinfer.offline.synth import load_synthetic_model, synthetic_checkpoint

    expected = _logits(load_synthetic_model("tiny", seed=1, dtype=torch.float32))
    checkpoint, _ = synthetic_checkpoint("tiny", seed=1, dtype=torch.float32)
    hf_dir = hf_directory(checkpoint, str(tmp_path), torch.float32)
    torch.testing.assert_close(_logits(load_model(hf_dir)), expected, atol=1e-5, rtol=1e-5)
