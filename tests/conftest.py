"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest

import powerinfer  # noqa: F401  (before any test module imports torch: it sets GOMP_SPINCOUNT)


@pytest.fixture(scope="session")
def tiny_relu_model():
    """Directory of the tiny ReLU model (Hugging Face format), trained on first use and cached.

    See `powerinfer.offline.tiny`: a 4-layer d=256 LLaMA with ReGLU FFNs trained on WikiText-2 validation;
    the cache is `.cache/tiny-relu/` at the repository root, or `$POWERINFER_CACHE/tiny-relu/`.
    """
    from powerinfer.offline.tiny import ensure_tiny_relu_model

    return ensure_tiny_relu_model()


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module of tiny-model tests: avoids OpenMP oversubscription on shared CI
    cores (10x slower when loaded)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
