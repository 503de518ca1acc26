"""Measured FFN decode time of `build`'s candidate strategies on the CPU (issue: "the fastest one within the
quality budget").

FFN bytes per token rank the strategies well where decoding is bandwidth-bound (a GPU in CUDA graphs). On a
CPU the per-layer work of a sparse strategy can cost more than the bytes it saves: SmolLM2's
exact-sparse-down artifact decoded at 0.85x dense on the 2-core VM with 45.7% of its FFN skipped. So a CPU
build times each candidate as the runtime's `cpu` mode runs it: every layer's `SplitFFN` over one token at a
time, on the calibration tokens' FFN inputs.
"""

from __future__ import annotations

import copy
import time

import torch

from powerinfer.offline.evaluate import CurvePoint

# Decode steps timed per candidate (after one warm-up step); median over steps of the sum over layers.
TIMED_TOKENS = 24


@torch.inference_mode()
def time_strategies(model, orders, points: list[CurvePoint], inputs: list[torch.Tensor], *, predictors,
                    predictor_thresholds, h_thresholds, active_thresholds, n_always_active: int,
                    tokens: int = TIMED_TOKENS) -> None:
    """Fill `ffn_ms_per_token` of `points` (CPU, float32 weights, the current torch/numba threads).

    `orders`: per layer the hot-first neuron order the artifact will use (predictors already follow it);
    `inputs`: per layer FFN inputs [N, d] from the profile; thresholds as in `measure_curve`."""
    from powerinfer.runtime.executor import CPU, ExecutionPlan, LayerPlan, NeuronCounts, SplitFFN

    plan = ExecutionPlan("cpu", CPU, torch.float32, [], CPU, CPU, torch.float32)
    counts = NeuronCounts(CPU)
    weights = []
    for block, order in zip(model.layers, orders):
        mlp = block.mlp
        gate, up = mlp.gate_up_proj.weight.detach().float().chunk(2)
        weights.append((torch.cat([gate[order], up[order]]), mlp.down_proj.weight.detach().float()[:, order],
                        mlp.activation, mlp.threshold))
    for point in points:
        ffns = []
        for i, (gate_up, down, activation, threshold) in enumerate(weights):
            h_threshold, predictor = 0.0, None
            if point.strategy == "exact-sparse-down":
                h_threshold = (active_thresholds[i] if h_thresholds is None
                               else h_thresholds[i][str(point.parameter)])
            elif point.strategy == "predictor":
                predictor = copy.deepcopy(predictors[i]).float()
                predictor.threshold.fill_(predictor_thresholds[i][str(point.parameter)])
            layer = LayerPlan(CPU, 0, point.strategy, h_threshold, n_always_active)
            ffns.append(SplitFFN(gate_up, down, activation, layer, plan, predictor, counts, threshold))
        steps = []
        for t in range(min(tokens, min(len(x) for x in inputs)) + 1):
            start = time.perf_counter()
            for ffn, x in zip(ffns, inputs):
                ffn(x[t].float().view(1, 1, -1))
            steps.append(time.perf_counter() - start)
        point.ffn_ms_per_token = 1e3 * sorted(steps[1:])[len(steps[1:]) // 2]  # the first step warms up
