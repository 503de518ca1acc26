"""The hybrid executor: every mode against the dense engine, with an oracle active set (PowerInfer §5)."""

from __future__ import annotations

import pytest
import torch

from model_files import write_hf_model
from powerinfer.loading import load_model
from powerinfer.models.llama import ModelArgs, Transformer, to_hf_weights
from powerinfer.runtime import Generator, SamplingParams
from powerinfer.runtime.executor import OraclePredictor, build_executor

GREEDY = SamplingParams(temperature=0)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

def _relu_model(tmp_path, activation):
    args = ModelArgs(vocab_size=260, hidden_size=64, intermediate_size=203, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                     hidden_act=activation, bos_token_id=256, eos_token_id=257)
    torch.manual_seed(0)
    model = Transformer(args)
    with torch.no_grad():  # negative gate bias through a constant-ish direction: most neurons inactive
        for block in model.layers:
            block.mlp.gate_up_proj.weight.mul_(3.0)
    return write_hf_model(tmp_path / activation, args.to_config(), to_hf_weights(model.state_dict(), args))

def _oracles(loaded):
    return [OraclePredictor(b.mlp.gate_up_proj.weight.detach().clone(), b.mlp.activation, b.mlp.threshold)
            for b in loaded.model.layers]

def _placement(n_layers, n_hot):
    return {"layers": [{"n_gpu_neurons": n, "attention_on_gpu": True} for n in n_hot]}

@pytest.fixture(scope="module", params=["relu", "drelu"])
def relu_model(request, tmp_path_factory):
    return _relu_model(tmp_path_factory.mktemp("m"), request.param)

def _logits(loaded, ids):
    with torch.inference_mode():
        gen = Generator(loaded, context=64)
        prefill = gen.prefill(ids[:7])
        steps = [gen.decode_step(torch.tensor([t]), 7 + i) for i, t in enumerate(ids[7:])]
    return torch.cat([prefill] + steps)

@pytest.mark.parametrize("mode,n_hot", [("cpu", None), ("hybrid", [0, 50, 203]), ("hybrid", [101, 7, 1]),
                                        ("gpu", None)])
def test_sparse_modes_with_oracle_equal_dense(relu_model, mode, n_hot):
    dense = load_model(relu_model)
    ids = torch.randint(0, 256, (20,)).tolist()
    want = _logits(dense, ids)
    loaded = load_model(relu_model)
    placement = _placement(3, n_hot) if n_hot else None
    run = build_executor(loaded, mode, hot_device="cpu", predictors=_oracles(loaded), placement=placement)
    got = _logits(run, ids)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    hot, cold = run.model.counts.shares()
    assert abs(hot + cold - 1) < 1e-9
    if mode == "cpu":
        assert cold == 1.0
    if mode == "gpu":
        assert hot == 1.0

def test_hybrid_on_cpu_generates_the_same_tokens_as_cpu_mode(relu_model):
    prompt = [256, 5, 6, 7, 8]
    outs = []
    for mode, placement in (("cpu", None), ("hybrid", _placement(3, [60, 120, 180]))):
        loaded = load_model(relu_model)
        run = build_executor(loaded, mode, hot_device="cpu", predictors=_oracles(loaded), placement=placement)
        outs.append(Generator(run, context=64).generate(prompt, max_tokens=24, sampling=GREEDY,
                                                        ignore_eos=True).tokens)
    assert outs[0] == outs[1]

def test_int4_gate_predictors_run_the_sparse_modes(relu_model):
    """int4-gate predictors (each layer's gate in 4 bits, threshold 0): cpu and hybrid-on-CPU generate the same
    tokens, and their logits stay close to dense (only neurons at the gate's zero crossing can be missed)."""
    from powerinfer.models.predictor import QuantizedGatePredictor

    prompt = [256, 5, 6, 7, 8]
    ids = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    want = _logits(load_model(relu_model), ids)
    outs = []
    for mode, placement in (("cpu", None), ("hybrid", _placement(3, [60, 120, 180]))):
        loaded = load_model(relu_model)
        gates = [b.mlp.gate_up_proj.weight.detach().chunk(2)[0] for b in loaded.model.layers]
        predictors = [QuantizedGatePredictor.from_gate(gate, 64) for gate in gates]
        run = build_executor(loaded, mode, hot_device="cpu", predictors=predictors, placement=placement)
        outs.append(Generator(run, context=64).generate(prompt, max_tokens=24, sampling=GREEDY,
                                                        ignore_eos=True).tokens)
        got = _logits(build_executor(load_model(relu_model), mode, hot_device="cpu", placement=placement,
                                     predictors=[QuantizedGatePredictor.from_gate(g, 64) for g in gates]), ids)
        assert (got - want).norm() / want.norm() < 0.05
    assert outs[0] == outs[1]

