"""Load test of `powerinfer serve`: many concurrent streaming clients on loopback, bounded in count and time.

Starts the real server (`python -m powerinfer serve`, a subprocess on 127.0.0.1 and a free port), then runs
`--clients` asyncio clients that each send `--requests` streaming `/v1/completions` requests one after
another (greedy, `--max-tokens` each, usage included). Every request must end with `data: [DONE]`, carry
no error event and report the right token count ("length" with exactly `--max-tokens` tokens, or "stop" at
an end-of-sequence token within that budget); afterwards `/health` must show the server idle, no failures.
Reports requests/s, generated tokens/s, latency and time-to-first-token percentiles (queueing included:
with more clients than `--parallel` slots, requests wait for a slot), and the same for one lone client
sending `--baseline-requests` requests first, as the single-stream reference.

    python benchmarks/bench_server.py --json benchmarks/results/server_load_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Openings of ordinary prose, so a greedy continuation rarely ends within a few tokens.
PROMPTS = ["The history of the city begins", "In the spring of that year, the army", "The river flows",
           "Scientists have long studied", "The old house at the end of the street", "During the war, the",
           "The album was recorded in", "Farmers in the region grow"]


SERVER_LOG: deque[str] = deque(maxlen=20)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def start_server(args) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "powerinfer", "serve", "--port", "0", "--ctx", str(args.ctx),
               "--parallel", str(args.parallel), "--queue-size", str(args.clients),
               "--request-timeout", str(args.time_limit), "--log-level", "warning"]
    if args.threads:
        command += ["--threads", str(args.threads)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=REPO)
    line = process.stderr.readline()
    match = re.search(r" at (http://127\.0\.0\.1:\d+)/v1", line)
    if not match:
        process.kill()
        raise SystemExit(f"the server did not start: {line.strip()} {process.stderr.read()[-2000:]}")
    # keep reading the server's log, so a full pipe never blocks it; the tail goes into a failure message
    threading.Thread(target=SERVER_LOG.extend, args=(process.stderr,), daemon=True).start()
    return process, match.group(1)


async def one_request(http: httpx.AsyncClient, prompt: str, max_tokens: int) -> dict:
    body = {"model": "default", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = finish = usage = error = None
    done = False
    async with http.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            return {"error": f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"}
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]["message"]
                break
            if event["choices"]:
                choice = event["choices"][0]
                if first is None and choice["text"]:
                    first = time.perf_counter()
                finish = choice["finish_reason"] or finish
            if event.get("usage"):
                usage = event["usage"]
    end = time.perf_counter()
    if error or not done or usage is None:
        return {"error": error or "the stream ended without [DONE] and usage"}
    tokens = usage["completion_tokens"]
    if not ((finish == "length" and tokens == max_tokens) or (finish == "stop" and tokens <= max_tokens)):
        return {"error": f"finish_reason {finish!r} with {tokens} tokens (max_tokens {max_tokens})"}
    return {"latency": end - start, "ttft": (first or end) - start, "tokens": tokens, "finish": finish}


async def client(http, index: int, requests: int, max_tokens: int) -> list[dict]:
    results = []
    for k in range(requests):
        prompt = f"{PROMPTS[(index + k) % len(PROMPTS)]} (part {index * requests + k})"
        results.append(await one_request(http, prompt, max_tokens))
    return results


async def load(base: str, args, clients: int, requests: int) -> tuple[list[dict], float]:
    """`clients` concurrent clients, each sending `requests` requests in turn; (results, wall seconds)."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=args.time_limit, limits=limits) as http:
        start = time.perf_counter()
        per_client = await asyncio.wait_for(
            asyncio.gather(*(client(http, i, requests, args.max_tokens) for i in range(clients))),
            timeout=args.time_limit)
        return [r for rs in per_client for r in rs], time.perf_counter() - start


def summary(results: list[dict], wall: float) -> dict:
    ok = [r for r in results if "error" not in r]
    latencies, ttfts = [r["latency"] for r in ok], [r["ttft"] for r in ok]
    tokens = sum(r["tokens"] for r in ok)
    out = {"requests": len(results), "errors": len(results) - len(ok),
           "error_samples": [r["error"] for r in results if "error" in r][:5],
           "finish_reasons": {f: sum(r["finish"] == f for r in ok) for f in ("length", "stop")},
           "wall_s": round(wall, 3), "requests_per_s": round(len(ok) / wall, 3),
           "generated_tokens": tokens, "generated_tokens_per_s": round(tokens / wall, 2)}
    if ok:
        out["latency_s"] = {"p50": round(statistics.median(latencies), 3),
                            "p99": round(percentile(latencies, 99), 3), "max": round(max(latencies), 3)}
        out["ttft_s"] = {"p50": round(statistics.median(ttfts), 3), "p99": round(percentile(ttfts, 99), 3),
                         "max": round(max(ttfts), 3)}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=8, help="requests per client, one after another")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--baseline-requests", type=int, default=4,
                   help="requests one lone client sends first, for single-stream latency and tokens/s")
    p.add_argument("--parallel", type=int, default=4, help="server decode slots")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--threads", type=int, default=None, help="server CPU threads (default: all cores)")
    p.add_argument("--time-limit", type=float, default=900.0, help="seconds before the run counts as failed")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    load_before = os.getloadavg()
    process, base = start_server(args)
    try:
        httpx.post(f"{base}/v1/completions", json={"model": "default", "prompt": "Hello", "max_tokens": 2},
                   timeout=120).raise_for_status()  # warm-up, not measured
        baseline = summary(*asyncio.run(load(base, args, 1, args.baseline_requests)))
        loaded = summary(*asyncio.run(load(base, args, args.clients, args.requests)))
        status = httpx.get(f"{base}/health", timeout=10).json()
    finally:
        process.terminate()
        process.wait(timeout=60)

    healthy = status["status"] == "ok" and status["active"] == 0 and status["queued"] == 0 \
        and status["failed"] == 0 and status["rejected"] == 0
    result = {
        **environment("cpu"),
        "benchmark": "server_load",
        "model": status["model"],
        "parameters": {"clients": args.clients, "requests_per_client": args.requests,
                       "max_tokens": args.max_tokens, "parallel": args.parallel, "ctx": args.ctx,
                       "server_threads": args.threads, "endpoint": "/v1/completions", "stream": True,
                       "temperature": 0, "host": "127.0.0.1", "baseline_requests": args.baseline_requests},
        "load_average_before": [round(x, 2) for x in load_before],
        "load": loaded,
        "single_client_baseline": baseline,
        "server_healthy_after": healthy, "health_after": status,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        write_json(args.json, result)
    errors = loaded["errors"] + baseline["errors"]
    if errors or not healthy:
        raise SystemExit(f"FAILED: {errors} errors, server healthy after: {healthy}; server log tail:\n"
                         + "".join(SERVER_LOG))


if __name__ == "__main__":
    main()
