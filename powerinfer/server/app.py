"""The HTTP layer: an ASGI app (FastAPI on Starlette, served by uvicorn) in front of the `Engine`.

Handlers never run the model: they validate, tokenize (in a thread-pool thread, so a long prompt does not
stall the event loop), submit to the engine and relay what it emits, either as one JSON body or as
server-sent events (`data: {...}` lines ending with `data: [DONE]`, as the OpenAI API streams). A client
that goes away is noticed while it waits, not only when the next token is sent, and its slot is freed.
Every failure is answered with the OpenAI error object and a 4xx/5xx status; none leaves a connection hung.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import socket
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import ClientDisconnect
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from powerinfer.errors import PowerInferError
from powerinfer.runtime import Chunk, SamplingParams
from powerinfer.server import protocol
from powerinfer.server.engine import Engine, EngineRequest, QueueFull, RequestCancelled, RequestTimeout
from powerinfer.server.protocol import APIError, ChatCompletionRequest, CompletionRequest

MAX_BODY_BYTES = 1 << 20
MODEL_ALIAS = "default"


@dataclass
class ServerConfig:
    model_id: str
    api_key: str | None = None
    request_timeout: float = 300.0  # seconds from arrival to the last token, queueing included
    max_body_bytes: int = MAX_BODY_BYTES


def model_id_for(path: str | Path) -> str:
    """The id `/v1/models` lists: a GGUF file's stem or a model directory's name."""
    path = Path(path)
    return path.name if path.is_dir() else path.stem


def create_app(engine: Engine, config: ServerConfig) -> FastAPI:
    """The app; it starts the engine's worker when it starts serving and stops it on shutdown."""

    @asynccontextmanager
    async def lifespan(_app):
        engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(engine.stop)

    app = FastAPI(title="powerinfer", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    if config.api_key is not None:
        app.add_middleware(_RequireApiKey, api_key=config.api_key)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(_request, e: APIError):
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return _error_response(APIError(e.status_code, str(e.detail), code=code))

    @app.exception_handler(Exception)
    async def unexpected_error(_request, e: Exception):
        return _error_response(APIError(500, f"internal error: {type(e).__name__}", type="server_error"))

    async def read_body(http: Request) -> bytes:
        return await _read_body(http, config.max_body_bytes, config.request_timeout)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": config.model_id, **engine.snapshot()}

    @app.get("/v1/models")
    async def list_models():
        ids = dict.fromkeys([config.model_id, MODEL_ALIAS])
        return {"object": "list", "data": [protocol.model_card(i, created) for i in ids]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        _check_model(model_id, config.model_id)
        return protocol.model_card(model_id, created)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request):
        request = protocol.parse(ChatCompletionRequest, await read_body(http))
        _check_model(request.model, config.model_id)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content}
                    for m in request.messages]
        ids = await run_in_threadpool(_encode_chat, engine, messages)
        max_tokens = request.max_completion_tokens or request.max_tokens
        return await _serve(http, engine, config, request, ids, max_tokens, "messages", chat=True)

    @app.post("/v1/completions")
    async def completions(http: Request):
        request = protocol.parse(CompletionRequest, await read_body(http))
        _check_model(request.model, config.model_id)
        ids = await run_in_threadpool(_encode_prompt, engine, request.prompt)
        return await _serve(http, engine, config, request, ids, request.max_tokens, "prompt", chat=False)

    return app


# -- request handling ----------------------------------------------------------------------------------
def _check_model(requested: str, model_id: str) -> None:
    if requested not in (model_id, MODEL_ALIAS):
        raise APIError(404, f"the model {requested[:100]!r} does not exist; this server serves '{model_id}' "
                            f"(alias '{MODEL_ALIAS}')", param="model", code="model_not_found")


