"""`powerinfer build`: profile -> predictors -> strategy -> placement -> one artifact (docs/ARTIFACT.md).

The offline half of PowerInfer (§5–6) in one pass. One step goes beyond the paper: before committing to
sparsity, the build measures what it costs. For models without exact zeros (SiLU, GELU) skipping neurons
is an approximation, so every strategy's operating points — predictor-driven at several recall targets,
exact gate/up with a sparse down at several sparsity levels (the largest-|h| "massive" neurons always
kept), and dense — are run on held-out calibration tokens, and the cheapest one (FFN bytes read per
token) whose perplexity increase is within `max_ppl_increase` with 95% confidence (over the held-out
windows) is chosen; dense is a valid answer. On a CPU build "cheapest" is the measured FFN decode time
(`offline.speed`: per-layer work can outweigh the bytes saved there). The chosen strategy and the whole
measured curve go into the manifest.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from powerinfer.errors import PowerInferError
from powerinfer.loading import load_model
from powerinfer.loading.artifact import source_fingerprint, write_artifact
from powerinfer.models.llama import to_hf_weights
from powerinfer.offline.evaluate import choose_strategy, h_quantile_thresholds, measure_curve, within_budget
from powerinfer.offline.placement import (DTYPE_BYTES, GiB, check_vram_budget, plan_placement, relative_ffn_bytes,
                                         required_gpu_bytes)
from powerinfer.offline.predictors import layer_kinds, predictor_nbytes, recall_targets, train_predictors
from powerinfer.offline.profile import (EXACT_ZERO_ACTIVATIONS, generate_calibration_tokens, hot_first_order,
                                        profile_model, read_text_file, split_windows, tokenize_text)
from powerinfer.offline.speed import time_strategies

DEFAULT_SPARSITY_LEVELS = (0.3, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7)
MIN_CALIBRATION_TOKENS = 64


@dataclass
class BuildOptions:
    out: str
    vram_budget_gib: float
    model: str | None = None
    data: str | None = None
    tokens: int = 8192  # profiled tokens
    holdout_tokens: int = 4096  # calibration tokens kept apart for the strategy's quality measurement
    sample_tokens: int = 4096  # profiled tokens whose FFN inputs train the predictors
    window: int = 512
    target_sparsity: float = 0.5
    recall: float = 0.95
    # "magnitude": active samples weighted by |h| in the predictors' BCE, "count": all alike (offline.predictors);
    # on a ReLU-fied SmolLM2 magnitude cut the perplexity cost at equal recall 3x
    # (benchmarks/results/relufied_smollm2_predictors_h100.json)
    predictor_loss: str = "magnitude"
    predictor_kind: str = "auto"  # "low-rank", "int4-gate", or "auto": per layer the cheapest allowed (offline.predictors)
    max_ppl_increase: float = 0.02
    keep_massive: int = 4
    sparsity_levels: tuple = DEFAULT_SPARSITY_LEVELS
    ctx: int = 2048
    gpu_dtype: str = "float16"
    cpu_dtype: str = "bfloat16"  # of the CPU-resident weights in the placement's objective (the runtime default)
    weights_dtype: str = "float16"
    neuron_batch: int = 64
    min_layer_fraction: float = 0.125
    device: str = "cpu"
    choose_by: str = "auto"  # the strategy's speed measure: "time" (CPU decode), "bytes", or "auto" (time on CPU)
    seed: int = 0
    force: bool = False
    progress: bool = False
    log: object = field(default=None, repr=False)  # a file for stage messages (None: quiet)


def calibration_tokens(loaded, data: str | None, n_tokens: int, holdout: int, window: int, seed: int,
                       progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(profile tokens, held-out tokens) from `data`, or text the model generates when `data` is None."""
    if data is None:
        tok = loaded.tokenizer
        start = tok.bos_token_id if tok.bos_token_id is not None else (tok.eos_token_ids or [0])[0]
        tokens = generate_calibration_tokens(loaded.model, n_tokens + holdout, window, start, seed, progress)
    else:
        tokens = tokenize_text(loaded.tokenizer, read_text_file(data), n_tokens + holdout)
        if len(tokens) < MIN_CALIBRATION_TOKENS:
            raise PowerInferError(f"{data}: only {len(tokens)} tokens; calibration needs at least "
                                  f"{MIN_CALIBRATION_TOKENS}")
        if holdout and len(tokens) < n_tokens + holdout:  # a short file: keep a quarter for the measurement
            holdout = len(tokens) // 4
    return tokens[:len(tokens) - holdout], tokens[len(tokens) - holdout:]


