"""The OpenAI-compatible server, run for real (uvicorn on a free loopback port, the default SmolLM2 model on
the CPU in float32) and driven by the official `openai` client and by raw HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from powerinfer.loading import load_model  # noqa: E402
from powerinfer.runtime import Generator, SamplingParams  # noqa: E402
from powerinfer.server import build_engine  # noqa: E402
from powerinfer.server.app import ServerConfig, bind_socket, create_app, make_server, model_id_for  # noqa: E402

CTX = 512
REPO = Path(__file__).resolve().parents[1]
ERROR_KEYS = {"message", "type", "param", "code"}
GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def loaded():
    return load_model(None, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def golden(loaded):
    """A generator of its own, run only while the servers are idle (one thread on the model at a time)."""
    return Generator(loaded, CTX)


@contextmanager
def running_server(loaded, parallel=4, queue_size=8, api_key=None, request_timeout=120.0):
    engine = build_engine(lambda: Generator(loaded, CTX), parallel, queue_size)
    config = ServerConfig(model_id=model_id_for(loaded.checkpoint.path), api_key=api_key,
                          request_timeout=request_timeout)
    sock = bind_socket("127.0.0.1", 0)
    server = make_server(create_app(engine, config), sock, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive()


@pytest.fixture(scope="module")
def url(loaded):
    with running_server(loaded) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def health(base: str) -> dict:
    response = httpx.get(f"{base}/health", timeout=10)
    assert response.status_code == 200
    return response.json()


def wait_for(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the server"
        time.sleep(0.05)


def assert_error(response, status: int, code: str | None = None, param: str | None = None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == ERROR_KEYS and isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


def chat_ids(golden, content: str) -> list[int]:
    tokenizer = golden.tokenizer
    return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": content}]), add_bos=False)


# -- the API, happy paths -----------------------------------------------------------------------------
def test_models_and_health(client, url, loaded):
    model_id = model_id_for(loaded.checkpoint.path)
    assert model_id == "SmolLM2-135M-Instruct.Q4_1"
    assert {m.id for m in client.models.list().data} == {model_id, "default"}
    assert client.models.retrieve("default").id == "default"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    status = health(url)
    assert status["status"] == "ok" and status["model"] == model_id and status["slots"] == 4


def test_chat_greedy_matches_generator(client, golden):
    question = "What is the capital of France?"
    ids = chat_ids(golden, question)
    expected = golden.generate(ids, max_tokens=12, sampling=GREEDY)
    reply = client.chat.completions.create(model="default", temperature=0, max_tokens=12,
                                           messages=[{"role": "user", "content": question}])
    assert reply.object == "chat.completion" and reply.model == "SmolLM2-135M-Instruct.Q4_1"
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == expected.stats.finish_reason
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.usage.completion_tokens == expected.stats.generated_tokens
    assert reply.usage.total_tokens == len(ids) + expected.stats.generated_tokens


def test_completion_greedy_length_and_usage(client, golden):
    prompt = "The history of the Roman Empire"
    ids = golden.tokenizer.encode(prompt)
    expected = golden.generate(ids, max_tokens=6, sampling=GREEDY)
    assert expected.stats.finish_reason == "length"
    reply = client.completions.create(model="SmolLM2-135M-Instruct.Q4_1", prompt=prompt, max_tokens=6,
                                      temperature=0)
    assert reply.choices[0].text == expected.text
    assert reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), 6)
    by_ids = client.completions.create(model="default", prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == expected.text


def test_stop_string_ends_with_finish_reason_stop(client, golden):
    prompt = "The history of the Roman Empire"
    full = golden.generate(prompt, max_tokens=12, sampling=GREEDY).text
    stop = full.split()[3]  # a word in the middle of the greedy continuation
    reply = client.completions.create(model="default", prompt=prompt, max_tokens=12, temperature=0, stop=[stop])
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].text == full[:full.index(stop)]
    assert reply.usage.completion_tokens < 12


def test_chat_stream_matches_non_stream(client, golden):
    question = "Name three colours."
    ids = chat_ids(golden, question)
    expected = golden.generate(ids, max_tokens=10, sampling=GREEDY)
    stream = client.chat.completions.create(model="default", temperature=0, max_tokens=10, stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": question}])
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == expected.text
    assert finishes == [expected.stats.finish_reason]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == len(ids)
    assert chunks[-1].usage.completion_tokens == expected.stats.generated_tokens


def test_message_forms_and_seeded_sampling(client):
    plain = client.chat.completions.create(
        model="default", max_tokens=1, temperature=0,
        messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi there"}])
    parts = client.chat.completions.create(
        model="default", max_tokens=1, temperature=0,
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}])
    assert plain.usage.prompt_tokens == parts.usage.prompt_tokens  # developer = system; parts joined
    runs = [client.completions.create(model="default", prompt="Once upon a time", max_tokens=8,
                                      temperature=1.0, top_p=0.9, seed=1234).choices[0].text for _ in range(2)]
    assert runs[0] == runs[1]


# -- bad input: an OpenAI-style 4xx, and the server keeps serving ----------------------------------------
CHAT = {"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": "default", "prompt": "hi", "max_tokens": 2}
BAD_REQUESTS = [
    ("chat", b"{not json", 400, "invalid_json", None),
    ("chat", b"[1, 2]", 400, None, None),
    ("chat", b"", 400, "invalid_json", None),
    ("chat", b'{"model": "default", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400,
     None, "temperature"),
    ("chat", {"messages": CHAT["messages"]}, 400, None, "model"),
    ("chat", {**CHAT, "model": "gpt-4o"}, 404, "model_not_found", "model"),
    ("chat", {**CHAT, "messages": []}, 400, None, "messages"),
    ("chat", {**CHAT, "messages": "hi"}, 400, None, "messages"),
    ("chat", {**CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, 400, None, "messages"),
    ("chat", {**CHAT, "messages": [{"role": "user", "content": 5}]}, 400, None, "messages"),
    ("chat", {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, None, "messages"),
    ("chat", {**CHAT, "max_tokens": "2"}, 400, None, "max_tokens"),
    ("chat", {**CHAT, "max_tokens": 0}, 400, None, "max_tokens"),
    ("chat", {**CHAT, "max_tokens": -5}, 400, None, "max_tokens"),
    ("chat", {**CHAT, "max_tokens": 10 ** 30}, 400, "context_length_exceeded", "max_tokens"),
    ("chat", {**CHAT, "max_completion_tokens": CTX}, 400, "context_length_exceeded", "max_tokens"),
    ("chat", {**CHAT, "temperature": "hot"}, 400, None, "temperature"),
    ("chat", {**CHAT, "temperature": 3.5}, 400, None, "temperature"),
    ("chat", {**CHAT, "top_p": 1.5}, 400, None, "top_p"),
    ("chat", {**CHAT, "seed": 2 ** 70}, 400, None, "seed"),
    ("chat", {**CHAT, "stream": "yes"}, 400, None, "stream"),
    ("chat", {**CHAT, "stop": 7}, 400, None, "stop"),
    ("chat", {**CHAT, "stop": ["x"] * 50}, 400, None, "stop"),
    ("chat", {**CHAT, "n": 3}, 400, "unsupported_parameter", "n"),
    ("chat", {**CHAT, "tools": [{"type": "function"}]}, 400, "unsupported_parameter", "tools"),
    ("chat", {**CHAT, "messages": [{"role": "user", "content": "word " * (CTX + 50)}]}, 400,
     "context_length_exceeded", "messages"),
    ("completion", {**COMPLETION, "prompt": "word " * (CTX + 50)}, 400, "context_length_exceeded", "prompt"),
    ("completion", {**COMPLETION, "prompt": ""}, 400, None, "prompt"),
    ("completion", {**COMPLETION, "prompt": [1, 10 ** 9]}, 400, None, "prompt"),
    ("completion", {**COMPLETION, "prompt": ["a", "b"]}, 400, None, "prompt"),
    ("completion", {**COMPLETION, "prompt": {"text": "hi"}}, 400, None, "prompt"),
    ("completion", {**COMPLETION, "echo": True}, 400, "unsupported_parameter", "echo"),
]
PATHS = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}


@pytest.mark.parametrize("endpoint,body,status,code,param", BAD_REQUESTS)
def test_bad_request_gets_openai_error(url, endpoint, body, status, code, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(url + PATHS[endpoint], content=content, headers={"Content-Type": "application/json"},
                          timeout=30)
    assert_error(response, status, code, param)
    assert health(url)["status"] == "ok"


def test_oversized_body_unknown_route_and_method(url):
    huge = json.dumps({**COMPLETION, "prompt": "a" * (2 << 20)}).encode()
    assert_error(httpx.post(url + "/v1/completions", content=huge, timeout=30), 413, "request_too_large")

    def chunked():  # no Content-Length: the limit is enforced while reading
        yield b'{"model": "default", "prompt": "'
        for _ in range(40):
            yield b"a" * (64 << 10)
        yield b'"}'
    assert_error(httpx.post(url + "/v1/completions", content=chunked(), timeout=30), 413, "request_too_large")
    assert_error(httpx.get(url + "/v1/nothing-here", timeout=10), 404, "not_found")
    assert_error(httpx.get(url + "/v1/chat/completions", timeout=10), 405)
    assert health(url)["active"] == 0


def test_openai_client_maps_errors(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="default", prompt="hi", max_tokens=-1)


# -- auth ----------------------------------------------------------------------------------------------
def test_api_key(loaded):
    with running_server(loaded, parallel=1, api_key="s3cret") as base:
        assert httpx.get(f"{base}/health").status_code == 200
        error = assert_error(httpx.get(f"{base}/v1/models"), 401, "invalid_api_key")
        assert "Authorization" in error["message"]
        assert_error(httpx.post(f"{base}/v1/completions", json=COMPLETION,
                                headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{base}/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="default", prompt="hi", max_tokens=2).usage.completion_tokens >= 1


# -- concurrency -------------------------------------------------------------------------------------------
def test_concurrent_streams_interleave_and_match_serial_output(url, golden):
    prompts = ["The ocean is", "My favourite food is", "In 1492,", "Python is a", "The moon", "Winter brings"]
    expected = [golden.generate(p, max_tokens=8, sampling=GREEDY).text for p in prompts]

    async def one(client, prompt):
        first = None
        pieces = []
        stream = await client.completions.create(model="default", prompt=prompt, max_tokens=8, temperature=0,
                                                 stream=True)
        async for chunk in stream:
            first = first or time.monotonic()
            pieces.append(chunk.choices[0].text)
        return "".join(pieces), first, time.monotonic()

    async def all_at_once():
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        return await asyncio.gather(*(one(client, p) for p in prompts))

    results = asyncio.run(all_at_once())
    assert [text for text, _, _ in results] == expected  # each slot's KV cache is its own
    first_done = min(done for _, _, done in results)
    assert sum(first < first_done for _, first, _ in results) >= 2  # decode steps were interleaved
    status = health(url)
    assert status["active"] == 0 and status["queued"] == 0


def test_disconnect_frees_slot(url):
    before = health(url)["cancelled"]
    body = {"model": "default", "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        events = (line for line in response.iter_lines() if line.startswith("data: "))
        for _ in range(3):
            next(events)
        assert health(url)["active"] == 1
    wait_for(lambda: health(url)["active"] == 0, timeout=5)
    assert health(url)["cancelled"] == before + 1

    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
        httpx.post(f"{url}/v1/completions", json={**body, "stream": False}, timeout=1.0)
    wait_for(lambda: health(url)["active"] == 0, timeout=5)
    assert health(url)["cancelled"] == before + 2


def test_queue_full_answers_429(loaded):
    long = {"model": "default", "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0}
    with running_server(loaded, parallel=1, queue_size=1) as base:
        async def scenario():
            async with httpx.AsyncClient(base_url=base, timeout=60) as http:
                async with http.stream("POST", "/v1/completions", json={**long, "stream": True}) as running:
                    lines = running.aiter_lines()
                    while not (await lines.__anext__()).startswith("data: "):
                        pass
                    waiting = asyncio.create_task(http.post("/v1/completions", json=long))
                    while (await http.get("/health")).json()["queued"] < 1:
                        await asyncio.sleep(0.05)
                    assert_error(await http.post("/v1/completions", json=long), 429, "queue_full")
                    with pytest.raises(openai.RateLimitError):
                        await openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0) \
                            .completions.create(**long)
                    waiting.cancel()  # a client leaving the queue frees its place too
            return (await asyncio.gather(waiting, return_exceptions=True))[0]

        assert isinstance(asyncio.run(scenario()), asyncio.CancelledError)
        wait_for(lambda: health(base)["active"] == 0 and health(base)["queued"] == 0, timeout=5)
        status = health(base)
        assert status["rejected"] == 2 and status["cancelled"] == 2
        ok = httpx.post(f"{base}/v1/completions", json={**long, "max_tokens": 2}, timeout=60)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_request_timeout(loaded):
    long = {"model": "default", "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0}
    with running_server(loaded, parallel=1, request_timeout=1.0) as base:
        assert_error(httpx.post(f"{base}/v1/completions", json=long, timeout=60), 504, "request_timeout")
        with httpx.stream("POST", f"{base}/v1/completions", json={**long, "stream": True}, timeout=60) as r:
            data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert json.loads(data[-1])["error"]["code"] == "request_timeout"
        status = health(base)
        assert status["timed_out"] == 2 and status["active"] == 0
        with socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])), timeout=30) as slow:
            slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            answer = b""  # the rest of the body never comes; the server answers and closes
            while piece := slow.recv(4096):
                answer += piece
        answer = answer.decode()
        assert answer.startswith("HTTP/1.1 408") and '"request_timeout"' in answer
        assert health(base)["status"] == "ok"


# -- the command line ----------------------------------------------------------------------------------
def test_cli_serve_subprocess():
    env = {**os.environ, "PYTHONPATH": str(REPO), "POWERINFER_API_KEY": "k"}
    process = subprocess.Popen(
        [sys.executable, "-m", "powerinfer", "serve", "--port", "0", "--ctx", "256", "--parallel", "1",
         "--model-name", "tiny", "--log-level", "warning"],
        stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        line = process.stderr.readline()
        assert " at http://127.0.0.1:" in line, line
        base = line.split(" at ")[1].split()[0]
        client = openai.OpenAI(base_url=base, api_key="k", max_retries=0)
        assert {m.id for m in client.models.list().data} == {"tiny", "default"}
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=3, temperature=0)
        assert reply.usage.completion_tokens >= 1
        port = base.rsplit(":", 1)[1].split("/")[0]
        taken = subprocess.run([sys.executable, "-m", "powerinfer", "serve", "--port", port],
                               capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
        assert taken.returncode == 1
        assert taken.stderr.strip().count("\n") == 0 and "cannot listen" in taken.stderr
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    assert process.returncode == 130 and "Traceback" not in err
