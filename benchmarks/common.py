"""What every benchmark result records next to its numbers (device, date, commit, software), an atomic JSON
writer, and the arguments and active sets the cold-FFN benchmarks share."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from powerinfer.bench import environment as _environment


def environment(device: str) -> dict:
    return _environment(cuda=device.startswith("cuda"))


def write_json(path: str | Path, result: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)


def add_cold_ffn_arguments(p) -> None:
    """The shape of one synthetic layer's cold FFN as a hybrid step meets it (bench_cold_ffn*.py)."""
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--cold-rows", type=int, default=8800, help="CPU rows per layer (synthetic 7B at 8 GiB)")
    p.add_argument("--active", type=int, default=310, help="active cold neurons per layer and token")


def active_sets(n_rows: int, active: int, count: int, generator: torch.Generator, uniform: bool = False
                ) -> list[torch.Tensor]:
    """`count` bool masks over n_rows with `active` rows set in each, drawn hot-first (row i with weight
    (i + 50) ** -0.8, as an artifact orders its cold rows) or, `uniform`, all rows alike."""
    rank = torch.arange(n_rows, dtype=torch.float64)
    weight = torch.ones_like(rank) if uniform else (rank + 50) ** -0.8
    masks = []
    for _ in range(count):
        mask = torch.zeros(n_rows, dtype=torch.bool)
        if active:
            mask[torch.multinomial(weight, active, generator=generator)] = True
        masks.append(mask)
    return masks