def build_artifact(opts: BuildOptions) -> dict:
    """Run the whole offline pipeline and write the artifact to `opts.out`; returns its manifest summary."""
    started = time.perf_counter()
    seconds = {}

    def stage(name: str, since: float) -> float:
        now = time.perf_counter()
        seconds[name] = round(now - since, 2)
        if opts.log is not None:
            print(f"{name}: {seconds[name]:.1f} s", file=opts.log)
        return now

    if not 0 <= opts.max_ppl_increase:
        raise PowerInferError(f"--max-ppl-increase must be >= 0, got {opts.max_ppl_increase}")
    if Path(opts.out).exists() and not opts.force:
        raise PowerInferError(f"{opts.out} already exists (pass --force to replace it)")
    loaded = load_model(opts.model, device=opts.device, dtype=torch.float32, progress=opts.progress)
    if loaded.checkpoint.format == "artifact":
        raise PowerInferError(f"{loaded.checkpoint.path} is already an artifact; build from its source model, "
                              "or re-plan it with `powerinfer plan`")
    model, args = loaded.model, loaded.args
    # fail before the long work when even the strategy-independent part cannot fit, or the predictor kind cannot
    check_vram_budget(opts.vram_budget_gib * GiB, required_gpu_bytes(args.to_config(), opts.ctx, opts.gpu_dtype),
                      opts.ctx)
    layer_kinds(opts.predictor_kind, model.layers[0].mlp, args.hidden_size)
    t = stage("load", started)

    profile_tokens, holdout_tokens = calibration_tokens(loaded, opts.data, opts.tokens, opts.holdout_tokens,
                                                        opts.window, opts.seed, opts.progress)
    profile = profile_model(model, split_windows(profile_tokens, opts.window), opts.target_sparsity,
                            opts.sample_tokens, opts.progress)
    t = stage("profile", t)

    predictors, reports = train_predictors(profile.inputs, profile.labels, opts.recall,
                                           ffns=[block.mlp for block in model.layers], loss=opts.predictor_loss,
                                           kind=opts.predictor_kind,
                                           device=opts.device, seed=opts.seed, progress=opts.progress)
    t = stage("predictors", t)

    exact_zeros = args.hidden_act in EXACT_ZERO_ACTIVATIONS
    d, n_ff = args.hidden_size, args.intermediate_size
    predictor_fraction = sum(r.parameters for r in reports) / (3 * d * n_ff * args.num_hidden_layers)
    levels = list(opts.sparsity_levels)
    h_thresholds = None if exact_zeros else h_quantile_thresholds(model, profile.inputs, levels)
    # massive neurons (largest |h|) are first in the hot-first order and always computed
    orders = [hot_first_order(layer, opts.keep_massive) for layer in profile.layers]
    n_always_active = min(opts.keep_massive, n_ff)
    reordered = [predictor.reordered(order).to(opts.device) for predictor, order in zip(predictors, orders)]
    ppl_dense, curve = _measure_reordered(model, orders, split_windows(holdout_tokens, opts.window), profile,
                                          reordered, reports, recall_targets(opts.recall), h_thresholds, levels,
                                          n_always_active, predictor_fraction, opts.progress)
    chosen_by = opts.choose_by if opts.choose_by != "auto" else ("time" if opts.device == "cpu" else "bytes")
    if chosen_by == "time":  # the CPU decode's own speed, where per-layer work can outweigh bytes (offline.speed)
        time_strategies(model, orders, within_budget(curve, opts.max_ppl_increase), profile.inputs,
                        predictors=reordered, predictor_thresholds=[r.thresholds for r in reports],
                        h_thresholds=h_thresholds,
                        active_thresholds=[layer.active_threshold for layer in profile.layers],
                        n_always_active=n_always_active)
    chosen = choose_strategy(curve, opts.max_ppl_increase)
    t = stage("strategy", t)

    if chosen.strategy == "predictor":  # the chosen recall target may be stricter than --recall
        reports = [report.at(chosen.parameter) for report in reports]
        for predictor, report in zip(predictors, reports):
            predictor.threshold.fill_(report.threshold)
    frequencies = [layer.frequency[order] for layer, order in zip(profile.layers, orders)]
    placement = plan_placement(
        args.to_config(), frequencies, vram_budget_bytes=int(opts.vram_budget_gib * GiB), strategy=chosen.strategy,
        n_always_active=n_always_active, predictor_bytes=[predictor_nbytes(r.kind, d, n_ff, r.rank,
                                                                           DTYPE_BYTES[opts.gpu_dtype])
                                                          for r in reports], ctx=opts.ctx,
        gpu_dtype=opts.gpu_dtype, cpu_dtype=opts.cpu_dtype, neuron_batch=opts.neuron_batch,
        min_layer_fraction=opts.min_layer_fraction)
    t = stage("placement", t)

    layers = []
    for i, (layer, report, predictor) in enumerate(zip(profile.layers, reports, predictors)):
        h_threshold = (layer.active_threshold if exact_zeros else h_thresholds[i][str(chosen.parameter)]) \
            if chosen.strategy == "exact-sparse-down" else None
        layers.append(_layer_record(n_ff, layer, report, predictor, h_threshold, n_always_active))
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[opts.weights_dtype]
    state = {k: v.detach().to("cpu", dtype) for k, v in model.state_dict().items()}
    build = {f.name: getattr(opts, f.name) for f in fields(opts) if f.name not in ("log", "progress", "force", "out")}
    build.update(sparsity_levels=levels, profiled_tokens=profile.tokens, holdout_tokens=len(holdout_tokens),
                 data=opts.data or "self-generated", activation=args.hidden_act,
                 active_definition="h != 0" if exact_zeros else f"|h| above the layer's quantile {opts.target_sparsity}",
                 predictor_fraction=predictor_fraction, seconds=seconds)
    strategy = {"name": chosen.strategy, "parameter": chosen.parameter, "ffn_sparsity": chosen.ffn_sparsity,
                "ppl_increase": chosen.ppl_increase, "ppl_increase_upper": chosen.ppl_increase_upper,
                "relative_ffn_bytes": chosen.relative_ffn_bytes, "ffn_ms_per_token": chosen.ffn_ms_per_token,
                "chosen_by": ("measured FFN decode time, CPU" if chosen_by == "time" else "FFN bytes per token"),
                "max_ppl_increase": opts.max_ppl_increase, "ppl_dense_holdout": ppl_dense,
                "holdout_tokens": len(holdout_tokens), "curve": [p.to_json() for p in curve]}
    checkpoint = loaded.checkpoint
    source = {"path": str(Path(checkpoint.path).resolve()), "sha256": source_fingerprint(checkpoint),
              "format": checkpoint.format}
    write_artifact(opts.out, config=args.to_config(), tokenizer=loaded.tokenizer, source=source, build=build,
                   strategy=strategy, layers=layers, weights=to_hf_weights(state, args), orders=orders,
                   predictors=predictors, profile=[layer.tensors() for layer in profile.layers],
                   placement=placement, rope_freq_factors=checkpoint.rope_freq_factors(), force=opts.force)
    stage("write", t)
    return {"out": opts.out, "strategy": strategy, "layers": layers, "placement": placement, "build": build,
            "reports": reports, "profile": profile, "seconds": seconds}


