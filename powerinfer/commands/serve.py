"""`powerinfer serve`: an OpenAI-compatible HTTP API (chat, completions, streaming) for one model."""

from __future__ import annotations

import os
import sys

from powerinfer.commands._common import (add_model_arguments, load_generator, non_negative_int, port_number,
                                         positive_float, positive_int)
from powerinfer.errors import PowerInferError

HELP = "serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions)"


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=port_number, default=8000, help="TCP port (default: 8000; 0: any free port)")
    p.add_argument("--api-key", default=os.environ.get("POWERINFER_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health "
                        "(default: $POWERINFER_API_KEY; unset: no key)")
    p.add_argument("--parallel", type=positive_int, default=4,
                   help="requests decoded at once, each with its own KV cache (default: 4)")
    p.add_argument("--queue-size", type=non_negative_int, default=64,
                   help="requests that may wait for a free slot before new ones get 429 (default: 64)")
    p.add_argument("--request-timeout", type=positive_float, default=300.0,
                   help="seconds a request may take, waiting included, before it fails with 504 (default: 300)")
    p.add_argument("--model-name", default=None,
                   help="model id to serve under (default: the model file's stem or directory name)")
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="info")


def run(args) -> int:
    try:
        from powerinfer.server.app import ServerConfig, bind_socket, create_app, is_loopback, make_server
    except ImportError as e:
        raise PowerInferError(f"the server needs FastAPI and uvicorn ({e.name} is missing): "
                              "pip install 'powerinfer[server]'") from None
    from powerinfer.server import build_engine
    from powerinfer.server.app import model_id_for

    if args.api_key is not None and not args.api_key.strip():
        raise PowerInferError("--api-key is empty")
    sock = bind_socket(args.host, args.port)  # fail fast on a taken port, before loading the model
    if not is_loopback(args.host) and args.api_key is None:
        print(f"powerinfer serve: warning: listening on {args.host} without --api-key: anyone who can "
              "reach this port can use the model", file=sys.stderr)
    engine = build_engine(lambda: load_generator(args), args.parallel, args.queue_size)
    model_id = args.model_name or model_id_for(engine.generators[0].loaded.checkpoint.path)
    config = ServerConfig(model_id=model_id, api_key=args.api_key, request_timeout=args.request_timeout)
    server = make_server(create_app(engine, config), sock, args.log_level)
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    print(f"powerinfer serve: {model_id} at http://{url_host}:{port}/v1 ({args.parallel} slots, context "
          f"{engine.context} tokens)", file=sys.stderr, flush=True)
    server.run(sockets=[sock])
    return 0
