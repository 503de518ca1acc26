"""What every benchmark result records next to its numbers (device, date, commit, software), and an
atomic JSON writer."""

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