def _layer_record(n_ff, layer, report, predictor, h_threshold, n_always_active) -> dict:
    """One layer's manifest entry (docs/ARTIFACT.md, `layers[i]`)."""
    return {"n_ff": n_ff, "predictor_kind": report.kind, "rank": report.rank,
            "threshold": predictor.threshold.item(),
            "recall": report.recall, "precision": report.precision,
            "predicted_sparsity": report.predicted_sparsity, "sparsity": layer.sparsity,
            "skew": layer.skew, "active_threshold": layer.active_threshold,
            "h_threshold": h_threshold, "n_always_active": n_always_active}


def build_in_memory(loaded, tokens: torch.Tensor, *, recall: float = 0.95, keep_massive: int = 4,
                    window: int = 512, ctx: int = 2048, gpu_dtype: str = "float16", cpu_dtype: str = "bfloat16",
                    weights_dtype: torch.dtype = torch.float16, neuron_batch: int = 64,
                    min_layer_fraction: float = 0.125, seed: int = 0, progress: bool = False,
                    log=None):
    """Profile -> predictors -> hot-first order for a ReLU-family model, kept in memory: a `MemoryArtifact`
    that `powerinfer.load` runs like an artifact directory (its placement is planned at load time for the
    VRAM budget). For benchmarks of large synthetic models: no perplexity-checked strategy choice (the
    `predictor` strategy is exact up to the predictors' recall for ReLU models) and nothing written.

    `loaded` is profiled on its own device and dtype (a GPU profiles and trains the predictors of a 7B
    model in seconds); `tokens` (1-D) are the calibration tokens. The artifact's weights are copies on the
    CPU in `weights_dtype`; drop `loaded` afterwards to free its memory."""
    from datetime import datetime, timezone

    from powerinfer.loading.artifact import FORMAT, FORMAT_VERSION
    from powerinfer.loading.memory import MemoryArtifact

    model, args = loaded.model, loaded.args
    if args.hidden_act not in EXACT_ZERO_ACTIVATIONS:
        raise PowerInferError(f"an in-memory build needs a ReLU-family model (exact zeros), not "
                              f"{args.hidden_act!r}; build an artifact with `powerinfer build`")
    seconds, started = {}, time.perf_counter()

    def stage(name: str, since: float) -> float:
        now = time.perf_counter()
        seconds[name] = round(now - since, 2)
        if log is not None:
            print(f"{name}: {seconds[name]:.1f} s", file=log, flush=True)
        return now

    device = next(model.parameters()).device
    profile = profile_model(model, split_windows(tokens, window), sample_tokens=len(tokens), progress=progress)
    t = stage("profile", started)
    predictors, reports = train_predictors(profile.inputs, profile.labels, recall,
                                           ffns=[block.mlp for block in model.layers], device=device, seed=seed,
                                           progress=progress)
    t = stage("predictors", t)

    n_ff = args.intermediate_size
    n_always_active = min(keep_massive, n_ff)
    orders = [hot_first_order(layer, keep_massive) for layer in profile.layers]
    layers = [_layer_record(n_ff, layer, report, predictor, None, n_always_active)
              for layer, report, predictor in zip(profile.layers, reports, predictors)]
    state = to_hf_weights(dict(model.state_dict()), args)
    tensors = {}
    for name in list(state):  # hot-first FFN, moved to the CPU one tensor at a time
        tensor = state.pop(name)
        if ".mlp." in name:
            order = orders[int(name.split(".")[2])].to(tensor.device)
            tensor = tensor[:, order] if name.endswith("down_proj.weight") else tensor[order]
        tensors[name] = tensor.to("cpu", weights_dtype).contiguous()
    t = stage("reorder", t)

    predicted = sum(r.predicted_sparsity for r in reports) / len(reports)
    fraction = sum(r.parameters for r in reports) / (3 * args.hidden_size * n_ff * args.num_hidden_layers)
    tokenizer = loaded.tokenizer
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {"path": str(loaded.checkpoint.path), "sha256": None, "format": loaded.checkpoint.format},
        "config": args.to_config(),
        "tokenizer": {"bos_token_id": tokenizer.bos_token_id, "eos_token_ids": tokenizer.eos_token_ids,
                      "add_bos": tokenizer.add_bos, "chat_template": tokenizer.chat_template,
                      "kind": tokenizer.kind},
        "build": {"in_memory": True, "recall": recall, "keep_massive": keep_massive, "window": window,
                  "ctx": ctx, "gpu_dtype": gpu_dtype, "cpu_dtype": cpu_dtype, "neuron_batch": neuron_batch,
                  "min_layer_fraction": min_layer_fraction, "seed": seed, "profiled_tokens": profile.tokens,
                  "device": str(device), "weights_dtype": str(weights_dtype).removeprefix("torch."),
                  "activation": args.hidden_act, "active_definition": "h != 0",
                  "predictor_fraction": fraction, "seconds": seconds},
        "strategy": {"name": "predictor", "parameter": recall, "ffn_sparsity": predicted,
                     "ppl_increase": None, "ppl_increase_upper": None,
                     "relative_ffn_bytes": relative_ffn_bytes("predictor", predicted, fraction),
                     "max_ppl_increase": None, "curve": [],
                     "note": "in-memory build: perplexity not measured"},
        "layers": layers,
    }
    return MemoryArtifact(
        str(loaded.checkpoint.path), manifest, tokenizer, tensors,
        [p.reordered(order).cpu() for p, order in zip(predictors, orders)],
        [{k: v[order] for k, v in layer.tensors().items()} for layer, order in zip(profile.layers, orders)],
        orders, loaded.checkpoint.rope_freq_factors())


