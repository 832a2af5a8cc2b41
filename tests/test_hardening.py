"""API keys, limits, metrics, the per-stream log line and graceful restarts, through real gunicorn."""

from __future__ import annotations

import hashlib
import json
import signal
import sqlite3
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from .conftest import wait_for
from .streams import read_sse

ALPHA, BETA = "sk-alpha-4f1c9e", "sk-beta-77d0aa"


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_keys_guard_every_endpoint_but_health(serve):
    server = serve(API_KEYS=f"{ALPHA}, {BETA}", METRICS_KEY="sk-prometheus")
    # Anyone may ask whether it is alive and wants keys (the page asks); its details take a key.
    assert server.get("/healthz").json() == {"status": "ok", "auth": "api_key"}
    assert server.get("/healthz", headers=bearer("sk-wrong")).json() == {"status": "ok", "auth": "api_key"}
    for key in (BETA, "sk-prometheus"):
        assert server.get("/healthz", headers=bearer(key)).json()["streams_in_flight"] == 0
        metrics = server.get("/metrics", headers=bearer(key))
        assert metrics.status_code == 200 and metrics.headers["Content-Type"].startswith("text/plain")
    assert server.post("/chat", json={"prompt": "x"}, headers=bearer("sk-prometheus")).status_code == 401
    for headers in ({}, bearer("sk-wrong"), {"Authorization": ALPHA}, {"Authorization": "Bearer "}):
        for method, path in (("POST", "/chat"), ("POST", "/chat/sse"), ("POST", "/chat/blocking"),
                             ("POST", "/batch"), ("GET", "/conversations"), ("GET", "/v1/models"),
                             ("GET", "/metrics")):
            response = requests.request(method, server.url + path, json={"prompt": "x"}, headers=headers, timeout=10)
            assert response.status_code == 401, (path, headers)
            assert response.json()["error"]["code"] == "unauthorized"
            assert ALPHA not in response.text and BETA not in response.text
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    models = openai.OpenAI(base_url=server.url + "/v1", api_key=BETA, max_retries=0).models.list()
    assert [m.id for m in models] == ["demo"]


def test_conversations_belong_to_their_key(serve):
    server = serve(API_KEYS=f"{ALPHA},{BETA}")
    mine = read_sse(server.url + "/chat/sse", json_body={"prompt": "secret plan"}, headers=bearer(ALPHA))
    conversation_id = mine.events[0]["conversation_id"]
    assert server.get(f"/conversations/{conversation_id}", headers=bearer(ALPHA)).status_code == 200
    assert server.get(f"/conversations/{conversation_id}", headers=bearer(BETA)).status_code == 404
    assert server.get("/conversations", headers=bearer(BETA)).json()["conversations"] == []
    assert len(server.get("/conversations", headers=bearer(ALPHA)).json()["conversations"]) == 1
    theirs = server.post("/chat", json={"prompt": "x", "conversation_id": conversation_id}, headers=bearer(BETA))
    assert theirs.status_code == 404
    replay = requests.get(server.url + "/chat/sse", headers={**bearer(BETA), "Last-Event-ID": mine.ids[2]}, timeout=10)
    assert replay.status_code == 204
    assert requests.delete(f"{server.url}/conversations/{conversation_id}", headers=bearer(BETA),
                           timeout=10).status_code == 404
    assert server.get(f"/conversations/{conversation_id}", headers=bearer(ALPHA)).status_code == 200


def test_open_mode_and_request_ids_in_the_stream_log(serve):
    server = serve()
    assert server.get("/healthz").json()["auth"] == "open"
    response = server.post("/chat", json={"prompt": "logged"}, headers={"X-Request-Id": "req-42"})
    assert response.headers["X-Request-Id"] == "req-42"
    assert len(server.post("/chat", json={"prompt": "x"}).headers["X-Request-Id"]) == 32  # one is made

    def log_line():
        for line in server.log.read_text().splitlines():
            if line.startswith("{") and '"req-42"' in line:
                return json.loads(line)

    entry = wait_for(log_line, what="the stream's log line")
    assert entry["endpoint"] == "/chat" and entry["outcome"] == "complete"
    assert entry["conversation_id"] == response.headers["X-Conversation-Id"]
    assert entry["tokens"] == 60 and entry["duration_ms"] >= 0 and "ttft_ms" in entry


