"""The streaming core through real gunicorn, with each worker class."""

from __future__ import annotations

import json
import select
import socket

import pytest
import requests

from streaming.providers.demo import answer_tokens

from .conftest import WORKER_CLASSES, wait_for
from .streams import read_raw, read_sse

JSON = {"Content-Type": "application/json"}
TRICKY = 'line one\n\nline three\rafter a CR data: x\r\n: not a comment\nid: 7 😀 中文 🇫🇷 \u2028 end'


@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
def test_sse_streams_token_by_token(serve, worker_class):
    server = serve(worker_class, DEMO_TOKENS_PER_S=40, DEMO_TOKENS=30)
    got = read_sse(server.url + "/chat/sse", json_body={"prompt": "hello"})

    kinds = [e["type"] for e in got.events]
    assert kinds[:2] == ["start", "status"] and kinds[-1] == "done"
    assert set(kinds[2:-1]) == {"delta"}
    start, done = got.events[0], got.events[-1]
    assert got.text.startswith('This is turn 1. You said: "hello".')
    assert done["usage"]["completion_tokens"] == 30 and done["finish_reason"] == "stop"
    assert done["usage"]["total_tokens"] == done["usage"]["prompt_tokens"] + 30  # as /v1's usage
    # ids are <message_id>:<seq>, in order; the first frame carries `retry`.
    assert [i.split(":")[0] for i in got.ids] == [start["message_id"]] * len(got.ids)
    seqs = [int(i.split(":")[1]) for i in got.ids]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert got.retry == "3000"
    # At 40 tokens/s the 30 tokens come into being over 0.75 s. Whatever is waiting when the
    # server writes goes out as one merged delta, so many separate deltas mean they went out as
    # they were made, not in one buffered lump at the end.
    assert len(got.of("delta")) >= 10
    # And tokens reach the client while the model is still mid-answer: this one goes silent after
    # three tokens (no heartbeats either), so a server that held them back would send nothing.
    hanging = serve(worker_class, DEMO_HANG_AFTER=3, IDLE_TIMEOUT_S=600, HEARTBEAT_S=600)
    early = read_sse(hanging.url + "/chat/sse", json_body={"prompt": "hello"},
                     until=lambda got: got.text == "This is turn")
    assert early.events[-1]["type"] == "delta"


def test_the_demo_says_it_follows_the_system_prompt(serve):
    """So that a user can see the system prompt was sent, with each turn of the conversation."""
    server = serve(DEMO_TOKENS=5)
    first = server.post("/chat/blocking", json={"prompt": "hi", "system": "be brief"}).json()
    assert first["text"] == 'This is turn 1. You said: "hi". I follow the system prompt: "be brief".'
    second = server.post("/chat/blocking", json={"prompt": "再说", "conversation_id": first["conversation_id"]}).json()
    assert second["text"] == "这是第 2 轮对话。你说：「再说」。我遵循系统提示：「be brief」。"
    long = server.post("/chat/blocking", json={"prompt": "hi", "system": "s" * 500}).json()["text"]
    assert long.endswith(f' I follow the system prompt: "{"s" * 80}…".')
    plain = server.post("/chat/blocking", json={"prompt": "hi"}).json()["text"]
    assert plain.startswith('This is turn 1. You said: "hi".') and "system" not in plain


@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
def test_tricky_text_survives_every_framing(serve, worker_class):
    server = serve(worker_class)
    got = read_sse(server.url + "/chat/sse", json_body={"prompt": TRICKY})
    assert f"「{TRICKY}」" in got.text  # the demo answers a prompt holding Chinese in Chinese

    response = requests.post(server.url + "/chat", json={"prompt": TRICKY}, timeout=30)
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert f"「{TRICKY}」" in response.content.decode("utf-8")
    assert response.headers["X-Conversation-Id"] and response.headers["X-Message-Id"]
    assert response.headers["Cache-Control"] == "no-cache" and response.headers["X-Accel-Buffering"] == "no"

    chinese = "用中文解释生成器"
    response = requests.get(server.url + "/chat", params={"prompt": chinese}, stream=True, timeout=30)
    pieces = [chunk for chunk in response.iter_content(chunk_size=None)]
    assert "".join(p.decode("utf-8") for p in pieces).startswith(f"这是第 1 轮对话。你说：「{chinese}」。")


