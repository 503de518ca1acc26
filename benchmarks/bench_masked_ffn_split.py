"""How to split the CPU's cold FFN of a hybrid step among threads (PowerInfer, arXiv 2312.12456, §5).

The numba masked-FFN kernel (kernels/cpu.py) on one synthetic 7B layer's CPU block (5000 cold rows x 4096,
bfloat16, huge-page copies as the executor makes them), microseconds per call by (numba team size, tasks) for
107 and 266 active rows (a hybrid 7B / 13B layer's), cycling over 24 layers' copies so that no call finds its
rows in cache. Prints one line per setting, then the table as JSON (hybrid_7b_cold_dtype_h200.json holds a run).

    python benchmarks/bench_masked_ffn_split.py
"""

import json
import time

import powerinfer  # noqa: F401  (first: sets the OpenMP spin before torch loads)
import numba
import numpy as np
import torch

from powerinfer.kernels import cpu
from powerinfer.runtime.host_memory import huge_page_copy

D, ROWS, LAYERS = 4096, 5000, 24
SETTINGS = ((16, 16), (16, 8), (16, 4), (8, 8), (8, 4), (4, 4), (2, 2), (1, 1))  # (team size, tasks)


def main() -> None:
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(ROWS, D, generator=g) / 64 for _ in range(3)]
    layers = [cpu.MaskedFFN(*[huge_page_copy(w + 0.001 * i, torch.bfloat16) for w in base], "relu")
              for i in range(LAYERS)]
    x = torch.randn(1, D, generator=g).numpy()
    out = np.zeros((1, D), np.float32)
    code, threshold = layers[0].code, layers[0].threshold
    results = {}
    for k in (107, 266):
        masks = []
        for _ in range(LAYERS):
            mask = np.zeros(ROWS, np.bool_)
            mask[torch.randperm(ROWS, generator=g)[:k].numpy()] = True
            masks.append(mask)
        for team, tasks in SETTINGS:
            if team > numba.config.NUMBA_NUM_THREADS:
                continue
            numba.set_num_threads(team)
            partial = np.zeros((16, 1, D), np.float32)
            kernel = cpu._masked_ffn_kernel_serial if tasks == 1 else cpu._masked_ffn_kernel

            def call(i):
                kernel(x, *layers[i].weights, *layers[i].scales, masks[i], 1, code, threshold, partial[:tasks], out)

            for i in range(3):  # compile and warm up
                call(i)
            start = time.perf_counter()
            for _ in range(6):
                for i in range(LAYERS):
                    call(i)
            us = (time.perf_counter() - start) / (6 * LAYERS) * 1e6
            results[f"k{k}_team{team}_tasks{tasks}"] = round(us, 1)
            print(k, team, tasks, round(us, 1), "us", round(3 * k * D * 2 / us / 1e3, 1), "GB/s", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
