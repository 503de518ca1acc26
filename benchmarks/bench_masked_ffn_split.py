"""How to split the CPU's cold FFN of a hybrid step among threads (PowerInfer, arXiv 2312.12456, §5).

The numba masked-FFN kernel (kernels/cpu.py) on one synthetic 7B layer's CPU block (5000 cold rows x 4096,
bfloat16, huge-page copies as the executor makes them), microseconds per call by (numba team size, tasks) for
107 and 266 active rows (a hybrid 7B / 13B layer's), cycling over 24 layers' copies so that no call finds its
rows in cache. Prints one line per setting, then the table as JSON (hybrid_7b_cold_dtype_h200.json holds a run).

    python benchmarks/bench_masked_ffn_split.py
"""
import powerinfer  # noqa
import time, json, torch, numpy as np, numba
from powerinfer.kernels import cpu
from powerinfer.runtime.host_memory import huge_page_copy
D, ROWS, LAYERS = 4096, 5000, 24
g = torch.Generator().manual_seed(0)
base = [torch.randn(ROWS, D, generator=g) / 64 for _ in range(3)]
layers = [cpu.MaskedFFN(*[huge_page_copy(w + 0.001 * l, torch.bfloat16) for w in base], "relu") for l in range(LAYERS)]
x = torch.randn(1, D, generator=g).numpy()
out = np.zeros((1, D), np.float32)
res = {}
for k in (107, 266):
    masks = []
    for l in range(LAYERS):
        m = np.zeros(ROWS, np.bool_); m[torch.randperm(ROWS, generator=g)[:k].numpy()] = True; masks.append(m)
    for team, tasks in ((16, 16), (16, 8), (16, 4), (8, 8), (8, 4), (4, 4), (2, 2), (1, 1)):
        if team > numba.config.NUMBA_NUM_THREADS:
            continue
        numba.set_num_threads(team)
        partial = np.zeros((16, 1, D), np.float32)
        kern = cpu._masked_ffn_kernel_serial if tasks == 1 else cpu._masked_ffn_kernel
        f = layers[0]
        for l in range(3):
            kern(x, *layers[l].weights, masks[l], f.code, f.threshold, partial[:tasks], out)
        t0 = time.perf_counter(); n = 0
        for rep in range(6):
            for l in range(LAYERS):
                kern(x, *layers[l].weights, masks[l], f.code, f.threshold, partial[:tasks], out); n += 1
        us = (time.perf_counter() - t0) / n * 1e6
        res[f"k{k}_team{team}_tasks{tasks}"] = round(us, 1)
        print(k, team, tasks, round(us, 1), "us", round(3 * k * D * 2 / us / 1e3, 1), "GB/s", flush=True)
print(json.dumps(res))
