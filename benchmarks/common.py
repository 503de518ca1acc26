"""What every benchmark result records next to its numbers (device, date, commit, software), an atomic JSON
writer, and the arguments the cold-FFN benchmarks share."""

from __future__ import annotations

import json
from pathlib import Path

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
