"""Generation: prefill, decode loop as a streaming generator, stop conditions, CUDA graphs.

Follows gpt-fast's shape: the cache is allocated once, the prompt is prefilled in large chunks, and each
decode step has static shapes, so on CUDA it is captured once in a CUDA graph and replayed per token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from powerinfer.errors import ContextOverflowError, PowerInferError
from powerinfer.loading import IncrementalDecoder, LoadedModel
from powerinfer.runtime.kv_cache import KVCache
from powerinfer.runtime.sampling import Sampler, SamplingParams
from powerinfer.runtime.segments import DecodeSegments, supports_segments

DEFAULT_CONTEXT = 2048
PREFILL_CHUNK = 512


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    finish_reason: str | None = None

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        # the first generated token comes out of prefill; the rest are decode steps
        steps = self.generated_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s else 0.0


@dataclass
class Chunk:
    """One step of a stream: new text (possibly empty while a stop string or UTF-8 char is pending)."""

    text: str
    token_id: int | None = None
    finish_reason: str | None = None  # "stop" (EOS or stop string) or "length"


@dataclass
class Completion:
    text: str
    tokens: list[int] = field(default_factory=list)
    stats: GenerationStats = field(default_factory=GenerationStats)


class Generator:
    """Runs one model for one sequence at a time with a static KV cache."""

    def __init__(self, loaded: LoadedModel, context: int | None = None, cuda_graphs: bool | None = None):
        self.loaded = loaded
        self.model, self.tokenizer, self.device = loaded.model, loaded.tokenizer, loaded.device
        args = loaded.args
        self.context = min(context or DEFAULT_CONTEXT, args.max_position_embeddings)
        if self.context < 2:
            raise PowerInferError(f"context must be at least 2 tokens, got {context}")
        make_cache = getattr(self.model, "make_cache", None)  # executors place each layer's cache
        self.cache = (make_cache(1, self.context) if make_cache else
                      KVCache.for_model(args, 1, self.context, loaded.dtype, self.device))
        self.eos_ids = set(self.tokenizer.eos_token_ids) | set(args.eos_token_ids)
        capturable = self.device.type == "cuda" and getattr(self.model, "supports_cuda_graphs", True)
        self.use_graphs = capturable if cuda_graphs is None else cuda_graphs and capturable
        # a hybrid step that leaves the GPU: CUDA graphs between the CPU's parts (runtime.segments)
        self.use_segments = cuda_graphs is not False and not capturable and supports_segments(self.model)
        self._graph = self._segments = None

    # -- model steps -------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> torch.Tensor:
        """Fill the cache with `ids` at positions 0..n-1; returns the last token's logits [1, V]."""
        logits = None
        for start in range(0, len(ids), PREFILL_CHUNK):
            chunk = ids[start:start + PREFILL_CHUNK]
            tokens = torch.tensor([chunk], device=self.device)
            positions = torch.arange(start, start + len(chunk), device=self.device)
            self.cache.set_window(start + len(chunk))
            logits = self.model(tokens, positions, self.cache, last_logits_only=True)
        return logits[:, -1]

    @torch.inference_mode()
    def decode_step(self, token: torch.Tensor, position: int) -> torch.Tensor:
        """token: [1] on device; writes the cache at `position`; returns logits [1, V]."""
        if self.use_graphs:
            if self._graph is None:
                self._capture()
            self._token.copy_(token.view(1, 1))
            self._position.fill_(position)
            self._graph.replay()
            return self._logits[:, -1].clone()  # the graph's output buffer is overwritten by the next replay
        if self.use_segments:
            if self._segments is None:
                self._warm_up()
                self._segments = DecodeSegments(self.model, self.cache)
            return self._segments.step(token, position)[:, -1]
        self.cache.set_window(position + 1)
        positions = torch.tensor([position], device=self.device)
        return self.model(token.view(1, 1), positions, self.cache)[:, -1]

    def _warm_up(self):
        """Static token/position buffers and two eager steps with them, as CUDA graph capture requires; the
        cache then attends over its whole (masked) length, a static shape."""
        self._token = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        self._position = torch.zeros(1, dtype=torch.long, device=self.device)
        self.cache.set_window(self.context)
        saved = [(k[:, :, 0].clone(), v[:, :, 0].clone()) for k, v in zip(self.cache.keys, self.cache.values)]
        counts = getattr(self.model, "counts", None)  # an executor's active-neuron counts: not for warm-ups
        saved_counts = counts.save() if counts is not None else None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.model(self._token, self._position, self.cache)
        torch.cuda.current_stream().wait_stream(stream)
        for (k, v), (k0, v0) in zip(zip(self.cache.keys, self.cache.values), saved):
            k[:, :, 0] = k0  # the warm-up wrote slot 0: restore it
            v[:, :, 0] = v0
        if counts is not None:
            counts.restore(saved_counts)

    def _capture(self):
        """Record one decode step; replays read the token and position from the static buffers."""
        self._warm_up()
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._logits = self.model(self._token, self._position, self.cache)

    # -- text in, text out -----------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[int], chat: bool = False) -> list[int]:
        if isinstance(prompt, list):
            return prompt
        if chat:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            return self.tokenizer.encode(text, add_bos=False)
        return self.tokenizer.encode(prompt)

    def stream(self, prompt: str | list[int], max_tokens: int = 256, sampling: SamplingParams | None = None,
               stop: list[str] | None = None, stats: GenerationStats | None = None,
               ignore_eos: bool = False) -> Iterator[Chunk]:
        """Yield text chunks as tokens are generated; the last chunk carries `finish_reason`.

        `ignore_eos` keeps generating past end-of-sequence tokens (for benchmarks)."""
        ids = self.encode_prompt(prompt)
        if not ids:
            raise PowerInferError("the prompt is empty")
        if len(ids) >= self.context:
            raise ContextOverflowError(
                f"the prompt has {len(ids)} tokens but the context holds {self.context} "
                f"(model maximum {self.loaded.args.max_position_embeddings}); shorten it or raise --ctx")
        if max_tokens < 1:
            raise PowerInferError(f"max_tokens must be >= 1, got {max_tokens}")
        stats = stats if stats is not None else GenerationStats()
        stats.prompt_tokens = len(ids)
        sampler = Sampler(sampling or SamplingParams(), self.device)
        budget = min(max_tokens, self.context - len(ids))
        texts = _StopMatcher(stop or [])
        decoder = IncrementalDecoder(self.tokenizer)

        start = time.perf_counter()
        token = sampler(self.prefill(ids))
        token_id = int(token)  # syncs: prefill time ends here
        stats.prefill_s = time.perf_counter() - start
        decode_start = time.perf_counter()
        position = len(ids)
        eos_ids = set() if ignore_eos else self.eos_ids
        while True:
            stats.generated_tokens += 1
            if token_id in eos_ids:
                stats.finish_reason = "stop"
                break
            text, stopped = texts.push(decoder.push(token_id))
            if stopped:
                stats.finish_reason = "stop"
                yield Chunk(text, token_id, "stop")
                break
            if stats.generated_tokens >= budget:
                stats.finish_reason = "length"
                yield Chunk(text + texts.flush(), token_id, "length")
                break
            yield Chunk(text, token_id)
            token = sampler(self.decode_step(token, position))
            token_id = int(token)
            position += 1
        stats.decode_s = time.perf_counter() - decode_start
        if stats.finish_reason == "stop" and token_id in eos_ids:
            yield Chunk(texts.flush(), None, "stop")

    def generate(self, prompt: str | list[int], max_tokens: int = 256, sampling: SamplingParams | None = None,
                 stop: list[str] | None = None, ignore_eos: bool = False) -> Completion:
        stats = GenerationStats()
        chunks = list(self.stream(prompt, max_tokens, sampling, stop, stats, ignore_eos))
        tokens = [c.token_id for c in chunks if c.token_id is not None]
        return Completion("".join(c.text for c in chunks), tokens, stats)


class _StopMatcher:
    """Holds back text that might be the start of a stop string; reports when one is completed."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])),
                   default=0)
        out, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