async def _read_body(http: Request, limit: int, timeout: float) -> bytes:
    """The body, refused when over `limit` bytes or when the client takes over `timeout` s to send it."""
    too_large = APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    declared = http.headers.get("content-length")
    if declared is not None and int(declared) > limit:  # the HTTP parser has checked it is a number
        raise too_large
    body = bytearray()
    try:
        with anyio.fail_after(timeout):
            async for piece in http.stream():
                body += piece
                if len(body) > limit:
                    raise too_large
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout:g} s",
                       code="request_timeout") from None
    except ClientDisconnect:  # nobody will read the answer; end the request quietly
        raise APIError(400, "the client disconnected while sending the body") from None
    return bytes(body)


def _encode_chat(engine: Engine, messages: list[dict]) -> list[int]:
    try:
        text = engine.tokenizer.apply_chat_template(messages)
    except PowerInferError as e:  # the model's template refused the conversation
        raise APIError(400, str(e), param="messages", code="invalid_value") from None
    return engine.tokenizer.encode(text, add_bos=False)


def _encode_prompt(engine: Engine, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        return engine.tokenizer.encode(prompt)
    vocab = engine.tokenizer.vocab_size
    bad = next((t for t in prompt if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"prompt: token id {bad} is outside the vocabulary (0..{vocab - 1})",
                       param="prompt", code="invalid_value")
    return prompt


def _budget(engine: Engine, ids: list[int], max_tokens: int | None, prompt_param: str) -> int:
    """The number of tokens to generate, or a 400 when the prompt (plus `max_tokens`) overflows."""
    room = engine.context - len(ids)
    if not ids:
        raise APIError(400, f"{prompt_param}: the prompt is empty", param=prompt_param, code="invalid_value")
    if room < 1:
        raise APIError(400, f"the prompt has {len(ids)} tokens but the context holds {engine.context}; "
                            "shorten it", param=prompt_param, code="context_length_exceeded")
    if max_tokens is not None and max_tokens > room:
        raise APIError(400, f"max_tokens={max_tokens} does not fit: the prompt has {len(ids)} tokens and "
                            f"the context holds {engine.context}, so at most {room} can be generated",
                       param="max_tokens", code="context_length_exceeded")
    return max_tokens or room


def _sampling(request) -> SamplingParams:
    greedy = request.temperature == 0 or request.top_p == 0  # top_p 0 keeps only the top token
    return SamplingParams(temperature=0.0 if greedy else request.temperature, top_k=max(request.top_k, 0),
                          top_p=1.0 if greedy else request.top_p, seed=request.seed)


def _engine_error(e: BaseException) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, RequestTimeout):
        return APIError(504, str(e), type="timeout_error", code="request_timeout")
    if isinstance(e, RequestCancelled):
        return APIError(503, str(e), type="server_error", code="cancelled")
    if isinstance(e, PowerInferError):
        return APIError(400, str(e), code="invalid_value")
    return APIError(500, f"internal error: {type(e).__name__}", type="server_error")


async def _serve(http: Request, engine: Engine, config: ServerConfig, request, ids: list[int],
                 max_tokens: int | None, prompt_param: str, chat: bool):
    """Submit one validated request to the engine; answer with JSON or an event stream."""
    budget = _budget(engine, ids, max_tokens, prompt_param)
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[Chunk | BaseException] = asyncio.Queue()

    def emit(item):  # runs on the engine thread
        try:
            loop.call_soon_threadsafe(items.put_nowait, item)
        except RuntimeError:  # the event loop has closed: nobody is waiting any more
            pass

    job = EngineRequest(ids, budget, _sampling(request), request.stop or [],
                        time.monotonic() + config.request_timeout, emit)
    try:
        engine.submit(job)
    except QueueFull as e:
        raise APIError(429, f"the server is busy ({e}); retry later", type="rate_limit_error",
                       code="queue_full") from None
    except RequestCancelled as e:
        raise _engine_error(e) from None

    id_ = protocol.new_id("chatcmpl" if chat else "cmpl")
    model = config.model_id
    if request.stream:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        events = _chat_events if chat else _completion_events
        return _EventStream(events(items, job, id_, model, include_usage), on_close=lambda: engine.cancel(job))

    watcher = asyncio.create_task(_until_disconnect(http.receive))
    watcher.add_done_callback(lambda task: task.cancelled() or engine.cancel(job))
    try:
        pieces = []
        while True:
            item = await items.get()
            if isinstance(item, BaseException):
                raise _engine_error(item)
            pieces.append(item.text)
            if item.finish_reason is not None:
                break
    finally:
        watcher.cancel()
        engine.cancel(job)
    usage = protocol.usage(job.stats.prompt_tokens, job.stats.generated_tokens)
    text = "".join(pieces)
    if chat:
        return protocol.chat_completion(id_, model, text, item.finish_reason, usage)
    return protocol.text_completion(id_, model, text, item.finish_reason, usage)


async def _until_disconnect(receive) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _relay(items: asyncio.Queue) -> AsyncIterator[Chunk | APIError]:
    """The engine's items for one request, ending after the last chunk or at the first error."""
    while True:
        item = await items.get()
        if isinstance(item, BaseException):
            yield _engine_error(item)
            return
        yield item
        if item.finish_reason is not None:
            return


async def _chat_events(items, job: EngineRequest, id_: str, model: str, include_usage: bool):
    yield _sse(protocol.chat_chunk(id_, model, {"role": "assistant", "content": ""}))
    async for item in _relay(items):
        if isinstance(item, APIError):
            yield _sse(item.body())  # the OpenAI clients raise this as an APIError
            return
        if item.text:
            yield _sse(protocol.chat_chunk(id_, model, {"content": item.text}))
        if item.finish_reason is not None:
            yield _sse(protocol.chat_chunk(id_, model, {}, item.finish_reason))
    if include_usage:
        usage = protocol.usage(job.stats.prompt_tokens, job.stats.generated_tokens)
        yield _sse(protocol.usage_chunk(id_, model, "chat.completion.chunk", usage))
    yield _sse("[DONE]")


async def _completion_events(items, job: EngineRequest, id_: str, model: str, include_usage: bool):
    async for item in _relay(items):
        if isinstance(item, APIError):
            yield _sse(item.body())
            return
        if item.text or item.finish_reason is not None:
            yield _sse(protocol.text_completion(id_, model, item.text, item.finish_reason, None))
    if include_usage:
        usage = protocol.usage(job.stats.prompt_tokens, job.stats.generated_tokens)
        yield _sse(protocol.usage_chunk(id_, model, "text_completion", usage))
    yield _sse("[DONE]")


class _EventStream(StreamingResponse):
    """A server-sent event stream that listens for the client going away (even while nothing is being
    sent, e.g. while its request waits for a slot) and calls `on_close` however the stream ends."""

    media_type = "text/event-stream"

    def __init__(self, content, on_close: Callable[[], None]):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as group:
                async def stream_then_stop():
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client disconnected mid-send
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(stream_then_stop)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            self.on_close()


def _error_response(e: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


class _RequireApiKey:
    """ASGI middleware: every route but `/health` needs `Authorization: Bearer <key>`."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                message = ("missing API key: send the header 'Authorization: Bearer <key>'" if not given
                           else "invalid API key")
                await _error_response(APIError(401, message, code="invalid_api_key"))(scope, receive, send)
                return
        await self.app(scope, receive, send)


# -- running -----------------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) (port 0: any free port), or a one-line error."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise PowerInferError(f"cannot resolve --host {host!r}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise PowerInferError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def make_server(app: FastAPI, sock: socket.socket, log_level: str = "info"):
    """A uvicorn server for `app` on the bound `sock`; call `.run(sockets=[sock])`."""
    import uvicorn

    host, port = sock.getsockname()[:2]
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                                         timeout_graceful_shutdown=5))
