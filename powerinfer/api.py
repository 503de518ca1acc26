"""`powerinfer.load`: one call from a model path to a ready `Generator`, dense or sparse.

A plain checkpoint runs dense (or `offload`, llama.cpp style). An artifact from `powerinfer build` runs
sparse with its predictors, FFN strategy and placement: `hybrid` on CUDA, `cpu` otherwise, unless `mode`
says otherwise; `vram_budget` re-plans the placement for another budget without re-profiling.
"""

from __future__ import annotations

import torch

from powerinfer.errors import PowerInferError
from powerinfer.loading import DTYPES, load_model, open_checkpoint, resolve_dtype
from powerinfer.runtime import Generator
from powerinfer.runtime.executor import MODES, build_executor, offload_layers_for_budget

GiB = 1 << 30
CPU_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}


def load(model=None, device: str = "cpu", dtype=None, context: int | None = None,
         cuda_graphs: bool | None = None, mode: str | None = None,
         vram_budget: float | None = None, cpu_dtype: str | None = None) -> Generator:
    """Load a GGUF file, Hugging Face directory or artifact (None: the default model) ready to generate.

    mode: hybrid | gpu | cpu | dense | offload (default: the artifact's natural mode, else dense).
    vram_budget: GiB of GPU memory for hybrid (re-plans the artifact's placement) and offload.
    cpu_dtype: "float32" | "bfloat16" | "int8", of the weight matrices in CPU memory (default: bfloat16 when a GPU
    holds the rest, else float32; dense on the CPU: its linear layers' weights, activations stay float32). int8:
    the predicted-sparse FFN's CPU rows quantized with one scale per row, the other CPU matrices bfloat16 (an
    artifact of the predictor strategy in hybrid, gpu or cpu mode).
    """
    if mode is not None and mode not in MODES:
        raise PowerInferError(f"unknown mode {mode!r} (choose from {', '.join(MODES)})")
    if cpu_dtype not in (None, *CPU_DTYPES):
        raise PowerInferError(f"cpu_dtype must be one of {', '.join(CPU_DTYPES)}, got {cpu_dtype!r}")
    if vram_budget is not None and not vram_budget > 0:
        raise PowerInferError(f"the VRAM budget must be positive, got {vram_budget} GiB")
    checkpoint = open_checkpoint(model)
    artifact = checkpoint.format == "artifact"
    if mode is None:
        mode = ("hybrid" if device == "cuda" else "cpu") if artifact else "dense"
    if cpu_dtype == "int8" and (mode in ("dense", "offload") or not artifact
                                or checkpoint.manifest["strategy"]["name"] != "predictor"):
        raise PowerInferError("cpu_dtype int8 is for the predicted-sparse FFN's CPU rows: an artifact of the "
                              "predictor strategy in hybrid, gpu or cpu mode; use float32 or bfloat16")
    if mode == "dense":
        loaded = load_model(model, device=device, dtype=dtype)
        if device == "cpu" and cpu_dtype is not None:  # on a GPU, dense keeps no weights in CPU memory
            loaded = build_executor(loaded, "dense", "cpu", cold_dtype=CPU_DTYPES[cpu_dtype])
        return Generator(loaded, context, cuda_graphs)
    if mode != "offload" and not artifact:
        raise PowerInferError(f"--mode {mode} runs an artifact; build one with "
                              f"`powerinfer build --model {model or '<default>'} --vram-budget GiB -o DIR`")
    hot_dtype = resolve_dtype(dtype, device)
    cold_dtype = CPU_DTYPES[cpu_dtype] if cpu_dtype else None
    # the executor converts each piece to its device's dtype (CPU: float32 for the numba kernels), so load in
    # the dtype an artifact stores (exact, half the memory of float32 for a 13B model), else in float32
    stored = checkpoint.manifest["build"].get("weights_dtype") if artifact else None
    loaded = load_model(model, device="cpu", dtype=hot_dtype if mode == "gpu" else DTYPES.get(stored, torch.float32))
    if mode == "offload":
        if vram_budget is None:
            raise PowerInferError("--mode offload needs --vram-budget GiB (how many layers fit the GPU)")
        from powerinfer.runtime.generate import DEFAULT_CONTEXT
        ctx = min(context or DEFAULT_CONTEXT, loaded.args.max_position_embeddings)
        layers = offload_layers_for_budget(loaded.args, int(vram_budget * GiB), ctx,
                                           torch.tensor([], dtype=hot_dtype).element_size())
        return Generator(build_executor(loaded, "offload", device, offload_layers=layers, hot_dtype=hot_dtype,
                                        cold_dtype=cold_dtype), context, cuda_graphs)

    manifest = checkpoint.manifest
    placement = None
    if mode == "hybrid":
        if vram_budget is not None:
            from powerinfer.offline.placement import plan_for_artifact
            placement = plan_for_artifact(checkpoint, vram_budget_bytes=int(vram_budget * GiB), ctx=context)
        else:
            placement = checkpoint.placement()
            if placement is None:
                raise PowerInferError(f"{checkpoint.path} has no placement; run `powerinfer plan --model "
                                      f"{checkpoint.path} --vram-budget GiB` or pass --vram-budget")
    strategy = manifest["strategy"]["name"]
    executor = build_executor(loaded, mode, device, checkpoint.predictors() if strategy == "predictor" else None,
                              placement, hot_dtype=hot_dtype, strategy=strategy, layer_params=manifest["layers"],
                              cold_dtype=cold_dtype)
    return Generator(executor, context, cuda_graphs)