def test_log_carries_a_key_id_never_the_key(serve):
    server = serve(API_KEYS=ALPHA)
    server.post("/chat", json={"prompt": "x"}, headers={**bearer(ALPHA), "X-Request-Id": "keyed"})
    entry = wait_for(lambda: next((json.loads(line) for line in server.log.read_text().splitlines()
                                   if '"keyed"' in line), None), what="the log line")
    assert entry["key_id"] == hashlib.sha256(ALPHA.encode()).hexdigest()[:8]
    assert ALPHA not in server.log.read_text()


def hold_stream(server, **kwargs) -> requests.Response:
    """Open a stream that stays open (the demo hangs), once its first token has come."""
    response = requests.post(server.url + "/chat", json={"prompt": "hold"}, stream=True, timeout=30, **kwargs)
    assert response.status_code == 200
    # Read from the raw stream: a dropped `iter_content()` generator would close the connection.
    assert response.raw.read(4) == b"This"
    return response


def test_streams_per_worker_limit(serve):
    server = serve(MAX_STREAMS_PER_WORKER=2, DEMO_HANG_AFTER=1, IDLE_TIMEOUT_S=600, HEARTBEAT_S=0.2)
    held = [hold_stream(server), hold_stream(server)]
    refused = server.post("/chat/sse", json={"prompt": "one too many"})
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["code"] == "too_many_streams"
    held.pop().close()
    wait_for(lambda: server.get("/healthz").json()["streams_in_flight"] == 1, what="a stream to end")
    hold_stream(server).close()
    held[0].close()


def test_zero_means_no_stream_limit(serve):
    server = serve(MAX_STREAMS_PER_KEY=0, MAX_STREAMS_PER_WORKER=0, DEMO_HANG_AFTER=1, IDLE_TIMEOUT_S=600)
    held = [hold_stream(server) for _ in range(3)]
    assert server.get("/healthz").json()["streams_in_flight"] == 3
    for response in held:
        response.close()


def test_an_open_service_has_no_per_key_limit(serve):
    server = serve(MAX_STREAMS_PER_KEY=1, DEMO_HANG_AFTER=1, IDLE_TIMEOUT_S=600)
    held = [hold_stream(server) for _ in range(3)]  # three people without keys, not one key
    assert server.get("/healthz").json()["streams_in_flight"] == 3
    for response in held:
        response.close()


def test_streams_per_key_limit(serve):
    server = serve(API_KEYS=f"{ALPHA},{BETA}", MAX_STREAMS_PER_KEY=1, DEMO_HANG_AFTER=1, IDLE_TIMEOUT_S=600,
                   HEARTBEAT_S=0.2, WEB_CONCURRENCY=2)
    held = hold_stream(server, headers=bearer(ALPHA))
    refused = server.post("/chat", json={"prompt": "x"}, headers=bearer(ALPHA))
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    other = hold_stream(server, headers=bearer(BETA))
    other.close()
    held.close()
    wait_for(lambda: server.post("/chat/blocking", json={"prompt": "x", "max_tokens": 1},
                                 headers=bearer(ALPHA)).status_code == 200, what="the key's stream to end")


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_metrics_across_workers(serve):
    server = serve(WEB_CONCURRENCY=2, DEMO_FAIL_AFTER=50, DEMO_TOKENS=40, HEARTBEAT_S=0.2)
    for _ in range(6):
        read_sse(server.url + "/chat/sse", json_body={"prompt": "ok"})
    failing = read_sse(server.url + "/chat/sse", json_body={"prompt": "x", "max_tokens": 100})
    assert failing.events[-1]["type"] == "done"  # 40 tokens: the fault at 50 is never reached

    def settled():
        text = server.get("/metrics").text
        return text if metric(text, 'streams_finished_total{outcome="complete"}') == 7 else None

    text = wait_for(settled, what="the metrics of seven streams")
    assert metric(text, 'streams_started_total{endpoint="/chat/sse"}') == 7
    assert metric(text, "tokens_relayed_total") == 7 * 40
    assert metric(text, "stream_ttft_seconds_count") == 7
    assert metric(text, "streams_active") == 0


