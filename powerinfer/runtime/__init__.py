"""The online half: KV cache, sampling, generation (and, in later modules, the sparse executors)."""

from powerinfer.runtime.generate import Chunk, Completion, GenerationStats, Generator
from powerinfer.runtime.kv_cache import KVCache
from powerinfer.runtime.sampling import Sampler, SamplingParams

__all__ = ["Chunk", "Completion", "GenerationStats", "Generator", "KVCache", "Sampler", "SamplingParams"]
