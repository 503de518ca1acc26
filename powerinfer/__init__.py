"""powerinfer: fast local LLM inference that exploits activation sparsity (PowerInfer, arXiv 2312.12456).

    import powerinfer
    llm = powerinfer.load()                      # the embedded SmolLM2-135M-Instruct
    print(llm.generate("The capital of France is", max_tokens=16).text)
    for chunk in llm.stream("Tell me a story"):  # streaming
        print(chunk.text, end="", flush=True)
"""

from powerinfer.errors import PowerInferError
from powerinfer.loading import load_model
from powerinfer.runtime import Generator, SamplingParams

__version__ = "0.1.0"


def load(model=None, device: str = "cpu", dtype=None, context: int | None = None,
         cuda_graphs: bool | None = None) -> Generator:
    """Load a model (GGUF file or Hugging Face directory; None: the default model) ready to generate."""
    return Generator(load_model(model, device=device, dtype=dtype), context=context, cuda_graphs=cuda_graphs)


__all__ = ["load", "load_model", "Generator", "SamplingParams", "PowerInferError", "__version__"]