@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
def test_text_stream_arrives_in_pieces(serve, worker_class):
    server = serve(worker_class, DEMO_TOKENS_PER_S=40, DEMO_TOKENS=30)
    response, chunks = read_raw(server.url + "/chat", json={"prompt": "hi"})
    assert response.status_code == 200
    body = b"".join(c for _, c in chunks)
    assert b'This is turn 1. You said: "hi".' in body
    assert len(chunks) >= 10  # many separate writes reached the socket, not one buffered lump


@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
def test_heartbeats_while_the_model_is_slow(serve, worker_class):
    server = serve(worker_class, DEMO_TTFT_MS=1200, HEARTBEAT_S=0.2, DEMO_TOKENS=5)
    response, chunks = read_raw(server.url + "/chat/sse", json={"prompt": "hi"})
    body = b"".join(c for _, c in chunks).decode()
    before_first_token = body.split("event: delta")[0]
    assert before_first_token.count(": ping\n\n") >= 2
    assert "event: done" in body.split("event: delta")[-1]


@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
def test_first_token_timeout(serve, worker_class):
    server = serve(worker_class, DEMO_TTFT_MS=30_000, FIRST_TOKEN_TIMEOUT_S=0.5, HEARTBEAT_S=0.2)
    got = read_sse(server.url + "/chat/sse", json_body={"prompt": "hi"})
    assert got.events[-1]["type"] == "error"
    assert got.events[-1]["error"]["code"] == "upstream_timeout"
    assert not got.of("delta")


@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
def test_idle_timeout_mid_stream(serve, worker_class):
    server = serve(worker_class, DEMO_HANG_AFTER=3, IDLE_TIMEOUT_S=0.5, HEARTBEAT_S=0.2)
    got = read_sse(server.url + "/chat/sse", json_body={"prompt": "hi"})
    assert got.text == "This is turn"
    assert got.events[-1]["error"]["code"] == "upstream_timeout"
    response = requests.post(server.url + "/chat", json={"prompt": "hi"}, timeout=30)
    assert response.text.startswith("This is turn\n[error] upstream_timeout: ")


@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
def test_max_stream_time(serve, worker_class):
    server = serve(worker_class, DEMO_TOKENS_PER_S=20, DEMO_TOKENS=200, MAX_STREAM_S=0.6, HEARTBEAT_S=0.2)
    got = read_sse(server.url + "/chat/sse", json_body={"prompt": "hi"})
    assert 0 < len(got.of("delta")) < 200
    assert got.events[-1]["error"]["code"] == "upstream_timeout"


@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
def test_model_failure_mid_stream(serve, worker_class):
    server = serve(worker_class, DEMO_FAIL_AFTER=4)
    got = read_sse(server.url + "/chat/sse", json_body={"prompt": "hi"})
    assert got.text == "This is turn 1."
    assert got.events[-1] == {**got.events[-1], "type": "error"}
    assert got.events[-1]["error"]["code"] == "upstream_error"
    text = requests.post(server.url + "/chat", json={"prompt": "hi"}, timeout=30).text
    assert text == "This is turn 1.\n[error] upstream_error: the demo model failed after 4 tokens\n"
    assert "Traceback" not in text