def test_metrics_count_errors_and_disconnects(serve):
    server = serve(DEMO_FAIL_AFTER=3, HEARTBEAT_S=0.2)
    read_sse(server.url + "/chat/sse", json_body={"prompt": "x"})
    text = wait_for(lambda: (t := server.get("/metrics").text) and 'upstream_errors_total{code="upstream_error"} 1.0'
                    in t and t, what="the error to be counted")
    assert metric(text, 'streams_finished_total{outcome="error"}') == 1


def test_metrics_count_the_heartbeats_of_a_batch(serve):
    server = serve(DEMO_HANG_AFTER=1, IDLE_TIMEOUT_S=1, HEARTBEAT_S=0.2)
    lines = [json.loads(line) for line in server.post("/batch", json={"prompts": ["a", "b"]}).iter_lines() if line]
    pings = sum(1 for line in lines if line["type"] == "ping")
    assert pings and lines[-1] == {"type": "batch_done", "ok": 0, "failed": 2}  # both timed out
    wait_for(lambda: metric(server.get("/metrics").text, "heartbeats_total") == pings, what="the pings counted")


def test_metrics_directory_is_removed_when_gunicorn_stops(serve, tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    server = serve(WEB_CONCURRENCY=2, TMPDIR=scratch)
    read_sse(server.url + "/chat/sse", json_body={"prompt": "ok"})
    assert "streams_started_total" in server.get("/metrics").text
    (made,) = scratch.glob("streaming-metrics-*")
    assert any(made.iterdir())  # the workers' samples
    server.stop()
    assert not made.exists()


def test_a_whole_answer_cut_by_a_restart_is_a_503_to_retry(serve):
    server = serve("gevent", GRACEFUL_TIMEOUT_S=4, DEMO_TOKENS_PER_S=20, DEMO_TOKENS=100_000)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(requests.post, server.url + "/chat/blocking", json={"prompt": "long"}, timeout=60)
        wait_for(lambda: server.get("/healthz").json()["streams_in_flight"] == 1, what="the answer to start")
        server.process.send_signal(signal.SIGTERM)
        response = pending.result()
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    assert response.json()["error"]["code"] == "shutdown"


@pytest.mark.parametrize("worker_class", ["sync", "gthread", "gevent"])
def test_sigterm_stops_an_idle_server_at_once(serve, worker_class):
    server = serve(worker_class, GRACEFUL_TIMEOUT_S=300)
    assert read_sse(server.url + "/chat/sse", json_body={"prompt": "before the restart"}).events[-1]["type"] == "done"
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=60) == 0  # not after the 300 s that streams would be given


@pytest.mark.parametrize("worker_class", ["sync", "gthread", "gevent"])
def test_sigterm_ends_running_streams_cleanly(serve, worker_class, tmp_path):
    db = tmp_path / "graceful.db"
    server = serve(worker_class, db=db, GRACEFUL_TIMEOUT_S=4, DEMO_TOKENS_PER_S=20, DEMO_TOKENS=100_000,
                   HEARTBEAT_S=0.2)
    response = requests.post(server.url + "/chat/sse", json={"prompt": "long"}, stream=True, timeout=30)
    lines = response.iter_lines(decode_unicode=True)
    next(line for line in lines if line == "event: delta")
    server.process.send_signal(signal.SIGTERM)
    rest = list(lines)
    error = json.loads(next(line for line in rest[::-1] if line.startswith("data: "))[6:])
    assert error["type"] == "error" and error["error"]["code"] == "shutdown"
    assert server.process.wait(timeout=30) == 0
    assert "was sent SIGKILL" not in server.log.read_text()
    with sqlite3.connect(db) as conn:
        status, content = conn.execute("SELECT status, content FROM messages WHERE role = 'assistant'").fetchone()
    assert status == "interrupted" and content.startswith('This is turn 1. You said: "long".')
