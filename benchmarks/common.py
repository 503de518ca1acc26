"""What every benchmark result records next to its numbers: device, date, commit, software."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    import torch
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{cpu_name()} ({os.cpu_count()} logical cores)"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return os.environ.get("POWERINFER_COMMIT", "unknown")


def environment(device: str) -> dict:
    import torch
    return {"device": device_name(device), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "commit": os.environ.get("POWERINFER_COMMIT") or git_commit(), "torch": torch.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads()}


def write_json(path: str | Path, result: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