@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
def test_blocking_answer(serve, worker_class):
    server = serve(worker_class, DEMO_TOKENS=12)
    body = server.post("/chat/blocking", json={"prompt": "whole", "max_tokens": 5}).json()
    assert body["text"] == "This is turn 1. You"
    assert body["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 5
    assert {"conversation_id", "message_id", "ttft_ms", "duration_ms"} <= set(body)


@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
@pytest.mark.parametrize("path", ["/chat/blocking", "/v1/chat/completions"])
def test_whole_answer_stops_when_its_client_leaves(serve, worker_class, path):
    """A client that gives up on a whole answer does not leave the model writing for nobody."""
    server = serve(worker_class, DEMO_TOKENS=1000, DEMO_TOKENS_PER_S=20, HEARTBEAT_S=0.2)
    body = {"messages": [{"role": "user", "content": "slow"}]} if path.startswith("/v1") else {"prompt": "slow"}
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(server.url + path, json=body, timeout=(5, 0.5))

    def ended() -> dict | None:  # (a worker's first /v1 request may begin its answer after the client left)
        conversations = server.get("/conversations").json()["conversations"]
        if not conversations:
            return None
        turn = server.get(f"/conversations/{conversations[0]['id']}").json()["messages"][-1]
        return turn if turn["status"] != "streaming" else None

    turn = wait_for(ended, what="the answer to be stopped")
    assert (turn["status"], turn["error_code"]) == ("interrupted", "interrupted")
    wait_for(lambda: server.get("/healthz").json()["streams_in_flight"] == 0, what="no stream left in flight")
    whole = "".join(answer_tokens("slow", 1, 1000))  # what the demo would have said to the end
    assert turn["content"] and whole.startswith(turn["content"]) and turn["content"] != whole


@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
def test_bad_input_is_a_json_4xx(serve, worker_class):
    server = serve(worker_class, MAX_PROMPT_CHARS=50, MAX_BODY_BYTES=2000)
    cases = [
        ("GET", "/chat/sse", {"params": {}}, 400),
        ("GET", "/chat", {"params": {"prompt": ""}}, 400),
        ("POST", "/chat", {"json": {"prompt": "x" * 51}}, 400),
        ("POST", "/chat/sse", {"json": {"prompt": 5}}, 400),
        ("POST", "/chat/sse", {"json": {"prompt": "hi", "max_tokens": "many"}}, 400),
        ("GET", "/chat/sse", {"params": {"prompt": "hi", "temperature": "hot"}}, 400),
        ("POST", "/chat/sse", {"json": {"prompt": "hi", "temperature": 9}}, 400),
        ("POST", "/chat/sse", {"json": {"prompt": "hi", "top_k": 3}}, 400),
        ("POST", "/chat/sse", {"data": "{not json", "headers": JSON}, 400),
        ("POST", "/chat/sse", {"json": ["a list"]}, 400),
        ("POST", "/chat/blocking", {"data": '{"prompt": "\\ud800"}', "headers": JSON}, 400),
        ("POST", "/chat/sse", {"json": {"prompt": "x" * 3000}}, 413),
        ("GET", "/chat/sse", {"params": {"prompt": "hi", "conversation_id": "nope"}}, 404),
        ("POST", "/chat/sse", {"json": {"prompt": "hi", "max_tokens": "5"}}, 400),  # a string in JSON
        ("GET", "/chat/sse", {"params": {"prompt": "hi", "max_tokens": "1_0"}}, 400),  # int() would take it
        ("POST", "/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": "hi"}],
                                                   "temperature": "0.5"}}, 400),
        ("POST", "/chat", {"json": {"prompt": "hi", "history": [{"role": "user", "content": "x"}]}}, 400),
        ("POST", "/batch", {"json": {"prompts": ["a"], "prompt": "b"}}, 400),
        ("GET", "/chat/blocking", {"params": {"prompt": "hi"}}, 405),
        ("PUT", "/chat", {}, 405),
    ]
    for method, path, kwargs, status in cases:
        response = requests.request(method, server.url + path, timeout=30, **kwargs)
        assert response.status_code == status, (path, kwargs, response.text)
        assert response.headers["Content-Type"] == "application/json"
        error = response.json()["error"]
        assert error["code"] and error["message"], error
        assert "Traceback" not in response.text
        if status == 405:
            assert method not in response.headers["Allow"] and "POST" in response.headers["Allow"]
    # A chunked body (no Content-Length) over MAX_BODY_BYTES is a 413 too, not a body cut short.
    for path in ("/chat/sse", "/v1/chat/completions"):
        chunked = requests.post(server.url + path, data=iter([b'{"prompt": "', b"x" * 3000, b'"}']), headers=JSON,
                                timeout=30)
        assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "body_too_large", chunked.text
    fits = requests.post(server.url + "/chat/blocking", data=iter([b'{"prompt": ', b'"chunked"}']), headers=JSON,
                         timeout=30)
    assert fits.status_code == 200 and 'You said: "chunked"' in fits.json()["text"]
    # A batch's error names the prompt it is about.
    batch = requests.post(server.url + "/batch", json={"prompts": ["a", "b", "", "c"]}, timeout=30)
    assert batch.json()["error"]["message"] == "prompts[2]: 'prompt' is required and must not be empty"
    # A request line over gunicorn's default 4094 bytes reaches the app (not gunicorn's HTML 414).
    long_get = requests.get(server.url + "/chat", params={"prompt": "a" * 6000}, timeout=30)
    assert long_get.status_code == 400 and "longer than 50 characters" in long_get.json()["error"]["message"]
    # A chunked body whose first chunk is shorter than its size line says: gunicorn's read fails.
    broken = (b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
              b"Transfer-Encoding: chunked\r\n\r\n10\r\n{\"prompt\":\"chun\r\n4\r\nked\"\r\n1\r\n}\r\n0\r\n\r\n")
    with socket.create_connection(server.url.removeprefix("http://").split(":"), timeout=30) as sock:
        sock.sendall(broken)
        reply = b"".join(iter(lambda: sock.recv(65536), b""))
    assert reply.startswith(b"HTTP/1.1 400 "), reply
    assert b'"code":"invalid_request"' in reply