@torch.no_grad()
def _measure_reordered(model, orders, windows, profile, predictors, reports, recalls, h_thresholds, levels,
                       n_always_active, predictor_fraction, progress):
    """`measure_curve` on the model with its FFN neurons permuted hot-first (as the artifact will hold
    them), restoring the original order afterwards."""
    originals = []
    for block, order in zip(model.layers, orders):
        ffn = block.mlp
        gate, up = ffn.gate_up_proj.weight.chunk(2)
        originals.append((ffn.gate_up_proj.weight.data, ffn.down_proj.weight.data))
        ffn.gate_up_proj.weight.data = torch.cat([gate[order], up[order]])
        ffn.down_proj.weight.data = ffn.down_proj.weight[:, order].contiguous()
    try:
        return measure_curve(
            model, windows, active_thresholds=[layer.active_threshold for layer in profile.layers],
            n_always_active=n_always_active, predictors=predictors,
            predictor_thresholds=[r.thresholds for r in reports], recall_targets=recalls,
            h_thresholds=h_thresholds, sparsity_levels=levels, predictor_fraction=predictor_fraction,
            progress=progress)
    finally:
        for block, (gate_up, down) in zip(model.layers, originals):
            block.mlp.gate_up_proj.weight.data, block.mlp.down_proj.weight.data = gate_up, down


