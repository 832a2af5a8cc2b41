"""`stream_response()` in a host app of its own, under real gunicorn with each worker class."""

from __future__ import annotations

import json
import os
import socket

import pytest
import requests

from .conftest import ROOT, WORKER_CLASSES, free_port, start_gunicorn, wait_for
from .streams import read_sse


@pytest.fixture(scope="module", params=WORKER_CLASSES)
def host(request, tmp_path_factory):
    """The tests' host app (tests/stream_apps.py) under one worker class; its marker directory."""
    tmp = tmp_path_factory.mktemp(request.param)
    port = free_port()
    # Run from tests/, away from the service's gunicorn.conf.py (gunicorn reads one in its cwd).
    env = {**os.environ, "MARKER_DIR": str(tmp), "WORKER_CLASS": request.param, "PYTHONPATH": str(ROOT)}
    args = ["-k", request.param, "--no-control-socket", "--threads", "4", "-b", f"127.0.0.1:{port}", "stream_apps:app"]
    server = start_gunicorn(tmp, args, port, env, cwd=ROOT / "tests")
    yield server, tmp
    server.stop()


def ndjson(body: bytes) -> list[dict]:
    return [json.loads(line) for line in body.decode().splitlines()]


def test_a_plain_generator_streams_in_each_framing(host):
    server, _ = host
    got = read_sse(server.url + "/slow?id=sse", method="GET")
    kinds = [e["type"] for e in got.events]
    assert kinds[:2] == ["start", "status"] and set(kinds[2:-1]) == {"delta"}  # deltas may be merged
    assert got.text == "Hello, world\n\ndata: x"  # line breaks and a fake field stay inside the JSON
    assert got.events[-1]["type"] == "done" and got.events[-1]["finish_reason"] == "stop"
    assert got.retry is not None and got.ids[0].endswith(":0")

    response = requests.get(server.url + "/slow?framing=ndjson&id=nd", timeout=30)
    assert response.headers["Content-Type"] == "application/x-ndjson"
    events = ndjson(response.content)
    assert "".join(e["text"] for e in events if e["type"] == "delta") == "Hello, world\n\ndata: x"
    assert events[-1]["type"] == "done"

    response = requests.get(server.url + "/slow?framing=text&id=tx", timeout=30)
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert response.text == "Hello, world\n\ndata: x"


def test_heartbeats_while_the_generator_is_slow(host):
    server, _ = host
    response = requests.get(server.url + "/slow?first_s=1&id=hb", stream=True, timeout=30)
    reads = [chunk for chunk in response.raw.stream(65536, decode_content=False) if chunk]
    body = b"".join(reads)
    before_first_word = body[: body.index(b"event: delta")]  # its first word, maybe merged with the next
    assert before_first_word.count(b": ping\n\n") >= 2  # 1 s of silence, a heartbeat each 0.2 s
    assert body.endswith(b"\n\n") and b"event: done" in body


def test_the_generator_is_closed_when_the_client_leaves(host):
    server, markers = host
    # Under gevent even a pause in one long call is cut short; a thread is interrupted at its
    # next Python instruction, so there the pause is a short one (but longer than a heartbeat).
    pause_s = 60 if server.env["WORKER_CLASS"] == "gevent" else 0.5
    for path in (f"/slow?gap_s={pause_s}&id=gone", "/blocked?id=gone"):
        sock = socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        seen = b""
        while b"event: delta" not in seen:
            seen += sock.recv(65536)
        sock.close()  # in the middle of the generator's pause, or of a next() that never returns
        name = path[1:].split("?")[0]
        wait_for(lambda name=name: (markers / f"{name}-gone").exists(), what=f"{name}'s finally to run")


def test_an_exception_ends_the_stream_with_an_error_event(host):
    server, _ = host
    got = read_sse(server.url + "/fails", method="GET")
    assert got.text == "one"
    error = got.events[-1]
    assert error["type"] == "error" and error["error"]["code"] == "internal_error"
    assert "SECRET" not in json.dumps(error) and "Traceback" not in json.dumps(error)
    assert read_sse(server.url + "/fails?own=1", method="GET").events[-1]["error"] == {
        "code": "quota", "message": "you are out of tokens"}
    text = requests.get(server.url + "/fails?framing=text", timeout=30).text
    assert text.startswith("one\n[error] internal_error:") and "SECRET" not in text
    assert "SECRET-DETAIL" in server.log.read_text()  # the server's log says what failed


def test_typed_events_and_the_first_token_deadline(host):
    server, _ = host
    got = read_sse(server.url + "/events", method="GET")
    assert [(e["type"], e.get("stage") or e.get("text") or e.get("arguments")) for e in got.events[1:-1]] == [
        ("status", "thinking"), ("status", "searching"), ("reasoning", "let me think"), ("delta", "plain text"),
        ("tool_call_delta", '{"q": '), ("tool_call_delta", '"x"}'), ("tool_call", '{"q": "x"}')]
    assert (got.of("tool_call")[0]["id"], got.of("tool_call")[0]["name"]) == ("call_1", "look_up")
    assert got.events[-1]["finish_reason"] == "length"
    got = read_sse(server.url + "/silent", method="GET")
    assert got.events[-1]["error"]["code"] == "upstream_timeout"
