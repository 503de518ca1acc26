"""The serving engine: one worker thread owns the model and interleaves decode steps of up to N requests.

Iteration-level scheduling as in Orca (Yu et al., OSDI 2022) and vLLM: requests join and leave between
decode steps rather than between whole requests. The runtime's `Generator` decodes one sequence with one
static KV cache, so each slot is its own `Generator` (its own cache, the loaded weights shared) and the
worker advances every active slot by one token per round, round-robin, so that no client starves. Only the
worker thread calls the model: a torch module is not meant to run concurrent forward passes from several
threads. Handlers talk to the worker through `submit` and `cancel`; results come back through each
request's `emit` callback (called on the worker thread, so it must be thread-safe).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

from powerinfer.errors import PowerInferError
from powerinfer.runtime import Chunk, GenerationStats, Generator, SamplingParams

log = logging.getLogger("powerinfer.server")


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is at its bound."""


class RequestTimeout(Exception):
    """The request ran past its deadline (waiting in the queue included)."""


class RequestCancelled(Exception):
    """The client went away (or the server is shutting down) before the request finished."""


@dataclass
class EngineRequest:
    """One generation job. `emit` receives each `Chunk` (the last one has `finish_reason`), or one
    exception (`RequestTimeout`, `RequestCancelled`, `PowerInferError`, or an unexpected error) that ends
    the request. Exactly one terminal item is emitted per submitted request."""

    ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: list[str]
    deadline: float  # time.monotonic() value
    emit: Callable[[Chunk | BaseException], None]
    stats: GenerationStats = field(default_factory=GenerationStats)
    cancelled: bool = False


@dataclass
class _Slot:
    generator: Generator
    request: EngineRequest | None = None
    stream: Iterator[Chunk] | None = None


class Engine:
    """A bounded queue of requests feeding `len(generators)` decode slots, run by one worker thread."""

    def __init__(self, generators: list[Generator], queue_size: int):
        if not generators:
            raise PowerInferError("the engine needs at least one generator")
        if queue_size < 0:
            raise PowerInferError(f"queue size must be >= 0, got {queue_size}")
        self.generators = generators
        self.tokenizer = generators[0].tokenizer
        self.context = generators[0].context
        self.queue_size = queue_size
        self._slots = [_Slot(g) for g in generators]
        self._pending: deque[EngineRequest] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.counters = {"completed": 0, "cancelled": 0, "timed_out": 0, "rejected": 0, "failed": 0}

    # -- called from the server's threads -----------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            self._stopping = False
        self._thread = threading.Thread(target=self._run, name="powerinfer-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish the worker; requests still waiting or running end with `RequestCancelled`."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def submit(self, request: EngineRequest) -> None:
        """Queue `request`; raises `QueueFull` when every slot is busy and `queue_size` are waiting."""
        with self._cond:
            if self._stopping or self._thread is None:
                raise RequestCancelled("the server is shutting down")
            free = sum(s.request is None for s in self._slots)
            if len(self._pending) >= free + self.queue_size:
                self.counters["rejected"] += 1
                raise QueueFull(f"{len(self._slots)} slots busy and {self.queue_size} requests waiting")
            self._pending.append(request)
            self._cond.notify()

    def cancel(self, request: EngineRequest) -> None:
        """Stop `request` at its next turn and free its slot (a no-op once it has finished)."""
        request.cancelled = True
        with self._cond:
            self._cond.notify()

    def snapshot(self) -> dict:
        with self._cond:
            return {"slots": len(self._slots), "active": sum(s.request is not None for s in self._slots),
                    "queued": len(self._pending), **self.counters}

    # -- the worker thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._pending and not self._busy_slots():
                    self._cond.wait()
                if self._stopping:
                    break
                self._admit()
                busy = self._busy_slots()
            for slot in busy:  # one token each, round-robin
                self._advance(slot)
        self._shut_down()

    def _busy_slots(self) -> list[_Slot]:
        return [s for s in self._slots if s.request is not None]

    def _admit(self) -> None:
        """Drop waiting requests that were cancelled or timed out; move the rest into free slots."""
        now = time.monotonic()
        for request in list(self._pending):
            if request.cancelled:
                self._pending.remove(request)
                self.counters["cancelled"] += 1
                request.emit(RequestCancelled("the client disconnected"))
            elif now > request.deadline:
                self._pending.remove(request)
                self.counters["timed_out"] += 1
                request.emit(RequestTimeout("the request timed out while waiting for a free slot"))
        for slot in self._slots:
            if slot.request is None and self._pending:
                request = self._pending.popleft()
                slot.request = request
                slot.stream = slot.generator.stream(request.ids, request.max_tokens, request.sampling,
                                                    request.stop, request.stats)

    def _advance(self, slot: _Slot) -> None:
        request = slot.request
        if request.cancelled:
            self._release(slot, "cancelled", RequestCancelled("the client disconnected"))
            return
        if time.monotonic() > request.deadline:
            self._release(slot, "timed_out", RequestTimeout(
                f"the request timed out after {request.stats.generated_tokens} generated tokens"))
            return
        try:
            chunk = next(slot.stream)  # the first call prefills the prompt
        except PowerInferError as e:
            self._release(slot, "failed", e)
            return
        except Exception as e:  # a bug: fail this request, keep serving the others
            log.exception("generation failed")
            self._release(slot, "failed", e)
            return
        if chunk.finish_reason is not None:
            self._release(slot, "completed", chunk)
        else:
            request.emit(chunk)

    def _release(self, slot: _Slot, outcome: str, last: Chunk | BaseException) -> None:
        """Free the slot before the last item goes out, so a client that sees its request end also
        sees the slot free."""
        request, stream = slot.request, slot.stream
        stream.close()
        with self._cond:
            slot.request = slot.stream = None
            self.counters[outcome] += 1
        request.emit(last)

    def _shut_down(self) -> None:
        for slot in self._busy_slots():
            self._release(slot, "cancelled", RequestCancelled("the server is shutting down"))
        with self._cond:
            pending, self._pending = list(self._pending), deque()
        for request in pending:
            request.emit(RequestCancelled("the server is shutting down"))


def build_engine(load: Callable[[], Generator], parallel: int = 4, queue_size: int = 64) -> Engine:
    """The one place the server's engine is made: `load()` returns the first slot's generator (whatever
    `powerinfer.load` returns); the other `parallel - 1` slots are generators of the same class over the
    same loaded model, each allocating its own KV cache."""
    if parallel < 1:
        raise PowerInferError(f"--parallel must be >= 1, got {parallel}")
    first = load()
    siblings = [type(first)(first.loaded, first.context, cuda_graphs=first.use_graphs)
                for _ in range(parallel - 1)]
    return Engine([first, *siblings], queue_size)