@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
def test_disconnect_stops_the_answer(serve, worker_class):
    """A client that leaves mid-answer stops generation, and the turn is kept as interrupted."""
    server = serve(worker_class, DEMO_TOKENS_PER_S=50, DEMO_TOKENS=5000, HEARTBEAT_S=0.2)
    got = read_sse(server.url + "/chat/sse", json_body={"prompt": "long"}, until=lambda got: len(got.of("delta")) >= 3)
    conversation_id = got.events[0]["conversation_id"]

    def stored_turn():
        turn = server.get(f"/conversations/{conversation_id}").json()["messages"][-1]
        return turn if turn["status"] != "streaming" else None

    turn = wait_for(stored_turn, what="the interrupted turn to be saved")
    assert turn["status"] == "interrupted"
    assert turn["content"].startswith("This is turn") and len(turn["content"]) < 5000
    wait_for(lambda: server.get("/healthz").json()["streams_in_flight"] == 0, what="no stream left in flight")


@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
def test_silent_disconnect_is_noticed(serve, worker_class):
    """Even while the model is silent and nothing is written, a client that leaves is noticed."""
    server = serve(worker_class, DEMO_HANG_AFTER=2, HEARTBEAT_S=0.2, IDLE_TIMEOUT_S=600)
    for path in ("/chat", "/chat/sse"):
        with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) as sock:
            body = json.dumps({"prompt": "x"}).encode()
            sock.sendall(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode() + body
            )
            received = b""
            while b"This is" not in received:
                received += sock.recv(4096)
        wait_for(lambda: server.get("/healthz").json()["streams_in_flight"] == 0, what="the answer to stop")


def test_gthread_workers_share_the_streams(serve):
    """A gthread worker takes no more streams than its threads can run (and a few idle
    connections): the others wait in the listen backlog for whichever worker is free, not in
    the queue of a busy one while another worker's threads sit idle."""
    server = serve("gthread", WEB_CONCURRENCY=2, THREADS=2, DEMO_HANG_AFTER=1, IDLE_TIMEOUT_S=600)
    port = int(server.url.rsplit(":", 1)[1])
    clients = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(24)]
    try:
        for client in clients:
            client.sendall(b"GET /chat?prompt=hold HTTP/1.1\r\nHost: test\r\n\r\n")

        def answered() -> int:
            return len(select.select(clients, [], [], 0)[0])

        wait_for(lambda: answered() == 4, what="both workers' two threads to start a stream each")
    finally:
        for client in clients:
            client.close()
