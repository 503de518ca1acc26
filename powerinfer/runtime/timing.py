"""Where a decode step's time goes: GPU compute, CPU compute, PCIe transfers and the rest (for `bench`).

An executor with a `PhaseTimer` attached (`HybridTransformer.timer`; None, the default, costs one
attribute test per call) marks its phases:
- on the GPU stream, with CUDA events: `mark(kind)` says what the stream did since the previous mark —
  "gpu" (kernels), "transfer" (a PCIe copy) or "idle" (it waited for the CPU's part); the time between
  two marks is read from the events once, at the end, so marking never synchronises;
- on the host, with perf_counter: `cpu()` brackets CPU compute (nested brackets count once).
GPU time is stream time, so it includes gaps in which the GPU waited for the host to launch its next
kernel; in a CUDA-graph replay there are none.
"""

from __future__ import annotations

import contextlib
import time

import torch


class PhaseTimer:
    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.marks: list[tuple[str | None, object]] = []
        self.cpu_s = 0.0
        self._depth = 0

    def mark(self, kind: str | None) -> None:
        """The stream's time since the previous mark was spent on `kind` (None: not counted)."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((kind, event))

    @contextlib.contextmanager
    def cpu(self):
        self._depth += 1
        start = time.perf_counter()
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.cpu_s += time.perf_counter() - start

    def move(self, x: torch.Tensor, device, dtype) -> torch.Tensor:
        """`x.to(device, dtype)`, marked as a transfer when it crosses between the GPU and the CPU."""
        device = torch.device(device)
        if (x.device.type == "cuda") == (device.type == "cuda"):
            return x.to(device, dtype)
        self.mark("gpu" if x.device.type == "cuda" else "idle")  # what the stream did before the copy
        y = x.to(device, dtype)
        self.mark("transfer")
        return y

    def stream_seconds(self) -> dict[str, float]:
        """Seconds of stream time per kind (synchronises)."""
        out = {"gpu": 0.0, "transfer": 0.0, "idle": 0.0}
        if self.marks:
            torch.cuda.synchronize()
        for (_, previous), (kind, event) in zip(self.marks, self.marks[1:]):
            if kind is not None:
                out[kind] += previous.elapsed_time(event) / 1e3
        return out