def test_skipped_neurons_change_the_output(relu_model):
    """Guard against a vacuous oracle test: a predictor that misses active neurons must show up."""
    loaded = load_model(relu_model)
    oracles = _oracles(loaded)

    class Lossy(torch.nn.Module):
        def __init__(self, oracle):
            super().__init__()
            self.oracle = oracle

        def predict(self, x):
            mask = self.oracle.predict(x)
            return mask & (torch.arange(mask.shape[-1]) % 2 == 0)

    ids = torch.randint(0, 256, (12,)).tolist()
    want = _logits(load_model(relu_model), ids)
    got = _logits(build_executor(loaded, "cpu", "cpu", [Lossy(o) for o in oracles]), ids)
    assert (got - want).abs().max() > 1e-3

@pytest.mark.parametrize("layers_on_hot", [0, 2, 3])
def test_offload_mode_equals_dense(relu_model, layers_on_hot):
    ids = torch.randint(0, 256, (15,)).tolist()
    want = _logits(load_model(relu_model), ids)
    run = build_executor(load_model(relu_model), "offload", "cpu", offload_layers=layers_on_hot)
    torch.testing.assert_close(_logits(run, ids), want, atol=2e-5, rtol=1e-5)

def test_modes_need_predictors(relu_model):
    with pytest.raises(ValueError, match="predictors"):
        build_executor(load_model(relu_model), "cpu", "cpu")

