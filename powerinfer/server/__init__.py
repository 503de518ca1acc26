"""An OpenAI-compatible HTTP server over the runtime (`powerinfer serve`).

`engine`: a request queue and one worker thread interleaving decode steps of several requests, each in its
own KV cache slot; `protocol`: request validation and OpenAI response shapes; `app`: the ASGI app
(FastAPI + uvicorn, imported only when serving: `pip install 'powerinfer[server]'`).
"""

from powerinfer.server.engine import Engine, EngineRequest, build_engine

__all__ = ["Engine", "EngineRequest", "build_engine"]
