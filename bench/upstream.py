"""A local OpenAI-format upstream on aiohttp, for hundreds of paced streams from one process.

`python -m bench.upstream --port N`; pace from UPSTREAM_TOKENS_PER_S and UPSTREAM_TOKENS. Answers
`POST /v1/chat/completions` with `stream: true` as `chat.completion.chunk` frames (role, one
content token a frame, finish reason, usage when asked) and `data: [DONE]`. The first token goes
out at once, so a client's time to first token is the relay's own latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

from aiohttp import web

RATE = float(os.environ.get("UPSTREAM_TOKENS_PER_S", "50"))
TOKENS = int(os.environ.get("UPSTREAM_TOKENS", "100"))


def chunk(base: dict, delta: dict, finish: str | None = None) -> bytes:
    body = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


async def completions(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    tokens = min(TOKENS, body.get("max_tokens") or TOKENS)
    base = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": body.get("model", "bench"),
    }
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(chunk(base, {"role": "assistant", "content": ""}))
    start = time.monotonic()
    for i in range(tokens):
        delay = start + i / RATE - time.monotonic() if RATE > 0 else 0
        if delay > 0:
            await asyncio.sleep(delay)
        await response.write(chunk(base, {"content": f" tok{i}"}))
    await response.write(chunk(base, {}, "stop"))
    if (body.get("stream_options") or {}).get("include_usage"):
        usage = {"prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": tokens + 1}
        await response.write(b"data: " + json.dumps({**base, "choices": [], "usage": usage}).encode() + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_get("/healthz", healthz)
    web.run_app(app, host="127.0.0.1", port=parser.parse_args().port, backlog=4096, print=None, access_log=None)


if __name__ == "__main__":
    main()