@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["gpu", "hybrid"])
def test_cuda_modes_match_dense(relu_model, mode):
    ids = torch.randint(0, 256, (20,)).tolist()
    want = _logits(load_model(relu_model), ids)
    loaded = load_model(relu_model)
    placement = _placement(3, [100, 50, 203])
    run = build_executor(loaded, mode, "cuda", _oracles(loaded), placement, hot_dtype=torch.float32,
                         cold_dtype=torch.float32)
    torch.testing.assert_close(_logits(run, ids).cpu(), want, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("strategy", ["exact-sparse-down", "predictor", "dense"])
@pytest.mark.parametrize("n_hot", [0, 70, 203])
def test_split_ffn_strategies_match_their_definition(strategy, n_hot):
    """One token through a SiLU FFN: h restricted to the strategy's rows (always-active rows kept)."""
    from powerinfer.models.llama import ffn_activation
    from powerinfer.runtime.executor import CPU, ExecutionPlan, LayerPlan, NeuronCounts, SplitFFN

    torch.manual_seed(3)
    d, n_ff = 64, 203
    gate_up, down = torch.randn(2 * n_ff, d) / 8, torch.randn(d, n_ff) / 8
    x = torch.randn(1, d)
    h = ffn_activation(*(x @ gate_up.T).chunk(2, dim=-1), "silu")
    threshold = h.abs().median().item()
    predicted = torch.rand(n_ff) < 0.3

    class Fixed(torch.nn.Module):
        def predict(self, inp):
            return predicted.clone()[None].expand(inp.shape[0], -1)

    keep = {"exact-sparse-down": h[0].abs() > threshold, "predictor": predicted.clone(),
            "dense": torch.ones(n_ff, dtype=torch.bool)}[strategy]
    keep[:5] = True  # n_always_active
    want = (h * keep) @ down.T
    plan = ExecutionPlan("hybrid", CPU, torch.float32, [], CPU, CPU)
    layer = LayerPlan(CPU, n_hot, strategy, threshold, n_always_active=5)
    ffn = SplitFFN(gate_up, down, "silu", layer, plan, Fixed(), NeuronCounts(CPU))
    torch.testing.assert_close(ffn(x[None])[0], want, atol=1e-5, rtol=1e-5)
    if strategy != "dense":
        assert int(ffn.counts.hot) + ffn.counts.cold == int(keep.sum())


@pytest.mark.parametrize("kind", ["low-rank", "int4-gate"])
def test_cpu_layer_decode_path_equals_the_general_path(kind):
    """A layer with every row in CPU memory runs one token over bound buffers (SplitFFN._bind_cpu_decode):
    the same output and neuron count as the general path, call after call."""
    from powerinfer.models.predictor import ActivationPredictor, QuantizedGatePredictor
    from powerinfer.runtime.executor import CPU, ExecutionPlan, LayerPlan, NeuronCounts, SplitFFN

    torch.manual_seed(4)
    d, n_ff = 64, 203
    gate_up, down = torch.randn(2 * n_ff, d) / 8, torch.randn(d, n_ff) / 8
    if kind == "low-rank":
        predictor = ActivationPredictor(d, 12, n_ff)
    else:
        predictor = QuantizedGatePredictor.from_gate(gate_up[:n_ff], 32)
    predictor.threshold.fill_(0.05)
    plan = ExecutionPlan("cpu", CPU, torch.float32, [], CPU, CPU)
    ffn = SplitFFN(gate_up, down, "relu", LayerPlan(CPU, 0, "predictor", n_always_active=3), plan,
                   predictor, NeuronCounts(CPU))
    assert ffn._cpu_decode is not None
    with torch.inference_mode():
        for _ in range(4):
            x = torch.randn(1, d)
            before = ffn.counts.cold
            fast = ffn(x[None])[0]
            fast_count = ffn.counts.cold - before
            general = ffn.cold_part(x, None)
            assert ffn.counts.cold - before == 2 * fast_count > 3  # the general path counted the same again
            torch.testing.assert_close(fast, general, atol=1e-6, rtol=1e-6)
        with torch.no_grad():  # nothing predicted: the always-active rows alone (the bound kernels read in place)
            (predictor.fc2.bias if kind == "low-rank" else predictor.threshold).fill_(-1e9 if kind == "low-rank" else 1e9)
        before = ffn.counts.cold
        ffn(x[None])
        assert ffn.counts.cold - before == 3


def test_cpu_rows_keep_gate_and_up_in_one_allocation():
    """Dense products over the CPU rows' gate and up are one GEMV (executor._gate_up): the two halves of one
    allocation, each a contiguous matrix for the sparse kernels; the result equals two separate products."""
    from powerinfer.runtime.executor import CPU, ExecutionPlan, LayerPlan, NeuronCounts, SplitFFN, _gate_up

    torch.manual_seed(5)
    d, n_ff = 64, 203
    gate_up, down = torch.randn(2 * n_ff, d), torch.randn(d, n_ff)
    plan = ExecutionPlan("cpu", CPU, torch.float32, [], CPU, CPU)
    ffn = SplitFFN(gate_up, down, "silu", LayerPlan(CPU, 70, "exact-sparse-down"), plan, None, NeuronCounts(CPU))
    gate, up, _ = ffn.cold
    assert gate.is_contiguous() and up.is_contiguous() and gate.shape == up.shape == (n_ff - 70, d)
    assert up.data_ptr() == gate.data_ptr() + gate.numel() * gate.element_size()
    x = torch.randn(2, d)
    want = torch.nn.functional.silu(x @ gate.T) * (x @ up.T)
    torch.testing.assert_close(_gate_up(x, gate, up, ("silu", 0.0)), want)
    torch.testing.assert_close(_gate_up(x, gate.clone(), up.clone(), ("silu", 0.0)), want)
    # adjacent in memory but two allocations (as the CUDA caching allocator may place the GPU rows): two products
    both = torch.cat([gate, up]).numpy()
    gate_alone, up_alone = torch.from_numpy(both[:n_ff - 70]), torch.from_numpy(both[n_ff - 70:])
    assert up_alone.data_ptr() == gate_alone.data_ptr() + gate_alone.numel() * gate_alone.element_size()
    torch.testing.assert_close(_gate_up(x, gate_alone, up_alone, ("silu", 0.0)), want)


def test_cpu_rows_of_the_predictor_strategy_are_bundled_per_neuron():
    """Rows read for the predicted neurons only: a neuron's gate, up and down rows adjacent (one run of memory
    per active neuron); dense products over them (the dense fallback) still equal the formula, one-row sides
    included."""
    from powerinfer.kernels.cpu import row_stride
    from powerinfer.runtime.executor import CPU, SplitFFN, _gate_up

    torch.manual_seed(6)
    d, n_ff = 64, 203
    gate, up, down = torch.randn(n_ff, d), torch.randn(n_ff, d), torch.randn(d, n_ff)
    for start in (70, n_ff - 1):
        rows = SplitFFN._rows(gate, up, down, start, n_ff, CPU, torch.float32, "predictor")
        assert [row_stride(w) for w in rows] == ([3] * 3 if n_ff - start > 1 else [1] * 3)
        assert rows[1].data_ptr() == rows[0].data_ptr() + d * 4 and rows[2].data_ptr() == rows[0].data_ptr() + 2 * d * 4
        for w, want in zip(rows, (gate[start:], up[start:], down.T[start:])):
            assert torch.equal(w, want)
        x = torch.randn(3, d)
        torch.testing.assert_close(_gate_up(x, rows[0], rows[1], ("relu", 0.0)),
                                   torch.relu(x @ gate[start:].T) * (x @ up[start:].T))


def _eager_and_segments(make_run, ids):
    """Greedy logits and neuron shares of a prefill + decode, eager and through the CUDA-graph segments
    (runtime.segments), each with a fresh executor from make_run()."""
    results = []
    for graphs in (False, True):
        run = make_run()
        with torch.inference_mode():
            gen = Generator(run, context=64, cuda_graphs=graphs)
            assert gen.use_segments == graphs
            logits = [gen.prefill(ids[:7])]
            logits += [gen.decode_step(torch.tensor([t]), 7 + i) for i, t in enumerate(ids[7:])]
        results.append((torch.cat([x.cpu() for x in logits]), run.model.counts.shares()))
    return results


def _split_placement():
    return {"layers": [{"n_gpu_neurons": n, "attention_on_gpu": True} for n in (0, 60, 203)]}


def _hybrid_on_cuda(relu_model, placement):
    loaded = load_model(relu_model)
    return build_executor(loaded, "hybrid", "cuda", _oracles(loaded), placement, hot_dtype=torch.float32)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("ends_on_gpu", [True, False])
def test_hybrid_graph_segments_equal_eager_decode(relu_model, ends_on_gpu):
    """Decode through per-layer CUDA-graph segments == the eager hybrid step; covers a layer all on the CPU
    (predictor in host memory), a split one, one all on the GPU, and embeddings/head either side."""
    placement = {**_split_placement(), "embeddings_on_gpu": ends_on_gpu, "lm_head_on_gpu": ends_on_gpu}
    ids = torch.randint(0, 256, (20,)).tolist()
    (eager, eager_shares), (segments, segment_shares) = _eager_and_segments(
        lambda: _hybrid_on_cuda(relu_model, placement), ids)
    torch.testing.assert_close(segments, eager, atol=1e-4, rtol=1e-4)
    assert segment_shares == pytest.approx(eager_shares)


@cuda
@pytest.mark.cuda
def test_graph_segments_timed_and_failed_steps(relu_model):
    """The segments' two schedules (queued one layer ahead of the CPU; one layer at a time under `bench`'s
    timer) give the same logits; a CPU part that raises leaves no wait armed: the step raises, and the next
    steps match a fresh run."""
    from powerinfer.runtime.timing import PhaseTimer

    ids = torch.randint(0, 256, (12,)).tolist()

    def decode(run, timed_steps=(), failing_step=None):
        gen = Generator(run, context=64, cuda_graphs=True)
        out = [gen.prefill(ids[:5])]
        for i, t in enumerate(ids[5:]):
            run.model.timer = PhaseTimer(cuda=True) if i in timed_steps else None
            if i == failing_step:
                segments = gen._segments
                graph_a, graph_b, cold, event = segments.layers[1]

                def fail():
                    raise RuntimeError("cold part failed")
                segments.layers[1] = (graph_a, graph_b, fail, event)
                with pytest.raises(RuntimeError, match="cold part failed"):
                    gen.decode_step(torch.tensor([t]), 5 + i)
                assert not segments._ready_np.any()
                segments.layers[1] = (graph_a, graph_b, cold, event)
            out.append(gen.decode_step(torch.tensor([t]), 5 + i))
        run.model.timer = None
        return torch.cat([x.cpu() for x in out])

    with torch.inference_mode():
        plain = decode(_hybrid_on_cuda(relu_model, _split_placement()))
        timed = decode(_hybrid_on_cuda(relu_model, _split_placement()), timed_steps=(1, 2, 5))
        failed = decode(_hybrid_on_cuda(relu_model, _split_placement()), failing_step=3)
    torch.testing.assert_close(timed, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(failed, plain, atol=1e-5, rtol=1e-5)


def _whole_step_placement():
    """Every layer with CPU rows also has GPU rows (its mask is predicted on the GPU): a whole-step graph."""
    return {"layers": [{"n_gpu_neurons": n, "attention_on_gpu": True} for n in (9, 60, 203)]}


@cuda
@pytest.mark.cuda
def test_whole_step_graph_with_one_cold_step_equals_eager_and_per_layer_decode(relu_model, monkeypatch):
    """The step as one CUDA graph, the GPU raising a host flag after each layer's attention part and every
    layer's cold FFN computed in one parallel region (kernels.cold_step) as the flags come: the same logits
    and neuron shares as the eager step and as the per-layer graphs."""
    from powerinfer.runtime.segments import DecodeSegments

    ids = torch.randint(0, 256, (20,)).tolist()

    def make_run():
        return _hybrid_on_cuda(relu_model, _whole_step_placement())
    (eager, eager_shares), (whole, whole_shares) = _eager_and_segments(make_run, ids)
    monkeypatch.setattr(DecodeSegments, "cold_step", False)
    _, (per_layer, _) = _eager_and_segments(make_run, ids)
    torch.testing.assert_close(whole, eager, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(whole, per_layer, atol=1e-5, rtol=1e-5)
    assert whole_shares == pytest.approx(eager_shares)


def _lowrank_predictors(loaded):
    """Random low-rank predictors (ActivationPredictor), thresholds at 0: about half the neurons predicted."""
    from powerinfer.models.predictor import ActivationPredictor

    args, g = loaded.args, torch.Generator().manual_seed(3)
    predictors = []
    for _ in range(args.num_hidden_layers):
        predictor = ActivationPredictor(args.hidden_size, 8, args.intermediate_size)
        with torch.no_grad():
            for weight in predictor.parameters():
                weight.copy_(torch.randn(weight.shape, generator=g) / weight.shape[-1] ** 0.5)
        predictors.append(predictor)
    return predictors


@cuda
@pytest.mark.cuda
def test_whole_step_graph_computes_the_lowrank_predictors_hidden_layer_in_the_norm(relu_model, monkeypatch):
    """With low-rank predictors on the GPU the post-attention norm's kernel also computes each predictor's hidden
    layer (DecodeSegments.fuse_predictor_hidden): the same logits and neuron shares as without it, and as the
    eager step."""
    from powerinfer.runtime.segments import DecodeSegments

    ids = torch.randint(0, 256, (20,)).tolist()

    def make_run():
        loaded = load_model(relu_model)
        run = build_executor(loaded, "hybrid", "cuda", _lowrank_predictors(loaded), _whole_step_placement(),
                             hot_dtype=torch.float32)
        assert all(f.predictor_projection(torch.device("cuda", torch.cuda.current_device()), torch.float32)
                   is not None for f in run.model.ffns)
        return run
    (eager, eager_shares), (fused, fused_shares) = _eager_and_segments(make_run, ids)
    monkeypatch.setattr(DecodeSegments, "fuse_predictor_hidden", False)
    _, (unfused, unfused_shares) = _eager_and_segments(make_run, ids)
    torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, eager, atol=1e-4, rtol=1e-4)
    assert fused_shares == pytest.approx(unfused_shares) and fused_shares == pytest.approx(eager_shares)
    assert 0 < fused_shares[1] < 1  # both halves served active neurons


@cuda
@pytest.mark.cuda
def test_whole_step_graph_and_timed_per_layer_steps_interleave(relu_model):
    """`bench`'s timer replays the per-layer graphs (kept beside the whole-step graph): timed steps between whole
    steps share the host flags without leaving one set, and every step's logits match an untimed run."""
    from powerinfer.runtime.timing import PhaseTimer

    ids = torch.randint(0, 256, (12,)).tolist()

    def decode(timed_steps=()):
        run = _hybrid_on_cuda(relu_model, _whole_step_placement())
        gen = Generator(run, context=64, cuda_graphs=True)
        out = [gen.prefill(ids[:5])]
        for i, t in enumerate(ids[5:]):
            run.model.timer = PhaseTimer(cuda=True) if i in timed_steps else None
            out.append(gen.decode_step(torch.tensor([t]), 5 + i))
            torch.cuda.synchronize()  # the graph's last wait has consumed its flag
            assert gen._segments._whole is not None
            assert not gen._segments._ready_np.any()
        run.model.timer = None
        return torch.cat([x.cpu() for x in out])

    with torch.inference_mode():
        torch.testing.assert_close(decode(timed_steps=(1, 2, 5)), decode(), atol=1e-5, rtol=1e-5)


@cuda
@pytest.mark.cuda
def test_whole_step_graph_failed_cold_step_leaves_no_wait_armed(relu_model):
    """A cold step that raises: the step raises, the graph's waits are released and cleared, and the next steps
    match a run that never failed; the whole-step path is the one taken."""
    ids = torch.randint(0, 256, (10,)).tolist()

    def decode(failing_step=None):
        gen = Generator(_hybrid_on_cuda(relu_model, _whole_step_placement()), context=64, cuda_graphs=True)
        out = [gen.prefill(ids[:5])]
        for i, t in enumerate(ids[5:]):
            if i == failing_step:
                segments = gen._segments
                graph, output, cold_step = segments._whole
                assert cold_step is not None

                class Failing:
                    threads = cold_step.threads

                    def __call__(self):
                        raise RuntimeError("cold step failed")
                segments._whole = (graph, output, Failing())
                with pytest.raises(RuntimeError, match="cold step failed"):
                    gen.decode_step(torch.tensor([t]), 5 + i)
                assert not segments._ready_np.any()
                segments._whole = (graph, output, cold_step)
            out.append(gen.decode_step(torch.tensor([t]), 5 + i))
        return torch.cat([x.cpu() for x in out])

    with torch.inference_mode():
        torch.testing.assert_close(decode(failing_step=2), decode(), atol=1e-5, rtol=1e-5)


@cuda
@pytest.mark.cuda
def test_notify_host_sets_the_flag_after_the_work_before_it():
    from powerinfer.kernels.fused import notify_host

    flag = torch.zeros(1, dtype=torch.int32, pin_memory=True)
    data = torch.zeros(1 << 16, dtype=torch.float32, pin_memory=True)
    source = torch.arange(1 << 16, dtype=torch.float32, device="cuda")
    with torch.inference_mode():
        for round_ in range(20):
            flag.zero_()
            torch.cuda.synchronize()
            data.copy_(source + round_, non_blocking=True)
            notify_host(flag, torch.device("cuda"))
            while int(flag[0]) == 0:
                pass
            assert float(data[-1]) == (1 << 16) - 1 + round_  # the copy before it is in
        torch.cuda.synchronize()
    with pytest.raises(ValueError, match="pinned"):
        notify_host(torch.zeros(1, dtype=torch.int32), torch.device("cuda"))


@pytest.mark.parametrize("name,before,after", [("notify_host", 0, 1), ("wait_for_host_flag", 1, 0)])
def test_host_flag_references_and_checks(name, before, after):
    """Off CUDA each direction's reference acts at once: notify sets the flag, the wait zeroes a set one."""
    from powerinfer.kernels import fused

    flag = torch.full((1,), before, dtype=torch.int32)
    getattr(fused, name)(flag, torch.device("cpu"))
    assert int(flag[0]) == after
    with pytest.raises(ValueError, match="int32"):
        getattr(fused, name)(torch.ones(1), torch.device("cpu"))


@cuda
@pytest.mark.cuda
def test_graph_segments_without_the_wait_kernel_equal_eager_decode(relu_model, monkeypatch):
    """Where the wait kernel cannot be built (no Triton), the segments capture no waits and launch each layer's
    graphs after the CPU part before them: the same logits as the eager step."""
    from powerinfer.runtime import segments

    monkeypatch.setattr(segments, "_triton_available", lambda: False)
    ids = torch.randint(0, 256, (12,)).tolist()
    (eager, _), (graphs, _) = _eager_and_segments(lambda: _hybrid_on_cuda(relu_model, _split_placement()), ids)
    torch.testing.assert_close(graphs, eager, atol=1e-4, rtol=1e-4)


@cuda
@pytest.mark.cuda
def test_wait_for_host_flag_holds_the_stream_until_the_host_sets_it():
    import time

    from powerinfer.kernels.fused import wait_for_host_flag

    flag = torch.zeros(1, dtype=torch.int32, pin_memory=True)
    after = torch.zeros(1, device="cuda")
    with torch.inference_mode():
        torch.cuda.synchronize()
        wait_for_host_flag(flag, torch.device("cuda"))
        after.add_(1)
        time.sleep(0.2)
        assert not torch.cuda.current_stream().query()  # still waiting
        flag[0] = 1
        torch.cuda.synchronize()
    assert float(after) == 1 and int(flag[0]) == 0


def test_wait_for_host_flag_on_cuda_needs_triton(monkeypatch):
    """Without Triton a CUDA stream cannot wait on the host: an error, not the reference blocking the host (in
    a CUDA-graph capture it would spin forever); the segments then launch layer by layer."""
    from powerinfer.kernels import fused

    monkeypatch.setattr(fused, "_triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="Triton"):
        fused.wait_for_host_flag(torch.zeros(1, dtype=torch.int32), torch.device("cuda"))


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["offload-1", "offload-2", "hybrid-last-attention-on-cpu"])
def test_graph_segments_with_cpu_layers_last_equal_eager_decode(relu_model, mode):
    """Layers kept in CPU memory after the GPU's (offload; hybrid with the last attention on the CPU) run
    eagerly after the GPU layers' graph segments: the same logits as the eager step."""
    if mode.startswith("offload"):
        def make_run():
            return build_executor(load_model(relu_model), "offload", "cuda", offload_layers=int(mode[-1]),
                                  hot_dtype=torch.float32)
    else:
        placement = {"layers": [{"n_gpu_neurons": n, "attention_on_gpu": i < 2} for i, n in enumerate((9, 60, 0))]}

        def make_run():
            return _hybrid_on_cuda(relu_model, placement)
    ids = torch.randint(0, 256, (20,)).tolist()
    (eager, _), (segments, _) = _eager_and_segments(make_run, ids)
    torch.testing.assert_close(segments, eager, atol=1e-4, rtol=1e-4)


def _int8_round_trip(w):
    from powerinfer.kernels import dequantize_rows_int8, quantize_rows_int8

    return dequantize_rows_int8(*quantize_rows_int8(w))


@pytest.mark.parametrize("cold_dtype,round_rows", [(torch.bfloat16, lambda w: w.to(torch.bfloat16).float()),
                                                   (torch.int8, _int8_round_trip)], ids=["bfloat16", "int8"])
@pytest.mark.parametrize("mode,n_hot", [("cpu", None), ("hybrid", [101, 7, 1])])
def test_low_precision_cpu_rows_equal_dense_with_those_rows_rounded(relu_model, mode, n_hot, cold_dtype, round_rows):
    """cold_dtype=bfloat16 / int8 stores the CPU's FFN rows in bfloat16, or as int8 with one scale per row (a
    neuron's gate row, up row and row of down.T), and computes in float32: the same as the dense model whose CPU
    rows were rounded so; in `cpu` mode the attention matrices and the LM head too, to bfloat16 (all of them are
    in CPU memory; hybrid here emulates a GPU holding them)."""
    ids = torch.randint(0, 256, (16,)).tolist()
    dense = load_model(relu_model)
    with torch.no_grad():
        for block, hot in zip(dense.model.layers, n_hot or [0] * 3):
            n_ff = block.mlp.down_proj.weight.shape[1]
            gate_up, down = block.mlp.gate_up_proj.weight, block.mlp.down_proj.weight
            for rows in (gate_up[hot:n_ff], gate_up[n_ff + hot:]):
                rows.copy_(round_rows(rows))
            down[:, hot:] = round_rows(down[:, hot:].T).T
            if mode == "cpu":
                for w in (block.self_attn.qkv_proj.weight, block.self_attn.o_proj.weight):
                    w.copy_(w.to(torch.bfloat16).float())
        if mode == "cpu":
            head = dense.model.lm_head  # a new parameter: a tied embedding table stays float32
            head.weight = torch.nn.Parameter(head.weight.to(torch.bfloat16).float(), requires_grad=False)
    want = _logits(dense, ids)
    placement = _placement(3, n_hot) if n_hot else None
    # the oracle reads the rounded weights: a gate near 0 may change sign when rounded
    run = build_executor(load_model(relu_model), mode, "cpu", _oracles(dense), placement, cold_dtype=cold_dtype)
    assert all(ffn.cold is None or ffn.cold[0].dtype == cold_dtype for ffn in run.model.ffns)
    matrices = {run.model.attention_layers[0].self_attn.qkv_proj.weight.dtype, run.model.lm_head.weight.dtype}
    assert matrices == {torch.bfloat16 if mode == "cpu" else torch.float32}
    torch.testing.assert_close(_logits(run, ids), want, atol=2e-5, rtol=1e-5)


def test_int8_cpu_rows_are_refused_where_no_int8_kernel_runs(relu_model):
    import powerinfer
    from powerinfer.errors import PowerInferError

    for mode, strategy in (("offload", "predictor"), ("dense", "predictor"), ("cpu", "exact-sparse-down")):
        with pytest.raises(ValueError, match="int8 CPU weights"):
            build_executor(load_model(relu_model), mode, "cpu", offload_layers=1, strategy=strategy,
                           cold_dtype=torch.int8)
    with pytest.raises(PowerInferError, match="cpu_dtype int8 is for the predicted-sparse FFN"):
        powerinfer.load(str(relu_model), cpu_dtype="int8")  # a plain checkpoint runs dense


def test_offload_with_bfloat16_cpu_rows_equals_dense_with_them_rounded(relu_model):
    """offload's CPU layers are dense: their bfloat16 FFN matrices go through the GEMV, down in the model's
    layout (prefill: a widened copy). (Their attention matrices turn bfloat16 only off the hot device: CUDA test.)"""
    ids = torch.randint(0, 256, (15,)).tolist()
    dense = load_model(relu_model)
    with torch.no_grad():
        for block in dense.model.layers[1:]:
            for w in (block.mlp.gate_up_proj.weight, block.mlp.down_proj.weight):
                w.copy_(w.to(torch.bfloat16).float())
    run = build_executor(load_model(relu_model), "offload", "cpu", offload_layers=1, cold_dtype=torch.bfloat16)
    torch.testing.assert_close(_logits(run, ids), _logits(dense, ids), atol=2e-5, rtol=1e-5)


@cuda
@pytest.mark.cuda
def test_cuda_offload_with_bfloat16_cpu_layers_equals_dense_with_them_rounded(relu_model):
    """offload on a GPU: the CPU layers' attention and FFN matrices and the LM head (on the CPU with them) are
    bfloat16 (half the bytes, as llama.cpp's float16 CPU layers), computed in float32: the dense model with
    those matrices rounded."""
    ids = torch.randint(0, 256, (15,)).tolist()
    dense = load_model(relu_model)
    with torch.no_grad():
        for block in dense.model.layers[1:]:
            for w in (block.mlp.gate_up_proj.weight, block.mlp.down_proj.weight, block.self_attn.qkv_proj.weight,
                      block.self_attn.o_proj.weight):
                w.copy_(w.to(torch.bfloat16).float())
        head = dense.model.lm_head  # a new parameter: a tied embedding table stays float32, as in offload
        head.weight = torch.nn.Parameter(head.weight.to(torch.bfloat16).float(), requires_grad=False)
    run = build_executor(load_model(relu_model), "offload", "cuda", offload_layers=1, hot_dtype=torch.float32,
                         cold_dtype=torch.bfloat16)
    assert run.model.attention_layers[1].self_attn.qkv_proj.weight.dtype == torch.bfloat16
    assert run.model.lm_head.weight.dtype == torch.bfloat16 and run.model.lm_head.weight.device.type == "cpu"
    torch.testing.assert_close(_logits(run, ids).cpu(), _logits(dense, ids), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("tied", [False, True])
def test_dense_cpu_with_bfloat16_linear_weights_equals_dense_with_them_rounded(tmp_path, tied):
    """`--cpu-dtype bfloat16` on a dense CPU model: its linear layers' weights in bfloat16 (the GEMV widens them;
    a prefill widens a copy), activations and the embedding table float32, a tied LM head untied: the float32
    model with those weights rounded."""
    import powerinfer

    args = ModelArgs(hidden_size=64, intermediate_size=203, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=260, max_position_embeddings=64, tie_word_embeddings=tied,
                     bos_token_id=256, eos_token_id=257)
    torch.manual_seed(1)
    model = Transformer(args)
    path = write_hf_model(tmp_path / "m", args.to_config(), to_hf_weights(model.state_dict(), args))
    ids = torch.randint(0, 256, (15,)).tolist()
    rounded = load_model(path)
    with torch.no_grad():
        for module in rounded.model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight = torch.nn.Parameter(module.weight.to(torch.bfloat16).float(), requires_grad=False)
    gen = powerinfer.load(str(path), cpu_dtype="bfloat16", context=64)
    model = gen.loaded.model
    assert model.layers[0].mlp.down_proj.weight.dtype == model.lm_head.weight.dtype == torch.bfloat16
    assert model.embed_tokens.weight.dtype == torch.float32
    torch.testing.assert_close(_logits(gen.loaded, ids), _logits(rounded, ids), atol=2e-5, rtol=1e-5)
    assert not torch.equal(_logits(gen.loaded, ids), _logits(load_model(path), ids))  # the rounding shows


@pytest.mark.parametrize("mode,n_hot", [("cpu", None), ("hybrid", [101, 7, 1])])
def test_fatrelu_threshold_runs_the_same_in_the_sparse_modes(relu_model, mode, n_hot):
    """A model with a FATReLU gate threshold (config relu_threshold): the sparse executor with an oracle active
    set equals the dense engine, and the threshold changes the output (it is applied, not ignored)."""
    from powerinfer.offline.relufy import set_ffn_activation

    ids = torch.randint(0, 256, (16,)).tolist()
    plain = _logits(load_model(relu_model), ids)
    dense = load_model(relu_model)
    set_ffn_activation(dense.model, dense.args.hidden_act, 0.5)
    want = _logits(dense, ids)
    assert (want - plain).abs().max() > 1e-3
    loaded = load_model(relu_model)
    set_ffn_activation(loaded.model, loaded.args.hidden_act, 0.5)
    placement = _placement(3, n_hot) if n_hot else None
    run = build_executor(loaded, mode, "cpu", _oracles(loaded), placement)
    torch.testing.assert_close(_logits(run, ids), want, atol=2e-5, rtol=1e-5)



def test_offload_counts_the_output_head_only_with_every_layer():
    """llama.cpp -ngl: the head joins the GPU only with every layer, so a partial offload spends the head's
    bytes on one more layer; room for every layer but not the head keeps one layer (and the head) off."""
    from powerinfer.offline.synth import synthetic_args
    from powerinfer.runtime.executor import offload_layers_for_budget

    args, _ = synthetic_args("llama2-7b")
    mib, context = 2**20, 256
    per_layer = 2 * (4 * 4096 * 4096 + 3 * 4096 * 11008) + 2 * context * 4096 * 2 + 7 * 2 * mib
    head = 32000 * 4096 * 2
    assert offload_layers_for_budget(args, 8 * 1024 * mib, context) == 20  # 19 if the head were counted
    all_layers = 64 * mib + 32 * per_layer
    assert offload_layers_for_budget(args, all_layers + head, context) == 32
    assert offload_layers_for_budget(args, all_layers + head - 1, context) == 31
    assert offload_layers_for_budget(args, 64 * mib + per_layer - 1, context) == 0


def test_huge_page_copy_holds_the_same_values_in_the_asked_dtype():
    from powerinfer.runtime.host_memory import HUGE_PAGE, huge_page_copy

    g = torch.Generator().manual_seed(0)
    big = torch.randn(2 * HUGE_PAGE // 4096 + 3, 1024, generator=g)  # > 2 huge pages of float32, odd rows
    for source, dtype in ((big, None), (big.T, torch.bfloat16), (big[:5], torch.bfloat16)):
        copy = huge_page_copy(source, dtype)
        assert copy.is_contiguous() and copy.dtype == (dtype or source.dtype) and copy.shape == source.shape
        assert torch.equal(copy, source.to(copy.dtype))
