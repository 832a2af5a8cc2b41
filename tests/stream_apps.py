"""A host app of the tests' own: routes that return `stream_response()` over plain generators.

Each generator notes in MARKER_DIR that its `finally` ran, as `<name>-<id>`, so that a test can
see the generator closed after its client left."""

from __future__ import annotations

import os
import time
from pathlib import Path

from flask import Flask, request

from streaming import stream_response
from streaming.providers.base import ProviderError

app = Flask(__name__)
MARKERS = Path(os.environ.get("MARKER_DIR", "."))


def noted(name: str):
    def finished() -> None:
        (MARKERS / f"{name}-{request_id}").touch()

    request_id = request.args.get("id", "0")
    return finished


@app.get("/healthz")
def healthz():
    return "ok"


@app.get("/slow")
def slow():
    """The tutorial's generator: a pause before each word."""
    done = noted("slow")

    def words():
        try:
            time.sleep(float(request.args.get("first_s", "0")))
            for word in ["Hello", ",", " world", "\n\n", "data: x"]:
                yield word
                time.sleep(float(request.args.get("gap_s", "0")))
        finally:
            done()

    return stream_response(words(), request.args.get("framing", "sse"), heartbeat_s=0.2)


@app.get("/blocked")
def blocked():
    """One word, then a `next()` that never returns."""
    done = noted("blocked")

    def words():
        try:
            yield "first"
            while True:
                time.sleep(0.02)
        finally:
            done()

    return stream_response(words(), request.args.get("framing", "sse"), heartbeat_s=0.2)


@app.get("/fails")
def fails():
    def words():
        yield "one"
        if request.args.get("own"):
            raise ProviderError("quota", "you are out of tokens", 429)
        raise RuntimeError("SECRET-DETAIL")

    return stream_response(words(), request.args.get("framing", "sse"))


@app.get("/events")
def events():
    def typed():
        yield {"type": "status", "stage": "searching"}
        yield {"type": "reasoning", "text": "let me think"}
        yield "plain "
        yield {"type": "delta", "text": "text"}
        yield {"type": "tool_call_delta", "index": 0, "id": "call_1", "name": "look_up", "arguments": '{"q": '}
        yield {"type": "tool_call_delta", "index": 0, "arguments": '"x"}'}
        yield {"type": "done", "finish_reason": "length"}

    return stream_response(typed())


@app.get("/silent")
def silent():
    def nothing():
        time.sleep(30)
        yield "late"

    return stream_response(nothing(), first_token_timeout_s=0.3, heartbeat_s=0.1)