def print_build_summary(result: dict, file=sys.stdout) -> None:
    from powerinfer.offline.placement import format_placement
    from powerinfer.offline.predictors import format_predictor_table
    from powerinfer.offline.profile import format_profile_table

    print("profile (per-layer sparsity and skew: fraction of neurons holding 80% of activations):", file=file)
    print(format_profile_table(result["profile"]), file=file)
    print("\npredictors:", file=file)
    print(format_predictor_table(result["reports"]), file=file)
    s = result["strategy"]
    print(f"\nsparsity-perplexity curve on {s['holdout_tokens']} held-out calibration tokens "
          f"(dense ppl {s['ppl_dense_holdout']:.4f}):", file=file)
    print(format_curve(s["curve"]), file=file)
    print(f"chosen strategy: {s['name']}" + (f" ({s['parameter']})" if s["parameter"] is not None else "")
          + f", FFN sparsity {s['ffn_sparsity']:.3f}, ppl {100 * s['ppl_increase']:+.2f}% "
          f"(95% bound {100 * s['ppl_increase_upper']:+.2f}%, budget +{100 * s['max_ppl_increase']:.2f}%), "
          f"FFN bytes/token x{s['relative_ffn_bytes']:.3f}"
          + (f", FFN {s['ffn_ms_per_token']:.3f} ms/token" if s.get("ffn_ms_per_token") is not None else "")
          + f"; chosen by {s.get('chosen_by', 'FFN bytes per token')}",
          file=file)
    print("\nplacement:", file=file)
    print(format_placement(result["placement"]), file=file)
    print(f"\nartifact written to {result['out']} in {sum(result['seconds'].values()):.1f} s "
          f"({', '.join(f'{k} {v:.1f} s' for k, v in result['seconds'].items())})", file=file)


def format_curve(curve: list[dict]) -> str:
    lines = [f"{'strategy':<18} {'param':>6} {'FFN sparsity':>12} {'ppl':>9} {'increase':>9} {'95% bound':>9} "
             f"{'FFN bytes':>9} {'FFN ms/tok':>10}"]
    for p in curve:
        param = "" if p["parameter"] is None else f"{p['parameter']:g}"
        ms = p.get("ffn_ms_per_token")
        lines.append(f"{p['strategy']:<18} {param:>6} {p['ffn_sparsity']:>12.3f} {p['ppl']:>9.4f} "
                     f"{100 * p['ppl_increase']:>8.2f}% {100 * p['ppl_increase_upper']:>8.2f}% "
                     f"{p['relative_ffn_bytes']:>9.3f} {'' if ms is None else f'{ms:.3f}':>10}")
    return "\n".join(lines)
